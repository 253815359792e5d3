"""Every notebook in ``notebooks/`` runs at toy size, in process: toy values are injected right after its one
``parameters`` cell (as papermill does), then every code cell runs in one namespace, in a temporary working folder,
with matplotlib's non-interactive Agg backend."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CONFIGS = str(ROOT / "configs")


def run_notebook(path: Path, parameters: dict[str, Any], workdir: Path, monkeypatch) -> dict[str, Any]:
    """Execute ``path`` with ``parameters`` overriding its ``parameters`` cell; returns the final namespace."""
    notebook = nbformat.read(path, as_version=4)
    cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    tagged = [i for i, cell in enumerate(cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected one code cell tagged 'parameters', found {len(tagged)}"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in cells), f"{path.name}: outputs not stripped"
    monkeypatch.chdir(workdir)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for index, cell in enumerate(cells):
        exec(compile(cell.source, f"{path.name} cell {index}", "exec"), namespace)
        if index == tagged[0]:
            unknown = set(parameters) - set(namespace)
            assert not unknown, f"{path.name}: toy values for names its parameters cell lacks: {sorted(unknown)}"
            namespace.update(parameters)
        plt.close("all")
    return namespace


def test_notebooks_are_valid_and_documented():
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [p.name for p in paths] == ["01_quickstart_2d.ipynb", "02_walkthrough_3d.ipynb", "03_finetuning.ipynb"]
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert notebook.cells[0].cell_type == "markdown"
        assert "subprocess" not in "".join(cell.source for cell in notebook.cells)  # the Python API, not the CLI


def _finite_scores(scores: dict, images: int) -> None:
    assert scores["n_images"] == images and math.isfinite(scores["mre_mm"]) and scores["mre_mm"] >= 0


def test_quickstart_2d(tmp_path, monkeypatch):
    ns = run_notebook(NOTEBOOKS / "01_quickstart_2d.ipynb", dict(
        CONFIGS=CONFIGS, OUT="out", SUBJECTS=3, STEPS=3, WARMUP_STEPS=0, BATCH_SIZE=2, PATCH_SIZE=[32, 32],
        LOG_EVERY=1, DEVICE="cpu"), tmp_path, monkeypatch)
    assert (tmp_path / "out" / "runs" / "infoguided_2d" / "model.pt").is_file()
    assert list(ns["SCORES"]) == ["pretrained", "random init", "NCC"]
    assert len(set(ns["PREDICTIONS"].values())) == 3  # one CSV per row
    for label, scores in ns["SCORES"].items():
        assert ns["PREDICTIONS"][label].is_file()
        _finite_scores(scores, images=2)
    assert ns["steps"] == [1, 2, 3]  # the loss curve read from metrics.csv
    assert ns["similarity"].shape == tuple(ns["query"].shape[1:])


def test_walkthrough_3d(tmp_path, monkeypatch):
    ns = run_notebook(NOTEBOOKS / "02_walkthrough_3d.ipynb", dict(
        CONFIGS=CONFIGS, OUT="out", SUBJECTS=2, SPACING_MM=4.0, STEPS=2, WARMUP_STEPS=0, BATCH_SIZE=1,
        PATCH_SIZE=[32, 32, 32], LOG_EVERY=1, DEVICE="cpu"), tmp_path, monkeypatch)
    assert (tmp_path / "out" / "runs" / "infoguided_3d" / "model.pt").is_file()
    assert len(set(ns["PREDICTIONS"].values())) == 3
    for label, scores in ns["SCORES"].items():
        assert ns["PREDICTIONS"][label].is_file()
        _finite_scores(scores, images=1)
    assert ns["similarity"].ndim == 3


def test_finetuning(tmp_path, monkeypatch):
    ns = run_notebook(NOTEBOOKS / "03_finetuning.ipynb", dict(
        CONFIGS=CONFIGS, OUT="out", SUBJECTS=3, N_VAL=1, N_TEST=1, LABELED=1, PRETRAIN_STEPS=2,
        PRETRAIN_WARMUP_STEPS=0, PRETRAIN_BATCH_SIZE=2, PRETRAIN_PATCH_SIZE=[32, 32], SEG_STEPS=2, LANDMARK_STEPS=2,
        FINETUNE_WARMUP_STEPS=0, FINETUNE_BATCH_SIZE=2, FINETUNE_PATCH_SIZE=[32, 32], VAL_EVERY=2, DEVICE="cpu"),
        tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert (out / "runs" / "pretrained" / "model.pt").is_file()
    for label in ("pretrained", "random init"):
        name = label.replace(" ", "_")
        assert (out / "runs" / f"seg_{name}" / "model.pt").is_file()
        assert len(list((out / "segmentation" / name).iterdir())) == 1
        assert 0.0 <= ns["SEG_SCORES"][label]["mean_dice"] <= 1.0
        _finite_scores(ns["LANDMARK_SCORES"][label], images=1)
