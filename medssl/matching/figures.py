"""PNG figures of landmarks on their images: 2D as one panel, 3D as one axial slice through each landmark.

Drawn on ``matplotlib.figure.Figure`` objects: no pyplot state, no backend switch (a notebook keeps its inline plots).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from monai.data import MetaTensor

from medssl.data.geometry import world_to_voxel
from medssl.outputs import save_figure

PREDICTED_STYLE = {"marker": "+", "color": "#ff3030", "s": 60, "linewidths": 1.5}
TRUE_STYLE = {"marker": "o", "facecolors": "none", "edgecolors": "#30ff30", "s": 50, "linewidths": 1.2}


def save_landmark_figure(path: str | Path, image: MetaTensor, predicted: Mapping[str, np.ndarray],
                         truth: Mapping[str, np.ndarray] | None = None, title: str = "") -> Path:
    """Write ``image`` ``(C, *S)`` with ``predicted`` (red +) and, if given, ``truth`` (green o) landmarks
    (name -> world mm) to the PNG ``path``. 3D images get one panel per landmark: the slice of the last axis
    through the predicted position. Array axis 0 runs left to right, axis 1 top to bottom."""
    from matplotlib.figure import Figure

    array = image.as_tensor()[0].detach().cpu().float().numpy()
    affine = torch.as_tensor(image.affine).detach().cpu().double().numpy()
    names = sorted(predicted)
    to_voxel = {name: world_to_voxel(affine, np.asarray(predicted[name], float)) for name in names}
    true_voxel = {name: world_to_voxel(affine, np.asarray(truth[name], float)) for name in names
                  if truth is not None and name in truth}
    if array.ndim == 2:
        panels = [(array, names, "")]
    else:
        depth = array.shape[2]
        panels = [(array[:, :, int(np.clip(round(to_voxel[name][2]), 0, depth - 1))], [name], name)
                  for name in names]
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(3.2 * columns, 3.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (plane, shown, label) in zip(axes.flat, panels):
        axis.imshow(plane.T, cmap="gray", origin="upper")
        for name in shown:
            axis.scatter([to_voxel[name][0]], [to_voxel[name][1]], **PREDICTED_STYLE)
            if name in true_voxel:
                axis.scatter([true_voxel[name][0]], [true_voxel[name][1]], **TRUE_STYLE)
            if array.ndim == 2:
                axis.annotate(name, (to_voxel[name][0], to_voxel[name][1]), color="yellow", fontsize=7,
                              xytext=(3, 3), textcoords="offset points")
        axis.set_title(label, fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path, dpi=100)
