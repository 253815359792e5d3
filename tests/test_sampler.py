"""ViewPairSampler and preprocessing: presets, exactness with augmentation off, IGU categories, resume, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from medssl.data.geometry import world_to_voxel
from medssl.data.readers import save_image
from medssl.errors import InputError
from medssl.transforms.infomap import percentile_thresholds
from medssl.transforms.preprocess import normalise_intensity, preprocess_image
from medssl.transforms.sampler import ViewPairSampler

NO_AUGMENTATION = dict(scale=(1, 1), aspect=(1, 1), max_shift=0.0, flip_prob=0.0, rotate_deg=0.0,
                       brightness=(1, 1), contrast=(1, 1), gamma=(1, 1), blur_prob=0.0, bias_field=0.0, noise_std=0.0)
SPACINGS = {2: (0.7, 1.3), 3: (0.9, 1.1, 2.0)}
SHAPES = {2: (40, 30), 3: (20, 18, 10)}
PATCHES = {2: (16, 24), 3: (16, 16, 8)}


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def scans(request, tmp_path):
    """Two smooth random scans with anisotropic spacing (NIfTI) and their spatial_dims."""
    dims = request.param
    rng = np.random.default_rng(dims)
    paths = []
    for k in range(2):
        volume = rng.normal(size=SHAPES[dims]).cumsum(axis=0).cumsum(axis=1).astype(np.float32)
        affine = np.diag([*SPACINGS[dims], 1.0])
        affine[:dims, dims] = [k * 3.0, -5.0, 2.0][:dims]
        paths.append(save_image(volume, affine, tmp_path / f"scan{k}.nii.gz"))
    return paths, dims


def _sampler(paths, dims, **options):
    return ViewPairSampler(paths, spatial_dims=dims, patch_size=PATCHES[dims], **options)


def test_without_augmentation_views_are_identical_and_sample_the_source(scans):
    paths, dims = scans
    sampler = _sampler(paths, dims, **NO_AUGMENTATION)
    batch = sampler.sample(3)
    assert torch.equal(batch.a.coords, batch.b.coords) and torch.equal(batch.a.image, batch.b.image)
    for row, subject in enumerate(batch.subjects):
        scan = sampler.scans[[p.name.split(".")[0] for p in paths].index(subject)]
        index = world_to_voxel(scan.affine, batch.a.coords[row].double().movedim(0, -1)).movedim(-1, 0).numpy()
        reference = map_coordinates(scan.image[0].numpy(), index, order=1, mode="nearest")
        valid = batch.a.valid[row, 0].numpy()
        assert np.allclose(np.round(index[:, valid]), index[:, valid], atol=1e-4)  # native grid, voxel-aligned
        np.testing.assert_allclose(batch.a.image[row, 0].numpy()[valid], reference[valid], atol=1e-5)


@pytest.mark.parametrize("preset", ["symmetric", "weak_strong", "raw_patch"])
@pytest.mark.parametrize("info_guided", [False, True])
def test_presets_give_overlapping_views_of_the_patch_size(scans, preset, info_guided):
    paths, dims = scans
    batch = _sampler(paths, dims, preset=preset, info_guided=info_guided, info_radius_mm=1.5).sample(2)
    for view in (batch.a, batch.b):
        assert view.image.shape == (2, 1, *PATCHES[dims]) and view.coords.shape == (2, dims, *PATCHES[dims])
        assert view.valid.dtype == torch.bool and view.view_to_world.shape == (2, dims + 1, dims + 1)
        assert (view.info is not None) == info_guided
    if preset == "raw_patch":
        assert batch.a.valid.all()  # the whole scan
    for row in range(2):  # both views contain the anchor: some view-a pixels land inside view b
        inside_b = world_to_voxel(batch.b.view_to_world[row], batch.a.coords[row].double().movedim(0, -1))
        within = ((inside_b >= -0.5) & (inside_b <= torch.tensor(PATCHES[dims]) - 0.5)).all(-1)
        assert (within & batch.a.valid[row, 0]).any()


def test_info_guided_intensity_follows_the_anchor_category(scans):
    paths, dims = scans
    options = dict(NO_AUGMENTATION, info_brightness=((0.5, 0.5), (0.25, 0.25), (0.125, 0.125)),
                   info_contrast=((1, 1),) * 3)
    sampler = _sampler(paths, dims, preset="weak_strong", info_guided=True, info_thresholds_bits=(-1.0, 100.0),
                       **options)  # every anchor is medium
    batch = sampler.sample(2)
    assert torch.allclose(batch.b.image, batch.a.image * 0.25, atol=1e-6)  # views identical but for the factor
    high = _sampler(paths, dims, preset="weak_strong", info_guided=True, info_thresholds_bits=(-2.0, -1.0),
                    **options).sample(2)
    assert torch.allclose(high.b.image, high.a.image * 0.125, atol=1e-6)


def test_dataset_percentile_thresholds(scans):
    paths, dims = scans
    sampler = _sampler(paths, dims, info_guided=True, info_thresholds_bits=None, info_percentiles=(30.0, 70.0))
    sampler.sample(1)
    expected = percentile_thresholds([sampler.scans[i].info for i in range(2)], (30.0, 70.0))
    assert sampler.state_dict()["thresholds_bits"] == pytest.approx(expected)


def test_category_shares_are_logged_and_a_missing_category_is_warned_about(scans, caplog):
    paths, dims = scans
    caplog.set_level(logging.INFO, logger="medssl.transforms.sampler")
    default = _sampler(paths, dims, info_guided=True)  # (2, 4.5) bits: above a 2 mm window's reach
    default.sample(1)
    shares = default.category_shares()
    assert shares["positions"]["high"] == 0 and shares["anchors"]["high"] == 0
    for kind in ("positions", "anchors"):
        assert sum(shares[kind].values()) == pytest.approx(100)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("category 'high' holds 0.00 %" in w and "data.info_thresholds_bits" in w for w in warnings)
    assert sum("information categories (thresholds 2.000, 4.500 bits" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    inside = percentile_thresholds([default.scans[i].info for i in range(2)], (30.0, 70.0))
    spread = _sampler(paths, dims, info_guided=True, info_thresholds_bits=inside).category_shares()
    assert all(value > 1 for kind in ("positions", "anchors") for value in spread[kind].values())
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_state_dict_resume_and_seed(scans):
    paths, dims = scans
    sampler = _sampler(paths, dims, info_guided=True, elastic_mm=1.0)
    sampler.sample(2)
    state = sampler.state_dict()
    expected = sampler.sample(2)
    resumed = _sampler(paths, dims, info_guided=True, elastic_mm=1.0, seed=99)
    resumed.load_state_dict(state)
    again = resumed.sample(2)
    for mine, theirs in ((expected.a, again.a), (expected.b, again.b)):
        assert torch.equal(mine.image, theirs.image) and torch.equal(mine.coords, theirs.coords)
        assert torch.equal(mine.info, theirs.info)
    assert expected.b.view_to_world is None  # elastic views have no affine
    assert not torch.equal(_sampler(paths, dims, seed=1).sample(2).b.image, _sampler(paths, dims).sample(2).b.image)


def test_disk_cache_gives_the_same_scans(scans, tmp_path):
    paths, dims = scans
    first = _sampler(paths, dims, info_guided=True, cache_dir=str(tmp_path / "cache")).sample(2)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    second = _sampler(paths, dims, info_guided=True, cache_dir=str(tmp_path / "cache")).sample(2)
    assert torch.equal(first.b.image, second.b.image) and torch.equal(first.a.info, second.a.info)


def test_bad_input_raises_input_error(scans, tmp_path):
    paths, dims = scans
    with pytest.raises(InputError, match="did you mean 'raw_patch'"):
        _sampler(paths, dims, preset="raw_pach")
    with pytest.raises(InputError, match="no images"):
        _sampler([], dims)
    with pytest.raises(InputError, match=f"expected a {5 - dims}D image"):
        ViewPairSampler(paths, spatial_dims=5 - dims, patch_size=[8] * (5 - dims)).sample(1)
    with pytest.raises(InputError, match="scale"):
        _sampler(paths, dims, scale=(2.0, 1.0))


def test_preprocessing_orients_resamples_and_normalises(tmp_path):
    volume = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4) * 10 - 1000
    affine = np.diag([-1.0, 2.0, 3.0, 1.0])  # axis 0 runs to the left (LAS)
    path = save_image(volume, affine, tmp_path / "ct.nii.gz")
    image = preprocess_image(path, spatial_dims=3, modality="ct", spacing_mm=(1.0, 1.0, 1.5))
    assert np.allclose(np.diag(image.affine.numpy())[:3], [1.0, 1.0, 1.5])  # RAS, resampled
    assert image.shape[1:] == (6, 9, 7)  # MONAI keeps the extent between the outer voxel centres
    assert 0 <= image.min() and image.max() <= 1
    first = preprocess_image(path, spatial_dims=3, modality="ct")  # voxel (0, 0, 0) is now the file's (5, 0, 0)
    assert float(first[0, 0, 0, 0]) == pytest.approx((volume[5, 0, 0] + 1000) / 2000)
    ct = normalise_intensity(torch.tensor([[-2000.0, -1000.0, 0.0, 1000.0, 3000.0]]), "ct")
    assert ct.tolist() == [[0.0, 0.0, 0.5, 1.0, 1.0]]
    mr = normalise_intensity(torch.linspace(0, 100, 1001)[None], "mr")
    assert float(mr.min()) == 0.0 and float(mr.max()) == 1.0 and float(mr[0, 500]) == pytest.approx(0.5)
    with pytest.raises(InputError, match="did you mean 'ct'"):
        normalise_intensity(torch.zeros(1, 3), "cta")
