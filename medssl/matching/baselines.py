"""Classical one-shot baselines with the embedding matcher's inputs and outputs (prepared images, landmarks in world
mm -> landmarks in world mm and a score per landmark): intensity NCC template matching and atlas registration.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor

from medssl.data.geometry import spacing_mm as affine_spacing_mm
from medssl.data.geometry import voxel_to_world, world_to_voxel
from medssl.correspondence import peak_positions


def _array(image: MetaTensor) -> np.ndarray:
    """The first channel of a prepared image as float64 ``(*S)``."""
    return image.as_tensor()[0].detach().cpu().double().numpy()


def _affine(image: MetaTensor) -> np.ndarray:
    return torch.as_tensor(image.affine).detach().cpu().double().numpy()


def _patch_radius_voxels(image: MetaTensor, radius_mm: float) -> np.ndarray:
    return np.maximum(1, np.round(radius_mm / np.asarray(affine_spacing_mm(image.affine)))).astype(int)


# --------------------------------------------------------------------------------------------------- NCC
def ncc_maps(template: MetaTensor, points_mm: np.ndarray, query: MetaTensor, *,
             patch_radius_mm: float = 16.0) -> torch.Tensor:
    """Normalised cross-correlation maps ``(L, *S_query)`` of a box of half-size ``patch_radius_mm`` around each
    template landmark ``(L, D)`` mm; the value at voxel ``v`` scores the template landmark placed at ``v``.

    Template and query must share the voxel spacing (``prepare_image`` resamples to one grid). Uses
    ``skimage.feature.match_template`` (n-D, FFT); the box is cut at the template's border.
    """
    from skimage.feature import match_template

    template_array, query_array = _array(template), _array(query)
    radius = _patch_radius_voxels(template, patch_radius_mm)
    centres = np.round(world_to_voxel(_affine(template), np.asarray(points_mm, dtype=np.float64))).astype(int)
    maps = []
    for centre in centres:
        low = np.maximum(centre - radius, 0)
        high = np.minimum(centre + radius + 1, template_array.shape)
        patch = template_array[tuple(slice(a, b) for a, b in zip(low, high))]
        before = centre - low  # the landmark's position inside the patch
        # pad so that result[v] = score of the patch placed with its landmark at query voxel v
        padded = np.pad(query_array, [(b, s - 1 - b) for b, s in zip(before, patch.shape)], mode="reflect")
        maps.append(torch.from_numpy(match_template(padded, patch).astype(np.float32)))  # (*S_query)
    return torch.stack(maps)  # (L, *S_query)


def ncc_match(templates: Sequence[tuple[MetaTensor, np.ndarray]], query: MetaTensor, *,
              patch_radius_mm: float = 16.0) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks (world mm ``(L, D)``) and peak NCC scores ``(L,)`` in ``query`` by NCC template matching; several
    ``(template image, landmarks mm)`` pairs average their NCC maps. The template landmark's sub-pixel offset from
    its patch centre is kept (averaged over templates); the peak is refined by a parabola fit."""

    maps = torch.stack([ncc_maps(image, points, query, patch_radius_mm=patch_radius_mm)
                        for image, points in templates]).mean(dim=0)  # (L, *S)
    voxels, scores = peak_positions(maps)
    fractions = [world_to_voxel(_affine(image), np.asarray(points, dtype=np.float64)) for image, points in templates]
    offset = np.mean([f - np.round(f) for f in fractions], axis=0)  # (L, D) sub-pixel landmark inside its patch
    return voxel_to_world(_affine(query), voxels + offset), scores


# --------------------------------------------------------------------------------------------------- registration
def to_sitk(image: MetaTensor):
    """A SimpleITK float32 image in our world frame (the affine's), so its physical points are our world mm."""
    import SimpleITK as sitk

    array = _array(image).astype(np.float32)
    dims = array.ndim
    affine = _affine(image)
    spacing = np.linalg.norm(affine[:dims, :dims], axis=0)
    result = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(*reversed(range(dims)))))  # (z, y, x)
    result.SetSpacing([float(s) for s in spacing])
    result.SetDirection([float(v) for v in (affine[:dims, :dims] / spacing).flatten()])
    result.SetOrigin([float(v) for v in affine[:dims, dims]])
    return result


