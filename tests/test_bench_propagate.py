"""``python -m benchmarks.bench_propagate`` at toy size: every variant and registration scored on the same images,
the phases timed inside the total, and the patched functions put back."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_propagate
from medssl.matching import propagate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_toy_variants_and_registration_on_the_same_images(tmp_path):
    from medssl.data.demo import write_demo_dataset
    from medssl.networks import build_network, save_model

    data = write_demo_dataset(tmp_path / "data", spatial_dims=2, n_subjects=3, seed=0)
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_model(build_network(spatial_dims=2, channels=(4, 8, 8, 8)), run / "model.pt", spatial_dims=2,
               preprocessing={"modality": "mr"})
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
