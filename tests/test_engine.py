"""The pretraining loop with a tiny network, objective and view sampler defined here: exact resume, NaN guard,
run folder contents, config checks, schedule."""

from __future__ import annotations

from types import SimpleNamespace

import copy
import csv
import sys
import types
from pathlib import Path

import math
import numpy as np
import pytest
import torch
import yaml
from monai.networks.layers import Conv
from torch import nn

import medssl.networks
from medssl.data.batch import PairBatch, ViewBatch
from medssl.engine import pretrain as engine
from medssl.networks import load_network, model_file
from medssl.engine.pretrain_config import pretrain_config_from_dict
from medssl.engine.schedule import build_optimizer, build_scheduler
from medssl.errors import InputError, TrainingDiverged
from medssl.objectives.base import OBJECTIVES, Objective


class TinyNet(nn.Module):
    """Two convolutions: (B, 1, *S) -> (B, C, *S); rebuildable from ``get_config()``."""

    def __init__(self, spatial_dims: int, channels: int = 4):
        super().__init__()
        self.spatial_dims, self.channels = spatial_dims, channels
        conv = Conv["conv", spatial_dims]
        self.body = nn.Sequential(conv(1, channels, 3, padding=1), nn.ReLU(), conv(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def get_config(self) -> dict:
        return {"spatial_dims": self.spatial_dims, "channels": self.channels}


class TinyObjective(Objective):
    """BYOL-like toy: a head on pooled student features regresses an EMA teacher's; a buffer counts steps.
    ``nan_at_call`` returns a NaN loss at that forward call; ``interrupt_at_call`` raises KeyboardInterrupt."""

    interrupt_at_call = 0  # set on the class by a test (not a hyperparameter: a resumed run must match its config)

    def __init__(self, network: nn.Module, hidden: int = 4, nan_at_call: int = 0):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(network.channels, hidden), nn.Dropout(0.2), nn.Linear(hidden, network.channels))
        self.teacher = copy.deepcopy(network).requires_grad_(False)
        self.register_buffer("ema_steps", torch.zeros(()))
        self.nan_at_call, self.calls = nan_at_call, 0

    def forward(self, network, batch):
        self.calls += 1
        if self.calls == self.interrupt_at_call:
            raise KeyboardInterrupt
        student = self.head(network(batch.a.image).flatten(2).mean(-1))  # (B, C)
        with torch.no_grad():
            target = self.teacher(batch.b.image).flatten(2).mean(-1)  # (B, C)
        loss = (student - target).pow(2).mean() + 0.01 * network(batch.b.image).pow(2).mean()
        if self.calls == self.nan_at_call:
            loss = loss * float("nan")
        return {"loss": loss, "mse": loss.detach()}

    @torch.no_grad()
    def on_step_end(self, network, progress):
        momentum = 0.9 + 0.1 * progress
        for t, s in zip(self.teacher.parameters(), network.parameters()):
            t.lerp_(s, 1 - momentum)
        self.ema_steps += 1


class FakeSampler:
    """Random-noise views seeded by ``(seed, step, first)`` like the real sampler (the engine's protocol: ``sample``,
    ``state_dict``, ``scans`` and ``device``)."""

    def __init__(self, images, *, spatial_dims, patch_size, preset="symmetric", info_guided=False, device="cpu",
                 seed=0, cache_dir=None, noise: float = 1.0):
        self.shape, self.noise, self.seed = tuple(patch_size), noise, seed
        self.images, self.device, self.step = images, torch.device(device), 0
        self.scans = SimpleNamespace(paths=[], channels=[], shapes=[])

    def _view(self, batch_size, generator):
        image = self.noise * torch.randn((batch_size, 1, *self.shape), generator=generator)
        coords = torch.zeros((batch_size, len(self.shape), *self.shape))
        return ViewBatch(image, coords, torch.ones((batch_size, 1, *self.shape), dtype=torch.bool))

    def sample(self, batch_size, step=None, first=0):
        if step is None:
            step, self.step = self.step, self.step + 1
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + first)
        return PairBatch(self._view(batch_size, generator), self._view(batch_size, generator))

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    """Swap in the tiny network, objective and sampler; returns a folder with two (unread) image files."""
    monkeypatch.setattr(engine, "build_network", TinyNet)
    monkeypatch.setattr(engine, "UNet", TinyNet)
    monkeypatch.setattr(model_file, "UNet", TinyNet)
    monkeypatch.setitem(OBJECTIVES._items, "tiny", TinyObjective)
    monkeypatch.setattr(engine, "ViewPairSampler", FakeSampler)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (data / name).write_bytes(b"")
    return data


