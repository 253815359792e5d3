"""PGSSL-UCS: pixel-global SSL with an uncertainty-aware context stabilizer, reconstructed from the abstract
(arXiv 2210.00646); no code or full text exists, so every design choice follows METHODS.md 1.2 ([I] there).

Global branch: BYOL on GAP(bottleneck) with an EMA teacher (cosine momentum). Pixel branch: a dense projector on the
last decoder level (stride 1) of both views; for every matched pixel the student vector goes through the context
stabilizer (MLP with LayerNorm and MC dropout, ``mc_samples`` passes) and its MC mean regresses onto the teacher's
vector of the same anatomy in the other view, weighted per pixel by the MC uncertainty. Contrast branch (ours, METHODS
1.5 leaves regression vs InfoNCE open): regression alone scores a constant map best, so a pixel InfoNCE with in-image
negatives on several decoder levels makes positions distinguishable, each anchor weighted by the same uncertainty.
Both directions, every term.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv
from torch import nn

from medssl.correspondence import cells_of, gather_pairs, match_views, matched_cells
from medssl.data.batch import PairBatch
from medssl.errors import InputError
from medssl.networks.heads import global_mlp, token_mlp
from medssl.objectives.base import OBJECTIVES, Objective, resolve_decoder_levels
from medssl.registry import look_up
from medssl.objectives.losses import (
    hard_uncertainty_weights,
    heteroscedastic_loss,
    info_nce_map,
    mc_statistics,
    regression_loss,
    uncertainty_weights,
)
from medssl.objectives.momentum import cosine_momentum, make_teacher, update_momentum
from medssl.transforms.infomap import sample_anchors

UNCERTAINTY_MODES = ("exp", "heteroscedastic", "hard", "none")


class ContextStabilizer(nn.Module):
    """``Linear -> LayerNorm -> ReLU -> Dropout`` twice, then ``Linear``, on gathered pixel vectors ``(N, C)``.

    Dropout stays on in every mode (Monte Carlo dropout); LayerNorm keeps the T passes free of batch statistics.
    """

    def __init__(self, channels: int, hidden: int, dropout: float):
        super().__init__()
        self.dropout = float(dropout)
        self.hidden = nn.ModuleList([nn.Linear(channels, hidden), nn.Linear(hidden, hidden)])
        self.norms = nn.ModuleList([nn.LayerNorm(hidden), nn.LayerNorm(hidden)])
        self.out = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        """``samples`` stochastic passes of ``x`` ``(N, C)`` -> ``(samples, N, C)``.

        Each pass is one sampled sub-network (MC dropout samples networks): its dropout masks over the hidden units
        are shared by all N rows, so they fold into the next layer's weights (dropping input columns) and no
        ``(T, N, H)`` mask is drawn or multiplied. The first block before its dropout is computed once.
        """
        h = F.relu(self.norms[0](self.hidden[0](x)))  # (N, H)
        keep = 1.0 - self.dropout
        masks = torch.bernoulli(h.new_full((2, samples, 1, h.shape[-1]), keep)) / keep  # (2, T, 1, H)
        weight = (self.hidden[1].weight * masks[0]).flatten(0, 1)  # (T*H, H): the T passes as one matrix product
        h = F.linear(h, weight, self.hidden[1].bias.repeat(samples)).unflatten(1, (samples, -1)).transpose(0, 1)
        h = F.relu(self.norms[1](h))  # (T, N, H)
        return torch.baddbmm(self.out.bias, h, (self.out.weight * masks[1]).transpose(1, 2))  # (T, N, C)


def _spread(u: torch.Tensor) -> dict[str, torch.Tensor]:
    """``uncertainty_mean``/``_std``/``_min``/``_max`` of the detached uncertainties ``u`` ``(N,)`` (0 when empty)."""
    if u.numel() == 0:
        return {f"uncertainty_{stat}": u.new_zeros(()) for stat in ("mean", "std", "min", "max")}
    return {"uncertainty_mean": u.mean(), "uncertainty_std": u.std(), "uncertainty_min": u.min(),
            "uncertainty_max": u.max()}


@OBJECTIVES.register("pgssl")
class PGSSL(Objective):
    """PGSSL-UCS (reconstructed from the abstract, arXiv 2210.00646): BYOL global + uncertainty-weighted pixel loss
    + uncertainty-weighted multi-level pixel InfoNCE.

    ``uncertainty``: ``"exp"`` (detached ``exp(-u / median u)`` weights, mean 1), ``"heteroscedastic"``
    (``l / (2 s) + log(s) / 2`` with ``s = u / median u``, not detached; the contrast term takes the exp weights),
    ``"hard"`` (drop the ``hard_fraction`` most uncertain pixels) or ``"none"``. At most ``max_pixels`` matched pairs
    per direction and batch; ``match_radius_mm`` is the nearest-neighbour radius for views without an affine
    (default: half the sum of a pixel's edge lengths).

    Contrast term (times ``contrast_weight``) on ``contrast_levels`` (decoder indices into ``network.feature_info``,
    negative from the finest; default every decoder level, ``[]`` = off): ``contrast_anchors`` pixels per image of
    view s with a match in view t; a 1x1 head per level (``contrast_dim`` channels, as InfoGuided's); the anchor's
    cell in view s must pick its matched cell among view t's cells (the whole map at the coarsest contrast level,
    within ``contrast_window`` cells at the finer ones), logits ``clamp(cos, 0, 1) / contrast_temperature``; the
    level losses are averaged (the balance with the other terms does not depend on the number of levels).
    Candidates are the *student's* (not the EMA teacher's): the negatives must be pushed apart in the network the
    matcher uses, and InfoNCE needs no EMA target against collapse (as CC2D).

    Outputs: ``loss``, ``loss_global``, ``loss_pixel``, ``loss_contrast`` and the spread of the stabiliser's MC
    uncertainty ``u`` over the matched pixels of both directions, ``uncertainty_mean``/``_std``/``_min``/``_max``
    (detached; 0 without overlap).
    """

    views = "symmetric"

    def __init__(
        self,
        network: nn.Module,
        *,
        global_hidden: int = 1024,
        global_dim: int = 256,
        pixel_hidden: int = 256,
        pixel_dim: int = 128,
        stabilizer_hidden: int = 256,
        dropout: float = 0.2,
        mc_samples: int = 8,
        uncertainty: str = "exp",
        hard_fraction: float = 0.1,
        pixel_weight: float = 1.0,
        base_momentum: float = 0.99,
        max_pixels: int = 4096,
        match_radius_mm: float | None = None,
        contrast_levels: Sequence[int] | None = None,
        contrast_weight: float = 1.0,
        contrast_temperature: float = 0.1,
        contrast_anchors: int = 32,
        contrast_window: int = 4,
        contrast_dim: int = 16,
    ):
        super().__init__()
        look_up(uncertainty, UNCERTAINTY_MODES, what="uncertainty mode", path="uncertainty")
        if mc_samples < 2 or not 0 < dropout < 1 or not 0 <= hard_fraction < 1 or max_pixels < 2:
            raise InputError("needs mc_samples >= 2, 0 < dropout < 1, 0 <= hard_fraction < 1 and "
                             f"max_pixels >= 2; got {mc_samples}, {dropout}, {hard_fraction}, {max_pixels}")
        if contrast_anchors < 2 or contrast_window < 1 or contrast_dim < 1 or contrast_temperature <= 0:
            raise InputError("needs contrast_anchors >= 2, contrast_window >= 1, contrast_dim >= 1 and "
                             f"contrast_temperature > 0; got {contrast_anchors}, {contrast_window}, {contrast_dim}, "
                             f"{contrast_temperature}")
        info = network.feature_info
        bottleneck, finest = info[0].channels, info[-1].channels
        self.pixel_level = len(info) - 1  # the stride-1 level the pixel term trains
        self.mc_samples, self.uncertainty, self.hard_fraction = int(mc_samples), uncertainty, float(hard_fraction)
        self.pixel_weight, self.base_momentum = float(pixel_weight), float(base_momentum)
        self.max_pixels, self.match_radius_mm = int(max_pixels), match_radius_mm
        levels = list(range(1, len(info))) if contrast_levels is None else contrast_levels
        self.contrast_levels = resolve_decoder_levels(levels, len(info), "contrast_levels")
        self.contrast_strides = [info[i].stride for i in self.contrast_levels]
        self.contrast_weight, self.contrast_temperature = float(contrast_weight), float(contrast_temperature)
        self.contrast_anchors, self.contrast_window = int(contrast_anchors), int(contrast_window)
        conv = Conv["conv", network.spatial_dims]
        self.contrast_heads = nn.ModuleList(conv(info[i].channels, contrast_dim, 1) for i in self.contrast_levels)
        self.global_projector = global_mlp(bottleneck, global_hidden, global_dim)
        self.global_predictor = global_mlp(global_dim, global_hidden, global_dim)
        self.pixel_projector = token_mlp(finest, pixel_hidden, pixel_dim)
        self.stabilizer = ContextStabilizer(pixel_dim, stabilizer_hidden, dropout)
        self.teacher_network = make_teacher(network)
        self.teacher_global_projector = make_teacher(self.global_projector)
        self.teacher_pixel_projector = make_teacher(self.pixel_projector)

    @property
    def trained_levels(self) -> list[int]:
        return sorted({*self.contrast_levels, self.pixel_level})

    def forward(self, network: nn.Module, batch: PairBatch) -> dict[str, torch.Tensor]:
        student = [network.forward_features(batch.a.image), network.forward_features(batch.b.image)]
        with torch.no_grad():
            teacher = [self.teacher_network.forward_features(view.image) for view in (batch.a, batch.b)]
        loss_global = self._global_loss(student[0][0], student[1][0], teacher[0][0], teacher[1][0])
        views, loss_pixel, loss_contrast, uncertainties = (batch.a, batch.b), 0.0, 0.0, []
        for s, t in ((0, 1), (1, 0)):
            grid, mask = match_views(views[s], views[t], radius_mm=self.match_radius_mm)  # (B, *S, D), (B, *S)
            loss, u = self._pixel_loss(student[s][-1], teacher[t][-1], grid, mask)
            loss_pixel, uncertainties = loss_pixel + loss, uncertainties + [u]
            loss_contrast = loss_contrast + self._contrast_loss(student[s], student[t], grid, mask)
        return {
            "loss": loss_global + self.pixel_weight * loss_pixel + self.contrast_weight * loss_contrast,
            "loss_global": loss_global.detach(),
            "loss_pixel": loss_pixel.detach(),
            "loss_contrast": loss_contrast.detach(),
            **_spread(torch.cat(uncertainties)),
        }

    def _global_loss(self, student_a, student_b, teacher_a, teacher_b) -> torch.Tensor:
        """Symmetric BYOL on pooled bottlenecks ``(B, C, *S)``: predictor(student a) -> teacher b and vice versa."""
        pooled = torch.cat([student_a.flatten(2).mean(-1), student_b.flatten(2).mean(-1)])  # (2B, C)
        predicted_a, predicted_b = self.global_predictor(self.global_projector(pooled)).chunk(2)  # (B, d) each
        with torch.no_grad():
            pooled_t = torch.cat([teacher_a.flatten(2).mean(-1), teacher_b.flatten(2).mean(-1)])  # (2B, C)
            target_a, target_b = self.teacher_global_projector(pooled_t).chunk(2)  # (B, d) each
        return regression_loss(predicted_a, target_b).mean() + regression_loss(predicted_b, target_a).mean()

    def _pixel_loss(self, student: torch.Tensor, teacher: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor):
        """Uncertainty-weighted regression of stabilised student pixels of view s onto the teacher's matching pixels
        of view t (``grid``, ``mask`` from ``match_views``); returns (loss, detached per-pixel uncertainty ``(N,)``,
        empty without overlap)."""
        pixels_s, pixels_t = gather_pairs(student, teacher, grid, mask, max_pairs=self.max_pixels)  # (N, C) each
        if pixels_s.shape[0] < 2:  # no overlap: nothing to learn from, keep the graph connected
            return student.sum() * 0.0, student.new_zeros(0)
        projected = self.pixel_projector(pixels_s.T[None])[0].T  # (N, pixel_dim)
        with torch.no_grad():
            target = self.teacher_pixel_projector(pixels_t.T[None])[0].T  # (N, pixel_dim)
        mean, u = mc_statistics(self.stabilizer(projected, self.mc_samples))  # (N, pixel_dim), (N,)
        per_pixel = regression_loss(mean, target)  # (N,)
        if self.uncertainty == "exp":
            loss = (uncertainty_weights(u) * per_pixel).mean()
        elif self.uncertainty == "hard":
            loss = (hard_uncertainty_weights(u, self.hard_fraction) * per_pixel).mean()
        elif self.uncertainty == "heteroscedastic":
            loss = heteroscedastic_loss(per_pixel, u / u.detach().quantile(0.5).clamp_min(1e-12)).mean()
        else:
            loss = per_pixel.mean()
        return loss, u.detach()

    def _contrast_loss(self, student_s: list[torch.Tensor], student_t: list[torch.Tensor], grid: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """Mean over the contrast levels of the uncertainty-weighted pixel InfoNCE of anchors of view s against the
        cells of view t (``student_*``: ``forward_features`` lists; ``grid``, ``mask`` from ``match_views``)."""
        if not self.contrast_levels:
            return student_s[-1].new_zeros(())
        matchable = mask[:, None]  # (B, 1, *S)
        anchors = sample_anchors(torch.ones_like(matchable, dtype=torch.float32), matchable, self.contrast_anchors,
                                 0.0)  # (B, K, D) voxel indices in view s
        valid = cells_of(matchable.float(), anchors)[..., 0] > 0.5  # (B, K) False only for images without overlap
        matched = cells_of(grid.movedim(-1, 1), anchors)  # (B, K, D) grid_sample points in view t
        with torch.no_grad():  # the stabiliser's uncertainty weights of the anchors (detached in every mode)
            pixels = cells_of(student_s[-1], anchors).flatten(0, 1)  # (B*K, C)
            _, u = mc_statistics(self.stabilizer(self.pixel_projector(pixels.T[None])[0].T, self.mc_samples))
            weights = uncertainty_weights(u)  # (B*K,)
            if self.uncertainty == "hard":
                weights = hard_uncertainty_weights(u, self.hard_fraction)
            elif self.uncertainty == "none":
                weights = torch.ones_like(weights)
            weights = weights.view(valid.shape) * valid  # (B, K)
        total = student_s[-1].new_zeros(())
        for head, level, stride in zip(self.contrast_heads, self.contrast_levels, self.contrast_strides):
            emb_s, emb_t = head(student_s[level]), head(student_t[level])  # (B, E, *S/stride)
            queries = cells_of(emb_s, anchors // stride)  # (B, K, E)
            targets = matched_cells(matched, student_t[-1].shape[2:], stride, emb_t.shape[2:])  # (B, K, D)
            window = None if level == self.contrast_levels[0] else self.contrast_window
            total = total + info_nce_map(emb_t, queries, targets, weights, window, self.contrast_temperature)
        return total / len(self.contrast_levels)

    def on_step_end(self, network: nn.Module, progress: float) -> None:
        """EMA update of the teacher network and projectors with the cosine momentum schedule."""
        momentum = cosine_momentum(self.base_momentum, progress)
        update_momentum(self.teacher_network, network, momentum)
        update_momentum(self.teacher_global_projector, self.global_projector, momentum)
        update_momentum(self.teacher_pixel_projector, self.pixel_projector, momentum)
