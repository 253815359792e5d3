"""View geometry and intensity augmentation: exact correspondences in 2D and 3D with anisotropic spacing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from medssl.data.geometry import voxel_to_world, world_to_voxel
from medssl.transforms.intensity import IntensityAugmentation, augment_intensity, gaussian_blur
from medssl.transforms.views import (random_orientation, render_views, rotation_matrix, smooth_displacement_mm,
                                     view_to_source)

CASES = [((23, 19), (0.6, 1.5)), ((13, 11, 9), (0.7, 1.0, 2.2))]


def _scan(shape, spacing, seed=0):
    """A random scan ``(1, *S)`` and an oblique affine with the given voxel sizes."""
    generator = torch.Generator().manual_seed(seed)
    dims = len(shape)
    source = torch.rand((1, *shape), generator=generator, dtype=torch.float64)
    rotation = rotation_matrix(torch.rand((1, dims * (dims - 1) // 2), generator=generator, dtype=torch.float64), dims)
    affine = torch.eye(dims + 1, dtype=torch.float64)
    affine[:dims, :dims] = rotation[0] * torch.tensor(spacing, dtype=torch.float64)
    affine[:dims, dims] = torch.randn(dims, generator=generator, dtype=torch.float64) * 10
    return source, affine


def _view(anchor_source, anchor_view, spacing, view_spacing, orientation):
    as_row = lambda v: torch.as_tensor(v, dtype=torch.float64)[None]  # noqa: E731 (1, D)
    return view_to_source(as_row(anchor_source), as_row(anchor_view), as_row(spacing), as_row(view_spacing),
                          torch.as_tensor(orientation, dtype=torch.float64)[None])


@pytest.mark.parametrize("shape, spacing", CASES)
def test_unaugmented_views_agree_exactly_on_the_overlap(shape, spacing):
    dims = len(shape)
    source, affine = _scan(shape, spacing)
    anchor, patch = [5] * dims, [8] * dims
    offset = [2, -1, 1][:dims]
    eye = torch.eye(dims)
    matrix_a = _view(anchor, [4] * dims, spacing, spacing, eye)
    matrix_b = _view(anchor, [4 + o for o in offset], spacing, spacing, eye)  # the same crop moved by `offset`
    image, coords, valid, to_world = render_views(source, affine, torch.cat([matrix_a, matrix_b]), patch)
    slice_a = tuple(slice(max(0, -o), 8 - max(0, o)) for o in offset)
    slice_b = tuple(slice(max(0, o), 8 + min(0, o)) for o in offset)
    assert torch.equal(coords[0][(slice(None), *slice_a)], coords[1][(slice(None), *slice_b)])
    assert torch.allclose(image[0][(slice(None), *slice_a)], image[1][(slice(None), *slice_b)], atol=1e-6)
    crop = tuple(slice(a - 4, a + 4) for a in anchor)  # view a is an exact crop of the scan
    assert torch.allclose(image[0], source[(slice(None), *crop)].float(), atol=1e-6)
    assert valid[0].all()


@pytest.mark.parametrize("shape, spacing", CASES)
def test_known_flip_and_rotation_give_the_known_mapping(shape, spacing):
    dims = len(shape)
    source, affine = _scan(shape, spacing)
    anchor, anchor_view = [5] * dims, [3] * dims
    flip = torch.diag(torch.tensor([-1.0] + [1.0] * (dims - 1)))
    angles = torch.zeros(1, dims * (dims - 1) // 2, dtype=torch.float64)
    angles[0, 0] = math.pi / 2  # 90 degrees in the plane of axes (0, 1): view axis 0 runs along source axis 1
    rotation = rotation_matrix(angles, dims)[0]
    swapped = [spacing[1], spacing[0], *spacing[2:]]  # view spacing that makes the rotation a voxel permutation
    matrices = torch.cat([_view(anchor, anchor_view, spacing, spacing, flip),
                          _view(anchor, anchor_view, spacing, swapped, rotation)])
    image, coords, _, to_world = render_views(source, affine, matrices, [6] * dims)
    for v in np.ndindex(*[6] * dims):
        d = [v[k] - anchor_view[k] for k in range(dims)]
        flipped = (anchor[0] - d[0], *[anchor[k] + d[k] for k in range(1, dims)])
        rotated = (anchor[0] - d[1], anchor[1] + d[0], *[anchor[k] + d[k] for k in range(2, dims)])
        for view, source_index in ((0, flipped), (1, rotated)):
            if all(0 <= i < n for i, n in zip(source_index, shape)):
                assert image[view][(0, *v)] == pytest.approx(float(source[(0, *source_index)]), abs=1e-5)
                world = voxel_to_world(affine, torch.tensor(source_index, dtype=torch.float64))
                assert torch.allclose(coords[view][(slice(None), *v)].double(), world, atol=1e-4)


@pytest.mark.parametrize("shape, spacing", CASES)
def test_random_views_round_trip_and_match_their_affine(shape, spacing):
    dims = len(shape)
    generator = torch.Generator().manual_seed(5)
    source, affine = _scan(shape, spacing, seed=1)
    count, patch = 6, [7] * dims
    anchors = torch.rand((count, dims), generator=generator, dtype=torch.float64) * torch.tensor(shape)
    orientation = random_orientation(count, dims, 40.0, 0.5, generator, "cpu")
    view_spacing = torch.tensor(spacing) * (0.5 + torch.rand((count, dims), generator=generator, dtype=torch.float64))
    matrices = view_to_source(anchors, torch.full((count, dims), 3.0), torch.tensor(spacing).repeat(count, 1),
                              view_spacing, orientation)
    _, coords, _, to_world = render_views(source, affine, matrices, patch)
    index = torch.stack(torch.meshgrid(*[torch.arange(p, dtype=torch.float64) for p in patch], indexing="ij"), -1)
    for a in range(count):
        world_a = coords[a].double().movedim(0, -1)  # (*P, D)
        assert torch.allclose(world_a, voxel_to_world(to_world[a], index), atol=1e-4)
        b = (a + 1) % count  # view a's pixels in view b and back
        back = world_to_voxel(to_world[a], voxel_to_world(to_world[b], world_to_voxel(to_world[b], world_a)))
        assert (back - index).abs().max() < 1e-4 * max(patch)


@pytest.mark.parametrize("shape, spacing", CASES)
@pytest.mark.parametrize("elastic", [False, True])
def test_view_image_is_the_source_interpolated_at_coords_and_valid_inside(shape, spacing, elastic):
    dims = len(shape)
    generator = torch.Generator().manual_seed(2)
    source, affine = _scan(shape, spacing, seed=3)
    count, patch = 4, [9] * dims
    anchors = torch.rand((count, dims), generator=generator, dtype=torch.float64) * torch.tensor(shape)
    matrices = view_to_source(anchors, torch.full((count, dims), 4.0), torch.tensor(spacing).repeat(count, 1),
                              torch.tensor(spacing).repeat(count, 1) * 1.3,
                              random_orientation(count, dims, 30.0, 0.5, generator, "cpu"))
    displacement = smooth_displacement_mm(count, patch, 1.5, 4, generator, "cpu") if elastic else None
    image, coords, valid, to_world = render_views(source, affine, matrices, patch, displacement)
    assert (to_world is None) == elastic
    for v in range(count):
        index = world_to_voxel(affine, coords[v].double().movedim(0, -1)).movedim(-1, 0).numpy()  # (D, *P)
        reference = map_coordinates(source[0].numpy(), index, order=1, mode="nearest")
        inside = np.all([(index[k] >= -0.5) & (index[k] <= shape[k] - 0.5) for k in range(dims)], axis=0)
        distance = np.min([np.minimum(np.abs(index[k] + 0.5), np.abs(index[k] - shape[k] + 0.5))
                           for k in range(dims)], axis=0)
        clear = distance > 1e-3  # float32 rounding decides points on the scan's edge
        assert np.array_equal(valid[v, 0].numpy()[clear], inside[clear])
        np.testing.assert_allclose(image[v, 0].numpy()[inside & clear], reference[inside & clear], atol=1e-5)
        assert (image[v, 0][~valid[v, 0]] == 0).all()
    assert valid.any() and not valid.all()


def test_intensity_augmentation_degenerate_ranges():
    image = torch.rand(3, 1, 6, 7) * 0.5
    valid = torch.ones_like(image, dtype=torch.bool)
    valid[:, :, 0] = False
    identity = augment_intensity(image, valid, IntensityAugmentation())
    assert torch.equal(identity, image * valid)
    squared = augment_intensity(image, valid, IntensityAugmentation(brightness=(2.0, 2.0), gamma=(2.0, 2.0)))
    assert torch.allclose(squared, (image * 2) ** 2 * valid, atol=1e-6)
    per_sample = torch.tensor([[1.0, 1.0], [0.5, 0.5], [2.0, 2.0]])
    scaled = augment_intensity(image, valid, IntensityAugmentation(), brightness=per_sample)
    assert torch.allclose(scaled, (image * per_sample[:, 0, None, None, None]).clamp(0, 1) * valid, atol=1e-6)
    flat = torch.full((2, 1, 5, 5, 5), 0.3)
    contrast = augment_intensity(flat, torch.ones_like(flat, dtype=torch.bool), IntensityAugmentation(
        contrast=(0.2, 3.0), bias_field=0.0))
    assert torch.allclose(contrast, flat, atol=1e-6)  # a constant image has no contrast to change
    noisy = augment_intensity(flat, torch.ones_like(flat, dtype=torch.bool), IntensityAugmentation(noise_std=0.1),
                              torch.Generator().manual_seed(0))
    assert 0 < (noisy - flat).std() < 0.1


def test_gaussian_blur_matches_scipy_per_sample():
    image = torch.rand(2, 1, 12, 10, 8, dtype=torch.float64)
    sigma = torch.tensor([0.0, 1.2], dtype=torch.float64)
    blurred = gaussian_blur(image, sigma)
    assert torch.allclose(blurred[0], image[0])
    radius = math.ceil(3 * 1.2)
    reference = gaussian_filter(image[1, 0].numpy(), 1.2, mode="constant", truncate=radius / 1.2)
    np.testing.assert_allclose(blurred[1, 0].numpy(), reference, atol=1e-10)