def tiny_config(data: Path, dims: int = 2, **train) -> dict:
    return {
        "method": "tiny",
        "spatial_dims": dims,
        "seed": 3,
        "data": {"path": str(data), "patch_size": [8] * dims},
        "network": {"channels": 4},
        "objective": {"tiny": {"hidden": 6}},
        "train": {"steps": 6, "batch_size": 2, "lr": 1e-2, "warmup_steps": 2, "log_every": 2,
                  "checkpoint_every": 3, **train},
    }


def run(data_dict: dict, out: Path, resume: Path | None = None) -> Path:
    return engine.pretrain(pretrain_config_from_dict(data_dict), out=out, resume=resume)


def weights(run_folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_folder / "model.pt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("dims", [2, 3])
def test_interrupted_and_resumed_run_ends_with_identical_weights(fakes, tmp_path, monkeypatch, dims):
    config = tiny_config(fakes, dims, steps=7, checkpoint_every=3, optimizer="sgd" if dims == 3 else "adamw")
    whole = run(config, tmp_path / "whole")
    monkeypatch.setattr(TinyObjective, "interrupt_at_call", 5)  # dies in step 5, after the step-3 checkpoint
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "parts")
    monkeypatch.setattr(TinyObjective, "interrupt_at_call", 0)
    assert torch.load(tmp_path / "parts" / engine.CHECKPOINT, weights_only=False)["step"] == 3
    run(config, None, resume=tmp_path / "parts")
    a, b = weights(whole), weights(tmp_path / "parts")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    full_a = torch.load(tmp_path / "whole" / engine.CHECKPOINT, weights_only=False)
    full_b = torch.load(tmp_path / "parts" / engine.CHECKPOINT, weights_only=False)
    for key in full_a["objectives"]:  # EMA teacher and buffers continue exactly too
        assert torch.equal(full_a["objectives"][key], full_b["objectives"][key]), key
    assert full_b["objectives"]["tiny.ema_steps"].item() == 7
    rows_a = list(csv.DictReader((tmp_path / "whole" / "metrics.csv").open()))
    rows_b = list(csv.DictReader((tmp_path / "parts" / "metrics.csv").open()))
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == ["2", "4", "6", "7"]
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]


def test_run_folder_holds_the_contract_files(fakes, tmp_path):
    folder = run(tiny_config(fakes), tmp_path / "run")
    assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.pt").is_file()
    assert list(folder.glob("events.out.tfevents.*")), "TensorBoard events missing"
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert {"loss", "mse", "lr", "seconds"} <= set(rows[0])
    payload = torch.load(folder / "model.pt", weights_only=True)
    assert payload["format"] == "medssl.model/1" and payload["spatial_dims"] == 2
    assert payload["network"] == {"spatial_dims": 2, "channels": 4}
    assert payload["preprocessing"] == {  # the Preprocessing spec (defaults filled) + the patch size
        "modality": "mr", "spacing_mm": None, "intensity_window": None, "file_spacing_mm": None, "patch_size": [8, 8]}
    network = load_network(folder).network
    x = torch.randn(1, 1, 8, 8)
    reference = TinyNet(2, 4)
    reference.load_state_dict(payload["state_dict"])  # the network's own keys: no surgery
    assert torch.equal(network(x), reference.eval()(x))
    with pytest.raises(InputError, match="--resume"):
        run(tiny_config(fakes), tmp_path / "run")  # a folder holding a run is not overwritten


def test_lr_follows_warmup_then_cosine(fakes, tmp_path):
    folder = run(tiny_config(fakes, steps=6, warmup_steps=2, log_every=1), tmp_path / "run")
    lrs = [float(r["lr"]) for r in csv.DictReader((folder / "metrics.csv").open())]
    expected = [0.0, 0.5e-2] + [1e-2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-12)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(fakes, tmp_path):
    config = tiny_config(fakes, steps=8, checkpoint_every=2)
    config["objective"]["tiny"]["nan_at_call"] = 4
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4.*step 2"):
        run(config, tmp_path / "run")
    state = torch.load(tmp_path / "run" / engine.CHECKPOINT, weights_only=False)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["network"].values())
    network = load_network(tmp_path / "run").network
    for key, value in network.state_dict().items():
        assert torch.equal(value, state["network"][key])


