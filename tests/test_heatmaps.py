"""Landmark heatmap maths: Gaussian targets in mm, sub-pixel decoding, adaptive wing loss, masked mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssl.data.geometry import coordinate_grid, voxel_to_world
from medssl.networks.heatmaps import (
    adaptive_wing_loss, decode_heatmaps, foreground_weights, gaussian_heatmaps, masked_mean,
)

# 2D: 0.5 x 2.0 mm pixels; 3D: oblique (rotated about z), anisotropic 0.8 x 1.0 x 1.5 mm voxels
AFFINE_2D = np.array([[0.5, 0.0, -3.0], [0.0, 2.0, 4.0], [0.0, 0.0, 1.0]])
_ROT = np.array([[0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
AFFINE_3D = np.eye(4)
AFFINE_3D[:3, :3] = _ROT @ np.diag([0.8, 1.0, 1.5])
AFFINE_3D[:3, 3] = [5.0, -2.0, 1.0]


def test_gaussian_targets_are_in_millimetres_and_absent_landmarks_are_zero():
    coords = coordinate_grid(AFFINE_2D, (20, 10))[None]  # (1, 2, 20, 10)
    point = voxel_to_world(AFFINE_2D, np.array([6.0, 3.0]))
    points = torch.tensor(np.array([[point, [np.nan, np.nan]]]), dtype=torch.float32)  # (1, 2, 2): the second is absent
    maps = gaussian_heatmaps(coords, points, sigma_mm=2.0)
    assert maps.shape == (1, 2, 20, 10)
    assert maps[0, 0, 6, 3] == pytest.approx(1.0)
    # one pixel along axis 0 is 0.5 mm, along axis 1 it is 2 mm: exp(-d^2 / (2 sigma^2))
    assert maps[0, 0, 7, 3].item() == pytest.approx(math.exp(-0.25 / 8.0), rel=1e-5)
    assert maps[0, 0, 6, 4].item() == pytest.approx(math.exp(-4.0 / 8.0), rel=1e-5)
    assert maps[0, 0, 9, 5].item() == pytest.approx(math.exp(-(1.5**2 + 4.0**2) / 8.0), rel=1e-5)
    assert torch.count_nonzero(maps[0, 1]) == 0 and torch.isfinite(maps).all()


@pytest.mark.parametrize(("affine", "shape", "voxel"), [
    (AFFINE_2D, (24, 16), [9.37, 6.71]),
    (AFFINE_3D, (14, 12, 10), [6.21, 4.58, 5.93]),
])
def test_decoding_a_gaussian_returns_its_subpixel_peak(affine, shape, voxel):
    point = voxel_to_world(affine, np.array(voxel))
    coords = coordinate_grid(affine, shape)[None].double()
    maps = gaussian_heatmaps(coords, torch.tensor(point)[None, None], sigma_mm=2.5)[0]  # (1, *S)
    voxels, peaks = decode_heatmaps(maps)
    np.testing.assert_allclose(voxels[0], voxel, atol=1e-3)
    np.testing.assert_allclose(voxel_to_world(affine, voxels[0]), point, atol=2e-3)
    assert 0.8 < peaks[0] <= 1.0  # the heat at the best pixel


def _awing_reference(pred: float, target: float, alpha=2.1, omega=14.0, epsilon=1.0, theta=0.5) -> float:
    """Adaptive wing loss as written in Wang et al. (ICCV 2019), eq. 5-6, for one pixel."""
    y, diff = target, abs(target - pred)
    if diff < theta:
        return omega * math.log(1.0 + (diff / epsilon) ** (alpha - y))
    a = omega * (1.0 / (1.0 + (theta / epsilon) ** (alpha - y))) * (alpha - y) \
        * ((theta / epsilon) ** (alpha - y - 1.0)) * (1.0 / epsilon)
    c = theta * a - omega * math.log(1.0 + (theta / epsilon) ** (alpha - y))
    return a * diff - c


def test_adaptive_wing_loss_matches_the_paper_formula_and_is_continuous():
    rng = np.random.default_rng(0)
    target = rng.uniform(0.0, 1.0, size=200)
    pred = target + rng.uniform(-1.5, 1.5, size=200)
    values = adaptive_wing_loss(torch.tensor(pred), torch.tensor(target)).numpy()
    expected = [_awing_reference(p, t) for p, t in zip(pred, target)]
    np.testing.assert_allclose(values, expected, rtol=1e-10, atol=1e-12)
    y = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    below = adaptive_wing_loss(y + 0.5 - 1e-9, y)
    above = adaptive_wing_loss(y + 0.5 + 1e-9, y)
    np.testing.assert_allclose(below.numpy(), above.numpy(), atol=1e-6)  # the pieces meet at theta
    assert adaptive_wing_loss(y, y).abs().max() == 0


@pytest.mark.parametrize("dims", [2, 3])
def test_foreground_weights_cover_the_dilated_peak(dims):
    target = torch.zeros(2, 3, *[7] * dims)
    target[(1, 2, *[3] * dims)] = 0.5  # one pixel above the 0.2 threshold in map (1, 2)
    target[(0, 0, *[0] * dims)] = 0.1  # below it
    weights = foreground_weights(target, 10.0)
    expected = torch.ones_like(target)
    expected[(1, 2, *[slice(2, 5)] * dims)] = 11.0  # the pixel and its 3^D neighbourhood, in that map only
    assert torch.equal(weights, expected)


def test_masked_mean_skips_absent_landmarks_even_when_they_are_nan():
    loss = torch.tensor([[[1.0, 3.0], [math.nan, math.nan]], [[5.0, 7.0], [10.0, 20.0]]], requires_grad=True)
    present = torch.tensor([[True, False], [True, True]])
    value = masked_mean(loss, present)  # maps' means: 2, -, 6, 15
    assert value.item() == pytest.approx((2.0 + 6.0 + 15.0) / 3)
    value.backward()
    assert torch.isfinite(loss.grad).all() and loss.grad[0, 1].abs().sum() == 0
    none = masked_mean(loss, torch.zeros_like(present))
    assert none.item() == 0.0 and none.requires_grad
