"""The shipped configs are package data (``medssl/configs``, linked from ``configs/``): found by name or by path,
with the shipped names listed when neither matches, and inside a built wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from medssl.cli import main
from medssl.config import find_config, shipped_config, shipped_configs
from medssl.engine.pretrain_config import read_pretrain_config
from medssl.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_configs_folder_is_the_package_data():
    shipped = shipped_configs()
    assert {"infoguided_2d", "pgssl_3d", "finetune_seg_2d"} <= set(shipped)
    assert (ROOT / "configs").resolve() == (ROOT / "medssl" / "configs").resolve() == shipped["pgssl_3d"].parent


def test_configs_resolve_by_name_and_by_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside a checkout: no configs/ folder here
    expected = shipped_config("infoguided_2d")
    for given in ("infoguided_2d", "infoguided_2d.yaml", "configs/infoguided_2d.yaml", expected):
        assert find_config(given) == expected, given
    own = tmp_path / "infoguided_2d.yaml"
    own.write_text("seed: 1\n")
    assert find_config("infoguided_2d.yaml") == Path("infoguided_2d.yaml")  # an existing file wins over the name
    assert read_pretrain_config("pgssl_2d") == read_pretrain_config(ROOT / "configs" / "pgssl_2d.yaml")


def test_an_unknown_name_lists_the_shipped_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"did you mean 'infoguided_2d'\?.*pgssl_3d"):
        find_config("infoguided_2")
    with pytest.raises(InputError, match="no shipped config is named 'lewel_4d'"):
        shipped_config("lewel_4d")
    assert main(["pretrain", "infoguided_2", "--out", "run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config file not found" in err[0] and "infoguided_2d" in err[0]
    assert main(["pretrain", "infoguided_2d", "--out", "run"]) == 2  # found by name: only --data is missing
    assert "pass --data PATH" in capsys.readouterr().err


def test_a_built_wheel_holds_the_configs(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    shutil.copytree(ROOT / "medssl", source / "medssl", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("medssl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"medssl/configs/{path.name}" for path in shipped_configs().values()} <= names
    # installed from the wheel (not editable), outside a checkout: a shipped config runs by name
    installed, work = tmp_path / "installed", tmp_path / "work"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(installed), str(wheel)],
                   check=True, capture_output=True)
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed)}
    where = subprocess.run([sys.executable, "-c", "import medssl; print(medssl.__file__)"], cwd=work, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert Path(where.strip()).is_relative_to(installed)
    steps = [["data", "demo", "--dim", "2", "--subjects", "2", "--out", "demo"],
             ["pretrain", "infoguided_2d", "--data", "demo/images", "--out", "run", "train.steps=1",
              "train.batch_size=1", "train.warmup_steps=0", "train.device=cpu", "data.patch_size=[32,32]",
              "network.channels=[4,8,8]"]]
    for args in steps:
        done = subprocess.run([sys.executable, "-m", "medssl", *args], cwd=work, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (work / "run" / "model.pt").is_file()
