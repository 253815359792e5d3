"""Segmentation scores per class: Dice and the 95th-percentile Hausdorff distance in mm (``monai.metrics``).

Rules (documented in the JSON description of ``segmentation_scores``):
- classes are the labels > 0 found in any prediction or truth; Dice of a class in one image is left out of the
  average when the class is absent from both prediction and truth of that image, and is 0 when it is in only one;
- HD95 needs the class in both: when it is in only one, that image's HD95 is NaN (``null`` in JSON) and is left
  out of the class average; a class that is never in both gets NaN (the Dice of 0 already reports the miss).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_hausdorff_distance

from medssl.data.geometry import spacing_mm
from medssl.errors import InputError

HD_PERCENTILE = 95


def label_classes(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """Sorted labels > 0 present in any prediction or truth of ``pairs``."""
    found: set[int] = set()
    for pred, truth in pairs:
        found.update(int(v) for v in torch.cat([pred.flatten(), truth.flatten()]).unique().tolist())
    return sorted(v for v in found if v > 0)


def _one_hot(label: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``(1, *spatial)`` label map -> ``(1, K, *spatial)`` boolean masks, one channel per class."""
    return torch.stack([label[0] == c for c in classes])[None]  # (1, K, *spatial)


def image_scores(pred: MetaTensor, truth: MetaTensor, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Dice ``(K,)`` and HD95 in mm ``(K,)`` of one image for ``classes``; NaN where the rules above leave a score out.

    ``pred`` and ``truth`` are ``(1, *spatial)`` integer label maps on the same grid; the voxel size comes from
    ``truth.affine``.
    """
    if tuple(pred.shape) != tuple(truth.shape):
        raise InputError(f"prediction shape {tuple(pred.shape)} differs from truth shape {tuple(truth.shape)}")
    if not classes:
        return np.zeros(0), np.zeros(0)
    pred_masks = _one_hot(torch.as_tensor(pred), classes)  # (1, K, *spatial)
    truth_masks = _one_hot(torch.as_tensor(truth), classes)  # (1, K, *spatial)
    in_pred = pred_masks.flatten(2).any(-1)[0]  # (K,)
    in_truth = truth_masks.flatten(2).any(-1)[0]  # (K,)
    dice = compute_dice(pred_masks.double(), truth_masks.double(), include_background=True, ignore_empty=False)[0]
    dice[~(in_pred | in_truth)] = float("nan")
    hd95 = torch.full((len(classes),), float("nan"), dtype=torch.float64)
    both = in_pred & in_truth  # (K,)
    if both.any():
        with warnings.catch_warnings():  # MONAI 1.5+ warns about its own deprecated internal argument
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            hd95[both] = compute_hausdorff_distance(
                pred_masks[:, both], truth_masks[:, both], include_background=True, percentile=HD_PERCENTILE,
                spacing=list(spacing_mm(truth.affine)),
            )[0].double()
    return dice.double().numpy(), hd95.numpy().round(6)  # MONAI computes HD in float32: drop its noise digits


def _mean_or_nan(values: np.ndarray) -> float:
    """Mean of the finite entries, NaN when there is none (without numpy's empty-slice warning)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def segmentation_scores(pairs: Sequence[tuple[MetaTensor, MetaTensor]]) -> dict:
    """Dice and HD95 (mm) per class over ``(prediction, truth)`` label-map pairs, 2D or 3D.

    Returns ``{"n_images", "mean_dice", "dice": {"1": f, ...}, "hd95_mm": {"1": f, ...}}``: per class the mean
    over the images where the score exists (see the module rules), ``mean_dice`` the mean over classes.
    HD95 may be NaN (written as ``null`` in JSON). With no foreground anywhere the dictionaries are empty and
    ``mean_dice`` is NaN.
    """
    if not pairs:
        raise InputError("no prediction/truth pairs to score")
    classes = label_classes(pairs)
    per_image = [image_scores(pred, truth, classes) for pred, truth in pairs]
    dice = np.stack([d for d, _ in per_image]).reshape(len(pairs), len(classes))  # (N, K)
    hd95 = np.stack([h for _, h in per_image]).reshape(len(pairs), len(classes))  # (N, K)
    dice_per_class = {str(c): _mean_or_nan(dice[:, k]) for k, c in enumerate(classes)}
    return {
        "n_images": len(pairs),
        "mean_dice": _mean_or_nan(np.array(list(dice_per_class.values()))),
        "dice": dice_per_class,
        "hd95_mm": {str(c): _mean_or_nan(hd95[:, k]) for k, c in enumerate(classes)},
    }
