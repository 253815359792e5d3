"""One-shot landmark quality on a demo dataset: pretrained runs vs random init, NCC and registration.

    python -m benchmarks.bench_oneshot --data demo2d --runs runs/pgssl_2d runs/msf_2d ... [--out table.md]

The template is the dataset's first subject (``subject_000``); every other subject is a query and its landmarks from
``landmarks.csv`` are the truth. Each row: MRE ± std (mm), SDR at 2/2.5/3/4 mm, seconds per query image (preparing and
matching, as logged by ``detect_landmarks_files``). Rows: each run folder given, ``random init`` (``--checkpoint
none``, embedded at the first run's pyramid factors so that both see the same context), ``NCC`` and
``registration``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from benchmarks.common import argument_parser, emit
from medssl.data.inputs import resolve_images
from medssl.data.landmarks import read_landmarks
from medssl.data.readers import image_key
from medssl.matching.run import detect_landmarks_files, image_preparer, method_matcher
from medssl.metrics.landmarks import landmark_scores
from medssl.networks.model_file import matching_pyramid, read_model_file
from medssl.report.markdown import markdown_table

MODULE = "benchmarks.bench_oneshot"
BASELINES = (("random init", "none", "embedding", "none"), ("NCC", None, "ncc", "ncc"),
             ("registration", None, "registration", "registration"))  # label, checkpoint, method, --skip key


def score_row(label: str, data: Path, checkpoint: str | None, method: str, work: Path, arch: str,
              device: str = "cpu", consistency: str | None = None, pyramid: Sequence[int] | None = None) -> dict:
    """Detect the landmarks of every query with one method and score them against the dataset's truth
    (``consistency``: the embedding's consistency check, default that of the dimension; ``pyramid``: its spacing
    factors, default those of the checkpoint)."""
    images = resolve_images(data / "images")
    template, queries = images[0], images[1:]
    truth_csv = data / "landmarks.csv"
    pred_csv = work / f"{label.replace(' ', '_').replace('/', '_')}.csv"
    started = time.perf_counter()
    detect_landmarks_files(checkpoint, [template], [truth_csv], queries, pred_csv, method=method,
                           arch=arch if checkpoint == "none" else None, device=device, consistency=consistency,
                           pyramid=pyramid)
    seconds = (time.perf_counter() - started) / len(queries)
    truth = read_landmarks(truth_csv)
    truth.pop(image_key(template))
    scores = landmark_scores(read_landmarks(pred_csv), truth)
    return {"label": label, "seconds": seconds, **scores}


def oneshot_rows(data: Path, runs: dict[str, Path], work: Path, arch: str = "small", skip: Sequence[str] = (),
                 device: str = "cpu", progress: Callable[[dict], None] | None = None) -> list[dict]:
    """``score_row`` of every run (label -> run folder), then of the baselines not in ``skip``; ``progress`` is
    called with each row as it is done."""
    cases = [(label, str(run), "embedding") for label, run in runs.items()]
    cases += [(label, checkpoint, method) for label, checkpoint, method, key in BASELINES if key not in skip]
    pyramid = matching_pyramid(read_model_file(next(iter(runs.values())))) if runs else None
    rows = []
    for label, checkpoint, method in cases:
        rows.append(score_row(label, data, checkpoint, method, work, arch, device,
                              pyramid=pyramid if checkpoint == "none" else None))
        if progress is not None:
            progress(rows[-1])
    return rows


def timing_rows(work: Path, spatial_dims: int, queries: int = 5, device: str = "cpu", skip: Sequence[str] = (),
                variability: str = "realistic") -> list[dict]:
    """Seconds per query image of one-shot matching on a demo population of ``queries + 1`` subjects (seed 0, in
    ``work``): the embedding matcher (default settings) on the network of ``configs/infoguided_<D>d.yaml`` at its
    random init (the time does not depend on the weights; its errors mean nothing), then NCC and registration
    unless in ``skip``. Rows as ``score_row``, the embedding one labelled ``embedding``, followed by the
    ``FORWARD_ONLY`` row (seconds only: ``forward_seconds``)."""
    from medssl.config import shipped_config
    from medssl.data.demo import write_demo_dataset
    from medssl.engine.pretrain import save_initial_model
    from medssl.engine.pretrain_config import read_pretrain_config

    data = work / f"data_{spatial_dims}d_{queries + 1}s_{variability}"
    if not (data / "datalist.json").is_file():
        write_demo_dataset(data, spatial_dims=spatial_dims, n_subjects=queries + 1, seed=0, variability=variability)
    model = save_initial_model(read_pretrain_config(shipped_config(f"infoguided_{spatial_dims}d")),
                               work / f"infoguided_{spatial_dims}d_init.pt")
    cases = [("embedding", str(model), "embedding")]
    cases += [(label, checkpoint, method) for label, checkpoint, method, key in BASELINES[1:] if key not in skip]
    rows = [score_row(label, data, checkpoint, method, work, "small", device) for label, checkpoint, method in cases]
    forward = {"label": FORWARD_ONLY, "seconds": forward_seconds(model, data, spatial_dims, device)}
    return rows[:1] + [forward] + rows[1:]


#: the ``timing_rows`` row of the network's forward pass alone: the least any embedding matcher can take per image
FORWARD_ONLY = "network forward only"


def forward_seconds(checkpoint: str | Path, data: Path, spatial_dims: int, device: str = "cpu") -> float:
    """Seconds per query image of embedding it alone (``OneShotMatcher.embed`` on the prepared image, model loaded
    once, preparing not counted)."""
    images = resolve_images(data / "images")
    matcher, preprocessing = method_matcher("embedding", checkpoint, spatial_dims, device=device)
    prepare = image_preparer(preprocessing, images[0], spatial_dims, network=matcher.network)
    prepared = [prepare(path) for path in images[1:]]
    started = time.perf_counter()
    for image in prepared:
        matcher.embed(image)
    return (time.perf_counter() - started) / len(prepared)


def format_seconds(rows: list[dict]) -> str:
    """Seconds per image and the ratio of registration's time to each method's (how many times faster)."""
    registration = next((row["seconds"] for row in rows if row["label"] == "registration"), None)
    return "\n".join(markdown_table(["method", "s / image", "registration s ÷ this"], [
        [row["label"], f"{row['seconds']:.2f}", f"{registration / row['seconds']:.1f}" if registration else "n/a"]
        for row in rows]))


def format_rows(rows: list[dict]) -> str:
    radii = list(rows[0]["sdr"])
    header = ["method", "MRE ± std (mm)", "median (mm)", *(f"SDR {r} mm" for r in radii), "s / image"]
    return "\n".join(markdown_table(header, [
        [row["label"], f"{row['mre_mm']:.2f} ± {row['std_mm']:.2f}", f"{row['median_mm']:.2f}",
         *(f"{100 * row['sdr'][r]:.1f} %" for r in radii), f"{row['seconds']:.2f}"] for row in rows]))


def population_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--data`` (a demo population) and ``--skip`` (the baselines to leave out), as the one-shot benchmarks take
    them."""
    parser.add_argument("--data", type=Path, required=True, help="a demo dataset folder (medssl data demo)")
    parser.add_argument("--skip", nargs="*", default=[], choices=[key for *_, key in BASELINES],
                        help="one-shot baselines to leave out")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = population_arguments(argument_parser(MODULE, __doc__))
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="pretraining run folders to compare")
    parser.add_argument("--arch", default="small", help="architecture of the random-init baseline")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = oneshot_rows(args.data, {run.name: run for run in args.runs}, Path(tmp), args.arch, args.skip)
    emit(format_rows(rows), args.out)


if __name__ == "__main__":
    main()
