"""MSF (Koohpayegani et al., ICCV 2021): mean shift with a memory bank of EMA target embeddings (METHODS 4).

The target embedding of the weak view is enqueued first; its ``k`` nearest bank entries (itself included) are the
targets the online prediction of the strong view is pulled towards. With ``k = 1`` this is asymmetric BYOL.

Small batches (METHODS 4.7): the projector and predictor see only ``B`` vectors per process and use LayerNorm
instead of BatchNorm (batch-size independent); the target runs in eval mode with EMA-averaged buffers (EMAN).
Under ``torchrun`` the targets of all processes are gathered before enqueueing, so every process holds the same bank.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medssl.correspondence import gather_pairs, match_views
from medssl.data.batch import PairBatch, ViewBatch
from medssl.engine.distributed import concat_across_ranks
from medssl.errors import InputError
from medssl.networks.heads import global_mlp
from medssl.objectives.base import OBJECTIVES, Objective
from medssl.objectives.lewel import layer_norm_mlp
from medssl.objectives.momentum import cosine_momentum, make_teacher, update_momentum


def mean_shift_loss(
    query: torch.Tensor, target: torch.Tensor, bank: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSF loss per row and the neighbours it used.

    ``query (N, P)`` online predictions, ``target (N, P)`` target embeddings, ``bank (M, P)``; all rows
    L2-normalised and ``target`` already in ``bank``. Neighbours are the ``k`` bank rows nearest to the *target*
    (``(N, k)`` indices, nearest first); the loss is the mean ``2 - 2 cos`` of the *query* to them, ``(N,)``.
    """
    neighbours = (target @ bank.T).topk(k, dim=1).indices  # (N, k): largest cosine = smallest 2 - 2cos
    similarity = torch.einsum("np,nkp->nk", query, bank[neighbours])  # (N, k)
    return (2.0 - 2.0 * similarity).mean(dim=1), neighbours


class MemoryBank(nn.Module):
    """FIFO bank of ``size`` L2-normalised ``dim``-vectors, initialised with random normalised rows.

    ``enqueue`` replaces the oldest rows; ``size`` must be a multiple of the rows enqueued per call (so blocks never
    straddle the end). ``setting`` names the config key of ``size`` in error messages.
    """

    def __init__(self, size: int, dim: int, setting: str):
        super().__init__()
        if size < 1:
            raise InputError(f"config key '{setting}' must be >= 1, got {size}")
        self.setting = setting
        self.register_buffer("embeddings", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor) -> None:
        """Write ``rows (n, dim)`` over the ``n`` oldest entries."""
        count = rows.shape[0]
        if self.size % count:
            raise InputError(
                f"config key '{self.setting}' ({self.size}) must be a multiple of the {count} embeddings enqueued "
                f"per step (batch size x processes); set it to e.g. {max(1, round(self.size / count)) * count}"
            )
        start = int(self.pointer)
        self.embeddings[start : start + count] = rows.to(self.embeddings.dtype)
        self.pointer.fill_((start + count) % self.size)
        self.filled.fill_(min(int(self.filled) + count, self.size))

    def fill_fraction(self) -> torch.Tensor:
        """Share of the bank holding real embeddings (not the random initial rows), a scalar in [0, 1]."""
        return self.filled.float() / self.size


