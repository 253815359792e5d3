"""Pyramid (issue 13/19): views cut at a multiple of the working spacing (both views of a pair at one scale),
images embedded at the same multiples for matching, the factors recorded in ``model.pt`` and used by default."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import validation_section
from medssl.cli import main
from medssl.data.demo import write_demo_dataset
from medssl.data.geometry import voxel_to_world, world_to_voxel
from medssl.data.readers import save_image
from medssl.engine import validation
from medssl.engine.pretrain import pretrain, save_initial_model
from medssl.engine.pretrain_config import pretrain_config_from_dict
from medssl.errors import InputError
from medssl.matching.oneshot import OneShotMatcher
from medssl.matching.run import matching_network
from medssl.networks import build_network, read_model_file
from medssl.transforms.sampler import ViewPairSampler
from medssl.transforms.views import check_pyramid
from test_oneshot import LANDMARK_VOXELS, SHAPES, SPACING, TINY_CHANNELS, affine_for, as_image, texture
from test_sampler import PATCHES, SPACINGS, scans  # noqa: F401 (scans: a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

def test_each_pair_is_cut_at_one_pyramid_factor_so_a_target_stays_one_voxel(scans):
    paths, dims = scans
    spacing = torch.tensor(SPACINGS[dims], dtype=torch.float64)
    sampler = ViewPairSampler(paths, spatial_dims=dims, patch_size=PATCHES[dims], preset="raw_patch",
                              pyramid=[1, 2], rotate_deg=0.0)
    batch = sampler.sample(16)
    factors = []
    for row in range(16):
        a = torch.linalg.norm(batch.a.view_to_world[row, :dims, :dims], dim=0) / spacing
        b = torch.linalg.norm(batch.b.view_to_world[row, :dims, :dims], dim=0) / spacing
        assert torch.allclose(a, a[0].expand(dims)) and torch.allclose(a, b)  # one scale within the pair
        factors.append(round(float(a[0]), 6))
        in_a = world_to_voxel(batch.a.view_to_world[row], batch.b.coords[row].double().movedim(0, -1))  # (*P, D)
        for axis in range(dims):  # neighbouring view-b voxels land one view-a voxel apart at either factor
            step = torch.linalg.norm(in_a.diff(dim=axis), dim=-1)
            assert torch.allclose(step, torch.ones_like(step), atol=1e-3)
    assert set(factors) == {1.0, 2.0}


#: sums of (view a image, view b image, view b coords) of 2 raw_patch samples at seed 3 of the scan below, recorded
#: with the sampler before the pyramid existed (commit 9da1920)
STREAM_BEFORE_PYRAMID = {2: (338.0820152461529, 330.37098440527916, 17663.339321363717),
                         3: (1095.4594033509493, 985.1980905756354, 121310.61526195958)}


@pytest.mark.parametrize("dims", [2, 3])
def test_a_single_factor_pyramid_keeps_the_view_stream(dims, tmp_path):
    rng = np.random.default_rng(dims)
    volume = rng.normal(size={2: (40, 30), 3: (20, 18, 10)}[dims]).cumsum(axis=0).cumsum(axis=1).astype(np.float32)
    path = save_image(volume, np.diag([*SPACINGS[dims], 1.0]), tmp_path / "scan.nii.gz")
    options = dict(spatial_dims=dims, patch_size=PATCHES[dims], preset="raw_patch", seed=3,
                   cache_dir=str(tmp_path / "cache"))
    default, explicit = ViewPairSampler([path], **options).sample(2), ViewPairSampler([path], pyramid=[1], **options).sample(2)
    assert torch.equal(default.a.image, explicit.a.image) and torch.equal(default.b.coords, explicit.b.coords)
    sums = (default.a.image.double().sum(), default.b.image.double().sum(), default.b.coords.double().sum())
    assert np.allclose([float(v) for v in sums], STREAM_BEFORE_PYRAMID[dims], rtol=1e-6)  # no extra draw


@pytest.mark.parametrize("bad", [[2], [1, 1], [0, 1], [1, 1.5], [1, True], "1,2", [], None])
def test_bad_pyramids_are_refused(bad):
    with pytest.raises(InputError, match="data.pyramid: must list distinct whole numbers >= 1 including 1"):
        check_pyramid(bad, "data.pyramid")
    assert check_pyramid([2, 1, 4], "x") == (1, 2, 4)


@pytest.mark.parametrize("dims", [2, 3])
def test_pyramid_levels_are_the_network_on_block_means_at_their_stride(dims):
    torch.manual_seed(0)
    network = build_network(spatial_dims=dims, channels=TINY_CHANNELS)  # 3 levels, strides 4, 2, 1
    image = as_image(texture(SHAPES[dims]), affine_for(dims))
    one = OneShotMatcher(network).embed(image)
    two = OneShotMatcher(network, pyramid=[1, 2]).embed(image)
    padded = two.padded_shape
    assert list(padded) == [-(-s // 8) * 8 for s in SHAPES[dims]]  # the next multiple of divisor (4) x factor 2
    strides = [padded[0] // level.shape[1] for level in two.features]
    assert strides == sorted(strides, reverse=True) and sorted(strides) == [1, 2, 2, 4, 4, 8]
    block = F.avg_pool2d if dims == 2 else F.avg_pool3d
    source = F.pad(image.as_tensor()[None].float(), [p for s, q in zip(reversed(SHAPES[dims]), reversed(padded))
                                                      for p in (0, q - s)])
    with torch.no_grad():
        expected = [F.normalize(level[0], dim=0) for level in network.eval().forward_features(block(source, 2))]
    coarse = [level for level, stride in zip(two.features, strides) if stride in (8, 4, 2)]
    for want in expected:  # each factor-2 level is among the levels of its stride
        assert any(level.shape == want.shape and torch.allclose(level, want, atol=1e-5) for level in coarse)
    assert len(one.features) == 3  # one factor: the network's levels only


@pytest.mark.parametrize("dims", [2, 3])
def test_a_template_matched_onto_itself_stays_exact_with_a_pyramid(dims):
    torch.manual_seed(0)
    matcher = OneShotMatcher(build_network(spatial_dims=dims, channels=TINY_CHANNELS), pyramid=[1, 2],
                             consistency="none")
    image = as_image(texture(SHAPES[dims]), affine_for(dims))
    embedding = matcher.embed(image)
    points_mm = voxel_to_world(image.affine.numpy(), np.array(LANDMARK_VOXELS[dims]))
    found = matcher.match([matcher.reference(embedding, image, points_mm)], embedding)
    assert np.abs(found.points_mm - points_mm).max() < 0.1 * max(SPACING[dims]) and np.all(found.scores > 0.99)


VALIDATION_PYRAMIDS: list = []  # the pyramid of every matcher the validation hook of ``pyramid_run`` built


@pytest.fixture(scope="module")
def pyramid_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-step InfoGuided run with ``data.pyramid: [1, 2]``, validated at step 2, and its demo folder."""
    demo = write_demo_dataset(tmp_path_factory.mktemp("pyr") / "demo2d", spatial_dims=2, n_subjects=3)
    config = pretrain_config_from_dict({
        "method": "infoguided", "spatial_dims": 2, "seed": 0,
        "data": {"path": str(demo / "images"), "patch_size": [16, 16], "pyramid": [1, 2]},
        "network": {"channels": [4, 8, 8, 8]}, "objective": {"infoguided": {"window": 2}},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 2},
        "validation": validation_section(demo),
    })
    original = validation.OneShotMatcher

    def recorded(*args, **kwargs):
        matcher = original(*args, **kwargs)
        VALIDATION_PYRAMIDS.append(matcher.pyramid)
        return matcher

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(validation, "OneShotMatcher", recorded)
        run = pretrain(config, out=tmp_path_factory.mktemp("pyr") / "run")
    save_initial_model(config, run.parent / "init.pt")
    return run, demo


