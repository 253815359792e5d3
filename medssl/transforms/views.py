"""View geometry (METHODS 0.2): batched affine views rendered with ``affine_grid``/``grid_sample`` on any device,
with the world position (mm) of every view pixel known analytically.

A view is described by ``view_to_source``, a ``(D+1, D+1)`` matrix mapping view voxel indices to (fractional) source
voxel indices. Rotations and flips act in millimetres (they do not shear anisotropic scans):
``source_index = diag(1 / source_spacing) @ orientation @ diag(view_spacing) @ (v - anchor_view) + anchor_source``.
``view_to_world = source_affine @ view_to_source``. Written here because MONAI's ``Affine`` resamples one image at a
time on a centred grid and does not return the composed voxel -> world matrix we need for exact correspondence.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from medssl.data.geometry import coordinate_grid, voxel_to_world
from medssl.errors import InputError

#: which pair of views an objective asks the view sampler for (``medssl.transforms.sampler``)
VIEW_PRESETS = ("symmetric", "weak_strong", "raw_patch")


def check_pyramid(factors: Sequence[int], path: str) -> tuple[int, ...]:
    """Working-spacing factors (pretraining's ``data.pyramid``, the matcher's ``pyramid``) as a sorted tuple of
    distinct whole numbers >= 1 that includes 1 (the working scale itself); ``InputError`` naming ``path``."""
    values = list(factors) if isinstance(factors, (list, tuple)) else None
    if not values or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in values) \
            or 1 not in values or len(set(values)) != len(values):
        raise InputError(f"must list distinct whole numbers >= 1 including 1 (the working spacing), e.g. [1, 2]; "
                         f"got {factors!r}", path=path)
    return tuple(sorted(values))


def rotation_matrix(angles_rad: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Rotations ``(B, D, D)`` from ``D(D-1)/2`` angles per sample ``(B, P)``: one per axis plane, composed in
    the order of the planes ``(0,1)``, ``(0,2)``, ``(1,2)`` (2D: one angle; 3D: one about each axis)."""
    planes = list(itertools.combinations(range(spatial_dims), 2))
    if angles_rad.shape[-1] != len(planes):
        raise ValueError(f"{spatial_dims}D rotations need {len(planes)} angles per sample, got {angles_rad.shape[-1]}")
    batch = angles_rad.shape[0]
    rotation = torch.eye(spatial_dims, dtype=angles_rad.dtype, device=angles_rad.device).repeat(batch, 1, 1)
    for (i, j), angle in zip(planes, angles_rad.unbind(-1)):
        givens = torch.eye(spatial_dims, dtype=angles_rad.dtype, device=angles_rad.device).repeat(batch, 1, 1)
        givens[:, i, i], givens[:, j, j] = torch.cos(angle), torch.cos(angle)
        givens[:, i, j], givens[:, j, i] = -torch.sin(angle), torch.sin(angle)
        rotation = givens @ rotation  # (B, D, D)
    return rotation


def view_to_source(anchor_source: torch.Tensor, anchor_view: torch.Tensor, source_spacing_mm: torch.Tensor,
                   view_spacing_mm: torch.Tensor, orientation: torch.Tensor) -> torch.Tensor:
    """View voxel index -> source voxel index, ``(B, D+1, D+1)`` float64.

    The view point ``anchor_view`` ``(B, D)`` lands on the source point ``anchor_source`` ``(B, D)`` (both voxel
    indices); view axis ``k`` has spacing ``view_spacing_mm[:, k]`` and direction ``orientation[:, :, k]`` (an
    orthogonal ``(B, D, D)`` matrix in the source's millimetre axes; a negative determinant is a flip).
    """
    batch, dims = anchor_source.shape
    as64 = dict(dtype=torch.float64, device=anchor_source.device)
    linear = (orientation.to(**as64) * view_spacing_mm.to(**as64)[:, None, :]) \
        / source_spacing_mm.to(**as64)[:, :, None]  # (B, D, D): diag(1/sp) @ O @ diag(vs)
    matrix = torch.eye(dims + 1, **as64).repeat(batch, 1, 1)
    matrix[:, :dims, :dims] = linear
    matrix[:, :dims, dims] = anchor_source.to(**as64) - (linear @ anchor_view.to(**as64)[..., None])[..., 0]
    return matrix


