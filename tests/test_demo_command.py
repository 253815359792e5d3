"""``medssl demo``: one toy-size run end to end (2D, 4 subjects, 2 pretraining steps), its report and figures, and
what a second run into the same folder does."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medssl.cli import main
from medssl.data.landmarks import read_landmarks
from medssl.data.readers import load_image, load_label
from medssl.errors import InputError
from medssl.report import demo

# lr ~0: the pretrained weights stay (almost) those of the random init, whose identity the test checks
TINY_PRETRAIN = ["train.steps=2", "train.batch_size=2", "data.patch_size=[32,32]", "network.channels=[4,8,8]",
                 "train.warmup_steps=0", "train.log_every=1", "train.lr=1.0e-7", "train.weight_decay=0"]
TINY_FINETUNE = ["train.steps=1", "train.val_every=1", "train.batch_size=2", "data.patch_size=[96,96]",
                 "train.warmup_steps=0"]
PRETRAINED = "pretrained (infoguided)"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    report = demo.run_demo(out, spatial_dims=2, subjects=4, test=1, val=1, labeled=1,
                           pretrain_overrides=TINY_PRETRAIN, finetune_overrides=TINY_FINETUNE, device="cpu")
    assert report == out / "report.md"
    return out


def _table_row(report: str, section: str, label: str) -> list[str]:
    """The cells after the first of the table line that starts with ``label`` below the heading ``section``."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and section in line)
    line = next(line for line in lines[start:] if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


LANDMARKS, SEGMENTATION, TIME = "One-shot landmarks", "Segmentation transfer", "Time per stage"


def test_report_has_every_row_figure_and_stage(toy):
    report = (toy / "report.md").read_text()
    for label in (PRETRAINED, "random init", "NCC"):
        mre, *sdr, seconds = _table_row(report, LANDMARKS, label)
        assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", mre) and len(sdr) == 4 and float(seconds) > 0
    assert "| init | mean Dice | Dice CSF | Dice grey matter | Dice white matter |" in report
    for label in (PRETRAINED, "random init"):
        assert 0.0 <= float(_table_row(report, SEGMENTATION, label)[0]) <= 1.0  # mean Dice
    figures = re.findall(r"!\[[^]]*\]\((figures/[\w.]+\.png)\)", report)
    assert sorted(figures) == ["figures/curves.png", "figures/landmarks.png", "figures/segmentation.png",
                               "figures/similarity.png"]
    for figure in figures:
        with Image.open(toy / figure) as png:
            assert png.format == "PNG" and min(png.size) > 100
    for stage in ("dataset", "pretraining", "one-shot landmarks", "segmentation transfer", "total"):
        assert float(_table_row(report, TIME, stage)[0]) > 0
    assert "torch " + torch.__version__ in report and "device: CPU" in report
    assert "(realistic variability, seed 0)" in report and "--seed 0 --variability realistic" in report


def test_report_numbers_match_an_independent_computation(toy):
    """NCC's MRE recomputed from its CSV; the pretrained row's Dice recomputed from its predicted label map."""
    report = (toy / "report.md").read_text()
    truth = read_landmarks(toy / "data" / "landmarks.csv")["subject_003"]  # the one test subject
    predicted = read_landmarks(toy / "landmarks" / "ncc.csv")
    assert list(predicted) == ["subject_003"]
    errors = [np.linalg.norm(predicted["subject_003"][name] - truth[name]) for name in truth]
    assert _table_row(report, LANDMARKS, "NCC")[0].startswith(f"{np.mean(errors):.2f} ± {np.std(errors):.2f}")

    image = load_image(toy / "data" / "images" / "subject_003.png")
    true_labels = load_label(toy / "data" / "labels" / "subject_003.png", like=image).numpy()
    labels = load_label(toy / "segmentation" / "pretrained_infoguided" / "subject_003.png", like=image).numpy()
    dice = [2 * np.sum((labels == c) & (true_labels == c)) / (np.sum(labels == c) + np.sum(true_labels == c))
            for c in (1, 2, 3)]
    assert _table_row(report, SEGMENTATION, PRETRAINED)[:4] == [f"{np.mean(dice):.3f}"] + [f"{d:.3f}" for d in dice]


def test_random_init_is_the_start_of_pretraining_and_both_fine_tune_alike(toy):
    random_init = torch.load(toy / "runs" / "random_init" / "model.pt", weights_only=True)
    pretrained = torch.load(toy / "runs" / "pretrained" / "model.pt", weights_only=True)
    assert random_init["network"] == pretrained["network"]
    assert random_init["preprocessing"] == pretrained["preprocessing"]
    assert random_init["matching"]["levels"] == pretrained["matching"]["levels"] == [0, 1]  # every level of both
    moved = [not torch.equal(random_init["state_dict"][k], v) for k, v in pretrained["state_dict"].items()]
    assert any(moved)  # pretraining did step ...
    for key, value in pretrained["state_dict"].items():  # ... from exactly the saved random init (lr ~0)
        torch.testing.assert_close(value, random_init["state_dict"][key], atol=1e-5, rtol=0)
    splits = [(toy / "runs" / run / "split.json").read_text() for run in ("seg_pretrained_infoguided",
                                                                          "seg_random_init")]
    assert splits[0] == splits[1]  # the same labeled and validation images


def test_second_run_replaces_the_previous_demo_and_refuses_other_folders(toy, tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING):
        demo.prepare_output(toy)
    assert "holds a previous demo: replacing it" in caplog.text
    assert sorted(p.name for p in toy.iterdir()) == [demo.MARKER]

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(other) in err and "holds no medssl demo" in err
    assert (other / "notes.txt").read_text() == "keep me" and len(list(other.iterdir())) == 1


def test_cli_passes_its_options(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kwargs: calls.append((out, kwargs)))
    assert main(["demo", "--out", str(tmp_path / "d3"), "--dim", "3", "--quick", "--variability", "low"]) == 0
    assert main(["demo"]) == 0
    assert calls == [(tmp_path / "d3", {"spatial_dims": 3, "quick": True, "variability": "low"}),
                     (Path("medssl_demo"), {"spatial_dims": 2, "quick": False, "variability": "realistic"})]


@pytest.mark.parametrize("kwargs, message", [
    ({"subjects": 3, "test": 2, "val": 1}, "subjects - test - val >= labeled"),
    ({"method": "infoguidd"}, "did you mean 'infoguided'"),
])
def test_bad_sizes_fail_before_writing_anything(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        demo.run_demo(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_demo_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "example:\n  medssl demo --out" in capsys.readouterr().out
