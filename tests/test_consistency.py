"""Robust fits of matched points: an affine and a thin-plate spline recovered with up to ~40 % gross outliers."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.matching.consistency import robust_affine, robust_spline


def _pairs(dims: int, count: int = 60, outliers: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    source = rng.uniform(-50, 50, size=(count, dims))
    linear = np.eye(dims) * 1.1 + rng.normal(scale=0.1, size=(dims, dims))
    target = source @ linear.T + rng.normal(scale=5, size=dims)
    clean = target + rng.normal(scale=0.3, size=target.shape)
    noisy = clean.copy()
    noisy[:outliers] += rng.uniform(20, 40, size=(outliers, dims)) * rng.choice([-1, 1], size=(outliers, dims))
    return source, target, noisy, outliers


@pytest.mark.parametrize("dims", [2, 3])
def test_robust_affine_ignores_gross_outliers(dims):
    source, target, noisy, outliers = _pairs(dims)
    fit = robust_affine(source, noisy, min_scale_mm=0.1)
    assert np.abs(fit.predicted - target).max() < 3.0  # every point where the true affine puts it
    assert not fit.inliers[:outliers].any() and fit.inliers[outliers:].mean() > 0.9
    assert 0.1 <= fit.scale_mm < 1.5


@pytest.mark.parametrize("dims", [2, 3])
def test_robust_spline_follows_a_smooth_warp_and_rejects_outliers(dims):
    source, _, _, _ = _pairs(dims, count=120)
    warp = source + 4.0 * np.sin(source[:, ::-1] / 25.0)  # smooth, not affine
    noisy = warp.copy()
    noisy[:30] += 30.0
    fit = robust_spline(source, noisy, smoothing=10.0, min_scale_mm=0.1)
    assert not fit.inliers[:30].any()
    spline_error = np.median(np.linalg.norm(fit.predicted - warp, axis=1))
    affine_error = np.median(np.linalg.norm(robust_affine(source, noisy).predicted - warp, axis=1))
    assert spline_error < 0.5 and spline_error < 0.5 * affine_error  # the warp is not affine: the spline follows it


def test_identity_is_exact_and_too_few_points_are_refused():
    source = np.random.default_rng(1).uniform(0, 10, size=(12, 2))
    fit = robust_spline(source, source, smoothing=1000.0)
    np.testing.assert_allclose(fit.predicted, source, atol=1e-6)
    with pytest.raises(ValueError, match="at least 4 point pairs"):
        robust_affine(source[:3], source[:3])
    with pytest.raises(ValueError, match="must both be"):
        robust_affine(source, source[:5])


def test_the_fitted_map_evaluates_anywhere():
    rng = np.random.default_rng(3)
    source = rng.uniform(0, 50, (60, 2))
    target = source @ np.array([[1.1, 0.1], [-0.05, 0.9]]) + [4.0, -2.0]  # an affine
    for fit in (robust_affine(source, target), robust_spline(source, target, smoothing=1.0)):
        np.testing.assert_allclose(fit.transform(source), fit.predicted, atol=1e-6)
        elsewhere = rng.uniform(0, 50, (5, 2))  # points the fit never saw
        np.testing.assert_allclose(fit.transform(elsewhere), elsewhere @ np.array([[1.1, 0.1], [-0.05, 0.9]])
                                   + [4.0, -2.0], atol=1e-3)


def test_robust_affine_is_the_least_median_minimal_subset_and_skips_collinear_ones():
    import itertools

    rng = np.random.default_rng(4)
    source = rng.uniform(0, 40, (9, 2))
    source[:3] = [[0.0, 0.0], [10.0, 10.0], [20.0, 20.0]]  # a collinear triple: no unique affine, skipped
    target = source * 1.2 + rng.normal(scale=2.0, size=source.shape)
    homogeneous = np.concatenate([source, np.ones((9, 1))], axis=1)
    best = np.inf
    for subset in itertools.combinations(range(9), 3):  # every minimal subset, as few enough to try all
        corners = homogeneous[list(subset)]
        if np.linalg.cond(corners) > 1e8:
            continue
        solution = np.linalg.solve(corners, target[list(subset)])
        median = np.median(np.sum((homogeneous @ solution - target) ** 2, axis=1))
        if median < best:
            best, expected = median, homogeneous @ solution
    np.testing.assert_allclose(robust_affine(source, target).predicted, expected, atol=1e-9)
    with pytest.raises(ValueError, match="one hyperplane"):
        robust_affine(source[:3].repeat(2, axis=0) + [[0, 0]] * 6, source[:3].repeat(2, axis=0))


def test_random_minimal_subsets_are_distinct_uniform_and_seeded():
    """With too many minimal subsets to try all, ``_MAX_SUBSETS`` random ones: distinct points in each, every point
    drawn about equally often, the same draw for the same seed."""
    from medssl.matching.consistency import _MAX_SUBSETS, _subsets

    subsets = _subsets(128, 3, np.random.default_rng(0))
    assert subsets.shape == (_MAX_SUBSETS, 3) and subsets.min() >= 0 and subsets.max() < 128
    assert all(len(set(row)) == 3 for row in subsets.tolist())
    counts = np.bincount(subsets.ravel(), minlength=128)  # expected 2000 * 3 / 128 = 46.9 per point
    assert counts.min() > 15 and counts.max() < 90
    np.testing.assert_array_equal(subsets, _subsets(128, 3, np.random.default_rng(0)))
    assert not np.array_equal(subsets, _subsets(128, 3, np.random.default_rng(1)))
    assert _subsets(5, 3, np.random.default_rng(0)).shape == (10, 3)  # few enough: every one of them


def test_the_fits_run_blas_on_one_thread_and_restore_it_after():
    from threadpoolctl import threadpool_info, threadpool_limits

    from medssl.matching.consistency import serial_blas

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    seen = []
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert serial_blas(lambda: seen.append(blas_threads()) or 7)() == 7
        assert blas_threads() == before  # the caller's setting back
    assert before and seen[0] and all(count == 1 for count in seen[0])  # NumPy's wheels ship OpenBLAS
    source, _, noisy, _ = _pairs(2)
    fit = robust_spline(source, noisy, smoothing=1.0)  # the decorated fits still fit
    assert np.isfinite(fit.transform(source[:3])).all()
