"""Geometric consistency of matched points: a robust smooth map from the template's points to their matches.

One-shot matching finds each landmark by the arg-max of its own similarity map, which has no notion of where the
landmark should be: a few landmarks jump to a look-alike structure far away (the other hemisphere, the next
vertebra). Matching many *support points* of the template as well (a grid over its foreground) gives hundreds of
correspondences; a robust thin-plate spline through them is a feature-driven registration, smooth like an atlas
registration, and each landmark is read off it. Outliers go in two stages: least median of squares for an affine
(Rousseeuw 1984: no threshold to tune, up to half the matches may be wrong), then spline refits that drop matches
beyond ``OUTLIER_CUTOFF`` robust scales of the spline. Written here because neither MONAI, SimpleITK nor
scikit-image fits a transform to point pairs with outliers without a fixed, data-dependent residual threshold; the
spline itself is SciPy's ``RBFInterpolator``.

The fits run NumPy's BLAS on one thread (``serial_blas``): their matrices are small, and OpenBLAS worker threads left
spinning after a call slowed the network pass that follows on a 2-core CPU by about 2x (2D label propagation 113 ->
76 ms per image, docs/segmentation.md).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
from scipy.interpolate import RBFInterpolator
from threadpoolctl import ThreadpoolController

#: residuals beyond this many robust standard deviations are outliers
OUTLIER_CUTOFF = 3.0
#: the spline kernel per spatial dims (the biharmonic one: r^2 log r in 2D, -r in 3D)
SPLINE_KERNEL = {2: "thin_plate_spline", 3: "linear"}
_MAX_SUBSETS = 2000  # minimal subsets tried by the affine fit (all of them when there are fewer)
_SPLINE_ROUNDS = 3
_SUBSET_CHUNK = 256  # minimal subsets solved and scored together by the affine fit
_Function = TypeVar("_Function", bound=Callable)


@functools.cache
def _blas_pools() -> ThreadpoolController:
    """The thread pools of the loaded native libraries (found once, on first use: a few ms)."""
    return ThreadpoolController()


def serial_blas(function: _Function) -> _Function:
    """``function`` with NumPy's BLAS limited to one thread while it runs (restored after; torch's own threads are
    untouched). Not ``ThreadpoolController().wrap``: that scans the loaded libraries when the module is imported."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with _blas_pools().limit(limits=1, user_api="blas"):
            return function(*args, **kwargs)

    return wrapped


@dataclass(frozen=True)
class Deformation:
    """A robust fit of ``P`` point pairs: where it puts every source point (``predicted`` ``(P, D)`` mm), each
    target's distance from that (``residuals_mm``), the robust residual scale (``scale_mm``), the ``inliers``
    ``(P,)`` (residual within ``OUTLIER_CUTOFF`` scales) and the fitted map itself (``transform``: points ``(M, D)``
    mm anywhere -> ``(M, D)`` mm)."""

    predicted: np.ndarray
    residuals_mm: np.ndarray
    scale_mm: float
    inliers: np.ndarray
    transform: Callable[[np.ndarray], np.ndarray]


