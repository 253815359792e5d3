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

    def pin_memory(self) -> "ViewBatch":
        """A copy in page-locked memory (DataLoader ``pin_memory``: faster, asynchronous copies to a GPU)."""
        return replace(self, **{f.name: v.pin_memory() for f in fields(self) for v in [getattr(self, f.name)]
                                if isinstance(v, torch.Tensor)})


def concat_views(views: list[ViewBatch]) -> ViewBatch:
    """One batch of the samples of ``views`` in order (optional fields: present in all or none)."""
    def joined(name: str) -> torch.Tensor | None:
        values = [getattr(view, name) for view in views]
        return None if any(v is None for v in values) else torch.cat(values)

    return ViewBatch(*(joined(f.name) for f in fields(ViewBatch)))


@dataclass
class PairBatch:
    """Two views of the same anatomy per sample (view ``a`` and view ``b``) plus the subjects they came from."""

    a: ViewBatch
    b: ViewBatch
    subjects: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PairBatch":
        return PairBatch(self.a.to(device, non_blocking), self.b.to(device, non_blocking), list(self.subjects))

    def pin_memory(self) -> "PairBatch":
        return PairBatch(self.a.pin_memory(), self.b.pin_memory(), list(self.subjects))
