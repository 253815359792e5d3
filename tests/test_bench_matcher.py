"""``python -m benchmarks.bench_matcher`` at toy size: every matcher variant scored on the same queries (the
ensemble's extra templates left out of all of them), one table row per variant."""

from __future__ import annotations

import pytest
from conftest import toy_demo_run

from medssl.data.landmarks import read_landmarks

from benchmarks import bench_matcher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_toy_ablation_scores_every_variant_on_the_same_queries(tmp_path):
    data, run = toy_demo_run(tmp_path, subjects=6)
    records = []
    rows, (templates, queries) = bench_matcher.score_run(run, data, 2, records=records)
    assert templates[0] == "subject_000" and len(templates) == 3 and len(set(templates)) == 3
    assert sorted([*templates, *queries]) == [f"subject_{i:03d}" for i in range(6)]
    assert list(rows) == [variant[0] for variant in bench_matcher.VARIANTS]
    for label, row in rows.items():
        assert 0 < row["mre"] < 200 and 0 <= row["sdr2"] <= row["sdr4"] <= 1, label
    landmarks = len(read_landmarks(data / "landmarks.csv")["subject_000"])
    assert {row["n"] for row in rows.values()} == {len(queries) * landmarks}  # every variant on the same queries
    assert rows["argmax"]["rho_residual"] != rows["argmax"]["rho_residual"]  # NaN: no consistency check
    text = bench_matcher.table([rows, rows], {})
    assert text.count("\n") == 1 + len(bench_matcher.VARIANTS) and "± 0.00" in text
    # --errors: one row per variant, query and landmark, whose mean is the row's MRE
    assert len(records) == len(rows) * len(queries) * landmarks
    argmax = [record["error_mm"] for record in records if record["matcher"] == "argmax"]
    assert sum(argmax) / len(argmax) == pytest.approx(rows["argmax"]["mre"])
    written = bench_matcher.write_csv(tmp_path / "errors.csv", records).read_text().splitlines()
    assert written[0] == "run,matcher,query,landmark,error_mm,score,residual_mm" and len(written) == 1 + len(records)


def test_templates_option_fixes_the_ensemble_across_commands(tmp_path):
    data, run = toy_demo_run(tmp_path, subjects=6)
    text = bench_matcher.main(["--dim", "2", "--runs", str(run), "--data", str(data), "--skip-baselines",
                               "--templates", "subject_003, subject_001,subject_005"])
    assert "templates subject_003, subject_001, subject_005; 3 queries" in text
    with pytest.raises(SystemExit, match="three image names"):
        bench_matcher.main(["--dim", "2", "--runs", str(run), "--data", str(data), "--templates", "subject_003"])
    with pytest.raises(SystemExit, match="subject_042: no such image"):
        bench_matcher.main(["--dim", "2", "--runs", str(run), "--data", str(data), "--skip-baselines",
                            "--templates", "subject_003,subject_042,subject_005"])
