"""LEWEL (Huang et al., CVPR 2022): learning where to learn, BYOL variant ``LEWEL_B`` (METHODS 3.2/3.3).

The shared projection head, evaluated on every bottleneck token, yields alignment maps (softmax over positions)
that pool the backbone features into aligned embeddings; the k-th aligned embedding of one view regresses the k-th
of the other view's EMA target. Dimension-agnostic: feature maps of any ``spatial_dims`` are flattened to
``(B, C, N)`` tokens.

Small batches (METHODS 3.7): the projection heads keep BatchNorm, which there sees ``B * (1 + N)`` tokens
(``proj``) or ``B * K`` tokens (``proj_obj``, ``predictor_obj``), enough at batch 2 in 3D; the global predictor
sees only ``B`` vectors and uses LayerNorm instead (batch-size independent). The target runs in eval mode with
EMA-averaged BatchNorm statistics (EMAN), so it does not depend on the batch either.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medssl.data.batch import PairBatch
from medssl.errors import InputError
from medssl.networks.heads import global_mlp, token_mlp
from medssl.objectives.base import OBJECTIVES, Objective, resolve_decoder_levels
from medssl.objectives.losses import regression_loss
from medssl.objectives.momentum import cosine_momentum, make_teacher, update_momentum


def layer_norm_mlp(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """``global_mlp`` with LayerNorm in place of BatchNorm1d, for heads that see only ``B`` vectors (``(B, C)``
    inputs): batch-size independent, so it trains at batch 1-2 (3D) and under any number of processes."""
    mlp = global_mlp(in_channels, hidden, out_channels)
    mlp[1] = nn.LayerNorm(hidden)  # global_mlp = Linear, BatchNorm1d, ReLU, Linear
    return mlp


class ObjectNeck(nn.Module):
    """LEWEL's neck on one feature level: global embedding, alignment maps and grouped aligned embeddings.

    ``proj`` (shared by the pooled token and every pixel token) gives ``proj_dim`` logits per position; they are
    L2-normalised over channels, divided by ``temperature`` and softmaxed over positions (the alignment maps).
    Channel group ``g`` of the backbone features is pooled with maps ``g*K .. g*K+K-1`` (``K = proj_dim / groups``)
    and ``proj_obj`` projects the ``K`` aligned embeddings.
    """

    def __init__(self, in_channels: int, hidden_dim: int, proj_dim: int, groups: int, temperature: float):
        super().__init__()
        self.groups, self.temperature = groups, temperature
        self.proj = token_mlp(in_channels, hidden_dim, proj_dim)
        self.proj_obj = token_mlp(in_channels, hidden_dim, proj_dim)

    @property
    def num_aligned(self) -> int:
        """``K``: aligned embeddings per image."""
        return self.proj[-1].out_channels // self.groups

    def forward(
        self, features: torch.Tensor, max_tokens: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``features (B, C, *S)`` -> global ``(B, P)``, aligned ``(B, P, K)``, maps ``(B, P, N)`` with
        ``P = proj_dim``, ``N = prod(S)``; every map sums to 1 over its ``N`` positions. With ``max_tokens`` the maps
        cover a random subset of that many positions (the same for the batch) when ``N`` is larger; the pooled token
        still averages all."""
        tokens = features.flatten(2)  # (B, C, N)
        pooled = tokens.mean(dim=2, keepdim=True)  # (B, C, 1)
        if max_tokens is not None and tokens.shape[2] > max_tokens:
            tokens = tokens[:, :, torch.randperm(tokens.shape[2], device=tokens.device)[:max_tokens]]  # (B, C, N')
        batch, channels, positions = tokens.shape
        projected = self.proj(torch.cat([pooled, tokens], dim=2))  # (B, P, 1 + N)
        global_embedding = projected[:, :, 0]  # (B, P)
        logits = F.normalize(projected[:, :, 1:], dim=1) / self.temperature  # (B, P, N)
        maps = logits.softmax(dim=2)  # (B, P, N)
        grouped_maps = maps.reshape(batch, self.groups, -1, positions)  # (B, G, K, N)
        grouped_features = tokens.reshape(batch, self.groups, channels // self.groups, positions)  # (B, G, C/G, N)
        aligned = grouped_features @ grouped_maps.transpose(2, 3)  # (B, G, C/G, K)
        aligned = aligned.reshape(batch, channels, -1)  # (B, C, K)
        return global_embedding, self.proj_obj(aligned), maps


class _LevelHeads(nn.Module):
    """The online neck and predictors of one feature level."""

    def __init__(self, in_channels: int, hidden_dim: int, proj_dim: int, groups: int, temperature: float):
        super().__init__()
        self.neck = ObjectNeck(in_channels, hidden_dim, proj_dim, groups, temperature)
        self.predictor = layer_norm_mlp(proj_dim, hidden_dim, proj_dim)
        self.predictor_obj = token_mlp(proj_dim, hidden_dim, proj_dim)


@OBJECTIVES.register("lewel")
class LEWEL(Objective):
    """LEWEL_B on the U-Net bottleneck plus a neck per decoder level in ``decoder_levels`` (dense, not in the paper).

    Loss per level and direction: ``alpha * l(pred(z_g), sg(z_g')) + (1 - alpha) * mean_k l(pred_obj(Y)_k,
    sg(Y'_k))`` with ``l = 2 - 2 cos``, summed over both directions (view a -> b and b -> a). The target is an
    EMA of network + necks, momentum rising from ``base_momentum`` to 1 (cosine), kept in eval mode (EMAN).

    Defaults follow METHODS 3.5 (``proj_dim`` 256, ``groups`` 4 -> K = 64, L2-normalised logits, ``alpha`` 0.5,
    ``base_momentum`` 0.98 (EMAN)) except ``hidden_dim`` = 1024 instead of 4096 (U-Net bottlenecks have 256-512
    channels, not ResNet-50's 2048) and ``temperature`` 0.1 instead of 1: with a few to a few thousand positions the
    paper's maps are near uniform (entropy >= 99.8 % of log N at init, 78.8-97.2 % even for perfectly peaked logits),
    so every aligned embedding would be the average pooling.

    ``decoder_levels`` (indices into ``network.feature_info``: 1 = coarsest decoder level, -1 = finest; default the
    decoder levels of stride 4 and 1; ``[]`` = the bottleneck only, the paper) each add their own neck's LEWEL loss
    times ``decoder_weight``, so the decoder levels one-shot matching compares are trained too. ``max_tokens``: the
    maps of a level with more positions cover a random subset of that many per step (a stride-1 neck on 128^2 x 8
    costs 12x the bare network's step on CPU in full, about as much as a stride-4 neck when subsampled).
    """

    views = "symmetric"

    def __init__(
        self,
        network: nn.Module,
        *,
        proj_dim: int = 256,
        hidden_dim: int = 1024,
        groups: int = 4,
        temperature: float = 0.1,
        alpha: float = 0.5,
        base_momentum: float = 0.98,
        decoder_levels: Sequence[int] | None = None,
        decoder_weight: float = 1.0,
        max_tokens: int = 1024,
    ):
        super().__init__()
        info = network.feature_info
        if decoder_levels is None:
            decoder_levels = [i for i in range(1, len(info)) if info[i].stride in (4, 1)]
        self.levels = [0, *resolve_decoder_levels(decoder_levels, len(info), "decoder_levels")]
        self.level_weights = [1.0] + [float(decoder_weight)] * (len(self.levels) - 1)
        self.strides = [info[level].stride for level in self.levels]
        if proj_dim % groups:
            raise InputError(f"({proj_dim}) must be divisible by 'groups' ({groups})", path="proj_dim")
        for level in self.levels:
            if info[level].channels % groups:
                raise InputError(f"({groups}) must divide the {info[level].channels} channels of network level "
                                 f"'{info[level].name}'; choose groups among the divisors of {info[level].channels}",
                                 path="groups")
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"must be in [0, 1], got {alpha}", path="alpha")
        if temperature <= 0:
            raise InputError(f"must be > 0, got {temperature}", path="temperature")
        if max_tokens < 1:
            raise InputError(f"must be >= 1, got {max_tokens}", path="max_tokens")
        self.max_tokens = int(max_tokens)
        self.alpha, self.base_momentum = alpha, base_momentum
        self.online = nn.ModuleList(
            _LevelHeads(info[level].channels, hidden_dim, proj_dim, groups, temperature) for level in self.levels
        )
        self.target_network = make_teacher(network)
        self.target_necks = nn.ModuleList(make_teacher(heads.neck) for heads in self.online)
        self.target_network.eval()
        self.target_necks.eval()

    @property
    def trained_levels(self) -> list[int]:
        return sorted(self.levels)

    def train(self, mode: bool = True) -> "LEWEL":
        """Train/eval the online heads; the target always stays in eval mode (EMAN)."""
        super().train(mode)
        self.target_network.eval()
        self.target_necks.eval()
        return self

    def forward(self, network: nn.Module, batch: PairBatch) -> dict[str, torch.Tensor]:
        online = [self._online(network, view.image) for view in (batch.a, batch.b)]
        with torch.no_grad():
            target = [self._target(view.image) for view in (batch.a, batch.b)]
        total, parts = 0.0, {}
        for index, weight in enumerate(self.level_weights):
            loss_global, loss_aligned = 0.0, 0.0
            for source, other in ((0, 1), (1, 0)):
                (p_global, p_aligned), (t_global, t_aligned) = online[source][index], target[other][index]
                loss_global = loss_global + regression_loss(p_global, t_global).mean()
                loss_aligned = loss_aligned + regression_loss(_rows(p_aligned), _rows(t_aligned)).mean()
            level_loss = self.alpha * loss_global + (1.0 - self.alpha) * loss_aligned
            total = total + weight * level_loss
            suffix = "" if index == 0 else f"_stride{self.strides[index]}"
            parts[f"loss_global{suffix}"] = loss_global.detach()
            parts[f"loss_aligned{suffix}"] = loss_aligned.detach()
        return {"loss": total, **parts}

    def _online(self, network: nn.Module, image: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level: predicted global ``(B, P)`` and aligned ``(B, P, K)`` embeddings of the online branch."""
        features = network.forward_features(image)
        out = []
        for level, heads in zip(self.levels, self.online):
            global_embedding, aligned, _ = heads.neck(features[level], self.max_tokens)
            out.append((heads.predictor(global_embedding), heads.predictor_obj(aligned)))
        return out

    def _target(self, image: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level: global ``(B, P)`` and aligned ``(B, P, K)`` embeddings of the EMA target."""
        features = self.target_network.forward_features(image)
        return [neck(features[level], self.max_tokens)[:2] for level, neck in zip(self.levels, self.target_necks)]

    @torch.no_grad()
    def alignment_maps(self, network: nn.Module, image: torch.Tensor, level: int = 0) -> torch.Tensor:
        """The online alignment maps of ``image (B, C, *S)`` at ``level`` (``0`` or one of ``decoder_levels``) as
        ``(B, proj_dim, *S_level)``: where each map looks over every position; each sums to 1 over space. Call
        ``eval()`` first outside training (in train mode the heads' BatchNorm uses and updates batch statistics)."""
        level = level % len(network.feature_info)
        features = network.forward_features(image)[level]
        _, _, maps = self.online[self.levels.index(level)].neck(features)
        return maps.reshape(*maps.shape[:2], *features.shape[2:])  # (B, P, *S_level)

    @torch.no_grad()
    def on_step_end(self, network: nn.Module, progress: float) -> None:
        """EMA update of the target network and necks, momentum ``cosine_momentum(base_momentum, progress)``."""
        momentum = cosine_momentum(self.base_momentum, progress)
        update_momentum(self.target_network, network, momentum)
        for target_neck, heads in zip(self.target_necks, self.online):
            update_momentum(target_neck, heads.neck, momentum)


def _rows(aligned: torch.Tensor) -> torch.Tensor:
    """``(B, P, K)`` aligned embeddings -> ``(B * K, P)`` rows, one per (image, map index)."""
    return aligned.transpose(1, 2).reshape(-1, aligned.shape[1])  # (B * K, P)
