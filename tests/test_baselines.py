"""Classical one-shot baselines: NCC template matching and atlas registration give the template landmarks back when
template == query and the known shift for a shifted query, 2D and 3D; the SimpleITK bridge keeps world mm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.ndimage import gaussian_filter

from medssl.data.geometry import voxel_to_world
from medssl.data.landmarks import read_landmarks, write_landmarks
from medssl.data.readers import save_image
from medssl.matching.baselines import ncc_maps, ncc_match, register, registration_match, to_sitk
from medssl.matching.run import detect_landmarks_files

SHAPES = {2: (64, 56), 3: (32, 28, 24)}
SPACING = {2: (0.8, 1.2), 3: (0.8, 1.2, 1.5)}
VOXELS = {2: [[24.3, 30.6], [40.0, 20.75]], 3: [[14.4, 12.6, 10.2], [18.0, 15.5, 12.7]]}


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth random texture under a centred bright ellipsoid, in [0, 1] (distinct everywhere, registrable)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = np.exp(-2.0 * (grid**2).sum(0))
    values = body + 0.3 * gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    return (values - values.min()) / (values.max() - values.min())


def image_of(array: np.ndarray, dims: int) -> MetaTensor:
    affine = torch.diag(torch.tensor([*SPACING[dims], 1.0], dtype=torch.float64))
    affine[:dims, dims] = torch.tensor([4.0, -6.0, 9.0][:dims])
    return MetaTensor(torch.as_tensor(array, dtype=torch.float32)[None], affine=affine)


def shifted_pair(dims: int, shift: np.ndarray) -> tuple[MetaTensor, MetaTensor]:
    """Template and a query showing the same content moved by ``-shift`` voxels (a crop of one bigger array)."""
    margin = int(np.abs(shift).max())
    big = blobs(tuple(s + 2 * margin for s in SHAPES[dims]), seed=dims)
    template = big[tuple(slice(margin, margin + s) for s in SHAPES[dims])]
    query = big[tuple(slice(margin + k, margin + k + s) for k, s in zip(shift, SHAPES[dims]))]
    return image_of(template, dims), image_of(query, dims)


@pytest.mark.parametrize("dims", [2, 3])
def test_ncc_template_equals_query(dims):
    image = image_of(blobs(SHAPES[dims]), dims)
    points = voxel_to_world(image.affine.numpy(), np.array(VOXELS[dims]))
    predicted, scores = ncc_match([(image, points)], image, patch_radius_mm=5.0)
    voxel_error = np.abs(predicted - points) / np.array(SPACING[dims])
    assert voxel_error.max() < 0.25  # exact integer peak; the parabola fit on an asymmetric peak moves it a little
    np.testing.assert_allclose(scores, 1.0, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_ncc_known_shift(dims):
    shift = np.array([3, -2, 2][:dims])
    template, query = shifted_pair(dims, shift)
    points = voxel_to_world(template.affine.numpy(), np.array(VOXELS[dims]))
    predicted, _ = ncc_match([(template, points), (template, points)], query, patch_radius_mm=5.0)
    expected = voxel_to_world(query.affine.numpy(), np.array(VOXELS[dims]) - shift)
    assert (np.abs(predicted - expected) / np.array(SPACING[dims])).max() < 0.25


def test_ncc_map_matches_a_direct_correlation():
    """One NCC map value against the Pearson correlation computed by hand."""
    dims = 2
    template, query = shifted_pair(dims, np.array([2, 1]))
    points = voxel_to_world(template.affine.numpy(), np.array([[30.0, 28.0]]))
    maps = ncc_maps(template, points, query, patch_radius_mm=3.0)  # radius (4, 2) voxels -> 9 x 5 patch
    patch = template.as_tensor()[0, 26:35, 26:31].double().numpy()
    window = query.as_tensor()[0, 21:30, 24:29].double().numpy()  # the patch placed with its centre at (25, 26)
    reference = np.corrcoef(patch.ravel(), window.ravel())[0, 1]
    assert maps.shape == (1, *SHAPES[dims])
    assert abs(maps[0, 25, 26].item() - reference) < 1e-4


@pytest.mark.parametrize("dims", [2, 3])
def test_sitk_bridge_keeps_world_coordinates(dims):
    image = image_of(blobs(SHAPES[dims]), dims)
    image.affine[0, 0] = -image.affine[0, 0]  # a flipped axis: the direction matrix must carry it
    converted = to_sitk(image)
    index = [3, 5, 7][:dims]
    expected = voxel_to_world(image.affine.numpy(), np.array(index, dtype=float))
    np.testing.assert_allclose(converted.TransformIndexToPhysicalPoint(index), expected, atol=1e-9)
    assert converted.GetPixel(index) == pytest.approx(image[(0, *index)].item())


@pytest.mark.parametrize("dims", [2, 3])
def test_registration_identity_and_known_shift(dims):
    options = dict(bspline_spacing_mm=24.0 if dims == 2 else None, iterations=30 if dims == 2 else 20)
    shift = np.array([3, -2, 2][:dims])
    template, query = shifted_pair(dims, shift)
    points = voxel_to_world(template.affine.numpy(), np.array(VOXELS[dims]))
    predicted, scores = registration_match([(template, points)], template, **options)
    assert (np.abs(predicted - points) / np.array(SPACING[dims])).max() < 0.3 and np.all(scores > 0.95)
    predicted, _ = registration_match([(template, points)], query, **options)
    expected = voxel_to_world(query.affine.numpy(), np.array(VOXELS[dims]) - shift)
    assert (np.abs(predicted - expected) / np.array(SPACING[dims])).max() < 0.5


def test_register_maps_template_points_to_the_query():
    """An affine-only registration of a world-translated copy is that translation."""
    dims = 2
    template = image_of(blobs(SHAPES[dims]), dims)
    query = image_of(blobs(SHAPES[dims]), dims)
    query.affine[:dims, dims] += torch.tensor([2.5, -1.5], dtype=torch.float64)
    transform = register(template, query, bspline_spacing_mm=None, iterations=50)
    # a third of the 0.8 mm pixel; seen 0.11 mm off while the metric's sample took a wall-clock seed
    np.testing.assert_allclose(transform.TransformPoint((20.0, 10.0)), (22.5, 8.5), atol=0.25)


@pytest.fixture
def one_itk_thread():
    """ITK's threads sum the metric in a varying order (the last digits vary): one thread for exact repeats."""
    import SimpleITK as sitk

    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


