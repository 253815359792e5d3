"""Every example of ``docs/api.md`` runs: its ```` ```python ```` blocks (not the ```` ```python signature ````
ones), in order, in one namespace, in a temporary folder that sees the repository's ``configs/``."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def test_api_examples_run(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    examples = EXAMPLE.findall(text)
    assert len(examples) >= 18  # a 2D and a 3D example per section
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for index, source in enumerate(examples):
        exec(compile(source, f"docs/api.md example {index + 1}", "exec"), namespace)
    assert (tmp_path / "runs" / "ig3d" / "model.pt").is_file() and (tmp_path / "scores3d.json").is_file()
    assert namespace["found3d"].points_mm.shape == namespace["points3d"].shape
    assert len(namespace["label_maps"]) == 4 and 0.0 <= namespace["seg_scores"]["mean_dice"] <= 1.0
