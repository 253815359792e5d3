"""Mixed precision exercised without a GPU: with ``train.cpu_amp`` the loops run the CUDA autocast path on the CPU in
bfloat16 (one pretraining and one fine-tuning step per dimensionality): finite loss, parameters updated."""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medssl.data.demo import write_demo_dataset
from medssl.engine import finetune as finetune_engine
from medssl.engine import pretrain as pretrain_engine
from medssl.engine.finetune_config import read_finetune_config
from medssl.engine.pretrain_config import read_pretrain_config
from medssl.networks import load_network

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEP = ["network.channels=[4,8,8]", "train.steps=1", "train.batch_size=2", "train.warmup_steps=0",
        "train.log_every=1", "train.device=cpu", "train.amp=bf16", "train.cpu_amp=true"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=[2, 3])
def demo(request, tmp_path_factory) -> tuple[int, Path]:
    dims = request.param
    return dims, write_demo_dataset(tmp_path_factory.mktemp(f"amp{dims}d"), spatial_dims=dims, n_subjects=4, seed=1,
                                    spacing_mm=6.0 if dims == 3 else None)


def _autocast_seen(monkeypatch, module, name: str) -> list[torch.dtype | None]:
    """Record, at every call of ``module.<name>``, the CPU autocast dtype in force (None: autocast off)."""
    seen: list[torch.dtype | None] = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_one_pretraining_step_in_bfloat16_on_cpu(demo, tmp_path, monkeypatch):
    dims, data = demo
    patch = [16] * dims
    config = read_pretrain_config(CONFIGS / f"pgssl_{dims}d.yaml", [*STEP, f"data.patch_size={patch}",
                                                                     "data.spacing_mm=6.0"])
    seen = _autocast_seen(monkeypatch, pretrain_engine.TrainStep, "forward")
    start = pretrain_engine.save_initial_model(config, tmp_path / "init.pt")
    run = pretrain_engine.pretrain(config, data=data / "images", out=tmp_path / "run")
    assert seen == [torch.bfloat16]
    row = next(csv.DictReader((run / "metrics.csv").open()))
    assert math.isfinite(float(row["loss"]))
    before, after = load_network(start).network.state_dict(), load_network(run).network.state_dict()
    assert any(not torch.equal(before[key], after[key]) for key in before)


def test_one_finetuning_step_in_bfloat16_on_cpu(demo, tmp_path, monkeypatch):
    dims, data = demo
    config = read_finetune_config(CONFIGS / f"finetune_seg_{dims}d.yaml",
                                  [*STEP, "train.val_every=1", f"data.patch_size={[16] * dims}", "data.spacing_mm=6.0"])
    seen, task_loss = [], finetune_engine.task_loss

    def recorded_loss(config):
        loss = task_loss(config)

        def wrapped(outputs, batch):  # runs inside the loop's autocast, on the network's outputs
            seen.append((torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None, outputs.dtype))
            return loss(outputs, batch)

        return wrapped

    monkeypatch.setattr(finetune_engine, "task_loss", recorded_loss)
    run = finetune_engine.finetune(config, checkpoint="none", data=data / "datalist.json", out=tmp_path / "run")
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # one step, its forward in bfloat16
    row = next(csv.DictReader((run / "metrics.csv").open()))
    assert math.isfinite(float(row["loss"]))
    initial = finetune_engine.build_task_network(replace(config, checkpoint="none"), 4)[0].state_dict()
    tuned = load_network(run).network.state_dict()
    assert any(not torch.equal(initial[key], tuned[key]) for key in initial)
