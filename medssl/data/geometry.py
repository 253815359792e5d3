"""Voxel index <-> world millimetre conversion: the one place it lives.

An affine is a ``(D+1, D+1)`` homogeneous matrix (numpy or torch) mapping the voxel index ``ijk`` (axis ``k`` of the
array, voxel centres at integers) to world mm: ``xyz = A[:D, :D] @ ijk + A[:D, D]``. Every function accepts numpy
arrays and torch tensors; the result is torch when any input is torch (on that input's device), numpy otherwise.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


def _as_torch_pair(affine: ArrayLike, points: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Both as float64 torch tensors on the points' device, plus the dtype the result should have."""
    device = points.device if isinstance(points, torch.Tensor) else affine.device
    points_t = _plain_tensor(points).to(device)
    out_dtype = points_t.dtype if points_t.is_floating_point() else torch.float64
    return _plain_tensor(affine).to(device, torch.float64), points_t.to(torch.float64), out_dtype


def _plain_tensor(values: ArrayLike) -> torch.Tensor:
    """A plain torch tensor (a MONAI MetaTensor loses its metadata; numpy/lists are converted)."""
    if isinstance(values, torch.Tensor):
        return values.as_subclass(torch.Tensor)
    return torch.as_tensor(np.asarray(values))


def _check(affine_shape: tuple[int, ...], points_shape: tuple[int, ...]) -> int:
    """The spatial dimension D, after checking that the affine is (D+1, D+1) and points are (..., D)."""
    if len(affine_shape) != 2 or affine_shape[0] != affine_shape[1] or affine_shape[0] not in (3, 4):
        raise ValueError(f"affine must be a (D+1, D+1) matrix with D = 2 or 3, got shape {tuple(affine_shape)}")
    dims = affine_shape[0] - 1
    if len(points_shape) == 0 or points_shape[-1] != dims:
        raise ValueError(f"points must have shape (..., {dims}) for a {dims}D affine, got {tuple(points_shape)}")
    return dims


def voxel_to_world(affine: ArrayLike, ijk: ArrayLike) -> np.ndarray | torch.Tensor:
    """World mm ``(..., D)`` of voxel indices ``ijk`` ``(..., D)`` (fractional indices allowed)."""
    if isinstance(affine, torch.Tensor) or isinstance(ijk, torch.Tensor):
        affine_t, ijk_t, out_dtype = _as_torch_pair(affine, ijk)
        dims = _check(tuple(affine_t.shape), tuple(ijk_t.shape))
        xyz = ijk_t @ affine_t[:dims, :dims].T + affine_t[:dims, dims]  # (..., D)
        return xyz.to(out_dtype)
    affine_np, ijk_np = np.asarray(affine, dtype=np.float64), np.asarray(ijk, dtype=np.float64)
    dims = _check(affine_np.shape, ijk_np.shape)
    return ijk_np @ affine_np[:dims, :dims].T + affine_np[:dims, dims]  # (..., D)


def world_to_voxel(affine: ArrayLike, xyz: ArrayLike) -> np.ndarray | torch.Tensor:
    """Fractional voxel indices ``(..., D)`` of world points ``xyz`` ``(..., D)`` in mm."""
    if isinstance(affine, torch.Tensor) or isinstance(xyz, torch.Tensor):
        affine_t, xyz_t, out_dtype = _as_torch_pair(affine, xyz)
        dims = _check(tuple(affine_t.shape), tuple(xyz_t.shape))
        inverse = torch.linalg.inv(affine_t[:dims, :dims])
        ijk = (xyz_t - affine_t[:dims, dims]) @ inverse.T  # (..., D)
        return ijk.to(out_dtype)
    affine_np, xyz_np = np.asarray(affine, dtype=np.float64), np.asarray(xyz, dtype=np.float64)
    dims = _check(affine_np.shape, xyz_np.shape)
    return (xyz_np - affine_np[:dims, dims]) @ np.linalg.inv(affine_np[:dims, :dims]).T  # (..., D)


def coordinate_grid(affine: ArrayLike, spatial_shape: Sequence[int]) -> torch.Tensor:
    """World mm of every voxel centre, float32 ``(D, *spatial_shape)``.

    Written here because MONAI's grid helpers produce centred voxel grids, not world coordinates of an affine.
    Built as a sum of broadcast per-axis terms in float64, so no ``(N, D)`` index array is materialised.
    """
    affine_t = _plain_tensor(affine).to(torch.float64)
    dims = _check(tuple(affine_t.shape), (len(spatial_shape),))
    axes = []
    for axis, size in enumerate(spatial_shape):
        view_shape = [1] * dims
        view_shape[axis] = int(size)
        axes.append(torch.arange(int(size), dtype=torch.float64, device=affine_t.device).reshape(view_shape))
    grid = torch.empty((dims, *[int(s) for s in spatial_shape]), dtype=torch.float32, device=affine_t.device)
    for row in range(dims):
        world = affine_t[row, dims] + sum(affine_t[row, axis] * axes[axis] for axis in range(dims))
        grid[row] = world.expand(grid.shape[1:])  # (*spatial)
    return grid


def spacing_mm(affine: ArrayLike) -> tuple[float, ...]:
    """Voxel size along each array axis in mm: the norms of the affine's first D columns."""
    matrix = affine.detach().cpu().double().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine, float)
    dims = _check(matrix.shape, (matrix.shape[0] - 1,))
    return tuple(float(v) for v in np.linalg.norm(matrix[:dims, :dims], axis=0))
