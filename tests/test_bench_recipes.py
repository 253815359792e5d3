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


def test_the_3d_study_runs_its_own_recipes_over_the_3d_base(tmp_path, monkeypatch):
    save_model(UNet(3, channels=[4, 8, 8]), tmp_path / "pre", spatial_dims=3, preprocessing={})
    seen = []
    monkeypatch.setattr(bench_recipes, "population", lambda out, dims, **_: tmp_path / "data" / "datalist.json")

    def fake_run(task, dims, init, n, seed, datalist, landmarks, out, overrides):
        seen.append((dims, init, out.name, list(overrides)))
        return {"mean_dice": 0.5 + 0.1 * (init != "none")}

    monkeypatch.setattr(bench_recipes, "run_one", fake_run)
    path = bench_recipes.main(["--dim", "3", "--checkpoint", "pre=" + str(tmp_path / "pre"), "--labeled", "1",
                               "--seeds", "0", "--recipes", "1000 steps", "fresh decoder", "--out", str(tmp_path)])
    assert sorted(name for *_, name, _ in seen) == ["1000_steps_none_n1_s0", "1000_steps_pre_n1_s0",
                                                    "fresh_decoder_pre_n1_s0"]
    assert all(dims == 3 and overrides[:len(bench_recipes.BASE_3D)] == bench_recipes.BASE_3D
               for dims, _, _, overrides in seen)
    assert "+0.100" in path.read_text()  # the gain of both pretrained rows over the 1000-step random-init row
    random_start = [overrides for _, init, _, overrides in seen if init == "none"][0]
    assert "network.channels=[4, 8, 8]" in random_start  # random init has the pretrained network's architecture
    assert all("network.channels=[4, 8, 8]" not in overrides for _, init, _, overrides in seen if init != "none")
    with pytest.raises(SystemExit):  # a 2D recipe is not a 3D one
        bench_recipes.main(["--dim", "3", "--checkpoint", str(tmp_path / "pre"), "--recipes", "150 steps",
                            "--out", str(tmp_path)])


def test_a_random_start_gets_the_checkpoints_architecture(tmp_path):
    from benchmarks.bench_finetune import random_start_overrides
    from medssl.config import shipped_config
    from medssl.engine.finetune_config import read_finetune_config

    network = UNet(3, channels=[4, 8, 16, 8], dropout=0.1)
    save_model(network, tmp_path / "pre", spatial_dims=3, preprocessing={})
    overrides = random_start_overrides(tmp_path / "pre")
    config = read_finetune_config(shipped_config("finetune_seg_3d"), overrides)
    assert UNet(3, **config.network).get_config() == network.get_config()
