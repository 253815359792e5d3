"""Voxel <-> world conversion against nibabel's apply_affine, numpy and torch inputs, coordinate grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nibabel.affines import apply_affine

from medssl.data.geometry import coordinate_grid, spacing_mm, voxel_to_world, world_to_voxel


def test_voxel_to_world_matches_nibabel_and_round_trips(oblique_affine):
    ijk = np.random.default_rng(0).uniform(-1, 10, size=(5, 7, 3))
    xyz = voxel_to_world(oblique_affine, ijk)
    np.testing.assert_allclose(xyz, apply_affine(oblique_affine, ijk), atol=1e-10)
    np.testing.assert_allclose(world_to_voxel(oblique_affine, xyz), ijk, atol=1e-10)


def test_torch_inputs_give_torch_results_with_the_same_values(oblique_affine):
    ijk = np.random.default_rng(1).uniform(0, 8, size=(4, 3))
    xyz_torch = voxel_to_world(torch.as_tensor(oblique_affine), torch.as_tensor(ijk, dtype=torch.float32))
    assert isinstance(xyz_torch, torch.Tensor) and xyz_torch.dtype == torch.float32
    np.testing.assert_allclose(xyz_torch.numpy(), apply_affine(oblique_affine, ijk), atol=1e-4)
    back = world_to_voxel(oblique_affine, torch.as_tensor(apply_affine(oblique_affine, ijk)))  # numpy affine
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float64
    np.testing.assert_allclose(back.numpy(), ijk, atol=1e-10)


def test_2d_affine_maps_column_row_to_x_y():
    affine = np.array([[0.3, 0.0, 5.0], [0.0, 0.4, -1.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(voxel_to_world(affine, [[2, 3]]), [[5.6, 0.2]])
    np.testing.assert_allclose(world_to_voxel(affine, [5.6, 0.2]), [2, 3])


@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 5)])
def test_coordinate_grid_equals_voxel_to_world_of_every_index(oblique_affine, shape):
    dims = len(shape)
    affine = oblique_affine if dims == 3 else oblique_affine[[0, 1, 3]][:, [0, 1, 3]]
    grid = coordinate_grid(affine, shape)
    assert grid.shape == (dims, *shape) and grid.dtype == torch.float32
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)  # (*shape, D)
    expected = np.moveaxis(apply_affine(affine, index.reshape(-1, dims)).reshape(*shape, dims), -1, 0)
    np.testing.assert_allclose(grid.numpy(), expected, atol=1e-4)


def test_spacing_is_the_column_norm(oblique_affine):
    np.testing.assert_allclose(spacing_mm(oblique_affine), (0.5, 1.2, 2.0))
    np.testing.assert_allclose(spacing_mm(torch.as_tensor(oblique_affine)), (0.5, 1.2, 2.0))


def test_mismatched_point_dimension_is_rejected(oblique_affine):
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        voxel_to_world(oblique_affine, np.zeros((4, 2)))