def test_composed_methods_sum_weighted_losses(fakes, tmp_path, monkeypatch):
    monkeypatch.setitem(OBJECTIVES._items, "tiny2", TinyObjective)
    config = tiny_config(fakes, steps=3, warmup_steps=1, log_every=1)
    config.update(method=["tiny", "tiny2"], objective={"tiny": {"weight": 0.25}, "tiny2": {"weight": 2.0}})
    rows = list(csv.DictReader((run(config, tmp_path / "run") / "metrics.csv").open()))
    for row in rows:
        expected = 0.25 * float(row["tiny/loss"]) + 2.0 * float(row["tiny2/loss"])
        assert float(row["loss"]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"network": {"chanels": 4}}, "network.chanels' \\(did you mean 'channels'"),
        ({"objective": {"tiny": {"hiden": 3}}}, "objective.tiny.hiden' \\(did you mean 'hidden'"),
        ({"data": {"path": "x", "patch_size": [8, 8], "noize": 1}}, "data.noize' \\(did you mean 'noise'"),
        ({"data": {"path": "x", "patch_size": [8, 8], "seed": 1}}, "data.seed' is set by medssl"),
        ({"method": "tinny"}, "did you mean 'tiny'"),
    ],
)
def test_sections_are_checked_against_the_signatures(fakes, tmp_path, change, message):
    config = {**tiny_config(fakes), **change}
    if "method" in change:
        config["objective"] = {}
    with pytest.raises(InputError, match=message):
        run(config, tmp_path / "run")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"path": "x"}}, "data.patch_size' is required"),
        ({"data": {"patch_size": [8, 8, 8]}}, "must list 2 positive integers"),
        ({"objective": {"msf": {}}}, "objective.msf' is for a method not in"),
        ({"train": {"steps": 0, "batch_size": 1, "lr": 0.1}}, "train.steps' must be >= 1"),
        ({"train": {"steps": 5, "batch_size": 1, "lr": 0.1, "warmup_steps": 5}}, "warmup_steps"),
        ({"train": {"steps": 5, "batch_size": 1, "lr": 0.1, "optimiser": "sgd"}}, "did you mean 'optimizer'"),
    ],
)
def test_invalid_configs_are_input_errors(fakes, change, message):
    with pytest.raises(InputError, match=message):
        pretrain_config_from_dict({**tiny_config(fakes), **change})


def test_resume_rejects_a_different_config(fakes, tmp_path):
    run(tiny_config(fakes, steps=3), tmp_path / "run")
    with pytest.raises(InputError, match="train.lr differ"):
        run(tiny_config(fakes, steps=3, lr=0.5), None, resume=tmp_path / "run")
    with pytest.raises(InputError, match="cannot resume"):
        run(tiny_config(fakes, steps=3), None, resume=tmp_path / "nothing")


def test_weight_decay_skips_biases_and_scheduler_matches_formula():
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    optimizer = build_optimizer([net], name="sgd", lr=1.0, weight_decay=0.1)
    decay, no_decay = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [(4, 3)] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    scheduler = build_scheduler(optimizer, steps=10, warmup_steps=0, min_lr_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [max(0.1, 0.5 * (1 + math.cos(math.pi * k / 10))) for k in range(10)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)


CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*_[23]d.yaml")
                 if not p.name.startswith("finetune_"))


def test_a_config_per_method_and_dimension_ships():
    names = {p.stem for p in CONFIGS}
    assert {f"{m}_{d}d" for m in ("pgssl", "infoguided", "lewel", "msf") for d in (2, 3)} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_build_their_network_objectives_and_sampler_options(path):
    from medssl.config import check_kwargs
    from medssl.engine.pretrain_config import read_pretrain_config
    from medssl.transforms.sampler import ViewPairSampler

    raw = yaml.safe_load(path.read_text())
    for key in ("method", "spatial_dims", "seed", "train.steps", "train.batch_size", "train.lr", "data.patch_size"):
        section, _, name = key.rpartition(".")
        assert name in (raw[section] if section else raw), f"contract key {key} missing"
    config = read_pretrain_config(path)
    network = engine.network_from_config(config)
    objectives, weights = engine.build_objectives(config, network)
    assert list(objectives) == config.methods and all(w == 1.0 for w in weights.values())
    check_kwargs(ViewPairSampler, {k: v for k, v in config.data.items() if k != "path"}, "data",
                 reserved=engine.SAMPLER_RESERVED)
    assert config.name == path.stem