@OBJECTIVES.register("msf")
class MSF(Objective):
    """Mean-shift SSL on the global-average-pooled U-Net bottleneck; view ``a`` = weak = target, ``b`` = strong =
    query.

    Defaults follow METHODS 4.5/4.7 scaled to U-Nets: ``k`` 5, constant EMA momentum 0.99 (``momentum_schedule=
    "cosine"`` raises it from ``momentum`` to 1), projector/predictor ``hidden_dim`` 2048 and ``proj_dim`` 256
    (METHODS 4.7 for 256-512-channel bottlenecks), ``bank_size`` 4096 (medical datasets are small; must be a
    multiple of the global batch size).

    ``dense=True`` -- an extension, not in the paper -- adds a pixel-level MSF term (times ``dense_weight``) on the
    last decoder level: ``dense_pairs`` corresponding pixel pairs per step (found from the views' coordinates) go
    through a dense projector/predictor; their target embeddings feed a second bank of ``dense_bank_size`` pixel
    embeddings. It trains the decoder, which the image-level MSF leaves untouched.
    """

    views = "weak_strong"

    def __init__(
        self,
        network: nn.Module,
        *,
        proj_dim: int = 256,
        hidden_dim: int = 2048,
        bank_size: int = 4096,
        k: int = 5,
        momentum: float = 0.99,
        momentum_schedule: Literal["constant", "cosine"] = "constant",
        dense: bool = False,
        dense_pairs: int = 256,
        dense_bank_size: int = 16384,
        dense_weight: float = 1.0,
    ):
        super().__init__()
        if k < 1 or k > bank_size:
            raise InputError(f"config key 'objective.msf.k' must be in [1, bank_size={bank_size}], got {k}")
        if momentum_schedule not in ("constant", "cosine"):
            raise InputError(
                "config key 'objective.msf.momentum_schedule' must be 'constant' or 'cosine', "
                f"got {momentum_schedule!r}"
            )
        self.k, self.momentum, self.momentum_schedule = k, momentum, momentum_schedule
        self.dense, self.dense_pairs, self.dense_weight = dense, dense_pairs, dense_weight
        bottleneck = network.feature_info[0].channels
        self.pixel_level = len(network.feature_info) - 1  # the level of the dense term
        self.projector = layer_norm_mlp(bottleneck, hidden_dim, proj_dim)
        self.predictor = layer_norm_mlp(proj_dim, hidden_dim, proj_dim)
        self.bank = MemoryBank(bank_size, proj_dim, "objective.msf.bank_size")
        online = [self.projector]
        if dense:
            if dense_pairs < 1 or k > dense_bank_size:
                raise InputError(
                    f"config keys 'objective.msf.dense_pairs' ({dense_pairs}) must be >= 1 and "
                    f"'objective.msf.dense_bank_size' ({dense_bank_size}) >= k ({k})"
                )
            finest = network.feature_info[-1].channels
            self.dense_projector = global_mlp(finest, hidden_dim, proj_dim)  # BatchNorm over the sampled pixels
            self.dense_predictor = global_mlp(proj_dim, hidden_dim, proj_dim)
            self.dense_bank = MemoryBank(dense_bank_size, proj_dim, "objective.msf.dense_bank_size")
            online.append(self.dense_projector)
        self.target_network = make_teacher(network)
        self.target_heads = nn.ModuleList(make_teacher(head) for head in online)
        self.target_network.eval()
        self.target_heads.eval()

    def train(self, mode: bool = True) -> "MSF":
        """Train/eval the online heads; the target always stays in eval mode (EMAN)."""
        super().train(mode)
        self.target_network.eval()
        self.target_heads.eval()
        return self

    @property
    def trained_levels(self) -> list[int]:
        return [self.pixel_level] if self.dense else [0]

    def forward(self, network: nn.Module, batch: PairBatch) -> dict[str, torch.Tensor]:
        weak, strong = batch.a, batch.b
        online_features = network.forward_features(strong.image)
        pooled = online_features[0].flatten(2).mean(dim=2)  # (B, C)
        query = F.normalize(self.predictor(self.projector(pooled)), dim=1)  # (B, P)
        with torch.no_grad():
            target_features = self.target_network.forward_features(weak.image)
            target_pooled = target_features[0].flatten(2).mean(dim=2)  # (B, C)
            target = F.normalize(self.target_heads[0](target_pooled), dim=1)  # (B, P)
        loss = self._bank_loss(query, target, self.bank).mean()
        parts = {"bank_fill": self.bank.fill_fraction()}
        if self.dense:
            loss_dense = self._dense_loss(weak, strong, target_features[-1], online_features[-1])
            parts.update(loss_global=loss.detach(), loss_dense=loss_dense.detach(),
                         dense_bank_fill=self.dense_bank.fill_fraction())
            loss = loss + self.dense_weight * loss_dense
        return {"loss": loss, **parts}

    def _bank_loss(self, query: torch.Tensor, target: torch.Tensor, bank: MemoryBank) -> torch.Tensor:
        """Enqueue the (all-process) targets, then the mean-shift loss of each query row, ``(N,)``."""
        bank.enqueue(concat_across_ranks(target))
        loss, _ = mean_shift_loss(query, target, bank.embeddings, self.k)  # indexing copies: later enqueues are safe
        return loss

    def _dense_loss(
        self, weak: ViewBatch, strong: ViewBatch, target_map: torch.Tensor, online_map: torch.Tensor
    ) -> torch.Tensor:
        """Pixel MSF (extension): ``dense_pairs`` corresponding pixels of the finest level, target (weak view) ->
        bank and neighbours, query (strong view) -> loss."""
        grid_b, mask = match_views(weak, strong)
        target_rows, online_rows = gather_pairs(target_map, online_map, grid_b, mask, max_pairs=self.dense_pairs)
        found = target_rows.shape[0]  # (N, C) each
        if found == 0:
            raise InputError("objective.msf.dense needs overlapping views, but the two views of a sample share no "
                             "pixel; use the weak_strong view preset with overlapping crops")
        if found < self.dense_pairs:  # a fixed count per step keeps the bank's blocks aligned across processes
            pick = torch.randint(found, (self.dense_pairs,), device=target_rows.device)
            target_rows, online_rows = target_rows[pick], online_rows[pick]  # (dense_pairs, C)
        query = F.normalize(self.dense_predictor(self.dense_projector(online_rows)), dim=1)  # (dense_pairs, P)
        with torch.no_grad():
            target = F.normalize(self.target_heads[1](target_rows), dim=1)  # (dense_pairs, P)
        return self._bank_loss(query, target, self.dense_bank).mean()

    @torch.no_grad()
    def on_step_end(self, network: nn.Module, progress: float) -> None:
        """EMA update of the target network and projector(s)."""
        momentum = self.momentum
        if self.momentum_schedule == "cosine":
            momentum = cosine_momentum(self.momentum, progress)
        update_momentum(self.target_network, network, momentum)
        update_momentum(self.target_heads[0], self.projector, momentum)
        if self.dense:
            update_momentum(self.target_heads[1], self.dense_projector, momentum)
