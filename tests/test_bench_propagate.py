"""``python -m benchmarks.bench_propagate`` at toy size: every variant and registration scored on the same images,
the phases timed inside the total, and the patched functions put back."""

from __future__ import annotations

import pytest
from conftest import toy_demo_run

from benchmarks import bench_propagate
from medssl.matching import propagate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_toy_variants_and_registration_on_the_same_images(tmp_path):
    data, run = toy_demo_run(tmp_path, subjects=3)
    spline = propagate.robust_spline
    text = bench_propagate.main(["--checkpoint", str(run), "--data", str(data), "--dim", "2", "--images", "2",
                                 "--variants", "default", "128 support points, stride 4, bf16",
                                 "--out", str(tmp_path / "table.md")])
    assert propagate.robust_spline is spline  # the timers are removed again
    rows = bench_propagate.score_variants(run, data, 2, 1, {"every level": bench_propagate.VARIANTS["every level"]},
                                          registration=False)
    assert list(rows) == ["every level"] and 0.0 <= rows["every level"]["mean_dice"] <= 1.0
    row = rows["every level"]
    assert 0 < sum(row[phase] for phase in bench_propagate.PHASES) < row["seconds"]  # the vote is the rest
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[2].startswith("| variant") and len(lines) == 7  # title, blank, header, rule, 2 rows, registration
    assert lines[-1].startswith("| registration") and lines[-1].split("|")[4].strip() == "1.0"
    assert "default" in text and "128 support points, stride 4, bf16" in text
