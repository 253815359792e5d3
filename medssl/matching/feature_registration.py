"""Dense feature registration: a smooth displacement that refines a template -> query map so that many template
points land where the query's features match theirs.

The robust spline of ``consistency`` goes through a few hundred support matches, each an arg-max of its own. Where
the features change little along a structure (the outer surface of an organ) those matches slide along it, and so
does the spline. Here every one of thousands of template points pulls on one smooth displacement (a control grid,
bilinear / trilinear between its nodes, its bending penalised) by its feature similarity, as an intensity
registration does with intensities: the points on either side of a structure hold it in place.

Each point's similarity is tabulated once per feature level on the whole voxels within ``radius_mm`` of where the
starting map puts it. A dot product is linear in the features, so the table's interpolation equals the similarity
of the interpolated features (before their renormalisation); the optimiser then reads only the tables (about
0.05 s per step for 20 000 points and the 8 levels of the shipped 3D network on 2 CPU cores, against about 0.35 s,
estimated from per-level timings, for sampling the feature maps themselves). Written here because
MONAI's registration blocks (``Warp``, ``BendingEnergyLoss``) act on whole images and dense fields, and neither
MONAI nor SimpleITK registers multi-channel feature maps by a similarity given as tables.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medssl.correspondence import flat_index, offset_cube
from medssl.data.geometry import spacing_mm as affine_spacing_mm

#: control-grid spacing (mm), search radius around the starting map (mm), smoothness weight, Adam steps and step
#: size (in units of the query's largest voxel side); chosen on the seed-1 3D demo population, which the matcher's
#: tables do not use (docs/oneshot.md)
CONTROL_SPACING_MM = 16.0
RADIUS_MM = 8.0
SMOOTHNESS = 0.1
STEPS = 50
STEP_VOXELS = 0.5
DEFAULT_SAMPLES = 20000


@dataclass(frozen=True)
class _Table:
    """Similarities ``(N, prod(width))`` of N points on a box of whole voxels of one query level, ``width`` voxels
    per axis from ``corner`` ``(N, D)``; ``stride``: the level's voxel in voxels of the query's padded grid."""

    values: torch.Tensor
    corner: torch.Tensor
    width: torch.Tensor
    stride: torch.Tensor

    def read(self, voxels: torch.Tensor) -> torch.Tensor:
        """Linear interpolation ``(N,)`` at query voxels ``(N, D)`` (clamped into the box)."""
        dims = voxels.shape[1]
        position = ((voxels + 0.5) / self.stride - 0.5 - self.corner).clamp(min=0.0)
        position = torch.minimum(position, (self.width - 1).to(position) - 1e-4)
        low = position.floor()
        fraction = position - low
        corners = offset_cube(torch.arange(2, device=voxels.device), dims)  # (2^D, D)
        index = flat_index(low.long()[:, None, :] + corners, self.width)  # (N, 2^D)
        weights = torch.where(corners.bool(), fraction[:, None, :], 1.0 - fraction[:, None, :]).prod(-1)
        return (weights * self.values.gather(1, index)).sum(1)


def similarity_tables(vectors: Sequence[torch.Tensor], levels: Sequence[torch.Tensor], voxels: torch.Tensor,
                      padded_shape: Sequence[int], spacing_mm: Sequence[float], radius_mm: float) -> list[_Table]:
    """Per level: the dot products of the template ``vectors`` ``(N, C_l)`` with the query's unit features
    ``levels`` ``(C_l, *P_l)`` on the whole level voxels within ``radius_mm`` (per axis, at least one voxel) of the
    query voxels ``voxels`` ``(N, D)`` (of the padded grid ``padded_shape``, voxel size ``spacing_mm``)."""
    tables = []
    for vector, level in zip(vectors, levels):
        size = torch.as_tensor(level.shape[1:], device=voxels.device)
        stride = torch.as_tensor(padded_shape, dtype=torch.float32, device=voxels.device) / size
        reach = [max(1, round(radius_mm / (float(s) * float(d)))) for s, d in zip(stride, spacing_mm)]
        width = torch.as_tensor([2 * r + 1 for r in reach], device=voxels.device)
        corner = ((voxels + 0.5) / stride - 0.5).round().long() - torch.as_tensor(reach, device=voxels.device)
        flat = level.reshape(level.shape[0], -1).T.contiguous()  # (V, C): one row per level voxel
        values = torch.empty(len(voxels), int(width.prod()), device=voxels.device)
        for column, offset in enumerate(itertools.product(*[range(int(w)) for w in width])):
            cells = torch.minimum((corner + torch.as_tensor(offset, device=voxels.device)).clamp(min=0), size - 1)
            values[:, column] = (flat.index_select(0, flat_index(cells, size)) * vector).sum(-1)
        tables.append(_Table(values, corner.float(), width, stride))
    return tables


@dataclass(frozen=True)
class Displacement:
    """A smooth displacement (mm) of template world points: ``values`` ``(1, D, *G)`` on a control grid whose node
    ``i`` (per world axis) sits at ``origin_mm + i * spacing_mm``; linear between nodes, constant beyond the grid."""

    values: torch.Tensor
    origin_mm: torch.Tensor
    spacing_mm: float

    def _grid(self, points_mm: torch.Tensor) -> torch.Tensor:
        """Points ``(M, D)`` mm -> ``grid_sample`` coordinates (align_corners=True) ``(1, M, 1[, 1], D)``."""
        dims = points_mm.shape[1]
        nodes = torch.as_tensor(self.values.shape[2:], dtype=points_mm.dtype, device=points_mm.device)
        normalised = 2.0 * (points_mm - self.origin_mm.to(points_mm)) / (self.spacing_mm * (nodes - 1)) - 1.0
        return normalised.flip(-1).reshape(1, -1, *[1] * (dims - 1), dims)  # grid_sample wants the last axis first

    def at(self, points_mm: torch.Tensor) -> torch.Tensor:
        """The displacement ``(M, D)`` mm at template points ``(M, D)`` mm (differentiable in ``values``)."""
        sampled = F.grid_sample(self.values, self._grid(points_mm), mode="bilinear", padding_mode="border",
                                align_corners=True)
        return sampled.reshape(points_mm.shape[1], -1).T

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        """The displacement ``(M, D)`` mm (float64) at template points ``(M, D)`` mm."""
        with torch.no_grad():
            points = torch.as_tensor(np.asarray(points_mm), dtype=torch.float32, device=self.values.device)
            return self.at(points).double().cpu().numpy()


def _bending(values: torch.Tensor, spacing_mm: float) -> torch.Tensor:
    """Mean squared second difference of the control values along each axis with three or more nodes, per mm^2."""
    terms = [values.diff(n=2, dim=axis).square().mean() for axis in range(2, values.ndim) if values.shape[axis] > 2]
    return (sum(terms) if terms else values.sum() * 0.0) / spacing_mm ** 2


def sample_voxels(shape: Sequence[int], count: int = DEFAULT_SAMPLES, seed: int = 0) -> np.ndarray:
    """``count`` distinct voxels ``(N, D)`` drawn at random from an image of ``shape`` (all of them when it has
    fewer), in raster order: the points a dense feature registration compares (as ITK samples its metric)."""
    total = int(np.prod(shape))
    chosen = np.arange(total) if count >= total else np.sort(np.random.default_rng(seed).choice(total, count,
                                                                                                replace=False))
    return np.stack(np.unravel_index(chosen, tuple(int(s) for s in shape)), axis=-1).astype(np.float64)


def register_features(vectors: Sequence[torch.Tensor], points_mm: np.ndarray, start_mm: np.ndarray,
                      levels: Sequence[torch.Tensor], padded_shape: Sequence[int], affine: torch.Tensor,
                      shape: Sequence[int] | None = None, *, control_spacing_mm: float = CONTROL_SPACING_MM,
                      radius_mm: float = RADIUS_MM, smoothness: float = SMOOTHNESS, steps: int = STEPS,
                      step_voxels: float = STEP_VOXELS) -> Displacement:
    """The displacement (over the template) that, added to a starting map, best matches the template's unit feature
    ``vectors`` (per level ``(N, C_l)``) at ``points_mm`` ``(N, D)`` with the query's unit features ``levels`` (per
    level ``(C_l, *P_l)``, on the padded grid ``padded_shape``; ``affine``: the query's voxel -> world mm), where
    the starting map puts the points at ``start_mm`` ``(N, D)`` query mm. With the query image's own ``shape``
    (voxels, ``<= padded_shape``), points the starting map puts outside it are left out: their similarity says
    nothing (another field of view), and they would pull the displacement.

    Maximises the mean over levels and points of the similarity, read from ``similarity_tables`` (so the answer stays
    within ``radius_mm`` of the start), minus ``smoothness`` times the control grid's bending (``_bending``); Adam,
    ``steps`` steps of at most about ``step_voxels`` query voxels, the step size cosine-annealed to zero."""
    device = levels[0].device
    points = torch.as_tensor(np.asarray(points_mm), dtype=torch.float32, device=device)
    start = torch.as_tensor(np.asarray(start_mm), dtype=torch.float32, device=device)
    affine = torch.as_tensor(affine, dtype=torch.float64)
    to_voxel = torch.linalg.inv(affine).to(device=device, dtype=torch.float32)  # world mm -> voxel (homogeneous)
    spacing = affine_spacing_mm(affine)  # mm per voxel along each array axis
    dims = points.shape[1]

    def voxels_of(world: torch.Tensor) -> torch.Tensor:
        return world @ to_voxel[:dims, :dims].T + to_voxel[:dims, dims]

    if shape is not None:
        starts = voxels_of(start)
        inside = ((starts >= -0.5) & (starts <= torch.as_tensor(shape, device=device) - 0.5)).all(dim=1)
        points, start, vectors = points[inside], start[inside], [vector[inside] for vector in vectors]
    if len(points) == 0:  # nothing to compare: no displacement
        return Displacement(torch.zeros(1, dims, *[2] * dims, device=device), torch.zeros(dims, device=device), 1.0)
    with torch.no_grad():
        tables = similarity_tables(vectors, levels, voxels_of(start), padded_shape, spacing, radius_mm)
    low, high = points.min(dim=0).values, points.max(dim=0).values
    nodes = [max(2, math.ceil(float(extent) / control_spacing_mm) + 1) for extent in high - low]
    centre = (low + high) / 2
    origin = centre - control_spacing_mm * (torch.as_tensor(nodes, device=device) - 1) / 2  # the grid covers them
    field = Displacement(torch.zeros(1, dims, *nodes, device=device, requires_grad=True), origin,
                         float(control_spacing_mm))
    optimiser = torch.optim.Adam([field.values], lr=step_voxels * max(spacing))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(int(steps), 1))  # settles at the end
    for _ in range(int(steps)):
        voxels = voxels_of(start + field.at(points))
        similarity = torch.stack([table.read(voxels).mean() for table in tables]).mean()
        loss = smoothness * _bending(field.values, control_spacing_mm) - similarity
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    return Displacement(field.values.detach(), origin, float(control_spacing_mm))