@pytest.mark.parametrize("dims", [2, 3])
def test_composed_config_trains_both_objectives_on_raw_patch_views(dims, tmp_path):
    """``configs/infoguided+lewel_<D>d.yaml`` with a tiny network: the scan/patch views of the first method feed both
    objectives, every logged step's loss is their weighted sum, and the matcher's levels are the union."""
    from medssl.data.demo import write_demo_dataset
    from medssl.engine.pretrain_config import read_pretrain_config

    data = write_demo_dataset(tmp_path / "demo", spatial_dims=dims, n_subjects=2)
    tiny = ["network.channels=[4,8,8]", "train.steps=2", "train.batch_size=2", "train.warmup_steps=0",
            "train.log_every=1", "train.device=cpu", f"data.patch_size={[16] * dims}", "data.spacing_mm=4.0",
            "objective.infoguided.window=2", "objective.lewel.proj_dim=16", "objective.lewel.hidden_dim=32"]
    config = read_pretrain_config(CONFIGS[0].parent / f"infoguided+lewel_{dims}d.yaml", tiny)
    assert config.methods == ["infoguided", "lewel"]
    objectives, weights = engine.build_objectives(config, engine.network_from_config(config))
    assert objectives["infoguided"].views == "raw_patch" and objectives["lewel"].trained_levels == [0, 1]
    rows = list(csv.DictReader((engine.pretrain(config, data=data, out=tmp_path / "run") / "metrics.csv").open()))
    assert len(rows) == 2 and "lewel/loss_aligned_stride1" in rows[0] and "infoguided/loss_stride1" in rows[0]
    for row in rows:
        expected = sum(weights[name] * float(row[f"{name}/loss"]) for name in objectives)
        assert float(row["loss"]) == pytest.approx(expected, rel=1e-4)


def test_real_msf_run_resumes_exactly(tmp_path, monkeypatch):
    """The same with the real sampler (RNG on its own generator), U-Net, MSF teacher and memory bank."""
    import nibabel as nib
    from medssl.objectives.msf import MSF

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for k in range(2):
        image = rng.normal(size=(36, 40)).cumsum(0).cumsum(1).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), data / f"scan{k}.nii.gz")
    config = {
        "method": "msf", "spatial_dims": 2, "seed": 5,
        "data": {"path": str(data), "patch_size": [16, 16]}, "network": {"channels": [4, 8, 4], "dropout": 0.1},
        "objective": {"msf": {"proj_dim": 8, "hidden_dim": 16, "bank_size": 8, "k": 2}},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "checkpoint_every": 2},
    }
    whole = run(config, tmp_path / "whole")
    original = MSF.on_step_end
    calls = []

    def dies_in_step_3(self, network, progress):
        calls.append(progress)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(self, network, progress)

    monkeypatch.setattr(MSF, "on_step_end", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "parts")
    monkeypatch.setattr(MSF, "on_step_end", original)
    run(config, None, resume=tmp_path / "parts")
    full_a = torch.load(whole / engine.CHECKPOINT, weights_only=False)
    full_b = torch.load(tmp_path / "parts" / engine.CHECKPOINT, weights_only=False)
    for part in ("network", "objectives"):
        for key, value in full_a[part].items():
            assert torch.equal(value, full_b[part][key]), key


def test_truncate_metrics_drops_rows_after_the_step_and_a_torn_last_line(tmp_path):
    """A resumed run keeps the rows up to its step; a partial last line (the run killed mid-append) goes too."""
    from medssl.engine.monitor import truncate_metrics

    path = tmp_path / "metrics.csv"
    path.write_text("step,loss,seconds\n10,1.5,2.0\n20,1.25,4.0\n30,1.0,6.0\n4")
    assert truncate_metrics(path, 20) == [["step", "loss", "seconds"], ["10", "1.5", "2.0"], ["20", "1.25", "4.0"]]
    assert path.read_text() == "step,loss,seconds\n10,1.5,2.0\n20,1.25,4.0\n"
    path.write_text("step,loss,seconds\n10,1.5,2.0\n20,1.2")
    assert truncate_metrics(path, 100)[1:] == [["10", "1.5", "2.0"]]