def _index_to_normalised(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(D+1, D+1)``: voxel index -> ``grid_sample`` coordinate in [-1, 1] (align_corners=False), tensor-axis order."""
    size = torch.tensor([float(n) for n in shape], dtype=torch.float64, device=device)
    matrix = torch.diag(torch.cat([2.0 / size, size.new_ones(1)]))
    matrix[:-1, -1] = 1.0 / size - 1.0
    return matrix


def _reverse_axes(dims: int, device: torch.device) -> torch.Tensor:
    """``(D+1, D+1)`` permutation between tensor-axis order and ``grid_sample``'s (x, y[, z]) order."""
    order = list(reversed(range(dims))) + [dims]
    return torch.eye(dims + 1, dtype=torch.float64, device=device)[order]


def sampling_grid(view_to_source_matrix: torch.Tensor, source_shape: Sequence[int],
                  patch_size: Sequence[int]) -> torch.Tensor:
    """``grid_sample`` grid ``(V, *P, D)`` (x, y[, z] order, normalised) of views ``(V, D+1, D+1)``."""
    device = view_to_source_matrix.device
    dims = len(patch_size)
    flip = _reverse_axes(dims, device)
    theta = flip @ _index_to_normalised(source_shape, device) @ view_to_source_matrix \
        @ torch.linalg.inv(_index_to_normalised(patch_size, device)) @ flip  # (V, D+1, D+1)
    size = (theta.shape[0], 1, *[int(p) for p in patch_size])
    return F.affine_grid(theta[:, :dims].float(), list(size), align_corners=False)  # (V, *P, D)


def smooth_displacement_mm(count: int, patch_size: Sequence[int], magnitude_mm: float, control_points: int,
                           generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """Random smooth displacement fields ``(V, D, *P)`` in mm: Gaussian values (std ``magnitude_mm``) on a coarse
    grid of ``control_points`` per axis, interpolated (bi/trilinear) to the view grid."""
    dims = len(patch_size)
    coarse = torch.randn((count, dims, *[control_points] * dims), generator=generator, device=device)
    mode = ("linear", "bilinear", "trilinear")[dims - 1]
    return F.interpolate(coarse * magnitude_mm, size=[int(p) for p in patch_size], mode=mode, align_corners=True)


def touched_box(grid: torch.Tensor, valid: torch.Tensor, source_shape: Sequence[int]) -> tuple[list[int], list[int]]:
    """The box ``low <= i < high`` (tensor-axis voxel indices) of source voxels that bilinear sampling at the valid
    points of ``grid`` ``(V, *P, D)`` (normalised, x-y[-z] order) reads, with one voxel of margin."""
    size = torch.tensor(list(source_shape), dtype=torch.float64, device=grid.device)
    points = grid[valid[:, 0]].double().flip(-1)  # (N, D) tensor-axis order
    if points.numel() == 0:
        return [0] * len(source_shape), [1] * len(source_shape)
    index = (((points + 1.0) * size - 1.0) / 2.0).clamp(min=torch.zeros_like(size), max=size - 1)
    low = (index.min(dim=0).values.floor() - 1).clamp_min(0)
    high = torch.minimum(index.max(dim=0).values.floor() + 3, size)
    return [int(v) for v in low.tolist()], [int(v) for v in high.tolist()]


def render_views(source: torch.Tensor | Callable[[list[int], list[int]], torch.Tensor], source_affine: torch.Tensor,
                 view_to_source_matrix: torch.Tensor, patch_size: Sequence[int],
                 displacement_mm: torch.Tensor | None = None, *, source_shape: Sequence[int] | None = None,
                 device: torch.device | str | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Resample ``V`` views of one scan: ``(image (V,C,*P), coords (V,D,*P), valid (V,1,*P), view_to_world)``.

    ``source``: the scan ``(C, *S)``, or ``read(low, high)`` giving its voxels ``low <= i < high`` as ``(C, *box)``
    (then ``source_shape`` is required): only the box the views touch is read and resampled either way, so both
    give the same values. ``source_affine`` ``(D+1, D+1)`` voxel -> world mm; ``device`` (default: the source's)
    renders. Values are bilinear/trilinear; pixels whose centre lies outside the scan (beyond the outer voxel edges)
    are invalid and 0. ``displacement_mm`` ``(V, D, *P)`` (elastic views, along the source axes in mm) makes
    ``view_to_world`` None and the coordinates follow the deformed grid; otherwise coordinates are analytic.
    """
    dims = len(patch_size)
    read = source if callable(source) else None
    if read is None:
        source_shape, device = tuple(source.shape[1:]), device or source.device
    elif source_shape is None:
        raise ValueError("render_views needs source_shape when the source is a reader")
    device = torch.device(device or "cpu")
    source_shape = tuple(int(n) for n in source_shape)
    affine = torch.as_tensor(source_affine, dtype=torch.float64, device=device)
    grid = sampling_grid(view_to_source_matrix.to(device), source_shape, patch_size)  # (V, *P, D)
    size = torch.tensor(source_shape, dtype=torch.float64, device=device)
    if displacement_mm is not None:
        spacing = torch.linalg.norm(affine[:dims, :dims], dim=0)  # (D,)
        scale = (2.0 / (spacing * size)).flip(0).float()  # mm -> normalised units, (x, y[, z]) order
        grid = grid + displacement_mm.flip(1).movedim(1, -1) * scale  # (V, *P, D)
    valid = (grid.abs() <= 1.0).all(dim=-1).unsqueeze(1)  # (V, 1, *P)
    low, high = touched_box(grid, valid, source_shape)
    box = read(low, high) if read is not None else source[(slice(None), *map(slice, low, high))]
    box = box.to(device).float()  # (C, *box)
    start = torch.tensor(low, dtype=torch.float64, device=device).flip(0)
    extent = torch.tensor(box.shape[1:], dtype=torch.float64, device=device).flip(0)
    in_box = (((grid.double() + 1.0) * size.flip(0) - 2.0 * start) / extent - 1.0).float()  # the box's [-1, 1]
    batch_source = box.unsqueeze(0).expand(grid.shape[0], *box.shape)  # (V, C, *box)
    image = F.grid_sample(batch_source, in_box, mode="bilinear", padding_mode="border", align_corners=False)
    image = image * valid  # (V, C, *P)
    if displacement_mm is None:
        view_to_world = affine @ view_to_source_matrix.to(device)  # (V, D+1, D+1)
        coords = torch.stack([coordinate_grid(m, patch_size) for m in view_to_world])  # (V, D, *P)
        return image, coords, valid, view_to_world
    source_index = ((grid.double().flip(-1) + 1.0) * size - 1.0) / 2.0  # (V, *P, D) tensor-axis order
    coords = voxel_to_world(affine, source_index).float().movedim(-1, 1)  # (V, D, *P)
    return image, coords.contiguous(), valid, None


def random_orientation(count: int, spatial_dims: int, rotate_deg: float, flip_prob: float,
                       generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """Random orthogonal matrices ``(V, D, D)``: rotation angles uniform in ``±rotate_deg`` per axis plane, each
    view axis flipped with probability ``flip_prob``."""
    planes = spatial_dims * (spatial_dims - 1) // 2
    angles = (torch.rand((count, planes), generator=generator, device=device, dtype=torch.float64) * 2 - 1) \
        * math.radians(rotate_deg)
    flips = torch.rand((count, spatial_dims), generator=generator, device=device, dtype=torch.float64) < flip_prob
    signs = 1.0 - 2.0 * flips.double()  # (V, D)
    return rotation_matrix(angles, spatial_dims) * signs[:, None, :]  # (V, D, D): R @ diag(signs)
