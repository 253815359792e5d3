"""Correspondence between two views: exact on known geometry, 2D and 3D, analytic == coordinate-map path."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest_views import anisotropic_affine, make_pair_batch, render_view, smooth_volume, stack_views, view_matrix

from medssl.correspondence import feature_coords, gather_pairs, match_views, world_to_view_grid


def _expected_grid(index: torch.Tensor, size: int) -> torch.Tensor:
    """Reference: voxel index (..., D) of a size-``size`` view -> align_corners=False grid coordinate, (x, y[, z])."""
    return ((index + 0.5) / size * 2 - 1).flip(-1)


def _pair_from_matrices(dims: int, m_a: torch.Tensor, m_b: torch.Tensor, size: int, with_affine: bool = True):
    source = smooth_volume(dims, size, torch.Generator().manual_seed(1))
    affine = anisotropic_affine(dims)
    a = stack_views([render_view(source, affine, m_a, size)], with_affine)
    b = stack_views([render_view(source, affine, m_b, size)], with_affine)
    return a, b


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_identity_views_map_every_cell_onto_itself(dims, stride):
    size = 8
    eye = torch.eye(dims + 1, dtype=torch.float64)
    a, b = _pair_from_matrices(dims, eye, eye, size)
    grid, mask = match_views(a, b, stride_a=stride, stride_b=stride)
    cells = size // stride
    axes = [torch.arange(cells, dtype=torch.float64) * stride + (stride - 1) / 2 for _ in range(dims)]
    centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*C, D) voxel indices of cell centres
    assert grid.shape == (1, *[cells] * dims, dims)
    assert torch.allclose(grid[0].double(), _expected_grid(centres, size), atol=1e-5)
    assert mask.all()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("with_affine", [True, False])
def test_known_flip_shift_rotation_gives_the_known_mapping(dims, with_affine):
    size = 10
    # the known map T: view-a index -> view-b index; rotation by 90 deg in the first plane, flip of the last axis, shift
    t = torch.eye(dims + 1, dtype=torch.float64)
    t[0, 0], t[0, 1], t[1, 0], t[1, 1] = 0.0, 1.0, -1.0, 0.0  # b0 = a1, b1 = -a0
    t[dims - 1] *= -1 if dims == 3 else 1  # flip the last axis in 3D: b2 = -a2
    t[:dims, dims] = torch.tensor([1.0, size - 1 + 2.0, size - 1 - 1.0][:dims])
    m_a = torch.eye(dims + 1, dtype=torch.float64)
    m_b = m_a @ torch.linalg.inv(t)  # view-b index -> source index
    a, b = _pair_from_matrices(dims, m_a, m_b, size, with_affine)
    grid, mask = match_views(a, b)
    axes = [torch.arange(size, dtype=torch.float64) for _ in range(dims)]
    index_a = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*S, D)
    index_b = index_a @ t[:dims, :dims].T + t[:dims, dims]  # (*S, D)
    inside = ((index_b >= 0) & (index_b <= size - 1)).all(-1)
    assert torch.equal(mask[0], inside)
    assert torch.allclose(grid[0][inside].double(), _expected_grid(index_b[inside], size), atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_analytic_path_equals_coordinate_map_path(dims):
    batch = make_pair_batch(dims, view_size=16 if dims == 3 else 32, seed=3)
    no_affine = replace(batch.b, view_to_world=None)
    for stride in (1, 2):
        grid, mask = match_views(batch.a, batch.b, stride, stride)
        grid_nn, mask_nn = match_views(batch.a, no_affine, stride, stride)
        both = mask & mask_nn
        assert both.sum() > 0.2 * mask.numel()
        assert (mask == mask_nn).float().mean() > 0.99  # may differ only at the hull border (nearest-cell radius)
        assert torch.allclose(grid[both], grid_nn[both], atol=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_feature_coords_from_coords_map_equal_analytic(dims):
    batch = make_pair_batch(dims, view_size=16, seed=4)
    for stride in (1, 2, 4):
        world, valid = feature_coords(batch.a, stride)
        world_nn, valid_nn = feature_coords(replace(batch.a, view_to_world=None), stride)
        assert torch.allclose(world, world_nn, atol=1e-3)
        assert torch.equal(valid, valid_nn)


@pytest.mark.parametrize("dims", [2, 3])
def test_matched_points_show_the_same_anatomy(dims):
    size = 24 if dims == 2 else 12
    generator = torch.Generator().manual_seed(5)
    affine = anisotropic_affine(dims)
    axes = [torch.arange(2 * size, dtype=torch.float64) for _ in range(dims)]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*N, D)
    world = index @ affine[:dims, :dims].T + affine[:dims, dims]
    weights = torch.tensor([0.3, -0.2, 0.1][:dims], dtype=torch.float64)
    linear = (world @ weights)[None]  # (1, *N): linear in world mm, so bilinear sampling is exact
    smooth = smooth_volume(dims, 2 * size, generator)
    source = torch.cat([linear, smooth])  # (2, *N)
    views = []
    for _ in range(2):
        m = view_matrix(dims, 2 * size, size, generator)
        views.append(stack_views([render_view(source, affine, m, size)]))
    grid, mask = match_views(views[0], views[1])
    sampled = F.grid_sample(views[1].image.double(), grid.double(), align_corners=False)  # (1, 2, *S)
    assert mask.sum() > 0.1 * mask.numel()
    a_values, b_values = views[0].image[:, :, mask[0]].double(), sampled[:, :, mask[0]]
    assert torch.allclose(a_values[:, 0], b_values[:, 0], atol=1e-3)  # linear channel: exact up to float32
    assert torch.corrcoef(torch.stack([a_values[0, 1], b_values[0, 1]]))[0, 1] > 0.98  # smooth random anatomy


def test_gather_pairs_keeps_masked_cells_and_subsamples():
    batch = make_pair_batch(2, view_size=16, seed=6)
    grid, mask = match_views(batch.a, batch.b)
    feat_a = torch.randn(2, 5, 16, 16)
    feat_b = torch.randn(2, 5, 16, 16)
    fa, fb = gather_pairs(feat_a, feat_b, grid, mask)
    assert fa.shape == fb.shape == (int(mask.sum()), 5)
    assert torch.equal(fa, feat_a.permute(0, 2, 3, 1)[mask])
    reference = F.grid_sample(feat_b, grid, align_corners=False).permute(0, 2, 3, 1)[mask]
    assert torch.allclose(fb, reference)
    sub_a, sub_b = gather_pairs(feat_a, feat_b, grid, mask, max_pairs=7, generator=torch.Generator().manual_seed(0))
    assert sub_a.shape == (7, 5)
    rows = [(fa == row).all(1).nonzero()[0, 0] for row in sub_a]
    assert all(torch.equal(fb[r], row) for r, row in zip(rows, sub_b))  # pairs stay pairs
    with pytest.raises(ValueError, match="cell grid"):
        gather_pairs(feat_a[..., :8, :8], feat_b, grid, mask)


def test_world_to_view_grid_flags_points_outside_the_view():
    batch = make_pair_batch(2, batch=1, view_size=16, seed=7)
    affine = batch.a.view_to_world[0].double()
    inside_index = torch.tensor([[3.0, 4.0], [15.5, 0.0], [30.0, 2.0]], dtype=torch.float64)
    world = (inside_index @ affine[:2, :2].T + affine[:2, 2])[None]  # (1, 3, 2)
    grid, mask = world_to_view_grid(batch.a, world, stride=1)
    assert torch.allclose(grid[0, 0].double(), _expected_grid(inside_index[0], 16), atol=1e-5)
    assert mask[0].tolist() == [bool(batch.a.valid[0, 0, 3, 4]), False, False]


def test_bad_stride_and_radius_are_rejected():
    batch = make_pair_batch(2, batch=1, view_size=16, seed=8)
    with pytest.raises(ValueError, match="divisible"):
        match_views(batch.a, batch.b, stride_a=3)
    with pytest.raises(ValueError, match="radius_mm"):
        match_views(batch.a, replace(batch.b, view_to_world=None), radius_mm=0.0)
