"""Projection / prediction MLPs shared by the objectives (global vectors and per-token/per-pixel)."""

from __future__ import annotations

from torch import nn


def global_mlp(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """BYOL-style ``Linear -> BatchNorm1d -> ReLU -> Linear`` on ``(B, C)`` vectors."""
    return nn.Sequential(
        nn.Linear(in_channels, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_channels),
    )


def token_mlp(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """The same MLP applied to every token of ``(B, C, N)`` tensors (1x1 ``Conv1d``; BatchNorm over all B*N tokens).

    Dense maps of any ``spatial_dims`` go through it flattened: ``x.flatten(2)`` -> ``(B, C, N)``.
    """
    return nn.Sequential(
        nn.Conv1d(in_channels, hidden, kernel_size=1, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv1d(hidden, out_channels, kernel_size=1),
    )
