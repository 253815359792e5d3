"""``medssl landmarks oneshot|select-template`` on a tiny 2D demo population: the contract CSV, template == query
gives the template landmarks back with every method, ensembles, the ranking, bad inputs exit 2 with one line."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medssl.cli import build_parser, main
from medssl.data.demo import write_demo_dataset
from medssl.data.landmarks import read_landmarks, read_scores, write_landmarks
from medssl.data.readers import save_image
from medssl.matching.run import METHODS

TEMPLATE = "subject_000"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Three 2D demo subjects (PNG, 1 mm pixels, 16 landmarks each)."""
    return write_demo_dataset(tmp_path_factory.mktemp("landmarks_cli") / "demo2d", spatial_dims=2, n_subjects=3)


def image(demo: Path, key: str) -> str:
    return str(demo / "images" / f"{key}.png")


def oneshot(demo: Path, out: Path, *options: str, templates=(TEMPLATE,), images=None) -> int:
    args = ["landmarks", "oneshot", "--template-landmarks", str(demo / "landmarks.csv"), "--out", str(out)]
    for key in templates:
        args += ["--template", image(demo, key)]
    args += ["--images", *(images or [str(demo / "images")])]
    return main(args + list(options))


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medssl: error:"), lines
    return lines[0]


@pytest.mark.parametrize("method", METHODS)
def test_oneshot_writes_the_contract_csv_and_template_equals_query(demo, tmp_path, caplog, method):
    caplog.set_level(logging.INFO)
    keys = [TEMPLATE, "subject_001", "subject_002"] if method == "embedding" else [TEMPLATE, "subject_001"]
    options = ["--method", method, "--truth", str(demo / "landmarks.csv")]
    if method == "embedding":
        options += ["--checkpoint", "none", "--figures", str(tmp_path / "figures"), "--device", "cpu"]
    out = tmp_path / "pred.csv"
    assert oneshot(demo, out, *options, images=[image(demo, key) for key in keys]) == 0
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "name", "x", "y", "score", *["residual_mm"] * (method == "embedding")]
    truth, predicted, scores = read_landmarks(demo / "landmarks.csv"), read_landmarks(out), read_scores(out)
    assert sorted(predicted) == keys and all(predicted[key].keys() == truth[TEMPLATE].keys() for key in keys)
    assert all(np.isfinite(list(scores[key].values())).all() for key in keys)
    errors = [np.abs(predicted[TEMPLATE][name] - truth[TEMPLATE][name]).max() for name in truth[TEMPLATE]]
    assert max(errors) < 0.5  # template == query: its own landmarks back, within half a 1 mm pixel
    assert "MRE (mm)" in caplog.text and "SDR < 4 mm" in caplog.text  # --truth scores the predictions
    if method == "embedding":
        figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
        assert figures == sorted([f"template_{TEMPLATE}.png"] + [f"{key}.png" for key in keys])


def test_ensemble_of_one_template_twice_equals_one_template(demo, tmp_path):
    images = [image(demo, "subject_002")]
    assert oneshot(demo, tmp_path / "one.csv", "--method", "ncc", images=images) == 0
    assert oneshot(demo, tmp_path / "two.csv", "--method", "ncc", templates=(TEMPLATE, TEMPLATE), images=images) == 0
    one, two = read_landmarks(tmp_path / "one.csv")["subject_002"], read_landmarks(tmp_path / "two.csv")["subject_002"]
    for name in one:
        np.testing.assert_allclose(two[name], one[name], atol=1e-9)
    own = tmp_path / "own"  # one CSV per template, each holding only its image's rows
    table = read_landmarks(demo / "landmarks.csv")
    csvs = [write_landmarks(own / f"{key}.csv", {key: table[key]}) for key in (TEMPLATE, "subject_001")]
    args = ["landmarks", "oneshot", "--method", "ncc", "--out", str(tmp_path / "pair.csv"), "--images", *images]
    for key, path in zip((TEMPLATE, "subject_001"), csvs):
        args += ["--template", image(demo, key), "--template-landmarks", str(path)]
    assert main(args) == 0
    assert read_landmarks(tmp_path / "pair.csv")["subject_002"].keys() == table["subject_002"].keys()


def test_select_template_writes_a_ranking(demo, tmp_path):
    out = tmp_path / "ranking.csv"
    args = ["landmarks", "select-template", "--checkpoint", "none", "--images", str(demo / "images"),
            "--out", str(out), "--points", "4"]
    assert main(args) == 0
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["rank"] for row in rows] == ["1", "2", "3"]
    assert sorted(row["image"] for row in rows) == [TEMPLATE, "subject_001", "subject_002"]
    values = [float(row["score"]) for row in rows]
    assert values == sorted(values, reverse=True) and all(np.isfinite(values))


