"""EMA teachers and their momentum schedule."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL schedule: ``1 - (1 - base) * (cos(pi * progress) + 1) / 2``, rising from ``base`` to 1."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` (no gradients), to be updated by ``update_momentum``."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_momentum(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` for parameters; float buffers (BN running
    statistics) are averaged the same way (EMAN), integer buffers copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
            t.lerp_(s.detach(), 1.0 - momentum)
        else:
            t.copy_(s)
