"""InfoGuided: CC2D's multi-scale pixel InfoNCE with IGU-Aug's information-guided anchors (METHODS 2.2, 2.5, 2.9).

View a is an unaugmented context canvas around the sample's anchor, view b an augmented patch of it, both at the
scan's spacing (preset ``raw_patch``; the per-category augmentation strength of IGU-Aug is the view sampler's job). Anchors are drawn in the patch with probability
``IIE ** alpha`` (``info_guided=True``) or uniformly (``False``: the CC2D baseline). At every U-Net level of stride
``2**L ... 2`` (and 1 with ``include_stride1``) a 1x1 convolution maps the features to ``emb_dim`` channels; the
patch vector of the anchor's cell must pick the anchor's cell of the canvas among the cells within ``window`` (the
coarsest level: among all cells), with logits ``clamp(cos, 0, 1) / temperature``. Level losses are summed.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.layers import Conv
from torch import nn

from medssl.correspondence import cells_of, matched_cells, world_to_view_grid
from medssl.data.batch import PairBatch, ViewBatch
from medssl.errors import InputError
from medssl.objectives.base import OBJECTIVES, Objective
from medssl.objectives.losses import info_nce_map
from medssl.transforms.infomap import sample_anchors


@OBJECTIVES.register("infoguided")
class InfoGuided(Objective):
    """CC2D pixel InfoNCE on every U-Net level, anchors information-guided (IGU-Aug) or uniform (CC2D).

    ``include_stride1`` (default True) also trains the stride-1 level that CC2D leaves untrained, so the whole
    decoder used downstream is pre-trained; set False for CC2D's levels ``2**L ... 2``. ``window``: half-width in
    cells of the candidate cube on the finer levels (CC2D: 9 in 2D; smaller keeps 3D cheap). ``anchors`` per patch.
    """

    views = "raw_patch"

    def __init__(
        self,
        network: nn.Module,
        *,
        emb_dim: int = 16,
        include_stride1: bool = True,
        window: int = 9,
        temperature: float = 1.0,
        anchors: int = 32,
        info_guided: bool = True,
        alpha: float = 0.3,
        match_radius_mm: float | None = None,
    ):
        super().__init__()
        if window < 1 or anchors < 1 or emb_dim < 1 or temperature <= 0:
            raise InputError("needs window >= 1, anchors >= 1, emb_dim >= 1 and temperature > 0;"
                             f" got {window}, {anchors}, {emb_dim}, {temperature}")
        info = network.feature_info
        self.levels = [i for i, level in enumerate(info) if level.stride > 1 or include_stride1]
        self.strides = [info[i].stride for i in self.levels]
        conv = Conv["conv", network.spatial_dims]
        self.heads = nn.ModuleList([conv(info[i].channels, emb_dim, kernel_size=1) for i in self.levels])
        self.window, self.temperature, self.anchors = int(window), float(temperature), int(anchors)
        self.info_guided, self.alpha, self.match_radius_mm = bool(info_guided), float(alpha), match_radius_mm
        self.needs_info = self.info_guided

    @property
    def trained_levels(self) -> list[int]:
        return list(self.levels)

    def forward(self, network: nn.Module, batch: PairBatch) -> dict[str, torch.Tensor]:
        raw, patch = batch.a, batch.b
        anchor_index = self._draw_anchors(patch)  # (B, K, D) voxel indices in the patch
        world, anchor_valid = _gather_at(patch, anchor_index)  # (B, K, D) mm, (B, K)
        grid, inside = world_to_view_grid(raw, world, stride=1, radius_mm=self.match_radius_mm)  # (B, K, D)
        valid = anchor_valid & inside
        features_raw, features_patch = network.forward_features(raw.image), network.forward_features(patch.image)
        parts: dict[str, torch.Tensor] = {}
        total = 0.0
        for head, level, stride in zip(self.heads, self.levels, self.strides):
            emb_raw, emb_patch = head(features_raw[level]), head(features_patch[level])  # (B, E, *S/stride)
            queries = cells_of(emb_patch, anchor_index // stride)  # (B, K, E)
            targets = matched_cells(grid, raw.image.shape[2:], stride, emb_raw.shape[2:])  # (B, K, D)
            window = None if level == 0 else self.window  # the coarsest level competes with the whole map
            loss = info_nce_map(emb_raw, queries, targets, valid, window=window, temperature=self.temperature)
            parts[f"loss_stride{stride}"] = loss.detach()
            total = total + loss
        return {"loss": total, **parts, "anchors_valid": valid.float().mean()}

    def _draw_anchors(self, patch: ViewBatch) -> torch.Tensor:
        """``anchors`` voxel indices ``(B, K, D)`` per patch, inside the scan, prob. ``IIE ** alpha`` or uniform."""
        if not self.info_guided:
            return sample_anchors(torch.ones_like(patch.valid, dtype=torch.float32), patch.valid, self.anchors, 0.0)
        if patch.info is None:
            raise InputError("objective 'infoguided' with info_guided=true needs information maps: the view sampler "
                             "must run with info_guided=True (or set objective.infoguided.info_guided=false)")
        return sample_anchors(patch.info, patch.valid, self.anchors, self.alpha)


def _gather_at(view: ViewBatch, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World mm ``(B, K, D)`` and validity ``(B, K)`` of the voxels ``index`` ``(B, K, D)`` of ``view``."""
    world = cells_of(view.coords.double(), index)  # (B, K, D)
    valid = cells_of(view.valid.float(), index)[..., 0] > 0.5  # (B, K)
    return world.to(view.coords.dtype), valid
