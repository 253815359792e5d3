"""Random smooth spatial transforms of the demo population, with their exact inverse at points.

A subject is made by pulling back: subject world point ``x`` (mm) -> template world point ``phi(x)`` with
``phi(x) = c + A (x + u(x) - c) + t``: a free-form deformation ``u`` (cubic B-splines on one control grid, or the
sum of a coarse and a fine one) followed by an affine (rotation ``R``, per-axis scale, shift ``t``) about the grid
centre ``c``. ``x -> x + u(x)`` is a diffeomorphism when ``u``'s Lipschitz constant is below 1 (checked through
the Jacobian determinant and by the inverse's convergence).
Written here because MONAI's ``Rand2DElastic``/``Rand3DElastic`` resample images but expose neither the map at
arbitrary points nor its inverse, which the ground-truth landmarks need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg, ndimage

from medssl.data.geometry import voxel_to_world

_INVERSE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class ControlGrid:
    """A smooth field: cubic B-spline coefficients ``values`` ``(C, *grid)`` on a regular grid in world mm.

    The coefficients are used as B-spline weights (no prefilter), so the field is a convex combination of them
    and never exceeds their largest magnitude.
    """

    values: np.ndarray  # (C, *grid)
    origin_mm: np.ndarray  # (D,) world position of control point 0
    spacing_mm: float

    def evaluate(self, points_mm: np.ndarray) -> np.ndarray:
        """The field at world points ``(N, D)`` -> ``(N, C)``."""
        index = ((np.asarray(points_mm, dtype=np.float64) - self.origin_mm) / self.spacing_mm).T  # (D, N)
        return np.stack([ndimage.map_coordinates(channel, index, order=3, mode="nearest", prefilter=False)
                         for channel in self.values], axis=1)  # (N, C)

    def on_grid(self, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The field at every voxel centre of an axis-aligned grid, ``(C, *shape)``; equals ``evaluate`` on
        ``grid_points`` but costs D small 1D interpolations and a tensor contraction instead of N cubic taps."""
        dims = len(shape)
        matrix = np.asarray(affine, dtype=np.float64)[:dims, :dims]
        if np.count_nonzero(matrix - np.diag(np.diag(matrix))):
            raise ValueError("on_grid needs an axis-aligned (diagonal) affine; use evaluate on the points instead")
        field = self.values  # (C, *grid), contracted one axis at a time
        for axis in range(dims):
            position = (affine[axis, dims] + matrix[axis, axis] * np.arange(shape[axis]) - self.origin_mm[axis])
            unit = np.eye(self.values.shape[axis + 1])  # one basis function per control point
            weights = np.stack([ndimage.map_coordinates(basis, (position / self.spacing_mm)[None], order=3,
                                                        mode="nearest", prefilter=False) for basis in unit])  # (K, n)
            field = np.moveaxis(np.tensordot(field, weights, axes=([axis + 1], [0])), -1, axis + 1)
        return field  # (C, *shape)


def random_control_grid(rng: np.random.Generator, affine: np.ndarray, shape: tuple[int, ...], channels: int,
                        spacing_mm: float, std: float, limit: float) -> ControlGrid:
    """Gaussian coefficients (``std``, clipped to ``±limit``) on a grid covering the image (``affine``, ``shape``)
    with one spare control point beyond each border."""
    corners = voxel_to_world(affine, np.array([[0] * len(shape), [n - 1 for n in shape]], dtype=float))  # (2, D)
    low, high = corners.min(axis=0), corners.max(axis=0)
    origin = low - spacing_mm
    counts = np.ceil((high - origin) / spacing_mm).astype(int) + 2
    values = np.clip(rng.normal(0.0, std, size=(channels, *counts)), -limit, limit)  # (C, *grid)
    return ControlGrid(values=values, origin_mm=origin, spacing_mm=float(spacing_mm))


