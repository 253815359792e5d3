"""The objective interface and its registry: names = file names = config names."""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

from medssl.data.batch import PairBatch
from medssl.errors import InputError
from medssl.registry import Registry
from medssl.transforms.views import VIEW_PRESETS


class Objective(nn.Module):
    """A self-supervised objective: owns its heads (and teacher, bank, ...) but not the network it trains.

    Subclasses set ``views`` (one of ``VIEW_PRESETS``) and implement ``forward``; ``on_step_end`` runs after every
    optimizer step (EMA teacher update, memory bank, ...) with ``progress`` = step / total steps in [0, 1].
    """

    views: ClassVar[str] = "symmetric"
    needs_info: ClassVar[bool] = False  # True when the batch must carry information maps (``ViewBatch.info``)

    @property
    def trained_levels(self) -> list[int]:
        """Sorted indices into ``network.feature_info`` (0 = bottleneck) whose features a loss of this objective reads
        position by position (a global-only objective: ``[0]``): what one-shot matching compares. Subclasses set it."""
        raise NotImplementedError

    def forward(self, network: nn.Module, batch: PairBatch) -> dict[str, torch.Tensor]:
        """Return ``{"loss": scalar, ...named detached parts for logging}``."""
        raise NotImplementedError

    def on_step_end(self, network: nn.Module, progress: float) -> None:
        """Hook after each optimizer step; the default does nothing."""


def resolve_decoder_levels(levels: Sequence[int], count: int, setting: str) -> list[int]:
    """Sorted distinct indices into a ``count``-level ``feature_info`` of the decoder ``levels``: ``1 .. count-1`` or
    negative from the finest (``-1`` = stride 1); anything else is an ``InputError`` naming the parameter
    ``setting`` (the config layer adds its section)."""
    if not isinstance(levels, (list, tuple)):
        raise InputError(f"must be a list of decoder levels, got {levels!r}", path=setting)
    resolved = []
    for level in levels:
        index = level + count if isinstance(level, int) and level < 0 else level
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= index < count:
            raise InputError(f"must list decoder levels: 1..{count - 1} or -1..-{count - 1} (0 is the bottleneck), "
                             f"got {level!r}", path=setting)
        resolved.append(index)
    return sorted(set(resolved))


OBJECTIVES: Registry[type[Objective]] = Registry("objective")
