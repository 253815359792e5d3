"""What is trained is what is matched: ``model.pt`` records the union of its objectives' ``trained_levels``;
one-shot matching (``detect_landmarks_files``, ``rank_templates_files``, the pretraining validation hook) uses
exactly those by default, ``levels`` overrides, random init and older ``model.pt`` files match every level."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import validation_section
from medssl.data.demo import write_demo_dataset
from medssl.networks import read_model_file
from medssl.engine.pretrain import pretrain
from medssl.engine.pretrain_config import pretrain_config_from_dict
from medssl.matching.oneshot import OneShotMatcher
from medssl.matching.run import detect_landmarks_files, matching_network, rank_templates_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHANNELS = [4, 8, 8, 8]  # 3 feature levels: 0 = bottleneck (stride 4), 1 (stride 2), 2 (stride 1)
HEADS = {  # small heads (the defaults are sized for real runs)
    "lewel": {"proj_dim": 8, "hidden_dim": 16, "decoder_levels": []},  # the paper's bottleneck-only LEWEL: [0]
    "pgssl": {"global_hidden": 16, "global_dim": 8, "pixel_hidden": 8, "pixel_dim": 8, "stabilizer_hidden": 8,
              "max_pixels": 64, "mc_samples": 2, "contrast_levels": []},  # stride-1 regression only: [2]
    "infoguided": {"window": 2},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("levels") / "demo2d", spatial_dims=2, n_subjects=3)


def config(demo: Path, methods: list[str], validation: bool = False) -> dict:
    """2 steps of ``methods`` on 16 x 16 patches with a tiny 3-level U-Net (validated at step 2 if asked)."""
    data = {
        "method": methods if len(methods) > 1 else methods[0], "spatial_dims": 2, "seed": 0,
        "data": {"path": str(demo / "images"), "patch_size": [16, 16]},
        "network": {"channels": CHANNELS},
        "objective": {method: HEADS[method] for method in methods},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 2},
    }
    if validation:
        data["validation"] = validation_section(demo)
    return data


def count_combined(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many levels every ``OneShotMatcher.combine_levels`` (scores at points) and ``combined_maps``
    (similarity maps) call combines."""
    counts, original, maps = [], OneShotMatcher.combine_levels, OneShotMatcher.combined_maps

    def combine(self, cosines):
        counts.append(len(cosines))
        return original(self, cosines)

    def combined(self, query, vectors, *args, **kwargs):
        counts.append(len(vectors))
        return maps(self, query, vectors, *args, **kwargs)

    monkeypatch.setattr(OneShotMatcher, "combine_levels", combine)
    monkeypatch.setattr(OneShotMatcher, "combined_maps", combined)
    return counts


@pytest.fixture(scope="module")
def lewel_run(demo, tmp_path_factory) -> tuple[Path, list[int]]:
    """A LEWEL run (bottleneck only) validated at its last step, and the map counts its validation combined."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        counts = count_combined(monkeypatch)
        run = pretrain(pretrain_config_from_dict(config(demo, ["lewel"], validation=True)),
                       out=tmp_path_factory.mktemp("lewel") / "run")
    return run, counts


@pytest.mark.parametrize("methods, levels", [(["infoguided"], [0, 1, 2]), (["pgssl", "lewel"], [0, 2])],
                         ids=["infoguided", "pgssl+lewel"])
def test_model_pt_records_the_union_of_the_trained_levels(demo, tmp_path, methods, levels):
    payload = read_model_file(pretrain(pretrain_config_from_dict(config(demo, methods)), out=tmp_path / "run"))
    assert payload["matching"] == {"levels": levels, "methods": methods, "pyramid": [1]}


def test_a_lewel_model_is_matched_on_the_bottleneck_only(demo, lewel_run, tmp_path, monkeypatch, caplog):
    run, validation_counts = lewel_run
    assert read_model_file(run)["matching"] == {"levels": [0], "methods": ["lewel"], "pyramid": [1]}
    assert validation_counts and set(validation_counts) == {1}  # the validation hook: the trained level only
    counts = count_combined(monkeypatch)
    images, template = demo / "images", demo / "images" / "subject_000.png"
    with caplog.at_level(logging.INFO, logger="medssl"):
        detect_landmarks_files(run, [template], [demo / "landmarks.csv"], [images], tmp_path / "a.csv", device="cpu")
    assert counts and set(counts) == {1}  # matching all 3 levels (the old default) combined 3 maps
    assert "one-shot matching: levels 0 (trained by lewel, from model.pt)" in caplog.text
    counts.clear()
    rank_templates_files(run, [images], tmp_path / "rank.csv", n_points=2, device="cpu")
    assert counts and set(counts) == {1}
    counts.clear()
    detect_landmarks_files(run, [template], [demo / "landmarks.csv"], [images], tmp_path / "b.csv", device="cpu",
                           levels=[1, 2])  # --levels overrides
    assert counts and set(counts) == {2}


def test_random_init_and_older_model_files_match_every_level(lewel_run, tmp_path, caplog):
    payload = read_model_file(lewel_run[0])
    del payload["matching"]  # what medssl wrote before the record
    torch.save(payload, tmp_path / "old.pt")
    with caplog.at_level(logging.INFO, logger="medssl"):
        assert matching_network(tmp_path / "old.pt", 2)[2] == [0, 1, 2]
        assert matching_network("none", 2)[2] == [0, 1, 2, 3, 4]
        assert matching_network(lewel_run[0], 2, levels=[2])[2] == [2]
    assert "all 3 levels (model.pt records none: written by an older medssl)" in caplog.text
    assert "all 5 levels (random init)" in caplog.text
    assert "levels 2 (--levels)" in caplog.text
