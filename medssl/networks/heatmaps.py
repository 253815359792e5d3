"""Landmark heatmap maths for the supervised landmark head: Gaussian targets in millimetres, the adaptive wing loss
and its foreground weight map, a loss mean that skips absent landmarks, and arg-max + sub-pixel decoding.

Pure functions on tensors; one code path for 2D and 3D (the spatial dims are the trailing axes ``*S``).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.layers import Pool

from medssl.correspondence import peak_positions

#: heat below this is treated as this when decoding (log of the map)
_DECODE_FLOOR = 1e-6


def gaussian_heatmaps(coords_mm: torch.Tensor, points_mm: torch.Tensor, sigma_mm: float) -> torch.Tensor:
    """Gaussian targets ``exp(-|x - p|^2 / (2 sigma^2))`` (peak 1) of every landmark on every pixel.

    ``coords_mm`` ``(B, D, *S)``: world position of each pixel (a coordinate map, so crops, rotations and anisotropic
    or oblique grids are exact); ``points_mm`` ``(B, L, D)``: landmark positions, NaN where a landmark is absent
    (its map is all zeros). Returns ``(B, L, *S)`` in the dtype of ``coords_mm``.
    """
    batch, dims = coords_mm.shape[:2]
    spatial = coords_mm.shape[2:]
    points = points_mm.to(coords_mm)
    squared = torch.zeros(batch, points.shape[1], *spatial, dtype=coords_mm.dtype, device=coords_mm.device)
    for axis in range(dims):  # sum over axes without a (B, L, D, *S) intermediate
        position = points[:, :, axis].reshape(batch, -1, *[1] * len(spatial))  # (B, L, 1, ...)
        squared += (coords_mm[:, None, axis] - position) ** 2  # (B, L, *S)
    return torch.nan_to_num(torch.exp(-squared / (2.0 * float(sigma_mm) ** 2)), nan=0.0)


def adaptive_wing_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 2.1, omega: float = 14.0,
                       epsilon: float = 1.0, theta: float = 0.5) -> torch.Tensor:
    """Element-wise adaptive wing loss (Wang, Bo, Fuxin; ICCV 2019) of heatmaps ``pred`` vs ``target`` in [0, 1].

    ``omega * ln(1 + (|d| / epsilon)^(alpha - y))`` for ``|d| < theta``, else ``A |d| - C`` with ``A`` and ``C``
    making the two pieces meet smoothly at ``theta``; ``d = pred - y``, ``y = target``. Same shape as the inputs.
    """
    diff = (pred - target).abs()
    power = alpha - target
    ratio = theta / epsilon
    inner = omega * torch.log1p((diff / epsilon) ** power)
    slope = omega / (1.0 + ratio**power) * power * ratio ** (power - 1.0) / epsilon
    offset = theta * slope - omega * torch.log1p(ratio**power)
    return torch.where(diff < theta, inner, slope * diff - offset)


def foreground_weights(target: torch.Tensor, weight: float, threshold: float = 0.2) -> torch.Tensor:
    """Loss weights ``1 + weight * M`` for heatmaps ``target`` ``(B, L, *S)``: ``M`` is ``target >= threshold``
    dilated by one pixel (a 3^D max-pool), the weight map of the adaptive wing loss paper (W = 10 there), which keeps
    the few pixels near a landmark from being outvoted by the background."""
    dims = target.ndim - 2
    mask = (target >= threshold).to(target.dtype).flatten(0, 1)[:, None]  # (B*L, 1, *S)
    dilated = Pool["max", dims](kernel_size=3, stride=1, padding=1)(mask).reshape(target.shape)  # (B, L, *S)
    return 1.0 + weight * dilated


def masked_mean(loss: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean of the per-landmark maps ``loss`` ``(B, L, *S)`` over the landmarks ``present`` ``(B, L)`` (bool).

    Absent landmarks contribute nothing (not even NaN); with none present the result is 0 (still differentiable).
    """
    per_map = loss.flatten(2).mean(dim=-1)  # (B, L)
    kept = torch.where(present, per_map, torch.zeros_like(per_map))
    return kept.sum() / present.sum().clamp(min=1)


def decode_heatmaps(maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Landmark voxel positions ``(L, D)`` (float64) and peak heat ``(L,)`` of heatmaps ``(L, *S)``.

    Arg-max, refined per axis by a parabola through the logarithm of the peak and its two neighbours: exact for a
    Gaussian peak on any grid with orthogonal axes (the log of a Gaussian is a parabola along each axis).
    """
    voxels, log_peaks = peak_positions(maps.float().clamp(min=_DECODE_FLOOR).log(), subpixel=True)
    return voxels, np.exp(log_peaks)
