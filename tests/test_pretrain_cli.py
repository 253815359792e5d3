"""``medssl pretrain``: overrides, resume, exit status 2 with one stderr line for bad configs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from medssl.cli import main
from medssl.engine.pretrain import CHECKPOINT
from test_engine import fakes, tiny_config  # noqa: F401  (the fixture and config of the tiny fakes)


@pytest.fixture
def config_file(fakes, tmp_path):  # noqa: F811
    path = tmp_path / "tiny.yaml"
    config = tiny_config(fakes)
    del config["data"]["path"]
    path.write_text(yaml.safe_dump(config))
    return path


def test_overrides_reach_the_resolved_config(config_file, fakes, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = ["pretrain", str(config_file), "--data", str(fakes), "--out", str(out), "train.steps=4", "seed=9"]
    assert main(args) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 4 and saved["seed"] == 9
    assert saved["data"]["path"] == str(fakes.resolve()) and saved["data"]["patch_size"] == [8, 8]
    assert saved["train"]["optimizer"] == "adamw"  # defaults are written out: the config is fully resolved
    assert torch.load(out / CHECKPOINT, weights_only=False)["step"] == 4
    assert main(["pretrain", str(out / "config.yaml"), "--resume", str(out)]) == 0  # finished: nothing left to do


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stpes=3", "unknown config key 'train.stpes' (did you mean 'steps'?)"),
        ("network.chanels=3", "unknown config key 'network.chanels' (did you mean 'channels'?)"),
        ("train.optimizer=adam", "must be one of 'adamw', 'sgd', got 'adam'"),
        ("data.patch_size=[8]", "must list 2 positive integers"),
        ("train.steps", "not of the form key.sub=value"),
    ],
)
def test_bad_config_exits_2_with_one_line(config_file, fakes, tmp_path, capsys, override, message):  # noqa: F811
    code = main(["pretrain", str(config_file), "--data", str(fakes), "--out", str(tmp_path / "run"), override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and err.startswith("medssl: error:")


def test_nan_exits_2_and_names_the_checkpoint(config_file, fakes, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    code = main(["pretrain", str(config_file), "--data", str(fakes), "--out", str(out), "objective.tiny.nan_at_call=5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "loss became nan at step 5" in err[0] and "step 3" in err[0] and str(out / CHECKPOINT) in err[0]


def test_missing_config_and_missing_data_exit_2(config_file, tmp_path, capsys):
    assert main(["pretrain", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err
    assert main(["pretrain", str(config_file), "--out", str(tmp_path / "run")]) == 2
    assert "pass --data PATH" in capsys.readouterr().err


def test_help_shows_an_example():
    result = subprocess.run([sys.executable, "-m", "medssl", "pretrain", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "example:" in result.stdout and "--resume" in result.stdout and "train.steps=" in result.stdout
