"""PNG figures of the demo report: training curves, a one-shot similarity map, segmentation overlays.

2D images are drawn whole, 3D images as one slice of the last array axis; array axis 0 runs left to right and axis 1
top to bottom, as in ``medssl.matching.figures`` (which draws the predicted vs true landmarks).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from monai.data import MetaTensor

from medssl.data.geometry import world_to_voxel
from medssl.matching.figures import PREDICTED_STYLE, TRUE_STYLE
from medssl.outputs import save_figure

#: colours of label values 1, 2, ... in segmentation overlays (0 stays transparent)
LABEL_COLORS = ("#3b8bff", "#ff9f1c", "#2ec4b6", "#e71d36", "#b15eff", "#f4e04d")


def _figure(columns: int, figsize: tuple[float, float]) -> tuple[Any, np.ndarray]:
    """A ``matplotlib.figure.Figure`` (no pyplot state, no backend switch) and its ``(1, columns)`` axes."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(1, columns, squeeze=False)


def _save(figure: Any, path: str | Path) -> Path:
    return save_figure(figure, path, dpi=100, bbox_inches="tight")


def _array(image: MetaTensor) -> np.ndarray:
    """The first channel of ``image`` ``(C, *S)`` as float64 ``(*S)``."""
    return image.as_tensor()[0].detach().cpu().double().numpy()


def _voxel(image: MetaTensor, point_mm: np.ndarray) -> np.ndarray:
    """Fractional voxel indices ``(D,)`` of a world point in ``image``."""
    affine = torch.as_tensor(image.affine).detach().cpu().double().numpy()
    return world_to_voxel(affine, np.asarray(point_mm, dtype=float))


def _plane(array: np.ndarray, depth: float) -> np.ndarray:
    """A 2D ``array`` itself, or the slice of a 3D one's last axis nearest index ``depth``."""
    if array.ndim == 2:
        return array
    return array[..., int(np.clip(round(depth), 0, array.shape[-1] - 1))]


def read_metric(metrics_csv: str | Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps ``(N,)`` and values ``(N,)`` of ``column`` in a run's ``metrics.csv`` (rows where it is empty skipped)."""
    with open(metrics_csv, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(column)]
    return np.array([int(row["step"]) for row in rows]), np.array([float(row[column]) for row in rows])


def save_curves_figure(path: str | Path, pretrain_metrics: str | Path, finetune_metrics: Mapping[str, str | Path],
                       metric: str = "val/mean_dice", metric_label: str = "validation mean Dice") -> Path:
    """Pretraining loss per step (left) and the fine-tuning runs' ``metric`` column per step (right, one line per
    label of ``finetune_metrics``: label -> ``metrics.csv``)."""
    figure, ((left, right),) = _figure(2, (9.0, 3.4))
    steps, loss = read_metric(pretrain_metrics, "loss")
    left.plot(steps, loss, marker=".", color="#333333")
    left.set(title="self-supervised pretraining", xlabel="step", ylabel="loss")
    for label, metrics_csv in finetune_metrics.items():
        steps, values = read_metric(metrics_csv, metric)
        right.plot(steps, values, marker="o", label=label)
    right.set(title="segmentation transfer", xlabel="step", ylabel=metric_label)
    right.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def save_similarity_figure(path: str | Path, landmark: str, template: MetaTensor, template_mm: np.ndarray,
                           query: MetaTensor, truth_mm: np.ndarray, maps: Mapping[str, np.ndarray],
                           predicted_mm: Mapping[str, np.ndarray]) -> Path:
    """The ``landmark`` on the template (left), then per model (``maps``: label -> similarity map ``(*S)`` on the
    query's grid) the query with that map overlaid, the true position (green o) and the model's prediction (red +,
    ``predicted_mm``: label -> world mm). 3D: the slices of the last axis through the template point and the truth."""
    figure, axes = _figure(1 + len(maps), (3.6 * (1 + len(maps)), 3.6))
    at_template, at_truth = _voxel(template, template_mm), _voxel(query, truth_mm)
    axis = axes[0, 0]
    axis.imshow(_plane(_array(template), at_template[-1]).T, cmap="gray", origin="upper")
    axis.scatter([at_template[0]], [at_template[1]], **TRUE_STYLE)
    axis.set_title(f"template: {landmark}", fontsize=8)
    for axis, (label, similarity) in zip(axes[0, 1:], maps.items()):
        axis.imshow(_plane(_array(query), at_truth[-1]).T, cmap="gray", origin="upper")
        shown = axis.imshow(_plane(np.asarray(similarity), at_truth[-1]).T, cmap="magma", origin="upper", alpha=0.6,
                            vmin=0.0, vmax=1.0)
        figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02)
        at_prediction = _voxel(query, predicted_mm[label])
        axis.scatter([at_truth[0]], [at_truth[1]], **TRUE_STYLE)
        axis.scatter([at_prediction[0]], [at_prediction[1]], **PREDICTED_STYLE)
        axis.set_title(f"{label}: similarity in a test image", fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    return _save(figure, path)


def save_segmentation_figure(path: str | Path, image: MetaTensor, truth: MetaTensor,
                             predictions: Mapping[str, MetaTensor], class_names: Mapping[int, str]) -> Path:
    """The image, its true label map and each prediction (``predictions``: label -> label map on the image's grid)
    overlaid in ``LABEL_COLORS``; 3D: the slice of the last axis through the middle of the true foreground."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    grey, true_labels = _array(image), _array(truth)
    depth = float(np.mean(np.nonzero(true_labels)[-1])) if true_labels.ndim == 3 and true_labels.any() else 0.0
    count = max(int(true_labels.max()), *(int(_array(p).max()) for p in predictions.values()), 1)
    colours = ListedColormap([LABEL_COLORS[k % len(LABEL_COLORS)] for k in range(count)])
    panels = [("image", None), ("truth", true_labels)] + [(label, _array(p)) for label, p in predictions.items()]
    figure, axes = _figure(len(panels), (3.0 * len(panels), 3.4))
    for axis, (title, labels) in zip(axes.flat, panels):
        axis.imshow(_plane(grey, depth).T, cmap="gray", origin="upper")
        if labels is not None:
            plane = _plane(labels, depth).T
            axis.imshow(np.ma.masked_where(plane < 1, plane), cmap=colours, vmin=0.5, vmax=count + 0.5, alpha=0.55,
                        origin="upper", interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    handles = [Patch(color=LABEL_COLORS[(k - 1) % len(LABEL_COLORS)], label=class_names.get(k, str(k)))
               for k in range(1, count + 1)]
    figure.tight_layout(rect=(0.0, 0.08, 1.0, 1.0))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    return _save(figure, path)
