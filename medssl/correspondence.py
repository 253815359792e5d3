"""Which point of view b shows the same anatomy as each feature cell of view a (2D and 3D, batched).

Conventions: a stride-``s`` feature grid of a view of size ``N`` (per axis, divisible by ``s``) has ``N / s`` cells;
cell ``j`` covers voxels ``j*s ... j*s + s - 1`` and its centre is the voxel index ``j*s + (s - 1) / 2``. Grid
coordinates are those of ``F.grid_sample(..., align_corners=False)``: ``(x, y[, z])`` = reversed tensor-axis order,
``-1``/``+1`` at the outer edges of the first/last cell, so a voxel index ``i`` maps to ``(2 i + 1) / N - 1`` for every
stride. Two paths: analytic (both views carry ``view_to_world``: ``idx_b = A_b^-1 A_a idx_a``, exact) and, for
non-affine views, nearest neighbour in the ``coords`` maps within ``radius_mm`` refined to sub-cell precision with
the local Jacobian of view b's coordinate map (exact again when the view happens to be affine).
Written here because MONAI/torch offer resampling but no point correspondence between two resampled views.
Also ``peak_positions``: the sub-voxel arg-max of score maps (similarity maps of one-shot matching, heatmaps).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from medssl.data.batch import ViewBatch


def _cell_pool(values: torch.Tensor, stride: int) -> torch.Tensor:
    """Mean of ``(B, K, *S)`` over the cells of a stride-``stride`` grid -> ``(B, K, *S / stride)``."""
    if stride == 1:
        return values
    pool = (F.avg_pool2d, F.avg_pool3d)[values.ndim - 4]
    return pool(values, stride)


def _check_stride(view: ViewBatch, stride: int) -> tuple[int, ...]:
    """The cell-grid shape of ``view`` at ``stride`` (every spatial size must be divisible by it)."""
    sizes = tuple(view.image.shape[2:])
    if stride < 1 or any(s % stride for s in sizes):
        raise ValueError(f"view size {sizes} is not divisible by the feature stride {stride}")
    return tuple(s // stride for s in sizes)


def _cell_indices(shape: tuple[int, ...], stride: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Voxel indices of the cell centres of a stride-``stride`` grid: ``(D, *shape)``."""
    axes = [torch.arange(n, dtype=dtype, device=device) * stride + (stride - 1) / 2 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (D, *shape)


def feature_coords(view: ViewBatch, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """World mm of the cell centres of ``view``'s stride-``stride`` feature grid ``(B, D, *S/s)`` and their validity
    ``(B, *S/s)`` (True when every pixel of the cell lies inside the source scan).

    Analytic from ``view_to_world`` when present, else the cell mean of the ``coords`` map (exact for affine views).
    """
    shape = _check_stride(view, stride)
    valid = _cell_pool(view.valid.float(), stride)[:, 0] > 1.0 - 1e-6  # (B, *S/s)
    if view.view_to_world is None:
        return _cell_pool(view.coords.double(), stride).to(view.coords.dtype), valid
    dims = view.spatial_dims
    affine = view.view_to_world.double()  # (B, D+1, D+1)
    idx = _cell_indices(shape, stride, torch.float64, affine.device).flatten(1)  # (D, N)
    world = affine[:, :dims, :dims] @ idx + affine[:, :dims, dims:]  # (B, D, N)
    return world.reshape(world.shape[0], dims, *shape).to(view.coords.dtype), valid


def _index_to_grid(idx: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Voxel indices ``(B, N, D)`` (tensor-axis order) -> grid_sample coordinates ``(B, N, D)`` in (x, y[, z])."""
    size = torch.tensor(sizes, dtype=idx.dtype, device=idx.device)
    return ((2 * idx + 1) / size - 1).flip(-1)  # (B, N, D) reversed axis order


def _inside(grid: torch.Tensor, cells: tuple[int, ...]) -> torch.Tensor:
    """True where grid points ``(B, N, D)`` lie within the hull of the cell centres of a grid of ``cells``."""
    limit = 1 - 1 / torch.tensor(cells[::-1], dtype=grid.dtype, device=grid.device)
    return (grid.abs() <= limit + 1e-6).all(-1)  # (B, N)


def _nearest_indices(
    view: ViewBatch, world: torch.Tensor, stride: int, radius_mm: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fractional voxel indices ``(B, N, D)`` of world points ``(B, N, D)`` in a view without an affine, found by
    nearest cell centre (k-d tree on the ``coords`` map) within ``radius_mm`` plus a first-order (Jacobian) refinement;
    second output: found ``(B, N)``."""
    centres, _ = feature_coords(view, stride)  # (B, D, *C)
    dims, cells = view.spatial_dims, tuple(centres.shape[2:])
    centres = centres.double()
    # Jacobian d world / d cell index at every cell: (B, *C, D, D); rows = world axes, columns = index axes
    jac = torch.stack(torch.gradient(centres, dim=list(range(2, 2 + dims))), dim=2)  # (B, D, D, *C)
    jac = jac.permute(0, *range(3, 3 + dims), 1, 2)  # (B, *C, D, D)
    if radius_mm is not None and radius_mm <= 0:
        raise ValueError(f"radius_mm must be positive, got {radius_mm}")
    # default per sample: half the sum of a cell's edge lengths, >= half its longest diagonal, so every point inside
    # the view finds a centre (points found outside the view are removed by the hull test of the caller)
    half_cell_mm = 0.5 * jac.norm(dim=-2).sum(-1).flatten(1).amax(1) * (1 + 1e-3)  # (B,)
    flat_centres = centres.flatten(2).transpose(1, 2)  # (B, M, D)
    flat_jac = jac.flatten(1, dims)  # (B, M, D, D)
    query = world.double()
    found = torch.zeros(query.shape[:2], dtype=torch.bool, device=query.device)
    idx = torch.zeros_like(query)
    cell_index = _cell_indices(cells, 1, torch.float64, query.device).flatten(1).T  # (M, D) cell indices
    for b in range(query.shape[0]):
        tree = cKDTree(flat_centres[b].cpu().numpy())
        radius = float(half_cell_mm[b]) if radius_mm is None else radius_mm
        distance, nearest = tree.query(query[b].cpu().numpy(), distance_upper_bound=radius)
        hit = torch.from_numpy(np.isfinite(distance)).to(query.device)
        nearest = torch.from_numpy(np.where(np.isfinite(distance), nearest, 0)).to(query.device)
        residual = query[b] - flat_centres[b, nearest]  # (N, D) world mm
        step = torch.linalg.lstsq(flat_jac[b, nearest], residual.unsqueeze(-1)).solution[..., 0]  # (N, D) cells
        cell = cell_index[nearest] + step.clamp(-1.0, 1.0)  # (N, D) fractional cell index
        idx[b] = cell * stride + (stride - 1) / 2
        found[b] = hit
    return idx, found


def world_to_view_grid(
    view: ViewBatch, world_mm: torch.Tensor, stride: int = 1, radius_mm: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid coordinates ``(B, N, D)`` (x, y[, z], for ``grid_sample`` on ``view``'s stride-``stride`` features) of world
    points ``world_mm`` ``(B, N, D)``, and ``(B, N)`` True where the point lies inside the view's cell-centre hull and
    inside the scan. ``radius_mm`` only matters for views without ``view_to_world`` (default: half the sum of a
    cell's edge lengths, which reaches every point of the view).
    """
    cells = _check_stride(view, stride)
    sizes = tuple(view.image.shape[2:])
    dims = view.spatial_dims
    if view.view_to_world is not None:
        affine = view.view_to_world.double()  # (B, D+1, D+1)
        inverse = torch.linalg.inv(affine[:, :dims, :dims])  # (B, D, D)
        idx = (world_mm.double() - affine[:, None, :dims, dims]) @ inverse.transpose(1, 2)  # (B, N, D)
        found = torch.ones(idx.shape[:2], dtype=torch.bool, device=idx.device)
    else:
        idx, found = _nearest_indices(view, world_mm, stride, radius_mm)
    grid = _index_to_grid(idx, sizes)  # (B, N, D)
    _, cell_valid = feature_coords(view, stride)  # (B, *C)
    sample_grid = grid.to(torch.float32).reshape(grid.shape[0], *([1] * (dims - 1)), grid.shape[1], dims)
    in_scan = F.grid_sample(cell_valid[:, None].float(), sample_grid, mode="bilinear", align_corners=False)
    in_scan = in_scan.reshape(grid.shape[:2]) > 1.0 - 1e-4  # (B, N): every cell used by the interpolation is valid
    mask = found & _inside(grid, cells) & in_scan
    return grid.to(world_mm.dtype if world_mm.is_floating_point() else torch.float32), mask


def match_views(
    view_a: ViewBatch, view_b: ViewBatch, stride_a: int = 1, stride_b: int = 1, radius_mm: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every cell of view a's stride-``stride_a`` grid, where the same anatomy lies in view b.

    Returns ``grid_b`` ``(B, *S_a/stride_a, D)`` (x, y[, z] coordinates for ``F.grid_sample`` on view b's
    stride-``stride_b`` features) and ``mask`` ``(B, *S_a/stride_a)``: True where the cell lies in the scan in view
    a and its match lies inside view b's cell-centre hull and inside the scan.
    """
    world, valid_a = feature_coords(view_a, stride_a)  # (B, D, *C_a)
    cells = tuple(world.shape[2:])
    points = world.flatten(2).transpose(1, 2)  # (B, N, D)
    grid, mask = world_to_view_grid(view_b, points, stride_b, radius_mm)
    grid = grid.reshape(grid.shape[0], *cells, grid.shape[-1])  # (B, *C_a, D)
    return grid, mask.reshape(mask.shape[0], *cells) & valid_a


def gather_pairs(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    grid_b: torch.Tensor,
    mask: torch.Tensor,
    max_pairs: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corresponding feature vectors ``(N, C)`` of view a (at its cells) and view b (bilinear at ``grid_b``).

    ``feat_a`` ``(B, C, *C_a)``, ``feat_b`` ``(B, C_b, *C_b)``, ``grid_b`` ``(B, *C_a, D)`` and ``mask``
    ``(B, *C_a)`` as from ``match_views``; keeps the masked cells, a random subset of ``max_pairs`` when there are more.
    """
    if tuple(feat_a.shape[2:]) != tuple(mask.shape[1:]) or tuple(grid_b.shape[1:-1]) != tuple(mask.shape[1:]):
        raise ValueError(
            f"feat_a {tuple(feat_a.shape)}, grid_b {tuple(grid_b.shape)} and mask {tuple(mask.shape)} must share the "
            "cell grid of view a"
        )
    keep = mask.flatten().nonzero()[:, 0]  # (P,) flat indices of the matched cells, row-major over (B, *C_a)
    if max_pairs is not None and keep.shape[0] > max_pairs:
        chosen = torch.randperm(keep.shape[0], generator=generator, device="cpu")[:max_pairs].to(keep.device)
        keep = keep[chosen].sort().values  # sorted: each image's cells are contiguous
    fa = feat_a.flatten(2).transpose(1, 2).flatten(0, 1)[keep]  # (N, C)
    # view b is sampled at the kept cells' points only (4096 of 8 x 128^2 cells: 1/32 of sampling the whole map)
    dims = grid_b.shape[-1]
    points = grid_b.flatten(0, -2)[keep].to(feat_b.dtype)  # (N, D)
    counts = torch.bincount(keep // mask[0].numel(), minlength=feat_b.shape[0]).tolist()
    fb = torch.cat([F.grid_sample(feat_b[image:image + 1], part.reshape(1, -1, *[1] * (dims - 1), dims),
                                  mode="bilinear", align_corners=False).reshape(feat_b.shape[1], -1).T
                    for image, part in enumerate(points.split(counts))])  # (N, C_b)
    return fa, fb


def flat_index(cells: torch.Tensor, sizes: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Row-major flat index ``(...)`` of integer cells ``(..., D)`` in a grid of ``sizes`` ``(D,)``."""
    flat = torch.zeros(cells.shape[:-1], dtype=torch.long, device=cells.device)
    for axis in range(cells.shape[-1]):
        flat = flat * sizes[axis] + cells[..., axis]
    return flat


def offset_cube(values: torch.Tensor, dims: int) -> torch.Tensor:
    """Every combination of the 1D ``values`` along ``dims`` axes, row-major: ``(len(values) ** dims, D)`` (the
    offsets of a cube of cells or voxels around a point)."""
    return torch.stack(torch.meshgrid(*[values] * dims, indexing="ij"), dim=-1).reshape(-1, dims)


def cells_of(feat: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Feature vectors ``(B, K, C)`` of ``feat`` ``(B, C, *S)`` at integer cells ``(B, K, D)``."""
    flat = flat_index(cells, feat.shape[2:])  # (B, K)
    index = flat[:, None, :].expand(feat.shape[0], feat.shape[1], flat.shape[1])  # (B, C, K)
    return feat.flatten(2).gather(2, index).transpose(1, 2)  # (B, K, C)


def matched_cells(grid: torch.Tensor, sizes: Sequence[int], stride: int, shape: Sequence[int]) -> torch.Tensor:
    """Integer cells ``(B, K, D)`` (clamped inside ``shape``) of a stride-``stride`` grid holding the ``grid_sample``
    points ``grid`` ``(B, K, D)`` (x, y[, z]) of a view of voxel ``sizes``."""
    size = torch.tensor(tuple(sizes), dtype=grid.dtype, device=grid.device)
    index = ((grid.flip(-1) + 1) * size - 1) / 2  # (B, K, D) voxel index, tensor-axis order
    limit = torch.tensor(tuple(shape), device=grid.device) - 1
    return torch.minimum(torch.floor((index + 0.5) / stride).long().clamp_min(0), limit)


def peak_positions(maps: torch.Tensor, subpixel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Arg-max of every map ``(L, *S)``, with ``subpixel`` refined per axis by a parabola through the peak and its
    two neighbours.

    Returns voxel indices ``(L, D)`` (float64) and the peak values ``(L,)``. Written here because neither MONAI nor
    scikit-image offers a batched n-D sub-pixel arg-max.
    """
    count, shape = maps.shape[0], tuple(maps.shape[1:])
    flat = maps.reshape(count, -1)  # (L, N)
    scores, index = flat.max(dim=1)
    peaks = torch.stack(torch.unravel_index(index, shape), dim=1)  # (L, D)
    refined = peaks.to(torch.float64).clone()
    if not subpixel:
        return refined.cpu().numpy(), scores.double().cpu().numpy()
    rows = torch.arange(count, device=maps.device)
    for axis, size in enumerate(shape):
        inside = (peaks[:, axis] > 0) & (peaks[:, axis] < size - 1)
        before, after = peaks.clone(), peaks.clone()
        before[:, axis] = (peaks[:, axis] - 1).clamp(min=0)
        after[:, axis] = (peaks[:, axis] + 1).clamp(max=size - 1)
        value_before = maps[(rows, *before.unbind(1))].double()
        value_after = maps[(rows, *after.unbind(1))].double()
        curvature = value_before - 2.0 * scores.double() + value_after
        offset = torch.where(curvature < 0, 0.5 * (value_before - value_after) / curvature.clamp(max=-1e-12),
                             torch.zeros_like(curvature))
        refined[:, axis] += torch.where(inside, offset.clamp(-0.5, 0.5), torch.zeros_like(offset))
    return refined.cpu().numpy(), scores.double().cpu().numpy()