@pytest.mark.parametrize("seed", [0, 3])
def test_registration_repeats_for_a_seed(seed, one_itk_thread):
    """The metric's random sample follows ``seed``: the same call twice gives the same transform (SimpleITK reads a
    sampling seed of 0 as "use the wall clock", which once made seed 0 differ run to run)."""
    template, query = shifted_pair(2, np.array([3, -2]))
    first, second = (register(template, query, iterations=10, samples=500, seed=seed).GetParameters()
                     for _ in range(2))
    assert first == second


@pytest.mark.parametrize("method", ["ncc", "registration"])
def test_detect_landmarks_files_with_baselines(tmp_path, method):
    shift = np.array([3, -2])
    template, query = shifted_pair(2, shift)
    affine = torch.eye(3, dtype=torch.float64)  # PNG files: 1 mm pixels
    for name, image in (("template", template), ("query", query)):
        save_image((image.as_tensor()[0].numpy() * 255).round().astype(np.uint8), affine, tmp_path / f"{name}.png")
    points = {"a": np.array([24.0, 30.0]), "b": np.array([40.0, 21.0])}
    csv_path = write_landmarks(tmp_path / "t.csv", {"template": points})
    out = detect_landmarks_files(None, [tmp_path / "template.png"], [csv_path], [tmp_path / "query.png"],
                                 tmp_path / "pred.csv", method=method)
    predicted = read_landmarks(out)["query"]
    for name, position in points.items():
        assert np.abs(predicted[name] - (position - shift)).max() < 0.5