SHRINK_FACTORS = (4, 2, 1)


def _registration(fixed, seed: int, samples: int):
    """A SimpleITK registration method: Mattes MI on a fixed random sample of about ``samples`` voxels per pyramid
    level (so a 3D volume costs about what a 2D image does), 3-level pyramid. SimpleITK reads a sampling seed of 0
    as "seed from the wall clock", so ``seed`` is passed on as ``seed + 1``: every seed, 0 included, repeats."""
    import SimpleITK as sitk

    voxels = float(np.prod(fixed.GetSize()))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(
        [min(1.0, samples * f ** fixed.GetDimension() / voxels) for f in SHRINK_FACTORS], seed + 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def register(template: MetaTensor, query: MetaTensor, *, bspline_spacing_mm: float | None = 32.0,
             iterations: int = 30, samples: int = 20000, seed: int = 0):
    """SimpleITK transform mapping template world mm -> query world mm: affine (moments-initialised, Mattes MI),
    then a B-spline on a control grid of ``bspline_spacing_mm`` (None: affine only); ``iterations`` per pyramid level
    and stage, Mattes MI on ``samples`` random voxels per level (the defaults: 20 s per 86x104x90 volume on 2 CPU
    cores, where SimpleITK's usual 25 % sample took 334 s). The same ``seed`` draws the same sample, so a run repeats
    up to the last digits that ITK's threads move (0.01 mm on the 3D demo landmarks).

    The template is the fixed image, so the transform carries template points to the query directly (no inverse).
    """
    import SimpleITK as sitk

    fixed, moving = to_sitk(template), to_sitk(query)
    dims = fixed.GetDimension()
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(dims),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = _registration(fixed, seed, samples)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                    gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(initial, inPlace=False)
    affine = method.Execute(fixed, moving)
    if bspline_spacing_mm is None:
        return affine
    extent_mm = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    mesh = [max(1, int(round(e / bspline_spacing_mm))) for e in extent_mm]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh)
    method = _registration(fixed, seed, samples)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iterations)
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransform(bspline, inPlace=True)
    method.Execute(fixed, moving)
    return sitk.CompositeTransform([affine, bspline])  # p -> affine(bspline(p))


def _local_ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def registration_match(templates: Sequence[tuple[MetaTensor, np.ndarray]], query: MetaTensor, *,
                       bspline_spacing_mm: float | None = 32.0, iterations: int = 30, samples: int = 20000,
                       patch_radius_mm: float = 16.0) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks (world mm ``(L, D)``) in ``query`` by registering each template to it and carrying the template
    landmarks along; several templates average the positions. Score per landmark: NCC of the template and the
    query warped onto it, in a box of half-size ``patch_radius_mm`` around the template landmark (mean over
    templates)."""
    import SimpleITK as sitk

    query_sitk = to_sitk(query)
    positions, scores = [], []
    for template, points in templates:
        transform = register(template, query, bspline_spacing_mm=bspline_spacing_mm, iterations=iterations,
                             samples=samples)
        points = np.asarray(points, dtype=np.float64)
        positions.append(np.array([transform.TransformPoint([float(v) for v in p]) for p in points]))
        template_sitk = to_sitk(template)
        warped = sitk.GetArrayFromImage(sitk.Resample(query_sitk, template_sitk, transform, sitk.sitkLinear, 0.0))
        warped = warped.transpose(*reversed(range(warped.ndim)))  # (z, y, x) -> our (x, y, z) axis order
        template_array = _array(template)
        radius = _patch_radius_voxels(template, patch_radius_mm)
        centres = np.round(world_to_voxel(_affine(template), points)).astype(int)
        boxes = [tuple(slice(max(c - r, 0), c + r + 1) for c, r in zip(centre, radius)) for centre in centres]
        scores.append([_local_ncc(template_array[box], warped[box]) for box in boxes])
    return np.mean(positions, axis=0), np.mean(scores, axis=0)
