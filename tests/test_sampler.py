"""ViewPairSampler and preprocessing: presets, exactness with augmentation off, IGU categories, resume, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
import torch.nn.functional as F
from scipy.ndimage import map_coordinates

from medssl.correspondence import match_views
from medssl.data.demo import write_demo_dataset
from medssl.data.geometry import world_to_voxel
from medssl.data.readers import save_image
from medssl.errors import InputError
from medssl.networks import UNet
from medssl.objectives.infoguided import InfoGuided
from medssl.transforms.infomap import info_categories
from medssl.transforms.preprocess import Preprocessing
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
        assert batch.a.valid[(slice(None), 0, *[p // 2 for p in PATCHES[dims]])].all()  # centred on the anchor
    for row in range(2):  # both views contain the anchor: some view-a pixels land inside view b
        inside_b = world_to_voxel(batch.b.view_to_world[row], batch.a.coords[row].double().movedim(0, -1))
        within = ((inside_b >= -0.5) & (inside_b <= torch.tensor(PATCHES[dims]) - 0.5)).all(-1)
        assert (within & batch.a.valid[row, 0]).any()


def test_raw_patch_views_are_at_the_scan_spacing_so_a_target_is_one_voxel(scans):
    """raw_patch: both views at the scan's spacing (scale/aspect do not apply), view a axis-aligned. b -> a is a
    rotation (maybe flipped) in mm; without rotation neighbouring view-b voxels land one view-a voxel apart."""
    paths, dims = scans
    spacing = torch.tensor(SPACINGS[dims], dtype=torch.float64)
    jitter = dict(preset="raw_patch", scale=(0.5, 2.0), aspect=(0.5, 2.0))
    batch = _sampler(paths, dims, **jitter).sample(4)  # rotation, flips and shift as by default
    for view in (batch.a, batch.b):
        assert torch.allclose(torch.linalg.norm(view.view_to_world[:, :dims, :dims], dim=1), spacing.expand(4, -1))
    assert torch.allclose(batch.a.view_to_world[:, :dims, :dims], torch.diag(spacing).expand(4, -1, -1))
    b_to_a = (torch.linalg.inv(batch.a.view_to_world) @ batch.b.view_to_world)[:, :dims, :dims]  # voxel -> voxel
    in_mm = torch.diag(spacing) @ b_to_a @ torch.diag(1 / spacing)  # (4, D, D)
    identity = torch.eye(dims, dtype=torch.float64)
    assert torch.allclose(in_mm.transpose(1, 2) @ in_mm, identity.expand(4, -1, -1), atol=1e-6)  # float32 affine
    aligned = _sampler(paths, dims, rotate_deg=0.0, **jitter).sample(4)  # anisotropic: a rotation changes voxel steps
    for row in range(4):
        in_a = world_to_voxel(aligned.a.view_to_world[row], aligned.b.coords[row].double().movedim(0, -1))  # (*P, D)
        for axis in range(dims):
            step = torch.linalg.norm(in_a.diff(dim=axis), dim=-1)  # neighbouring b voxels, in a's voxels
            assert torch.allclose(step, torch.ones_like(step), atol=1e-3)
        jacobian = (torch.linalg.inv(aligned.a.view_to_world[row]) @ aligned.b.view_to_world[row])[:dims, :dims]
        assert torch.allclose(jacobian.T @ jacobian, identity, atol=1e-6)  # orthogonal, unit-norm columns


def test_context_size_sets_view_a_and_matching_copes_with_two_sizes(scans):
    paths, dims = scans
    context = [2 * p for p in PATCHES[dims]]
    batch = _sampler(paths, dims, preset="raw_patch", context_size=context, info_guided=True,
                     info_radius_mm=1.5).sample(2)
    assert batch.a.image.shape == (2, 1, *context) and batch.a.info.shape == (2, 1, *context)
    assert batch.a.coords.shape == (2, dims, *context) and batch.b.image.shape == (2, 1, *PATCHES[dims])
    grid, mask = match_views(batch.b, batch.a)  # (2, *P, D): view b's pixels in view a
    assert grid.shape == (2, *PATCHES[dims], dims) and mask.any()
    found = F.grid_sample(batch.a.coords, grid.float(), align_corners=False)  # (2, D, *P); coords are linear
    assert torch.allclose(found.movedim(1, -1)[mask], batch.b.coords.movedim(1, -1)[mask], atol=1e-3)
    torch.manual_seed(0)
    network = UNet(dims, channels=(4, 8, 8, 16, 8))
    out = InfoGuided(network, window=2)(network, batch)
    assert torch.isfinite(out["loss"]) and float(out["anchors_valid"]) > 0


def test_bad_context_size_raises_input_error(scans):
    paths, dims = scans
    for context in ([8] * (dims + 1), [8] * (dims - 1) + [0], [8.0] * dims, [True] * dims, 8):
        with pytest.raises(InputError, match="context_size: must list"):
            _sampler(paths, dims, preset="raw_patch", context_size=context)
    with pytest.raises(InputError, match="context_size: applies to the raw_patch"):
        _sampler(paths, dims, preset="symmetric", context_size=[8] * dims)


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def demo_scans(request, tmp_path_factory):
    """Two demo subjects (2D 1 mm, 3D 2 mm) and their spatial_dims."""
    root = write_demo_dataset(tmp_path_factory.mktemp("demo"), spatial_dims=request.param, n_subjects=2, seed=0)
    return sorted((root / "images").glob("subject_*")), request.param


def test_default_thresholds_give_every_information_category_on_demo_data(demo_scans, tmp_path):
    paths, dims = demo_scans
    options = dict(spatial_dims=dims, patch_size=[32] * dims, preset="raw_patch", info_guided=True,
                   cache_dir=str(tmp_path))  # the second sampler reads the information maps from the disk cache
    shares = ViewPairSampler(paths, **options).category_shares()  # dataset 20/80 percentiles
    assert min(shares["anchors"].values()) > 5
    igu_aug = ViewPairSampler(paths, info_thresholds_bits=(2.0, 4.5), **options).category_shares()
    assert igu_aug["anchors"]["high"] < 1  # a 2 mm window hardly reaches 4.5 bits


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
    values = np.concatenate([sampler.scans[i].info.flatten().numpy() for i in range(2)])
    expected = np.percentile(values, [30.0, 70.0])
    thresholds = sampler.state_dict()["thresholds_bits"]
    assert thresholds == pytest.approx(expected, abs=8 / 2048)  # one histogram bin
    exact = torch.bincount(info_categories(torch.from_numpy(values), thresholds), minlength=3) / values.size * 100
    shares = sampler.category_shares()["positions"]  # from the stored histograms, exact as thresholds are bin edges
    assert [shares[name] for name in ("low", "medium", "high")] == pytest.approx(exact.tolist(), abs=0.5)


def test_category_shares_are_logged_and_a_missing_category_is_warned_about(scans, caplog):
    paths, dims = scans
    caplog.set_level(logging.INFO, logger="medssl.transforms.sampler")
    default = _sampler(paths, dims, info_guided=True, info_thresholds_bits=(2.0, 4.5))  # above a 2 mm window's reach
    default.sample(1)
    shares = default.category_shares()
    assert shares["positions"]["high"] == 0 and shares["anchors"]["high"] == 0
    for kind in ("positions", "anchors"):
        assert sum(shares[kind].values()) == pytest.approx(100)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("category 'high' holds 0.00 %" in w and "data.info_thresholds_bits" in w for w in warnings)
    assert sum("information categories (thresholds 2.000, 4.500 bits" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    inside = np.percentile(np.concatenate([default.scans[i].info.flatten().numpy() for i in range(2)]), [30.0, 70.0])
    spread = _sampler(paths, dims, info_guided=True, info_thresholds_bits=inside).category_shares()
    assert all(value > 1 for kind in ("positions", "anchors") for value in spread[kind].values())
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_state_dict_resume_and_seed(scans):
    paths, dims = scans
    sampler = _sampler(paths, dims, info_guided=True, elastic_mm=1.0)
    sampler.sample(2)
    state = sampler.state_dict()
    expected = sampler.sample(2)
    resumed = _sampler(paths, dims, info_guided=True, elastic_mm=1.0)
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
    assert len(list((tmp_path / "cache").glob("*.npy"))) == len(list((tmp_path / "cache").glob("*.json"))) == 2
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
    image, _ = Preprocessing(modality="ct", spacing_mm=(1.0, 1.0, 1.5)).read(path, 3)
    assert np.allclose(np.diag(image.affine.numpy())[:3], [1.0, 1.0, 1.5])  # RAS, resampled
    assert image.shape[1:] == (6, 9, 7)  # MONAI keeps the extent between the outer voxel centres
    assert 0 <= image.min() and image.max() <= 1
    first, _ = Preprocessing(modality="ct").read(path, 3)  # voxel (0, 0, 0) is now the file's (5, 0, 0)
    assert float(first[0, 0, 0, 0]) == pytest.approx((volume[5, 0, 0] + 1000) / 2000)
    grid = torch.eye(3, dtype=torch.float64)  # 2D images of one row: (1, 1, N)
    ct, _ = Preprocessing(modality="ct")(MetaTensor(torch.tensor([[[-2000.0, -1000.0, 0.0, 1000.0, 3000.0]]]),
                                                    affine=grid))
    assert ct[0, 0].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    mr, _ = Preprocessing(modality="mr")(MetaTensor(torch.linspace(0, 100, 1001)[None, None], affine=grid))
    assert float(mr.min()) == 0.0 and float(mr.max()) == 1.0 and float(mr[0, 0, 500]) == pytest.approx(0.5)
    with pytest.raises(InputError, match="did you mean 'ct'"):
        Preprocessing(modality="cta")
