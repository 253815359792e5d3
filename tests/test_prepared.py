"""Pretraining at scale: the prepared-data cache (stale and corrupt entries, bounded memory, parallel preparation),
anchors drawn by rejection, and batches that depend only on (seed, step) whatever renders them."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from medssl.cli import main
from medssl.data.readers import save_image
from medssl.errors import InputError
from medssl.transforms.infomap import anchor_weights
from medssl.transforms.pair_loader import pair_batches
from medssl.transforms import prepared
from medssl.transforms.prepared import PreparedScans, PrepareSpec, prepare_scans
from medssl.transforms.preprocess import Preprocessing
from medssl.transforms.sampler import ViewPairSampler

SHAPES = {2: (40, 34), 3: (22, 20, 12)}
PATCHES = {2: [16, 16], 3: [8, 8, 8]}


def _write_scans(folder, dims, count, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        volume = rng.normal(size=SHAPES[dims]).cumsum(axis=0).cumsum(axis=1).astype(np.float32)
        affine = np.diag([0.9, 1.2, 2.0][:dims] + [1.0])
        paths.append(save_image(volume, affine, folder / f"scan{k}.nii.gz"))
    return paths


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def scans(request, tmp_path):
    dims = request.param
    return _write_scans(tmp_path, dims, 3), dims


def _sampler(paths, dims, folder, **options):
    options = {"preset": "raw_patch", "info_guided": True, "info_radius_mm": 1.5, "elastic_mm": 1.0, **options}
    return ViewPairSampler(paths, spatial_dims=dims, patch_size=PATCHES[dims], cache_dir=str(folder), **options)


def _same(first, second):
    for mine, theirs in ((first.a, second.a), (first.b, second.b)):
        for name in ("image", "coords", "valid", "info"):
            if not torch.equal(getattr(mine, name), getattr(theirs, name)):
                return False
    return first.subjects == second.subjects


def test_workers_resume_and_ranks_do_not_change_the_batches(scans, tmp_path):
    paths, dims = scans
    sampler = _sampler(paths, dims, tmp_path / "cache")
    alone = list(pair_batches(sampler, start=0, stop=5, batch_size=4))
    for workers in (1, 2):
        rendered = list(pair_batches(sampler, start=0, stop=5, batch_size=4, workers=workers, prefetch=1))
        assert len(rendered) == 5 and all(_same(a, b) for a, b in zip(alone, rendered)), workers
    resumed = list(pair_batches(_sampler(paths, dims, tmp_path / "cache"), start=3, stop=5, batch_size=4))
    assert all(_same(a, b) for a, b in zip(alone[3:], resumed))
    halves = [sampler.sample(2, step=1, first=rank * 2) for rank in (0, 1)]  # 2 ranks x 2 = the global batch of 4
    assert torch.equal(torch.cat([h.b.image for h in halves]), alone[1].b.image)
    assert not torch.equal(alone[0].b.image, alone[1].b.image)
    other_seed = _sampler(paths, dims, tmp_path / "cache", seed=1).sample(4, step=0)
    assert not torch.equal(other_seed.b.image, alone[0].b.image)


def test_memory_mapped_boxes_give_the_batches_of_scans_held_in_memory(scans, tmp_path):
    paths, dims = scans
    holding = _sampler(paths, dims, tmp_path / "cache")
    held = holding.sample(4, step=2)
    mapped = _sampler(paths, dims, tmp_path / "cache", cache_mb=0)
    assert _same(held, mapped.sample(4, step=2)) and mapped.scans._held_bytes == 0
    holding.sample(8, step=3)
    assert holding.scans._held_bytes > 0  # scans drawn again are held whole (and give the same boxes)
    assert _same(holding.sample(4, step=2), held)
    whole = mapped.scans[0]
    low, high = [1] * dims, [5] * dims
    box = (slice(None), *(slice(1, 5),) * dims)
    assert torch.equal(mapped.scans.region(0, low, high), torch.cat([whole.image, whole.info])[box])


def test_anchors_by_rejection_follow_the_weights(tmp_path):
    path = save_image(np.random.default_rng(3).random((6, 5)).astype(np.float32), np.eye(3), tmp_path / "s.nii.gz")
    for options in ({"info_alpha": 2.0}, {"info_category_ratios": (0.0, 1.0, 4.0)}):
        sampler = ViewPairSampler([path], spatial_dims=2, patch_size=[8, 8], info_guided=True, info_radius_mm=1.5,
                                  cache_dir=str(tmp_path / "c"), **options)
        info = sampler.scans[0].info  # (1, 6, 5)
        expected = anchor_weights(info[None], None, options.get("info_alpha", 0.3),
                                  options.get("info_category_ratios"), sampler.thresholds_bits)[0].double()
        expected = expected / expected.sum()
        generator = torch.Generator().manual_seed(0)
        draws = 10000
        counts = torch.zeros(info.numel(), dtype=torch.float64)
        for _ in range(draws):
            anchor, _ = sampler._anchor(0, generator)
            counts[int(anchor[0]) * 5 + int(anchor[1])] += 1
        total_variation = 0.5 * float((counts / draws - expected).abs().sum())
        assert total_variation < 0.06, (options, total_variation)  # 30 cells, 10000 draws: noise is about 0.02
        assert counts[expected == 0].sum() == 0


def test_stale_and_corrupt_entries_are_prepared_again(scans, tmp_path, caplog):
    paths, dims = scans
    folder = tmp_path / "cache"
    spec = PrepareSpec(Preprocessing(), dims, info_radius_mm=1.5)
    first = prepare_scans(paths, spec, folder, workers=1)
    records = sorted(folder.glob("*.json"))
    assert len(records) == 3 and len(list(folder.glob("*.npy"))) == 3
    mtimes = {p: p.stat().st_mtime_ns for p in records}
    assert prepare_scans(paths, spec, folder, workers=1) == first  # up to date: nothing written
    assert {p: p.stat().st_mtime_ns for p in records} == mtimes
    volume = np.random.default_rng(9).random(SHAPES[dims]).astype(np.float32)
    save_image(volume, np.eye(dims + 1), paths[0])  # the file changes
    os.utime(paths[0], ns=(1, 1))
    changed = prepare_scans(paths, spec, folder, workers=1)
    assert changed[0]["source_stamp"] != first[0]["source_stamp"] and changed[1:] == first[1:]
    assert np.allclose(changed[0]["affine"], np.eye(dims + 1))
    array = sorted(folder.glob("scan1-*.npy"))[0]
    array.write_bytes(array.read_bytes()[:100])  # truncated (a killed copy, a full disk)
    caplog.set_level(logging.WARNING)
    again = prepare_scans(paths, spec, folder, workers=1)
    assert again[1] == first[1] and "scan1" in caplog.text and "preparing it again" in caplog.text
    record = sorted(folder.glob("scan2-*.json"))[0]
    record.write_text("{not json")
    caplog.clear()
    assert prepare_scans(paths, spec, folder, workers=1)[2] == first[2] and "scan2" in caplog.text
    scans_now = PreparedScans(paths, spatial_dims=dims, info_radius_mm=1.5, folder=folder)
    assert torch.equal(torch.from_numpy(np.load(array)), torch.cat([scans_now[1].image, scans_now[1].info]))


def test_parallel_preparation_matches_and_names_every_bad_file(tmp_path, monkeypatch):
    monkeypatch.setattr(prepared, "_POOL_WORTH_SECONDS", 0.0)  # a pool even for tiny scans
    paths = _write_scans(tmp_path, 2, 5)
    save_image(np.full((30, 30), 7.0, np.float32), np.eye(3), paths[1])  # constant
    save_image(np.random.default_rng(0).random((4, 5, 6)).astype(np.float32), np.eye(4), paths[3])  # 3D
    spec = PrepareSpec(Preprocessing(spacing_mm=1.5), 2, info_radius_mm=1.5)
    messages = []
    for name, workers in (("one", 1), ("two", 2)):
        with pytest.raises(InputError) as error:
            prepare_scans(paths, spec, tmp_path / name, workers=workers)
        messages.append(str(error.value).replace(str(tmp_path / name), "CACHE"))
    assert messages[0] == messages[1]  # the pool reports what this process does
    assert "2 of 5 scan(s) cannot be used" in messages[0] and "constant" in messages[0]
    assert "scan1" in messages[0] and "scan3" in messages[0] and "expected a 2D image" in messages[0]
    for path in (paths[0], paths[2], paths[4]):  # the good ones are prepared alike and kept
        stem = prepared.entry_stem(path, spec)
        assert np.array_equal(np.load(tmp_path / "one" / f"{stem}.npy"), np.load(tmp_path / "two" / f"{stem}.npy"))
        assert (json.loads((tmp_path / "one" / f"{stem}.json").read_text())
                == json.loads((tmp_path / "two" / f"{stem}.json").read_text()))


def test_prepare_command_then_pretraining_from_the_cache(tmp_path, caplog):
    paths = _write_scans(tmp_path / "data", 2, 3)
    cache = tmp_path / "cache"
    overrides = ["data.patch_size=[16,16]", "data.info_radius_mm=1.5", "network.channels=[4,8,8]"]
    assert main(["prepare", str(tmp_path / "data"), "--config", "infoguided_2d", "--out", str(cache),
                 "--workers", "1", *overrides]) == 0
    prepared = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len([name for name in prepared if name.endswith(".npy")]) == len(paths)
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    assert main(["pretrain", "infoguided_2d", "--data", str(tmp_path / "data"), "--out", str(run), "train.steps=2",
                 "train.warmup_steps=0", "train.batch_size=2", f"data.cache_dir={cache}", *overrides]) == 0
    assert "preparing" not in caplog.text and not (run / "prepared").exists()
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == prepared  # used, not rewritten
    saved = json.loads(sorted(cache.glob("*.json"))[0].read_text())
    assert saved["spec"]["info_radius_mm"] == 1.5 and saved["info"] is True


def test_pretraining_with_worker_processes_ends_with_the_same_weights(tmp_path):
    _write_scans(tmp_path / "data", 2, 3)
    common = ["pretrain", "pgssl_2d", "--data", str(tmp_path / "data"), "train.steps=3", "train.batch_size=2",
              "train.warmup_steps=0", "data.patch_size=[16,16]", "network.channels=[4,8,8]"]
    weights = []
    for workers in (0, 2):
        run = tmp_path / f"run{workers}"
        assert main([*common, "--out", str(run), f"data.workers={workers}"]) == 0
        assert len(list((run / "prepared").glob("*.npy"))) == 3  # prepared under the run by default
        weights.append(torch.load(run / "model.pt", weights_only=False)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_bad_loader_and_cache_options_are_refused(tmp_path, capsys):
    _write_scans(tmp_path / "data", 2, 2)
    common = ["pretrain", "pgssl_2d", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
              "train.steps=1", "train.warmup_steps=0", "data.patch_size=[16,16]"]
    for override, message in (("data.workers=-1", "data.workers"), ("data.prefetch=0", "data.prefetch"),
                              ("data.cache_mb=-5", "cache_mb")):
        assert main([*common, override]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([*common, f"data.cache_dir={tmp_path / 'data'}"]) == 2  # the cache would sit among the scans
    assert "holds an input" in capsys.readouterr().err and not list((tmp_path / "data").glob("*.npy"))
    assert main(["prepare", str(tmp_path / "data"), "--config", "pgssl_2d", "--out", str(tmp_path)]) == 2
    assert "holds an input" in capsys.readouterr().err


def test_a_scan_is_held_whole_from_its_second_use_within_the_budget(tmp_path):
    paths = _write_scans(tmp_path, 2, 3)
    scans = PreparedScans(paths, spatial_dims=2, folder=tmp_path / "cache", cache_mb=1)
    low, high = [0, 0], [4, 4]
    scans.use(0)
    scans.region(0, low, high)
    assert scans._held_bytes == 0  # drawn once: boxes only
    scans.use(0)
    first = scans.region(0, low, high)
    size = 4 * 40 * 34  # one channel, float32
    assert scans._held_bytes == size and torch.equal(first, scans[0].image[:, :4, :4])
    scans.limit_cache(size / 2**20 * 1.5)  # room for one scan only
    for index in (1, 2):
        scans.use(index), scans.use(index), scans.region(index, low, high)
    assert scans._held_bytes == size  # the budget holds
