"""Pretraining at scale: peak memory of a fixed-length run on 24, 200 and 1000 demo scans, view pairs per second with
0, 1 and 2 DataLoader workers, and the time to prepare the cache per scan.

Run: ``python -m benchmarks.bench_scale --dim 2 [--sizes 24 200 1000] [--steps 20] [--distinct N] [--config NAME]
[--work bench/scale] [--out docs/benchmarks/scale_2d.md]``; prints a Markdown table (``docs/benchmarks.md`` quotes
it). Each set is the demo population of that many subjects (``medssl data demo``); with ``--distinct N`` only N
subjects are generated and the rest of a set are hard links to them under other names (a scan is prepared and held
per file, so memory and preparation time scale as with distinct scans; only the anatomy repeats). Every run is a
separate ``medssl pretrain`` process of the shipped ``infoguided_<D>d`` config on an already prepared cache; its
peak resident memory is the child's ``ru_maxrss``, once with the default in-memory budget (``data.cache_mb``) and
once with ``data.cache_mb=0`` (every scan read box by box from its memory map).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.common import ROOT, argument_parser, emit, log_progress
from medssl.data.demo import write_demo_dataset
from medssl.engine.pretrain import build_objectives, build_sampler, network_from_config, prepare_data
from medssl.engine.pretrain_config import pretrain_config_from_dict, read_pretrain_config
from medssl.config import find_config, to_dict
from medssl.report.markdown import markdown_table
from medssl.transforms.pair_loader import pair_batches
from medssl.transforms.prepared import DEFAULT_CACHE_MB

MODULE = "benchmarks.bench_scale"
log = logging.getLogger(MODULE)
_PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")  # kB on Linux


def demo_set(work: Path, dims: int, size: int, distinct: int) -> Path:
    """``size`` demo scans in ``work/set_<size>`` (the first ``distinct`` generated once, the rest hard links)."""
    source = work / f"demo_{dims}d_{distinct}"
    if not (source / "images").is_dir():
        write_demo_dataset(source, spatial_dims=dims, n_subjects=distinct, seed=0)
    images = sorted((source / "images").iterdir())
    folder = work / f"set_{dims}d_{size}"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(size):
        original = images[index % len(images)]
        target = folder / (original.name if index < len(images) else f"copy{index:04d}_{original.name}")
        if not target.exists():
            os.link(original, target)
    return folder


def peak_rss_mb(config: str, data: Path, cache: Path, run: Path, steps: int, cache_mb: float) -> tuple[float, float]:
    """``(peak resident MB, seconds)`` of a ``medssl pretrain`` process of ``steps`` steps on the prepared cache."""
    command = [sys.executable, "-m", "medssl", "pretrain", config, "--data", str(data), "--out", str(run),
               f"train.steps={steps}", "train.warmup_steps=0", f"train.checkpoint_every={steps}",
               f"data.cache_dir={cache}", f"data.cache_mb={cache_mb}"]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _PEAK, *command], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pretraining failed: {result.stderr[-2000:]}")
    return int(result.stdout.split()[-1]) / 1024, time.perf_counter() - started


def pairs_per_second(config_name: str, data: Path, cache: Path, workers: int, batches: int) -> float:
    """View pairs per second of the run's sampler rendered by ``workers`` DataLoader processes (startup included)."""
    config = read_pretrain_config(find_config(config_name))
    config = pretrain_config_from_dict({**to_dict(config), "data": {**config.data, "path": str(data.resolve()),
                                                                     "cache_dir": str(cache)}})
    objectives, _ = build_objectives(config, network_from_config(config))
    sampler = build_sampler(config, objectives, device=torch.device("cpu"))
    batch = config.train.batch_size
    next(iter(pair_batches(sampler, start=0, stop=1, batch_size=batch)))  # scans opened once
    started = time.perf_counter()
    for _ in pair_batches(sampler, start=0, stop=batches, batch_size=batch, workers=workers):
        pass
    return batches * batch / (time.perf_counter() - started)


def measure(dims: int, sizes: Sequence[int], steps: int, distinct: int | None, work: Path, workers: Sequence[int],
            batches: int, prepare_workers: int, config: str | None = None) -> tuple[list[dict], list[dict]]:
    """The memory rows (one per set size and cache budget) and the throughput rows (one per worker count) for the
    shipped ``config`` (default ``infoguided_<D>d``)."""
    config = config or f"infoguided_{dims}d"
    memory = []
    for size in sizes:
        data = demo_set(work, dims, size, distinct or max(sizes))
        cache = work / f"cache_{config}_{size}"
        started = time.perf_counter()
        prepare_data(find_config(config), data=data, out=cache, workers=prepare_workers)
        prepare_s = (time.perf_counter() - started) / size
        for cache_mb in (DEFAULT_CACHE_MB, 0):
            run = work / f"run_{config}_{size}_{cache_mb}"
            subprocess.run(["rm", "-rf", str(run)], check=True)
            peak, seconds = peak_rss_mb(config, data, cache, run, steps, cache_mb)
            memory.append({"scans": size, "cache_mb": cache_mb, "peak_mb": peak, "run_s": seconds,
                           "prepare_s_per_scan": prepare_s})
            log.info("%d scans, cache_mb %s: peak %.0f MB, %.1f s", size, cache_mb, peak, seconds)
    speed = []
    data, cache = work / f"set_{dims}d_{sizes[0]}", work / f"cache_{config}_{sizes[0]}"
    for count in workers:
        rate = pairs_per_second(config, data, cache, count, batches)
        speed.append({"workers": count, "pairs_per_s": rate})
        log.info("%d worker(s): %.1f pairs/s", count, rate)
    return memory, speed


def format_tables(config: str, memory: list[dict], speed: list[dict], steps: int) -> str:
    base = {row["cache_mb"]: row["peak_mb"] for row in memory if row["scans"] == memory[0]["scans"]}
    rows = [[str(row["scans"]), str(row["cache_mb"]), f"{row['peak_mb']:.0f}", f"{row['peak_mb'] / base[row['cache_mb']]:.2f}",
             f"{row['run_s']:.0f}", f"{row['prepare_s_per_scan']:.3f}"] for row in memory]
    lines = [f"Peak resident memory of `medssl pretrain {config}` ({steps} steps, prepared cache) by set "
             "size and in-memory budget:", "",
             *markdown_table(["scans", "data.cache_mb", "peak RSS (MB)", f"x {memory[0]['scans']}-scan run",
                              "run (s)", "prepare (s/scan)"], rows), "",
             "View pairs per second of the same sampler by DataLoader workers (startup included):", "",
             *markdown_table(["workers", "pairs/s"], [[str(r["workers"]), f"{r['pairs_per_s']:.1f}"] for r in speed])]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argument_parser(MODULE, __doc__)
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 200, 1000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--config", default=None, help="shipped pretraining config (default infoguided_<D>d)")
    parser.add_argument("--distinct", type=int, default=None, help="distinct demo subjects (default: the largest size)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=100, help="batches per throughput measurement")
    parser.add_argument("--prepare-workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "scale")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    log_progress()
    config = args.config or f"infoguided_{args.dim}d"
    memory, speed = measure(args.dim, args.sizes, args.steps, args.distinct, args.work, args.workers, args.batches,
                            args.prepare_workers, config)
    emit(format_tables(config, memory, speed, args.steps), args.out)


if __name__ == "__main__":
    main()
