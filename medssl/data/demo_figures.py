"""QC figure of a demo population (``medssl data demo --figures``): the template and a few subjects, each with its
landmarks and tissue labels, so a person can see what the generator made.

Drawn on ``matplotlib.figure.Figure`` objects (no pyplot state, no backend switch). 2D: the whole image; 3D: an
axial and a coronal slice through the middle of the head, with the landmarks within ``near_mm`` of each slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from medssl.data.geometry import world_to_voxel
from medssl.outputs import save_figure

LABEL_COLORS = ((0.23, 0.55, 1.0), (1.0, 0.62, 0.11), (0.18, 0.77, 0.71))  # CSF, grey, white matter


def _overlay(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """RGB ``(*S, 3)``: the grey image with label values 1-3 tinted."""
    low, high = np.percentile(image, [1, 99.5])
    grey = np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value, color in enumerate(LABEL_COLORS, start=1):
        rgb[label == value] = 0.55 * rgb[label == value] + 0.45 * np.array(color)
    return rgb


def _panels(image: np.ndarray, label: np.ndarray, voxels: np.ndarray, spacing_mm: float,
            near_mm: float) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, str]]:
    """(view name, image plane, label plane, landmark (column, row) positions, imshow origin) per panel."""
    if image.ndim == 2:  # array axis 0 = column, axis 1 = row (PNG)
        return [("", image.T, label.T, voxels, "upper")]
    middle = np.argwhere(label > 0).mean(axis=0).round().astype(int)  # (3,) centre of the head
    panels = []
    for name, axis, keep in (("axial", 2, (0, 1)), ("coronal", 1, (0, 2))):
        index = [slice(None)] * 3
        index[axis] = middle[axis]
        near = np.abs(voxels[:, axis] - middle[axis]) * spacing_mm <= near_mm
        panels.append((name, image[tuple(index)].T, label[tuple(index)].T, voxels[near][:, keep], "lower"))
    return panels


def save_population_figure(path: str | Path, cases: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                      Mapping[str, np.ndarray]]],
                           title: str = "", near_mm: float = 6.0) -> Path:
    """Write a PNG with one row per case (name -> (image ``(*S)``, label ``(*S)``, affine, landmarks in world mm)):
    the image with its landmarks (red dots), then the labels over the image (blue CSF, orange grey matter, teal
    white matter); 3D cases show an axial and a coronal slice of each."""
    from matplotlib.figure import Figure

    rows = []
    for name, (image, label, affine, landmarks) in cases.items():
        points = (np.stack([np.asarray(p, float) for p in landmarks.values()]) if landmarks
                  else np.zeros((0, image.ndim)))
        voxels = world_to_voxel(np.asarray(affine, float), points) if len(points) else points
        spacing = float(np.linalg.norm(np.asarray(affine, float)[:, 0][:image.ndim]))
        rows.append((name, _panels(image, label, voxels, spacing, near_mm)))
    columns = 2 * len(rows[0][1])
    figure = Figure(figsize=(2.6 * columns, 2.8 * len(rows)))
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row_axes, (name, panels) in zip(axes, rows):
        for k, (view, plane, label_plane, points, origin) in enumerate(panels):
            left, right = row_axes[2 * k], row_axes[2 * k + 1]
            left.imshow(plane, cmap="gray", origin=origin)
            if len(points):
                left.scatter(points[:, 0], points[:, 1], s=9, c="#ff3030")
            right.imshow(_overlay(plane, label_plane), origin=origin)
            left.set_title(f"{name} {view}".strip(), fontsize=8)
            right.set_title("labels", fontsize=8)
        for axis in row_axes:
            axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path, dpi=90)