def test_model_pt_records_the_pyramid_and_matching_uses_it(pyramid_run, caplog):
    run, _ = pyramid_run
    assert read_model_file(run)["matching"]["pyramid"] == [1, 2]
    assert VALIDATION_PYRAMIDS == [(1, 2)]  # the validation hook matched at the run's factors
    assert read_model_file(run.parent / "init.pt")["matching"]["pyramid"] == [1, 2]  # the run's random init too
    with caplog.at_level(logging.INFO, logger="medssl"):
        assert matching_network(run, 2).pyramid == [1, 2]
        assert matching_network(run, 2, pyramid=[1]).pyramid == [1]
        assert matching_network("none", 2).pyramid == [1]
    assert "at spacing x 1,2 (from model.pt)" in caplog.text


def test_cli_pyramid_option_and_its_errors(pyramid_run, tmp_path, capsys, caplog):
    run, demo = pyramid_run
    common = ["landmarks", "oneshot", "--checkpoint", str(run), "--template", str(demo / "images" / "subject_000.png"),
              "--template-landmarks", str(demo / "landmarks.csv"), "--images", str(demo / "images"),
              "--device", "cpu"]
    with caplog.at_level(logging.INFO, logger="medssl"):
        assert main([*common, "--pyramid", "1,2,4", "--out", str(tmp_path / "a.csv")]) == 0
    assert (tmp_path / "a.csv").is_file() and "at spacing x 1,2,4 (--pyramid)" in caplog.text
    for bad, message in (("1,x", "--pyramid: expected comma-separated whole numbers"),
                         ("2", "--pyramid: must list distinct whole numbers >= 1 including 1")):
        assert main([*common, "--pyramid", bad, "--out", str(tmp_path / "b.csv")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "b.csv").exists()
    config = Path(__file__).resolve().parents[1] / "configs" / "infoguided_2d.yaml"
    assert main(["pretrain", str(config), "--data", str(demo / "images"), "--out", str(tmp_path / "run"),
                 "data.pyramid=[2]"]) == 2
    assert "config key 'data.pyramid': must list distinct whole numbers" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bench_oneshot_embeds_random_init_at_the_runs_pyramid(pyramid_run, tmp_path, monkeypatch):
    from benchmarks import bench_oneshot

    run, demo = pyramid_run
    calls = {}

    def fake_row(label, data, checkpoint, method, work, arch, device="cpu", consistency=None, pyramid=None):
        calls[label] = pyramid
        return {"label": label}

    monkeypatch.setattr(bench_oneshot, "score_row", fake_row)
    bench_oneshot.oneshot_rows(demo, {"run": run}, tmp_path, skip=("ncc", "registration"))
    assert calls == {"run": None, "random init": [1, 2]}  # the run: its own record; random init: the same factors
