"""``python -m benchmarks.bench_scale`` pieces at toy size: a set of N scans from fewer distinct demo subjects, the
throughput measurement through DataLoader workers, and the tables."""

from __future__ import annotations

import pytest

from benchmarks import bench_scale

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sets_throughput_and_tables(tmp_path):
    data = bench_scale.demo_set(tmp_path, 2, 5, distinct=2)
    files = sorted(data.iterdir())
    assert len(files) == 5 and len({f.stat().st_ino for f in files}) == 2  # 2 distinct scans, 3 hard links
    assert bench_scale.demo_set(tmp_path, 2, 5, distinct=2) == data and len(list(data.iterdir())) == 5  # reused
    rate = bench_scale.pairs_per_second("pgssl_2d", data, tmp_path / "cache", workers=1, batches=2)
    assert rate > 0 and len(list((tmp_path / "cache").glob("*.npy"))) == 5
    memory = [{"scans": 24, "cache_mb": 0, "peak_mb": 900.0, "run_s": 20.0, "prepare_s_per_scan": 0.1},
              {"scans": 1000, "cache_mb": 0, "peak_mb": 990.0, "run_s": 21.0, "prepare_s_per_scan": 0.1}]
    text = bench_scale.format_tables("pgssl_2d", memory, [{"workers": 0, "pairs_per_s": rate}], 20)
    assert "| 1000 | 0 | 990 | 1.10 | 21 | 0.100 |" in text and "`medssl pretrain pgssl_2d` (20 steps" in text
