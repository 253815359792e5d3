"""Typed batches that flow from the view pipeline to the objectives."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class ViewBatch:
    """One augmented view of every sample in a batch.

    image:         (B, C, *S) intensities after augmentation.
    coords:        (B, D, *S) world position (mm) in the source scan of every pixel/voxel centre.
    valid:         (B, 1, *S) bool, True where the pixel centre lies inside the source scan.
    info:          (B, 1, *S) information map (local entropy, bits) of the view, or None.
    view_to_world: (B, D+1, D+1) affine mapping view voxel indices -> world mm when the view is an affine
                   resampling of the source (exact, analytic correspondence), or None (e.g. elastic views).
    """

    image: torch.Tensor
    coords: torch.Tensor
    valid: torch.Tensor
    info: torch.Tensor | None = None
    view_to_world: torch.Tensor | None = None

    @property
    def spatial_dims(self) -> int:
        return self.image.ndim - 2

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ViewBatch":
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return replace(self, **moved)


@dataclass
class PairBatch:
    """Two views of the same anatomy per sample (view ``a`` and view ``b``) plus the subjects they came from."""

    a: ViewBatch
    b: ViewBatch
    subjects: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PairBatch":
        return PairBatch(self.a.to(device, non_blocking), self.b.to(device, non_blocking), list(self.subjects))
