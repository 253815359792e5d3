"""What every training run shares (pretraining and fine-tuning are thin loops on it): the loop's config fields,
seeding, the optimiser step (mixed precision with a gradient scaler, unscale, clip, step: the shape of timm's
``NativeScaler``), the NaN guard, the run folder with resume checks, and checkpoint I/O.

Checkpoints (``checkpoints/last.pt``) hold tensors and plain values only and are read with
``torch.load(..., weights_only=True)``: resuming never unpickles code.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from monai.utils import set_determinism
from torch import nn

from medssl.config import config_differences
from medssl.errors import InputError, TrainingDiverged
from medssl.outputs import check_output, save_atomic, temporaries

log = logging.getLogger(__name__)

CHECKPOINT = Path("checkpoints") / "last.pt"
#: mixed-precision dtypes by config name (``off``: float32); on CUDA, and on CPU with ``train.cpu_amp``
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """The loop's knobs shared by pretraining and fine-tuning (each extends it): ``steps`` optimiser steps of
    ``batch_size`` samples (per process under ``torchrun``), linear warm-up then cosine to ``lr * min_lr_ratio``."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0  # max global gradient norm; null disables clipping
    amp: Literal["off", "bf16", "fp16"] = "bf16"  # mixed precision on CUDA (on CPU only with cpu_amp)
    cpu_amp: bool = False  # also autocast on CPU (1.5x faster with native bfloat16 / AMX; emulated elsewhere)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True  # deterministic kernels (CPU runs are bit-exact given the seed)
    log_every: int = 10


def check_train_config(train: TrainConfig, positive: Sequence[str] = ()) -> None:
    """``InputError`` naming the config key for a non-positive count (``steps``, ``batch_size``, ``log_every`` and
    the ``positive`` extras), a learning rate <= 0 or a warm-up outside ``[0, steps)``."""
    for key in ("steps", "batch_size", "log_every", *positive):
        if getattr(train, key) < 1:
            raise InputError(f"config key 'train.{key}' must be >= 1, got {getattr(train, key)}")
    if train.lr <= 0:
        raise InputError(f"config key 'train.lr' must be > 0, got {train.lr}")
    if not 0 <= train.warmup_steps < train.steps:
        raise InputError(f"config key 'train.warmup_steps' must be in [0, train.steps), got {train.warmup_steps}")


def log_cpu_threads(device: torch.device) -> None:
    """On CPU: log torch's thread count and how to set it, and warn when the machine already looks busy (a second
    CPU job with as many threads makes both 10-20x slower)."""
    if device.type != "cpu":
        return
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    log.info("CPU: %d torch thread(s) on %d core(s) (set with 'medssl --threads N' or OMP_NUM_THREADS)", threads,
             cores)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= cores:
        log.warning("the CPU is already busy (load %.1f on %d cores): if another torch job runs, give each job "
                    "'medssl --threads %d' or wait for it; sharing cores slows both several-fold", load, cores,
                    max(1, cores // 2))


def seed_run(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed every global generator (``monai.utils.set_determinism``) and set torch's determinism flags (warn, not
    fail, where an op has no deterministic kernel). Callers that must not leave this behind wrap the run in
    ``medssl.rng.global_state_kept``."""
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic kernels
    set_determinism(seed=seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


class OptimizerStep:
    """One optimiser update with mixed precision: ``autocast()`` around the forward pass, then ``step(loss)``:
    zero the gradients, scaled backward, unscale and clip (``grad_clip``; None: no clipping), step, scaler update,
    schedule step. Mixed precision (``amp`` ``bf16``/``fp16``) runs on CUDA, and on CPU only with ``cpu_amp``; fp16
    uses a gradient scaler."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any, *, parameters: Iterable[nn.Parameter],
                 grad_clip: float | None, amp: str, device: torch.device, cpu_amp: bool = False):
        self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, grad_clip
        self.parameters = [p for p in parameters if p.requires_grad]
        self.device_type = device.type
        self.amp_dtype = AMP_DTYPES.get(amp) if device.type == "cuda" or cpu_amp else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of the forward pass (a no-op in float32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def step(self, loss: torch.Tensor, lr_group: int = 0) -> float:
        """Update the parameters from ``loss``; returns the learning rate of parameter group ``lr_group`` used."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[lr_group]["lr"]
        self.scheduler.step()
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def check_finite(value: float, step: int, *, kept: str, run: Path, advice: str) -> None:
    """The NaN guard: ``TrainingDiverged`` (the run stops; ``kept`` says what survives, ``advice`` what to do)
    unless the loss ``value`` of 1-based ``step`` is finite."""
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss became {value} at step {step}; training stopped and {kept}. {advice}", path=run)


def read_resume_state(path: str | Path) -> dict[str, Any]:
    """The training state in a run's ``checkpoints/last.pt``, loaded with ``weights_only=True`` (tensors and plain
    values only: a file holding anything else, e.g. code to run, is refused). Partial temporary files of an
    interrupted write beside it are removed first."""
    path = Path(path)
    for partial in temporaries(path):
        partial.unlink(missing_ok=True)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt, foreign or unsafe files
        reason = f"{err.__class__.__name__}: {err}".splitlines()[0][:200]
        raise InputError(f"cannot resume from this checkpoint ({reason}); it is corrupt, was written by an older "
                         "medssl, or holds more than tensors and numbers. Start the run again with a new --out",
                         path=path) from None
    if not isinstance(state, dict):
        raise InputError("not a medssl resume checkpoint; start the run again with a new --out", path=path)
    return state


def save_checkpoint(run: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors and plain values) to the run's ``checkpoints/last.pt`` atomically."""
    return save_atomic(state, run / CHECKPOINT)


def resumed_run(resume: str | Path, *, kind: str, inputs: Sequence[Any], config: Any,
                read_config: Callable[[Path], Any], may_change: Sequence[str],
                command: str) -> tuple[Path, dict[str, Any]]:
    """The run folder ``resume`` and its checkpoint state, refused (``InputError``) when it holds no checkpoint of
    a ``kind`` run, when an output would overwrite one of the ``inputs``, or when ``config`` differs from the run's
    own (``read_config(RUN/config.yaml)``) in other keys than ``may_change`` (``command`` is how to resume right).
    The checkpoint is read before any other work, so that a bad one is refused at once."""
    run = Path(resume)
    if not (run / CHECKPOINT).is_file():
        raise InputError(f"cannot resume: no {CHECKPOINT} in this folder (is it a {kind} run?)", path=run)
    check_output(run, kind="folder", inputs=inputs)
    differ = config_differences(read_config(run / "config.yaml"), config, may_change)
    if differ:
        raise InputError(f"cannot resume with a different config ({', '.join(differ)} differ); pass the run's own "
                         f"config: {command}", path=run)
    return run, read_resume_state(run / CHECKPOINT)


def new_run(out: str | Path | None, name: str, inputs: Sequence[Any]) -> Path:
    """A new run folder: ``out``, or ``runs/<name>_<time>``; refused when it already holds a run or would overwrite
    an input. Not created here: a run refused while reading its data leaves no folder behind."""
    run = Path(out) if out is not None else Path("runs") / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    if (run / CHECKPOINT).is_file():
        raise InputError(f"already holds a run; continue it with --resume {run} or choose another --out", path=run)
    return check_output(run, kind="folder", inputs=inputs)
