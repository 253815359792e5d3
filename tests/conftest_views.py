"""Test helper: views of a synthetic scan resampled with known affines (independent of the package's view sampler).

A view is defined by ``M`` (D+1, D+1) mapping view voxel indices to source voxel indices; its ``view_to_world`` is
``source_affine @ M``. Rendering uses ``grid_sample`` (bilinear, align_corners=False, voxel ``i`` at ``(2i+1)/N-1``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medssl.data.batch import PairBatch, ViewBatch
from medssl.data.geometry import coordinate_grid


def anisotropic_affine(dims: int) -> torch.Tensor:
    """A source affine (D+1, D+1): voxel size 0.7 / 1.3 (/ 2.1) mm, rotated 30 deg in the first plane, shifted."""
    spacing = torch.tensor([0.7, 1.3, 2.1][:dims], dtype=torch.float64)
    rotation = torch.eye(dims, dtype=torch.float64)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    rotation[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    affine = torch.eye(dims + 1, dtype=torch.float64)
    affine[:dims, :dims] = rotation @ torch.diag(spacing)
    affine[:dims, dims] = torch.tensor([12.0, -7.0, 3.0][:dims], dtype=torch.float64)
    return affine


def smooth_volume(dims: int, size: int, generator: torch.Generator, channels: int = 1) -> torch.Tensor:
    """A smooth random image ``(channels, *[size]*dims)`` in about [-1, 1] (upsampled coarse noise)."""
    coarse = torch.randn((1, channels, *[4] * dims), generator=generator, dtype=torch.float64)
    mode = "bilinear" if dims == 2 else "trilinear"
    return F.interpolate(coarse, size=[size] * dims, mode=mode, align_corners=True)[0]


def view_matrix(dims: int, source_size: int, view_size: int, generator: torch.Generator,
                max_angle_deg: float = 20.0, scale: tuple[float, float] = (0.7, 1.1), flip: bool = True,
                max_shift: float = 0.15) -> torch.Tensor:
    """A random ``M`` (D+1, D+1): view index -> source index (rotation in every plane, zoom, optional flips, shift)."""
    rand = lambda: float(torch.rand((), generator=generator, dtype=torch.float64))  # noqa: E731
    matrix = torch.eye(dims, dtype=torch.float64)
    for i in range(dims):
        for j in range(i + 1, dims):
            angle = math.radians((2 * rand() - 1) * max_angle_deg)
            plane = torch.eye(dims, dtype=torch.float64)
            c, s = math.cos(angle), math.sin(angle)
            plane[i, i], plane[i, j], plane[j, i], plane[j, j] = c, -s, s, c
            matrix = plane @ matrix
    zoom = torch.tensor([scale[0] + (scale[1] - scale[0]) * rand() for _ in range(dims)], dtype=torch.float64)
    flips = torch.tensor([-1.0 if flip and rand() < 0.5 else 1.0 for _ in range(dims)], dtype=torch.float64)
    matrix = matrix @ torch.diag(zoom * flips * source_size / view_size)
    centre_src = torch.tensor([(source_size - 1) / 2 + (2 * rand() - 1) * max_shift * source_size for _ in range(dims)],
                              dtype=torch.float64)
    centre_view = torch.full((dims,), (view_size - 1) / 2, dtype=torch.float64)
    m = torch.eye(dims + 1, dtype=torch.float64)
    m[:dims, :dims] = matrix
    m[:dims, dims] = centre_src - matrix @ centre_view
    return m


def render_view(source: torch.Tensor, source_affine: torch.Tensor, m: torch.Tensor, view_size: int) -> dict:
    """Resample ``source`` (C, *N) through ``m``: image, coords (world mm), valid and view_to_world of one view."""
    dims = source.ndim - 1
    shape = [view_size] * dims
    axes = [torch.arange(view_size, dtype=torch.float64) for _ in range(dims)]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(dims, -1)  # (D, N)
    src_idx = m[:dims, :dims] @ idx + m[:dims, dims:]  # (D, N)
    sizes = torch.tensor(source.shape[1:], dtype=torch.float64)[:, None]
    grid = ((2 * src_idx + 1) / sizes - 1).flip(0).T.reshape(1, *shape, dims)  # (1, *S, D) in (x, y[, z])
    image = F.grid_sample(source[None], grid, mode="bilinear", align_corners=False)[0]  # (C, *S)
    valid = ((src_idx >= 0) & (src_idx <= sizes - 1)).all(0).reshape(1, *shape)  # inside the source's centre hull
    view_to_world = source_affine @ m
    return {
        "image": (image * valid).float(),
        "coords": coordinate_grid(view_to_world, shape),
        "valid": valid,
        "view_to_world": view_to_world.float(),
    }


def stack_views(views: list[dict], with_affine: bool = True) -> ViewBatch:
    """A ``ViewBatch`` from per-sample ``render_view`` dicts; ``info`` = a positive map derived from the image."""
    image = torch.stack([v["image"] for v in views])
    info = 1.0 + image.abs().mean(1, keepdim=True)  # (B, 1, *S) any positive map will do for the tests
    return ViewBatch(
        image=image,
        coords=torch.stack([v["coords"] for v in views]),
        valid=torch.stack([v["valid"] for v in views]),
        info=info,
        view_to_world=torch.stack([v["view_to_world"] for v in views]) if with_affine else None,
    )


def make_pair_batch(dims: int, batch: int = 2, view_size: int = 32, source_size: int | None = None,
                    preset: str = "symmetric", seed: int = 0, with_affine: bool = True) -> PairBatch:
    """Two views per sample of smooth random scans; ``raw_patch``: view a = the whole scan, view b = a rotated patch."""
    generator = torch.Generator().manual_seed(seed)
    source_size = source_size or (2 * view_size if preset == "raw_patch" else view_size)
    affine = anisotropic_affine(dims)
    views_a, views_b = [], []
    for _ in range(batch):
        source = smooth_volume(dims, source_size, generator)
        if preset == "raw_patch":
            m_a = torch.eye(dims + 1, dtype=torch.float64)
            views_a.append(render_view(source, affine, m_a, source_size))
            m_b = view_matrix(dims, source_size, view_size, generator, scale=(0.45, 0.55), flip=False, max_shift=0.1)
        else:
            views_a.append(render_view(source, affine, view_matrix(dims, source_size, view_size, generator), view_size))
            m_b = view_matrix(dims, source_size, view_size, generator)
        views_b.append(render_view(source, affine, m_b, view_size))
    subjects = [f"s{i}" for i in range(batch)]
    return PairBatch(stack_views(views_a, with_affine), stack_views(views_b, with_affine), subjects)
