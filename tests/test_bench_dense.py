"""``python -m benchmarks.bench_dense`` at toy size: every config x seed pretrained and scored, random init per seed,
the baselines once, the table aggregated over seeds, and a rerun reusing what is done."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest

from benchmarks import bench_dense

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOY = ["--dim", "2", "--configs", "infoguided", "lewel", "--seeds", "0,1", "--steps", "2", "--subjects", "3",
       "--skip", "registration", "--override", "network.channels=[4,8,8]", "--override", "data.patch_size=[32,32]",
       "--override", "data.spacing_mm=2.0", "--override", "train.batch_size=2"]


def test_toy_comparison_and_rerun(tmp_path):
    work, out = tmp_path / "work", tmp_path / "dense.md"
    assert bench_dense.main([*TOY, "--work", str(work), "--out", str(out)]) == out
    results = json.loads((work / "results_2d.json").read_text())
    assert set(results["scores"]) == {"infoguided seed 0", "infoguided seed 1", "lewel seed 0", "lewel seed 1",
                                      "random init seed 0", "random init seed 1", "NCC"}
    rows = {row["config"]: row for row in bench_dense.summary_rows(results)}
    mre = [results["scores"][f"infoguided seed {s}"]["mre_mm"] for s in (0, 1)]
    assert rows["infoguided"]["mre"] == pytest.approx(np.mean(mre))
    assert rows["infoguided"]["sd"] == pytest.approx(np.std(mre, ddof=1))
    assert rows["random init"]["ratio"] == pytest.approx(1.0) and rows["NCC"]["seeds"] == 1
    text = out.read_text()
    assert "## 2D: 2 steps each, batch 2 of 32x32, seeds 0, 1" in text
    assert "| infoguided | 2 |" in text and "| NCC | 1 |" in text and "cos distant" in text
    redo = shlex.join([*TOY, "--work", str(work), "--out", str(out)])
    assert f"`python -m benchmarks.bench_dense {redo}`" in text  # how to regenerate it
    assert set(results["scores"]["lewel seed 1"]["margin"]) == {"far", "same", "margin"}
    runs = sorted(p.name for p in (work / "pretrain").iterdir())
    assert len(runs) == 4  # two configs x two seeds, one folder each
    stamps = {p: (work / "pretrain" / p / "model.pt").stat().st_mtime_ns for p in runs}
    docs = bench_dense.ROOT / "docs" / "dense.md"
    committed = docs.read_bytes()
    # a rerun trains nothing again; without --out it writes into --work, never over the committed docs/dense.md
    assert bench_dense.main([*TOY, "--work", str(work)]) == work / "dense.md"
    assert docs.read_bytes() == committed and "| infoguided | 2 |" in (work / "dense.md").read_text()
    assert {p: (work / "pretrain" / p / "model.pt").stat().st_mtime_ns for p in runs} == stamps
    assert json.loads((work / "results_2d.json").read_text())["scores"] == results["scores"]


def test_feature_margin_of_identical_subjects(tmp_path):
    """Queries that are copies of the template (same landmarks) have features equal to the template's at every
    landmark (``same`` = 1 on every level), other subjects do not (so the queries' own features are compared); a
    random network does not map distant positions alike (``far`` < 1)."""
    import shutil

    from medssl.data.demo import write_demo_dataset
    from medssl.data.landmarks import read_landmarks, write_landmarks
    from medssl.engine.pretrain import save_initial_model
    from medssl.engine.pretrain_config import read_pretrain_config

    data = tmp_path / "data"
    write_demo_dataset(data, spatial_dims=2, n_subjects=3, seed=0, variability="low")
    images = sorted((data / "images").iterdir())
    truth = read_landmarks(data / "landmarks.csv")
    model = save_initial_model(read_pretrain_config(bench_dense.ROOT / "configs" / "infoguided_2d.yaml",
                                                    ["network.channels=[4,8,8]", "data.spacing_mm=2.0"]),
                               tmp_path / "init" / "model.pt")
    assert max(bench_dense.feature_margin(str(model.parent), data, 2, queries=2)["same"]) < 0.999  # other subjects
    template = images[0].name.split(".")[0]
    for copy in images[1:]:
        shutil.copyfile(images[0], copy)
        truth[copy.name.split(".")[0]] = truth[template]
    write_landmarks(data / "landmarks.csv", truth)
    margin = bench_dense.feature_margin(str(model.parent), data, 2, queries=2)
    assert len(margin["far"]) == len(margin["same"]) == 2  # every level of the toy U-Net (bottleneck, decoder)
    assert margin["same"] == pytest.approx([1.0] * 2, abs=1e-5)
    assert all(-1.0 <= far < 0.99 for far in margin["far"])
    assert margin["margin"] == pytest.approx(1.0 - np.mean(margin["far"]))
