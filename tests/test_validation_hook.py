"""One-shot landmark validation during pretraining: finite ``val/*`` rows equal to an independent one-shot run of
the saved model, no effect on training, bit-exact resume with validation on, bad paths fail at config time."""

from __future__ import annotations

import csv
import logging
import logging.handlers
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import validation_section
from medssl.cli import main
from medssl.data.demo import write_demo_dataset
from medssl.data.landmarks import read_landmarks
from medssl.engine import pretrain as engine
from medssl.engine.pretrain_config import pretrain_config_from_dict
from medssl.errors import InputError
from medssl.matching.run import detect_landmarks_files
from medssl.metrics.landmarks import landmark_scores
from medssl.objectives.msf import MSF

VAL_COLUMNS = ["val/mre_mm", "val/sdr_2mm", "val/sdr_4mm"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("validation") / "demo2d", spatial_dims=2, n_subjects=3)


def config(demo: Path, validation: bool = True) -> dict:
    """4 steps of MSF on 16 x 16 patches with a tiny U-Net (dropout on: eval/train switching matters)."""
    data = {
        "method": "msf", "spatial_dims": 2, "seed": 5,
        "data": {"path": str(demo / "images"), "patch_size": [16, 16]},
        "network": {"channels": [4, 8, 4], "dropout": 0.1},
        "objective": {"msf": {"proj_dim": 8, "hidden_dim": 16, "bank_size": 8, "k": 2}},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1},
    }
    if validation:
        data["validation"] = validation_section(demo)
    return data


@pytest.fixture(scope="module")
def validated(demo, tmp_path_factory) -> tuple[Path, str]:
    """A whole run with validation every 2 steps, and its log."""
    handler = logging.handlers.BufferingHandler(1000)
    logger = logging.getLogger("medssl")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        folder = run(config(demo), tmp_path_factory.mktemp("validated") / "run")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return folder, "\n".join(record.getMessage() for record in handler.buffer)


def run(data: dict, out: Path | None, resume: Path | None = None) -> Path:
    return engine.pretrain(pretrain_config_from_dict(data), out=out, resume=resume)


def rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_weights(a: Path, b: Path) -> None:
    full_a = torch.load(a / engine.CHECKPOINT, weights_only=False)
    full_b = torch.load(b / engine.CHECKPOINT, weights_only=False)
    for part in ("network", "objectives"):
        for key, value in full_a[part].items():
            assert torch.equal(value, full_b[part][key]), key


def test_validation_rows_match_a_one_shot_run_and_leave_training_unchanged(demo, validated, tmp_path):
    folder, log_text = validated
    table = rows(folder)
    assert [r["step"] for r in table] == ["1", "2", "3", "4"]
    assert all(r[c] == "" for r in (table[0], table[2]) for c in VAL_COLUMNS)  # header widened at step 2
    for r in (table[1], table[3]):
        assert math.isfinite(float(r["val/mre_mm"])) and all(0 <= float(r[c]) <= 1 for c in VAL_COLUMNS[1:])
    assert "val/mre_mm" in log_text  # in the progress line
    # reference: the saved final model through the one-shot command's code path (each landmark's own match, as
    # validation scores the features), template left out
    images = [demo / "images" / f"subject_00{k}.png" for k in (1, 2)]
    predicted = detect_landmarks_files(folder, [demo / "images" / "subject_000.png"], [demo / "landmarks.csv"],
                                       images, tmp_path / "pred.csv", consistency="none")
    scores = landmark_scores(read_landmarks(predicted), read_landmarks(demo / "landmarks.csv"), (2.0, 4.0))
    assert float(table[3]["val/mre_mm"]) == pytest.approx(scores["mre_mm"], abs=1e-3)  # CSV rounding only
    assert float(table[3]["val/sdr_4mm"]) == pytest.approx(scores["sdr"]["4"], abs=1e-6)
    without = run(config(demo, validation=False), tmp_path / "without")
    assert_same_weights(folder, without)  # validating changes no weight and no random stream
    assert [r["loss"] for r in rows(without)] == [r["loss"] for r in table]


def test_resume_with_validation_is_bit_exact(demo, validated, tmp_path, monkeypatch):
    whole = validated[0]
    original, calls = MSF.on_step_end, []

    def dies_in_step_3(self, network, progress):
        calls.append(progress)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(self, network, progress)

    monkeypatch.setattr(MSF, "on_step_end", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(config(demo), tmp_path / "parts")
    monkeypatch.setattr(MSF, "on_step_end", original)
    run(config(demo), None, resume=tmp_path / "parts")
    assert_same_weights(whole, tmp_path / "parts")
    without_time = [{k: v for k, v in r.items() if k != "seconds"} for r in rows(tmp_path / "parts")]
    assert without_time == [{k: v for k, v in r.items() if k != "seconds"} for r in rows(whole)]
    assert without_time[3]["val/mre_mm"] != ""  # the resumed part validated too
    run(config(demo, validation=False), None, resume=tmp_path / "parts")  # the section may change on resume


def test_bad_validation_section_fails_at_config_time(demo, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(demo)))
    missing = tmp_path / "nope.png"
    out = tmp_path / "run"
    assert main(["pretrain", str(path), "--out", str(out), f"validation.template={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "validation" in err[0] and str(path) in err[0]
    assert not out.exists()  # nothing was started
    assert main(["pretrain", str(path), "--out", str(out), "validation.evry=3"]) == 2
    assert "did you mean 'every'" in capsys.readouterr().err
    data = config(demo)
    data["validation"]["truth"] = str(tmp_path / "no_truth.csv")
    with pytest.raises(InputError, match="no_truth.csv: no such landmark CSV"):
        pretrain_config_from_dict(data)
    data = config(demo)
    data["validation"]["every"] = 0
    with pytest.raises(InputError, match="validation.every' must be >= 1"):
        pretrain_config_from_dict(data)
    np.testing.assert_equal(pretrain_config_from_dict(config(demo)).validation.sdr_radii_mm, (2.0, 4.0))