def _subsets(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Every ``size``-subset of ``range(count)`` when there are at most ``_MAX_SUBSETS``, else that many random ones
    ``(S, size)``: the ``size`` smallest of ``count`` uniform keys per row (a uniform random subset; drawn at once, 3
    ms for 2000 of 128 points where one ``rng.choice`` per subset took 24 ms)."""
    total = 1
    for k in range(size):
        total = total * (count - k) // (k + 1)
    if total <= _MAX_SUBSETS:
        return np.asarray(list(itertools.combinations(range(count), size)), dtype=np.int64).reshape(-1, size)
    return np.argpartition(rng.random((_MAX_SUBSETS, count)), size - 1, axis=1)[:, :size]


def _robust_scale(residuals: np.ndarray, min_scale_mm: float) -> float:
    """1.4826 x the median residual (the standard deviation for Gaussian residuals), at least ``min_scale_mm``."""
    return max(1.4826 * float(np.median(residuals)), min_scale_mm)


def _check_pairs(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if source.ndim != 2 or target.shape != source.shape:
        raise ValueError(f"source {source.shape} and target {target.shape} must both be (points, dims)")
    count, dims = source.shape
    if count < dims + 2:
        raise ValueError(f"a robust {dims}D fit needs at least {dims + 2} point pairs, got {count}")
    return source, target


@serial_blas
def robust_affine(source: np.ndarray, target: np.ndarray, *, min_scale_mm: float = 0.0,
                  seed: int = 0) -> Deformation:
    """Least-median-of-squares affine from ``source`` to ``target`` (both ``(P, D)`` mm, P >= D + 2): the exact
    affine of the minimal subset whose median squared residual is smallest. ``seed`` draws the subsets when there
    are too many to try all (the same input gives the same fit)."""
    source, target = _check_pairs(source, target)
    count, dims = source.shape
    homogeneous = np.concatenate([source, np.ones((count, 1))], axis=1)  # (P, D+1)
    subsets = _subsets(count, dims + 1, np.random.default_rng(seed))  # (S, D+1)
    best_median, best = np.inf, None
    for start in range(0, len(subsets), _SUBSET_CHUNK):  # all subsets of a chunk at once (memory: chunk x P x D)
        chunk = subsets[start:start + _SUBSET_CHUNK]
        corners = homogeneous[chunk]  # (s, D+1, D+1)
        solvable = np.linalg.cond(corners) <= 1e8  # points on one hyperplane: no unique affine
        if not solvable.any():
            continue
        solutions = np.linalg.solve(corners[solvable], target[chunk[solvable]])  # (s', D+1, D)
        errors = np.tensordot(solutions, homogeneous, axes=([1], [1])) - target.T  # (s', D, P)
        medians = np.median(np.einsum("sdp,sdp->sp", errors, errors), axis=1)  # (s',) median squared residual
        first = int(np.argmin(medians))  # the first of equal medians, as subsets are listed
        if medians[first] < best_median:
            best_median, best = float(medians[first]), solutions[first]
    if best is None:
        raise ValueError("the points lie on one hyperplane: no affine can be fitted")
    predicted = homogeneous @ best
    residuals = np.linalg.norm(predicted - target, axis=1)
    scale = _robust_scale(residuals, min_scale_mm)

    @serial_blas
    def transform(points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        return np.concatenate([points, np.ones((len(points), 1))], axis=1) @ best

    return Deformation(predicted, residuals, scale, residuals <= OUTLIER_CUTOFF * scale, transform)


@serial_blas
def robust_spline(source: np.ndarray, target: np.ndarray, *, smoothing: float, min_scale_mm: float = 0.0,
                  seed: int = 0) -> Deformation:
    """A smoothing thin-plate spline (affine part + bending, ``smoothing`` as in SciPy's ``RBFInterpolator``) from
    ``source`` to ``target`` (``(P, D)`` mm), fitted on the inliers of ``robust_affine`` and refitted on its own
    inliers (within ``OUTLIER_CUTOFF`` robust scales, at least ``min_scale_mm``) a few times."""
    source, target = _check_pairs(source, target)
    fit = robust_affine(source, target, min_scale_mm=min_scale_mm, seed=seed)
    kernel = SPLINE_KERNEL[source.shape[1]]
    for _ in range(_SPLINE_ROUNDS):
        inliers = fit.inliers
        if inliers.sum() < source.shape[1] + 2:  # too few to fit: keep the fit so far
            break
        spline = RBFInterpolator(source[inliers], target[inliers], kernel=kernel, degree=1, smoothing=smoothing)
        predicted = spline(source)
        residuals = np.linalg.norm(predicted - target, axis=1)
        scale = _robust_scale(residuals[inliers], min_scale_mm)
        fit = Deformation(predicted, residuals, scale, residuals <= OUTLIER_CUTOFF * scale, _chunked(spline))
    return fit


def _chunked(spline: RBFInterpolator, chunk: int = 32768) -> Callable[[np.ndarray], np.ndarray]:
    """``spline`` evaluated a chunk of points at a time (its kernel matrix is points x centres)."""
    @serial_blas
    def transform(points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        return np.concatenate([spline(points[start:start + chunk]) for start in range(0, len(points), chunk)]) \
            if len(points) else np.zeros_like(points)

    return transform
