"""How hard a demo population is: intensity-threshold segmentation, shape change, and the one-shot baselines.

    python -m benchmarks.bench_population --data demo2d [--out table.md] [--skip registration]

Rows written (Markdown):
- threshold segmentation, mean Dice over CSF / grey / white matter against the true labels: per-image multi-Otsu
  (4 classes, ``skimage.filters.threshold_multiotsu``), one multi-Otsu threshold set for the whole population, and
  the *oracle*: for each image the 3 thresholds that maximise its mean Dice given its true labels (an upper bound for
  any single-intensity-threshold segmentation);
- the size of the non-linear part of each subject's deformation at its landmarks (``meta.json``);
- one-shot landmarks from ``subject_000`` by random-init features, NCC and registration (``bench_oneshot``: MRE,
  median, SDR, seconds per image).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.bench_oneshot import format_rows, oneshot_rows, population_arguments
from benchmarks.common import argument_parser, emit
from medssl.report.markdown import markdown_table

MODULE = "benchmarks.bench_population"

CLASSES = (1, 2, 3)  # CSF, grey matter, white matter
BINS = 96  # intensity bins of the oracle search


def _images_and_labels(data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    from medssl.data.readers import load_image, load_label

    pairs = []
    for item in json.loads((data / "datalist.json").read_text(encoding="utf-8"))["training"]:
        image = load_image(data / item["image"])
        pairs.append((image[0].numpy().astype(np.float64), load_label(data / item["label"], like=image)[0].numpy()))
    return pairs


def mean_dice(segmentation: np.ndarray, label: np.ndarray) -> float:
    """Mean Dice over ``CLASSES`` of two label maps."""
    scores = []
    for value in CLASSES:
        predicted, true = segmentation == value, label == value
        scores.append(2.0 * np.sum(predicted & true) / max(np.sum(predicted) + np.sum(true), 1))
    return float(np.mean(scores))


def oracle_threshold_dice(image: np.ndarray, label: np.ndarray, bins: int = BINS) -> float:
    """The best mean Dice of any 3-threshold segmentation of ``image`` (classes 0-3 by increasing intensity), searched
    exhaustively over ``bins`` intensity quantiles with per-class cumulative histograms."""
    edges = np.unique(np.quantile(image, np.linspace(0.0, 1.0, bins + 1)))
    index = np.clip(np.searchsorted(edges, image.ravel(), side="right") - 1, 0, len(edges) - 2)  # (N,) bin per voxel
    counts = np.stack([np.bincount(index[label.ravel() == c], minlength=len(edges) - 1) for c in range(4)])  # (4, B)
    cumulative = np.concatenate([np.zeros((4, 1)), np.cumsum(counts, axis=1)], axis=1)  # (4, B + 1)
    total = cumulative.sum(axis=0)  # (B + 1,) voxels below each cut
    cuts = np.arange(cumulative.shape[1])
    a, b, c = np.meshgrid(cuts, cuts, cuts, indexing="ij")
    valid = (a <= b) & (b <= c)
    a, b, c = a[valid], b[valid], c[valid]  # class 1 = bins [a, b), class 2 = [b, c), class 3 = [c, end)
    end = cumulative.shape[1] - 1
    scores = []
    for value, (low, high) in zip(CLASSES, ((a, b), (b, c), (c, np.full_like(c, end)))):
        hit = cumulative[value, high] - cumulative[value, low]
        predicted = total[high] - total[low]
        scores.append(2.0 * hit / np.maximum(predicted + cumulative[value, end], 1))
    return float(np.max(np.mean(scores, axis=0)))


def threshold_rows(data: Path) -> dict[str, list[float]]:
    """Per-image mean Dice of each threshold segmentation."""
    from skimage.filters import threshold_multiotsu

    pairs = _images_and_labels(data)
    pooled = np.concatenate([image.ravel() for image, _ in pairs])
    shared = threshold_multiotsu(pooled[:: max(1, pooled.size // 2_000_000)], classes=4)
    return {
        "multi-Otsu per image": [mean_dice(np.digitize(im, threshold_multiotsu(im, classes=4)), lb)
                                 for im, lb in pairs],
        "multi-Otsu, one threshold set for all images": [mean_dice(np.digitize(im, shared), lb) for im, lb in pairs],
        "oracle thresholds per image (upper bound)": [oracle_threshold_dice(im, lb) for im, lb in pairs],
    }


def shape_change(data: Path) -> list[float]:
    """Each subject's mean non-linear displacement at its landmarks (mm), from ``meta.json``."""
    subjects = json.loads((data / "meta.json").read_text(encoding="utf-8"))["per_subject"].values()
    return [subject["landmark_nonlinear_mean_mm"] for subject in subjects]


def population_report(data: Path, skip: list[str], arch: str = "small") -> str:
    """The Markdown report of ``data`` (see the module docstring)."""
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    lines = [f"Population: `{data}`, {meta['subjects']} {meta['spatial_dims']}D subjects, "
             f"{meta['variability']['name']} variability, seed {meta['seed']}.", ""]
    lines += markdown_table(["threshold segmentation", "mean Dice (mean over images)", "min", "max"], [
        [label, f"{np.mean(values):.3f}", f"{np.min(values):.3f}", f"{np.max(values):.3f}"]
        for label, values in threshold_rows(data).items()])
    shape = shape_change(data)
    lines += ["", f"Non-linear displacement at the landmarks: mean {np.mean(shape):.2f} mm over subjects "
                  f"(per subject {np.min(shape):.2f}-{np.max(shape):.2f} mm).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        lines.append(format_rows(oneshot_rows(data, {}, Path(tmp), arch, skip)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = population_arguments(argument_parser(MODULE, __doc__))
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    emit(population_report(args.data, args.skip), args.out)


if __name__ == "__main__":
    main()
