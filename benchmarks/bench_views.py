"""View-generation speed vs one training step: view pairs/s for 2D 128^2 and 3D 64^3 patches, next to the pairs/s of
one forward+backward step of the default network (``medssl.networks.unet.UNet(size="small")`` on both views).

Run: ``python -m benchmarks.bench_views [--device cpu] [--batch 4] [--repeats 5]``; prints a Markdown table
(the numbers in ``docs/views.md`` come from it). Scans are synthetic smooth volumes written to a temporary folder.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from benchmarks.common import argument_parser, synchronise
from medssl.data.readers import save_image
from medssl.networks.unet import UNet
from medssl.report.markdown import markdown_table
from medssl.transforms.sampler import ViewPairSampler

MODULE = "benchmarks.bench_views"

CASES = {2: ((192, 176), (128, 128)), 3: ((96, 88, 80), (64, 64, 64))}  # scan shape, patch size (1 mm voxels)


def _scans(folder: Path, spatial_dims: int, shape: tuple[int, ...], count: int = 4) -> list[Path]:
    rng = np.random.default_rng(spatial_dims)
    paths = []
    for k in range(count):
        volume = rng.normal(size=shape)
        for axis in range(spatial_dims):
            volume = volume.cumsum(axis=axis)
        paths.append(save_image(volume.astype(np.float32), np.eye(spatial_dims + 1), folder / f"scan{k}.nii.gz"))
    return paths


def pairs_per_second(sampler: ViewPairSampler, batch: int, repeats: int) -> float:
    """View pairs per second after one warm-up batch (which loads the prepared scans into memory)."""
    sampler.sample(batch)
    synchronise(sampler.device)
    start = time.perf_counter()
    for _ in range(repeats):
        sampler.sample(batch)
    synchronise(sampler.device)
    return batch * repeats / (time.perf_counter() - start)


def network_pairs_per_second(spatial_dims: int, patch: tuple[int, ...], batch: int, repeats: int,
                             device: torch.device) -> float:
    """Pairs per second of forward+backward of UNet(size="small") on both views (2 x batch images)."""
    network = UNet(spatial_dims=spatial_dims, size="small").to(device)
    images = torch.rand((2 * batch, 1, *patch), device=device)
    network(images).mean().backward()
    synchronise(device)
    start = time.perf_counter()
    for _ in range(repeats):
        network.zero_grad()
        network(images).mean().backward()
    synchronise(device)
    return batch * repeats / (time.perf_counter() - start)


def measure(spatial_dims: Sequence[int] = (2, 3), device: str | torch.device = "cpu", batch: int = 4, repeats: int = 5,
            cases: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = CASES) -> list[dict]:
    """Rows ``{patch, what, pairs_s, scan_s}`` per dimension: each view preset's pairs/s (and its one-off
    preprocessing seconds per scan), then the network's; ``cases``: dims -> (scan shape, patch size)."""
    device = torch.device(device)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dims in spatial_dims:
            (shape, patch), name = cases[dims], "x".join(map(str, cases[dims][1]))
            paths = _scans(Path(folder) / f"{dims}d", dims, shape)
            for preset, guided in (("symmetric", False), ("raw_patch", True)):
                start = time.perf_counter()  # building the sampler prepares every scan (+ information map) once
                sampler = ViewPairSampler(paths, spatial_dims=dims, patch_size=patch, preset=preset,
                                          info_guided=guided, device=device, prepare_workers=1)
                per_scan_s = (time.perf_counter() - start) / len(paths)
                rows.append({"patch": f"{dims}D {name}", "what": f"{preset}{' + info' if guided else ''}",
                             "pairs_s": pairs_per_second(sampler, batch, repeats), "scan_s": per_scan_s})
            network = network_pairs_per_second(dims, patch, batch, max(1, repeats // 2), device)
            rows.append({"patch": f"{dims}D {name}", "what": "UNet small fwd+bwd (both views)", "pairs_s": network,
                         "scan_s": None})
    return rows


def format_rows(rows: list[dict]) -> str:
    return "\n".join(markdown_table(["patch", "what", "pairs/s", "preprocessing s/scan (once)"], [
        [r["patch"], r["what"], f"{r['pairs_s']:.1f}", "" if r["scan_s"] is None else f"{r['scan_s']:.2f}"]
        for r in rows]))


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(MODULE, __doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = measure((2, 3), args.device, args.batch, args.repeats)
    print(f"device {args.device}, batch {args.batch}, torch threads {torch.get_num_threads()}\n")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
