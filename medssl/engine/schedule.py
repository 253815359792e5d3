"""Optimizer and learning-rate schedule (linear warm-up, then cosine) of both training loops.

The EMA momentum schedule belongs to the objectives (``medssl.objectives.momentum.cosine_momentum``); the loop
hands them ``progress`` in ``on_step_end``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from monai.optimizers import WarmupCosineSchedule
from torch import nn


def parameter_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: weights with ``weight_decay``; biases and norm scales (1-D) without."""
    decay, no_decay = [], []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    params: Iterable[nn.Module] | Iterable[dict], *, name: str, lr: float, weight_decay: float = 0.0,
    momentum: float = 0.9
) -> torch.optim.Optimizer:
    """``adamw`` or ``sgd`` (with ``momentum``) over ``params``: modules (their trainable parameters, in the two
    ``parameter_groups`` with ``weight_decay``) or parameter groups as given (each may set its own ``lr``)."""
    groups = list(params)
    if not groups or not isinstance(groups[0], dict):
        groups = parameter_groups(groups, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer '{name}'")  # the config schema only admits the two names


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, steps: int, warmup_steps: int, min_lr_ratio: float
) -> WarmupCosineSchedule:
    """Linear warm-up over ``warmup_steps`` then a half cosine down to ``lr * min_lr_ratio`` at ``steps``."""
    end_lr = min(group["lr"] for group in optimizer.param_groups) * min_lr_ratio
    return WarmupCosineSchedule(optimizer, warmup_steps=warmup_steps, t_total=steps, end_lr=end_lr)