def test_levels_choose_the_matched_feature_levels_and_bad_values_exit_2(demo, tmp_path, capsys):
    query = [image(demo, "subject_001")]
    predicted = {}
    for levels in ("0", "3,4"):  # the bottleneck alone, the two finest decoder levels
        out = tmp_path / f"levels_{levels}.csv"
        assert oneshot(demo, out, "--checkpoint", "none", "--device", "cpu", "--levels", levels, images=query) == 0
        predicted[levels] = read_landmarks(out)["subject_001"]
    assert any(np.abs(predicted["0"][name] - predicted["3,4"][name]).max() > 1.0 for name in predicted["0"])
    for value, message in [("0,x", "comma-separated whole numbers such as 0,1"), ("0,5", "level(s) 5 out of range")]:
        assert oneshot(demo, tmp_path / "bad.csv", "--checkpoint", "none", "--levels", value, images=query) == 2
        line = error_line(capsys)
        assert line.startswith("medssl: error: --levels:") and message in line
    select = ["landmarks", "select-template", "--checkpoint", "none", "--images", str(demo / "images"), "--out",
              str(tmp_path / "ranking.csv"), "--levels=-1"]
    assert main(select) == 2
    assert "--levels: level(s) -1 out of range" in error_line(capsys)
    assert not (tmp_path / "bad.csv").exists() and not (tmp_path / "ranking.csv").exists()


def test_bad_template_csv_rows_exit_2_naming_the_csv(demo, tmp_path, capsys):
    table = read_landmarks(demo / "landmarks.csv")
    others = write_landmarks(tmp_path / "others.csv", {k: table[k] for k in ("subject_001", "subject_002")})
    args = ["landmarks", "oneshot", "--method", "ncc", "--template", image(demo, TEMPLATE), "--template-landmarks",
            str(others), "--images", image(demo, "subject_001"), "--out", str(tmp_path / "p.csv")]
    assert main(args) == 2
    line = error_line(capsys)
    assert str(others) in line and f"no rows for template '{TEMPLATE}'" in line
    fewer = dict(table["subject_001"])
    dropped = sorted(fewer)[0]
    del fewer[dropped]
    short = write_landmarks(tmp_path / "short.csv", {"subject_001": fewer})
    args = ["landmarks", "oneshot", "--method", "ncc", "--template", image(demo, TEMPLATE), "--template",
            image(demo, "subject_001"), "--template-landmarks", str(demo / "landmarks.csv"), "--template-landmarks",
            str(short), "--images", image(demo, "subject_002"), "--out", str(tmp_path / "p.csv")]
    assert main(args) == 2
    line = error_line(capsys)
    assert str(short) in line and "differ from the first template's" in line and dropped in line


def test_2d_3d_mismatch_exits_2_naming_the_file(demo, tmp_path, capsys):
    volume = save_image(np.arange(512, dtype=np.float32).reshape(8, 8, 8), np.eye(4), tmp_path / "volume.nii.gz")
    assert oneshot(demo, tmp_path / "p.csv", "--method", "ncc", images=[str(volume)]) == 2
    line = error_line(capsys)
    assert str(volume) in line and "expected a 2D image" in line
    points_3d = write_landmarks(tmp_path / "3d.csv", {TEMPLATE: {"a": np.array([10.0, 10.0, 0.0])}})
    args = ["landmarks", "oneshot", "--method", "ncc", "--template", image(demo, TEMPLATE), "--template-landmarks",
            str(points_3d), "--images", image(demo, "subject_001"), "--out", str(tmp_path / "p.csv")]
    assert main(args) == 2
    line = error_line(capsys)
    assert str(points_3d) in line and "3 coordinates" in line


def test_missing_checkpoint_exits_2_naming_it(demo, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    assert oneshot(demo, tmp_path / "p.csv", "--checkpoint", str(missing)) == 2
    assert f"{missing}: no model found" in error_line(capsys)
    assert oneshot(demo, tmp_path / "p.csv") == 2  # embedding without --checkpoint
    assert "needs --checkpoint" in error_line(capsys)
    assert main(["landmarks", "select-template", "--checkpoint", str(missing), "--images", str(demo / "images"),
                 "--out", str(tmp_path / "r.csv")]) == 2
    assert f"{missing}: no model found" in error_line(capsys)


def test_help_has_examples_and_the_methods_of_the_library():
    for command in ("oneshot", "select-template"):
        result = subprocess.run([sys.executable, "-m", "medssl", "landmarks", command, "--help"],
                                capture_output=True, text=True)
        assert result.returncode == 0 and f"example:\n  medssl landmarks {command}" in result.stdout
    oneshot_parser = build_parser()._subparsers._group_actions[0].choices["landmarks"]
    method = next(a for a in oneshot_parser._subparsers._group_actions[0].choices["oneshot"]._actions
                  if a.dest == "method")
    assert tuple(method.choices) == METHODS


def test_device_choice():
    import torch

    from medssl.errors import InputError
    from medssl.dist import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="--device: unknown device 'gpu'"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device: no CUDA GPU is visible"):
            pick_device("cuda")
