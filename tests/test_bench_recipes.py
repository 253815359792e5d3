"""``python -m benchmarks.bench_recipes`` at toy size: the runs of each recipe and init, and the table's gains."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_recipes
from medssl.networks import UNet, save_model

TOY = ["network.channels=[4,8,8]", "train.steps=2", "train.val_every=2", "train.batch_size=2", "train.warmup_steps=0",
       "data.patch_size=[16,16]", "data.spacing_mm=4.0"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_recipe_runs_and_the_gain_is_against_random_init_under_the_same_recipe(tmp_path):
    torch.manual_seed(7)
    save_model(UNet(2, channels=[4, 8, 8]), tmp_path / "pre", spatial_dims=2, preprocessing={})
    out = tmp_path / "study"
    path = bench_recipes.main(["--checkpoint", str(tmp_path / "pre"), "--labeled", "1", "--seeds", "0,1",
                               "--recipes", "150 steps", "fresh decoder", "--subjects", "6", "--test", "2", "--val",
                               "1", "--out", str(out), *TOY])
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == sorted(f"{recipe}_{init}_n1_s{seed}" for recipe, init in
                          [("fresh_decoder", "pre"), ("150_steps", "none"), ("150_steps", "pre")] for seed in (0, 1))
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")]
             for line in path.read_text().splitlines()[2:]}
    assert set(lines) == {("150 steps", "pre"), ("fresh decoder", "pre"), ("150 steps", "none")}
    random_mean = float(lines[("150 steps", "none")][2].split(" ± ")[0])
    for recipe in ("150 steps", "fresh decoder"):  # the random-init baseline of both is the 150-step recipe's
        cells = lines[(recipe, "pre")]
        per_seed = [float(v) for v in cells[3].split(", ")]
        assert len(per_seed) == 2 and float(cells[4]) == pytest.approx(sum(per_seed) / 2 - random_mean, abs=2e-3)
    assert lines[("150 steps", "none")][4] == "-"