@dataclass(frozen=True)
class FieldSum:
    """The sum of smooth fields on several control grids (e.g. a coarse and a fine B-spline displacement)."""

    grids: tuple[ControlGrid, ...]

    def evaluate(self, points_mm: np.ndarray) -> np.ndarray:
        """The summed field at world points ``(N, D)`` -> ``(N, C)``."""
        return sum(grid.evaluate(points_mm) for grid in self.grids)

    def on_grid(self, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The summed field at every voxel centre of an axis-aligned grid, ``(C, *shape)``."""
        return sum(grid.on_grid(affine, shape) for grid in self.grids)


@dataclass(frozen=True)
class RandomTransform:
    """The pull-back map ``phi`` (subject world mm -> template world mm) of one subject."""

    matrix: np.ndarray  # (D, D) rotation @ diag(scale)
    centre_mm: np.ndarray  # (D,)
    shift_mm: np.ndarray  # (D,)
    displacement: ControlGrid | FieldSum  # D channels, mm

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        """``phi`` at subject points ``(N, D)`` -> template points ``(N, D)``."""
        points_mm = np.asarray(points_mm, dtype=np.float64)
        return self._affine_part(points_mm + self.displacement.evaluate(points_mm))

    def on_grid(self, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """``phi`` at every voxel centre of an axis-aligned grid, ``(*shape, D)`` (fast path of ``__call__``)."""
        displacement = np.moveaxis(self.displacement.on_grid(affine, shape), 0, -1)  # (*shape, D)
        return self._affine_part(grid_points(affine, shape).reshape(displacement.shape) + displacement)

    def _affine_part(self, deformed_mm: np.ndarray) -> np.ndarray:
        return self.centre_mm + (deformed_mm - self.centre_mm) @ self.matrix.T + self.shift_mm  # (..., D)

    def inverse(self, points_mm: np.ndarray, iterations: int = 200) -> np.ndarray:
        """``phi^-1`` at template points ``(N, D)``: undo the affine exactly, then solve ``x + u(x) = y`` by
        fixed-point iteration (a contraction: the field's Lipschitz constant is far below 1).

        Raises ``RuntimeError`` when ``|phi(x) - y|`` stays above 1e-3 mm.
        """
        target = np.asarray(points_mm, dtype=np.float64)
        undone = self.centre_mm + np.linalg.solve(self.matrix, (target - self.shift_mm - self.centre_mm).T).T
        estimate = undone.copy()
        for _ in range(iterations):
            update = undone - self.displacement.evaluate(estimate)
            converged = np.abs(update - estimate).max() < 1e-9
            estimate = update
            if converged:
                break
        error_mm = np.linalg.norm(self(estimate) - target, axis=-1).max(initial=0.0)
        if error_mm >= _INVERSE_TOLERANCE_MM:
            raise RuntimeError(f"could not invert the demo deformation: residual {error_mm:.3g} mm")
        return estimate


def random_transform(rng: np.random.Generator, affine: np.ndarray, shape: tuple[int, ...], *,
                     rotation_deg: float = 4.0, scale_range: float = 0.05, shift_mm: float = 3.0,
                     control_spacing_mm: float = 24.0, displacement_mm: float = 4.0) -> RandomTransform:
    """A random pull-back map for an image grid (``affine`` ``(D+1, D+1)``, ``shape``): rotation angles uniform in
    ``±rotation_deg``, per-axis scale in ``1 ± scale_range``, shift in ``±shift_mm``, B-spline displacement
    coefficients with std ``displacement_mm / 2`` clipped to ``±displacement_mm`` (so ``|u| <= displacement_mm``)."""
    dims = len(shape)
    n_angles = dims * (dims - 1) // 2
    skew = np.zeros((dims, dims))
    upper = np.triu_indices(dims, k=1)
    skew[upper] = np.radians(rng.uniform(-rotation_deg, rotation_deg, size=n_angles))
    rotation = linalg.expm(skew - skew.T)  # (D, D) orthogonal, det 1: one code path for 2D and 3D
    scale = rng.uniform(1.0 - scale_range, 1.0 + scale_range, size=dims)
    shift = rng.uniform(-shift_mm, shift_mm, size=dims)
    centre = voxel_to_world(affine, (np.array(shape, dtype=float) - 1.0) / 2.0)
    displacement = random_control_grid(rng, affine, shape, dims, control_spacing_mm, displacement_mm / 2.0,
                                       displacement_mm)
    return RandomTransform(matrix=rotation * scale, centre_mm=centre, shift_mm=shift, displacement=displacement)


def identity_transform(spatial_dims: int) -> RandomTransform:
    """The map ``phi(x) = x``: the template itself on its output grid."""
    zeros = np.zeros(spatial_dims)
    return RandomTransform(matrix=np.eye(spatial_dims), centre_mm=zeros, shift_mm=zeros,
                           displacement=ControlGrid(np.zeros((spatial_dims,) + (2,) * spatial_dims), zeros, 10.0))


def rotation_about_axis(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """The ``(D, D)`` rotation by ``angle_deg`` about the unit ``axis`` (3D, ``(3,)``); in 2D ``axis`` is ignored
    (pass ``np.ones(1)``) and the rotation is in the plane."""
    angle = np.radians(angle_deg)
    if len(axis) == 1:
        return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    x, y, z = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return linalg.expm(angle * cross)  # Rodrigues' formula in matrix form


def random_axis(rng: np.random.Generator, dims: int) -> np.ndarray:
    """A rotation axis uniform on the sphere (3D, ``(3,)``), or ``np.ones(1)`` in 2D (no draw)."""
    if dims == 2:
        return np.ones(1)
    axis = rng.normal(size=3)
    return axis / np.linalg.norm(axis)


def realistic_transform(rng: np.random.Generator, affine: np.ndarray, shape: tuple[int, ...], *,
                        rotation_deg: float, scale_range: float, shift_mm: float,
                        fields: tuple[tuple[float, float], ...]) -> tuple[RandomTransform, dict]:
    """A pull-back map with subject-like pose and shape, and what was drawn (JSON-ready).

    Rotation by an angle uniform in ``±rotation_deg`` about a random axis (3D; in-plane in 2D), per-axis scale in
    ``1 ± scale_range``, shift uniform in ``±shift_mm`` per axis, and one B-spline displacement per
    ``(control spacing mm, coefficient std mm)`` in ``fields`` (coefficients clipped at 2.5 std), summed.
    """
    dims = len(shape)
    axis = random_axis(rng, dims)
    angle = float(rng.uniform(-rotation_deg, rotation_deg))
    scale = rng.uniform(1.0 - scale_range, 1.0 + scale_range, size=dims)
    shift = rng.uniform(-shift_mm, shift_mm, size=dims)
    centre = voxel_to_world(affine, (np.array(shape, dtype=float) - 1.0) / 2.0)
    grids = tuple(random_control_grid(rng, affine, shape, dims, spacing, std, 2.5 * std) for spacing, std in fields)
    transform = RandomTransform(matrix=rotation_about_axis(axis, angle) * scale, centre_mm=centre,
                                shift_mm=shift, displacement=FieldSum(grids))
    drawn = {"rotation_deg": angle, "rotation_axis": axis.tolist() if dims == 3 else None,
             "scale": scale.tolist(), "shift_mm": shift.tolist(),
             "fields": [{"control_spacing_mm": spacing, "coefficient_std_mm": std} for spacing, std in fields]}
    return transform, drawn


def grid_points(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World mm of every voxel centre of a grid, ``(N, D)`` in C order of ``shape``."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)  # (*S, D)
    return voxel_to_world(affine, index.reshape(-1, len(shape)))  # (N, D)


def jacobian_determinant(mapped_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``det(d phi / d x)`` by central differences of a map sampled on a grid: ``mapped_mm`` ``(*S, D)`` holds
    ``phi`` at the voxel centres of ``affine``. Returns ``(*S)``; positive everywhere means no folding."""
    dims = mapped_mm.shape[-1]
    spacing = np.linalg.norm(np.asarray(affine, dtype=float)[:dims, :dims], axis=0)
    voxel_axes = np.asarray(affine, dtype=float)[:dims, :dims] / spacing  # world direction of each array axis
    per_axis = [np.gradient(mapped_mm, spacing[k], axis=k) for k in range(dims)]  # D x (*S, D)
    along_axes = np.stack(per_axis, axis=-1)  # (*S, D out, D array axes): d phi / d (array axis, mm)
    jacobian = along_axes @ voxel_axes.T  # (*S, D, D): chain rule to world-axis derivatives
    return np.linalg.det(jacobian)
