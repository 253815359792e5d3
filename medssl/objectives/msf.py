"""MSF (Koohpayegani et al., ICCV 2021): mean shift with a memory bank of EMA target embeddings (METHODS 4).

The target embedding of the weak view is enqueued first; its ``k`` nearest bank entries (itself included) are the
targets the online prediction of the strong view is pulled towards. With ``k = 1`` this is asymmetric BYOL.

Small batches (METHODS 4.7): the projector and predictor see only ``B`` vectors per process and use LayerNorm
instead of BatchNorm (batch-size independent); the target runs in eval mode with EMA-averaged buffers (EMAN).
Under ``torchrun`` the targets of all processes are gathered before enqueueing, so every process holds the same bank.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medssl.correspondence import cells_of, match_views, matched_cells
from medssl.data.batch import PairBatch, ViewBatch
from medssl.dist import concat_across_ranks
from medssl.errors import InputError
from medssl.networks.heads import global_mlp
from medssl.objectives.base import OBJECTIVES, Objective, resolve_decoder_levels
from medssl.registry import look_up
from medssl.objectives.lewel import layer_norm_mlp
from medssl.objectives.momentum import cosine_momentum, make_teacher, update_momentum
from medssl.transforms.infomap import sample_anchors


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

    ``dense`` (default on) -- an extension, not in the paper -- adds a pixel-level MSF term (times ``dense_weight``,
    averaged over ``dense_levels``: decoder indices into ``network.feature_info``, negative from the finest, default
    every decoder level) that trains the decoder, which the image-level MSF leaves untouched. Per step, ``dense_pairs``
    corresponding pixels (from the views' coordinates, the same at every level) read the level's cells holding them;
    per level they go through its own projector/predictor and their target embeddings feed its own bank of
    ``dense_bank_size`` pixel embeddings (a fixed count per step keeps the banks' blocks aligned across processes);
    ``dense_k`` neighbours there (default ``k``; 1 = each pixel regresses only its own match's target).
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
        dense: bool = True,
        dense_levels: Sequence[int] | None = None,
        dense_pairs: int = 256,
        dense_bank_size: int = 16384,
        dense_weight: float = 1.0,
        dense_k: int | None = None,
    ):
        super().__init__()
        if k < 1 or k > bank_size:
            raise InputError(f"must be in [1, bank_size={bank_size}], got {k}", path="k")
        look_up(momentum_schedule, ("constant", "cosine"), what="momentum schedule", path="momentum_schedule")
        self.k, self.momentum, self.momentum_schedule = k, momentum, momentum_schedule
        self.dense, self.dense_pairs, self.dense_weight = dense, dense_pairs, dense_weight
        self.dense_k = k if dense_k is None else int(dense_k)
        info = network.feature_info
        self.projector = layer_norm_mlp(info[0].channels, hidden_dim, proj_dim)
        self.predictor = layer_norm_mlp(proj_dim, hidden_dim, proj_dim)
        self.bank = MemoryBank(bank_size, proj_dim, "objective.msf.bank_size")
        levels = list(range(1, len(info))) if dense_levels is None else dense_levels
        self.dense_levels = resolve_decoder_levels(levels, len(info), "dense_levels") if dense else []
        self.dense_strides = [info[level].stride for level in self.dense_levels]
        if dense and (dense_pairs < 1 or not 1 <= self.dense_k <= dense_bank_size or not self.dense_levels):
            raise InputError(f"dense_pairs ({dense_pairs}) must be >= 1, dense_k ({self.dense_k}) in [1, "
                             f"dense_bank_size={dense_bank_size}] and dense_levels non-empty (or dense: false)")
        # BatchNorm over the sampled pixels; one projector, predictor and bank per dense level
        self.dense_projectors = nn.ModuleList(
            global_mlp(info[i].channels, hidden_dim, proj_dim) for i in self.dense_levels
        )
        self.dense_predictors = nn.ModuleList(global_mlp(proj_dim, hidden_dim, proj_dim) for _ in self.dense_levels)
        self.dense_banks = nn.ModuleList(
            MemoryBank(dense_bank_size, proj_dim, "objective.msf.dense_bank_size") for _ in self.dense_levels
        )
        self.target_network = make_teacher(network)
        self.target_heads = nn.ModuleList(make_teacher(head) for head in [self.projector, *self.dense_projectors])
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
        return list(self.dense_levels) or [0]

    def forward(self, network: nn.Module, batch: PairBatch) -> dict[str, torch.Tensor]:
        weak, strong = batch.a, batch.b
        online_features = network.forward_features(strong.image)
        pooled = online_features[0].flatten(2).mean(dim=2)  # (B, C)
        query = F.normalize(self.predictor(self.projector(pooled)), dim=1)  # (B, P)
        with torch.no_grad():
            target_features = self.target_network.forward_features(weak.image)
            target_pooled = target_features[0].flatten(2).mean(dim=2)  # (B, C)
            target = F.normalize(self.target_heads[0](target_pooled), dim=1)  # (B, P)
        loss = self._bank_loss(query, target, self.bank, self.k).mean()
        parts = {"bank_fill": self.bank.fill_fraction()}
        if self.dense_levels:
            levels = self._dense_losses(weak, strong, target_features, online_features)
            loss_dense = torch.stack(levels).mean()
            parts.update(loss_global=loss.detach(), loss_dense=loss_dense.detach(),
                         dense_bank_fill=self.dense_banks[0].fill_fraction(),
                         **{f"loss_dense_stride{s}": level.detach() for s, level in zip(self.dense_strides, levels)})
            loss = loss + self.dense_weight * loss_dense
        return {"loss": loss, **parts}

    def _bank_loss(self, query: torch.Tensor, target: torch.Tensor, bank: MemoryBank, k: int) -> torch.Tensor:
        """Enqueue the (all-process) targets, then the mean-shift loss of each query row to ``k`` neighbours,
        ``(N,)``."""
        bank.enqueue(concat_across_ranks(target))
        loss, _ = mean_shift_loss(query, target, bank.embeddings, k)  # indexing copies: later enqueues are safe
        return loss

    def _dense_losses(self, weak: ViewBatch, strong: ViewBatch, target_features: list[torch.Tensor],
                      online_features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pixel MSF (extension) per dense level: ``dense_pairs`` matched pixels of the weak view (the same at every
        level); the cells holding them (target, weak view) -> bank and neighbours, the cells holding their matches
        (query, strong view) -> loss."""
        grid_b, mask = match_views(weak, strong)  # (B, *S, D), (B, *S): the weak view's pixels in the strong view
        matchable = mask[:, None]  # (B, 1, *S)
        per_image = -(-self.dense_pairs // mask.shape[0])  # ceil
        anchors = sample_anchors(torch.ones_like(matchable, dtype=torch.float32), matchable, per_image, 0.0)
        rows = (cells_of(matchable.float(), anchors)[..., 0] > 0.5).flatten().nonzero()[:, 0]  # valid (b, k) rows
        if rows.numel() == 0:
            raise InputError("objective.msf.dense needs overlapping views, but the two views of a sample share no "
                             "pixel; use the weak_strong view preset with overlapping crops")
        if rows.numel() < self.dense_pairs:  # a fixed count per step keeps the banks' blocks aligned across processes
            rows = rows[torch.randint(rows.numel(), (self.dense_pairs,), device=rows.device)]
        rows = rows[: self.dense_pairs]  # (dense_pairs,)
        matched = cells_of(grid_b.movedim(-1, 1), anchors)  # (B, K, D) grid_sample points in the strong view
        losses = []
        for index, (level, stride) in enumerate(zip(self.dense_levels, self.dense_strides)):
            target_map, online_map = target_features[level], online_features[level]  # (B, C, *S / stride)
            online_cells = matched_cells(matched, strong.image.shape[2:], stride, online_map.shape[2:])  # (B, K, D)
            target_rows = cells_of(target_map, anchors // stride).flatten(0, 1)[rows]  # (dense_pairs, C)
            online_rows = cells_of(online_map, online_cells).flatten(0, 1)[rows]  # (dense_pairs, C)
            query = F.normalize(self.dense_predictors[index](self.dense_projectors[index](online_rows)), dim=1)
            with torch.no_grad():
                target = F.normalize(self.target_heads[1 + index](target_rows), dim=1)  # (dense_pairs, P)
            losses.append(self._bank_loss(query, target, self.dense_banks[index], self.dense_k).mean())
        return losses

    @torch.no_grad()
    def on_step_end(self, network: nn.Module, progress: float) -> None:
        """EMA update of the target network and projector(s)."""
        momentum = self.momentum
        if self.momentum_schedule == "cosine":
            momentum = cosine_momentum(self.momentum, progress)
        update_momentum(self.target_network, network, momentum)
        for target_head, head in zip(self.target_heads, [self.projector, *self.dense_projectors]):
            update_momentum(target_head, head, momentum)
