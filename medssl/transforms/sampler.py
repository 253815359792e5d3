"""``ViewPairSampler``: scans -> batches of two augmented views of the same anatomy with exact world coordinates.

Per sample: pick a scan, draw an anchor voxel (uniform, or with probability proportional to ``IIE ** alpha`` when
``info_guided``), place both views so that they contain the anchor (so they overlap), render them on ``device`` with
``grid_sample`` and augment their intensities. Presets (``medssl.transforms.views.VIEW_PRESETS``):

- ``symmetric``: both views get the full geometric and intensity augmentation.
- ``weak_strong`` (MSF): view ``a`` (target) weak = crop, zoom and flips only; view ``b`` (query) strong = full.
- ``raw_patch`` (CC2D / InfoGuided, METHODS 2.9): both views at the scan's (working) spacing, so a stride-1 target
  is one voxel of either view: view ``a`` = a ``context_size`` canvas centred on the anchor, axis-aligned, with no
  augmentation; view ``b`` = a crop around the anchor with shift, flips, rotation (and elastic) as configured and
  intensity augmentation. ``scale`` and ``aspect`` do not apply (one scale by design).

With ``info_guided`` the views carry information maps and the brightness/contrast ranges of every augmented view
follow the category (low/medium/high) of the sample's anchor (METHODS 2.6).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Sequence

import torch

from medssl.data.batch import PairBatch, ViewBatch
from medssl.errors import InputError
from medssl.registry import look_up
from medssl.transforms.infomap import (CATEGORY_NAMES, anchor_weights, info_categories, percentile_thresholds,
                                       sample_anchors)
from medssl.transforms.intensity import INFO_BRIGHTNESS, INFO_CONTRAST, IntensityAugmentation, augment_intensity
from medssl.transforms.preprocess import ScanCache
from medssl.transforms.views import (VIEW_PRESETS, random_orientation, render_views, smooth_displacement_mm,
                                     view_to_source)

log = logging.getLogger(__name__)
_ELASTIC_CONTROL_POINTS = 5
_RARE_CATEGORY_PERCENT = 1.0  # a category under this share of the anchors is warned about


@dataclass(frozen=True)
class GeometryAugmentation:
    """Random geometry of one view: ``scale`` (log-uniform, field of view relative to the patch at the scan's
    resolution: > 1 zooms out), ``aspect`` (extra per-axis log-uniform factor), ``max_shift`` (the anchor lies within
    this fraction of the half view from the view centre), flips, rotation (± degrees per axis plane), elastic (mm)."""

    scale: tuple[float, float] = (1.0, 1.0)
    aspect: tuple[float, float] = (1.0, 1.0)
    max_shift: float = 0.0
    flip_prob: float = 0.0
    rotate_deg: float = 0.0
    elastic_mm: float = 0.0


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 2 or values[0] > values[1]:
        raise InputError(f"must be a range [low, high] with low <= high, got {list(value)}", path=name)
    return values[0], values[1]


class ViewPairSampler:
    """Batches of view pairs (``PairBatch`` on ``device``), deterministic from ``seed``; see the module docstring.

    Geometry: ``scale`` and ``aspect`` (not for ``raw_patch``: one scale by design), ``max_shift``, ``flip_prob``,
    ``rotate_deg`` (about every axis plane), ``elastic_mm`` (0 = off; elastic views have ``view_to_world`` None),
    ``context_size`` (``raw_patch`` only: view ``a``'s grid in voxels; None = ``patch_size``). Intensity (augmented
    views only): ``brightness``, ``contrast``, ``gamma``, ``blur_sigma`` (view pixels) with ``blur_prob``,
    ``bias_field``, ``noise_std``. Preprocessing: ``modality`` (``ct``, ``mr``, ``xray``), ``spacing_mm``
    (resample; None keeps), ``intensity_window``, ``file_spacing_mm`` (2D files without geometry), ``cache_dir``.
    Information (``info_guided``): ``info_radius_mm``, ``info_bins``, ``info_alpha``, ``info_category_ratios``
    (low, medium, high; replaces ``IIE ** alpha`` by a piecewise map), ``info_thresholds_bits`` (None, the default:
    the dataset's ``info_percentiles``, so all three categories occur), ``info_brightness``/``info_contrast`` (one
    range per category); :meth:`category_shares` says how often each category occurs (logged at the first batch).
    """

    def __init__(self, images: Sequence[str | Path], *, spatial_dims: int, patch_size: Sequence[int],
                 context_size: Sequence[int] | None = None, preset: str = "symmetric", info_guided: bool = False,
                 device: str | torch.device = "cpu", seed: int = 0, modality: str = "mr",
                 spacing_mm: float | Sequence[float] | None = None,
                 intensity_window: Sequence[float] | None = None,
                 file_spacing_mm: float | Sequence[float] | None = None, cache_dir: str | None = None,
                 scale: Sequence[float] = (0.8, 1.25), aspect: Sequence[float] = (0.9, 1.1), max_shift: float = 0.5,
                 flip_prob: float = 0.5, rotate_deg: float = 15.0, elastic_mm: float = 0.0,
                 brightness: Sequence[float] = (0.8, 1.2), contrast: Sequence[float] = (0.8, 1.25),
                 gamma: Sequence[float] = (0.8, 1.25), blur_sigma: Sequence[float] = (0.5, 1.5),
                 blur_prob: float = 0.2, bias_field: float = 0.1, noise_std: float = 0.03,
                 info_radius_mm: float = 2.0, info_bins: int = 256, info_alpha: float = 0.3,
                 info_category_ratios: Sequence[float] | None = None,
                 info_thresholds_bits: Sequence[float] | None = None,
                 info_percentiles: Sequence[float] = (20.0, 80.0),
                 info_brightness: Sequence[Sequence[float]] = INFO_BRIGHTNESS,
                 info_contrast: Sequence[Sequence[float]] = INFO_CONTRAST):
        look_up(preset, VIEW_PRESETS, what="view preset", path="preset")
        self.patch_size = tuple(int(p) for p in patch_size)
        if spatial_dims not in (2, 3) or len(self.patch_size) != spatial_dims or min(self.patch_size) < 1:
            raise InputError(f"must list {spatial_dims} positive sizes for spatial_dims={spatial_dims}, got "
                             f"{list(patch_size)}", path="patch_size")
        context = self.patch_size if context_size is None else context_size
        if not isinstance(context, Sequence) or len(context) != spatial_dims or not all(
                isinstance(c, Integral) and not isinstance(c, bool) and c > 0 for c in context):
            raise InputError(f"must list {spatial_dims} positive integers for spatial_dims={spatial_dims} (or be "
                             f"null = patch_size), got {context_size!r}", path="context_size")
        context = tuple(int(c) for c in context)
        if context_size is not None and preset != "raw_patch":
            raise InputError(f"applies to the raw_patch view preset only, not '{preset}'", path="context_size")
        if not 0 <= max_shift <= 1 or not 0 <= flip_prob <= 1 or not 0 <= blur_prob <= 1:
            raise InputError("max_shift, flip_prob and blur_prob must lie in [0, 1]")
        self.spatial_dims, self.preset, self.info_guided = spatial_dims, preset, bool(info_guided)
        self.device = torch.device(device)
        self.scans = ScanCache(images, spatial_dims=spatial_dims, device=self.device, modality=modality,
                               spacing_mm=spacing_mm, intensity_window=intensity_window,
                               file_spacing_mm=file_spacing_mm, cache_dir=cache_dir,
                               info_radius_mm=info_radius_mm if info_guided else None, info_bins=info_bins)
        strong = GeometryAugmentation(_pair(scale, "scale"), _pair(aspect, "aspect"), max_shift, flip_prob,
                                      rotate_deg, elastic_mm)
        weak = GeometryAugmentation(strong.scale, strong.aspect, max_shift, flip_prob)
        one_scale = GeometryAugmentation(max_shift=max_shift, flip_prob=flip_prob, rotate_deg=rotate_deg,
                                         elastic_mm=elastic_mm)
        intensity = IntensityAugmentation(_pair(brightness, "brightness"), _pair(contrast, "contrast"),
                                          _pair(gamma, "gamma"), _pair(blur_sigma, "blur_sigma"), blur_prob,
                                          bias_field, noise_std)
        # per view: geometry, intensity (None = none) and grid size
        patch = self.patch_size
        self.views: tuple[tuple[GeometryAugmentation, IntensityAugmentation | None, tuple[int, ...]], ...] = {
            "symmetric": ((strong, intensity, patch), (strong, intensity, patch)),
            "weak_strong": ((weak, None, patch), (strong, intensity, patch)),
            "raw_patch": ((GeometryAugmentation(), None, context), (one_scale, intensity, patch)),
        }[preset]
        self.info_alpha, self.info_category_ratios = info_alpha, info_category_ratios
        self.info_percentiles = tuple(info_percentiles)
        self.thresholds_bits = None if info_thresholds_bits is None else _pair(info_thresholds_bits,
                                                                                "info_thresholds_bits")
        self._shares: dict[str, dict[str, float]] | None = None
        ranges = [[_pair(r, name) for r in value] for value, name in
                  ((info_brightness, "info_brightness"), (info_contrast, "info_contrast"))]
        if any(len(r) != 3 for r in ranges):
            raise InputError("info_brightness and info_contrast need three ranges (low, medium, high)")
        self.info_brightness, self.info_contrast = (torch.tensor(r, device=self.device) for r in ranges)  # (3, 2)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.scans.load_all()  # every scan checked before the first batch (and a constant one refused, not skipped)

    def _thresholds(self) -> tuple[float, float]:
        """The category thresholds in bits: configured, or the dataset percentiles (computed once); the first call
        also measures and logs the category shares (:meth:`category_shares`)."""
        if self.thresholds_bits is None:
            self.thresholds_bits = percentile_thresholds([self.scans[i].info for i in range(len(self.scans))],
                                                         self.info_percentiles)
            log.info("information thresholds from the dataset's %s percentiles: %.3f, %.3f bits",
                     self.info_percentiles, *self.thresholds_bits)
        if self._shares is None:
            self._shares = self._measure_shares(self.thresholds_bits)
        return self.thresholds_bits

    def category_shares(self) -> dict[str, dict[str, float]]:
        """Share (%) of each information category (``low``, ``medium``, ``high``) under the thresholds in use:
        ``positions`` = of all scan voxels, ``anchors`` = expected share of the drawn anchors (scans uniform, voxels
        by the anchor weights). Measured and logged once, at the first call or batch; needs ``info_guided``."""
        if not self.info_guided:
            raise ValueError("category shares need information maps: the sampler was built with info_guided=False")
        self._thresholds()
        return self._shares

    def _measure_shares(self, thresholds: tuple[float, float]) -> dict[str, dict[str, float]]:
        """The category shares of :meth:`category_shares`; logs them and warns about a category under 1 % of
        the anchors (its brightness/contrast ranges are then hardly ever used)."""
        positions = torch.zeros(3, dtype=torch.float64)
        anchors = torch.zeros(3, dtype=torch.float64)
        low, high = math.inf, -math.inf
        for index in range(len(self.scans)):
            info = self.scans[index].info  # (1, *S)
            categories = info_categories(info.flatten(), thresholds)  # (N,)
            weights = anchor_weights(info[None], None, self.info_alpha, self.info_category_ratios,
                                     thresholds)[0].double()  # (N,)
            positions += torch.bincount(categories, minlength=3).double().cpu()
            anchors += (torch.bincount(categories, weights=weights, minlength=3) / weights.sum()).cpu()
            low, high = min(low, float(info.min())), max(high, float(info.max()))
        shares = {"positions": positions / positions.sum() * 100, "anchors": anchors / len(self.scans) * 100}
        shares = {kind: dict(zip(CATEGORY_NAMES, values.tolist())) for kind, values in shares.items()}
        log.info("information categories (thresholds %.3f, %.3f bits; maps span %.2f-%.2f bits): positions %s; "
                 "anchors %s", *thresholds, low, high,
                 *(", ".join(f"{name} {value:.1f} %" for name, value in shares[kind].items())
                   for kind in ("positions", "anchors")))
        ratios = "; or raise its data.info_category_ratios entry" if self.info_category_ratios is not None else ""
        for name, value in shares["anchors"].items():
            if value < _RARE_CATEGORY_PERCENT:
                log.warning("information category '%s' holds %.2f %% of the anchors (%.2f %% of the positions) with "
                            "thresholds %.3f, %.3f bits, so its info_brightness/info_contrast ranges are hardly ever "
                            "used; set data.info_thresholds_bits inside the maps' %.2f-%.2f bits, or null for the "
                            "dataset's info_percentiles%s", name, value, shares["positions"][name], *thresholds,
                            low, high, ratios)
        return shares

    def _random(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.device, dtype=torch.float64)

    def _log_uniform(self, bounds: tuple[float, float], *shape: int) -> torch.Tensor:
        low, high = math.log(bounds[0]), math.log(bounds[1])
        return torch.exp(low + self._random(*shape) * (high - low))

    def _anchor(self, index: int) -> tuple[torch.Tensor, int]:
        """One anchor voxel index ``(D,)`` of scan ``index`` and its information category (-1 when not guided)."""
        scan = self.scans[index]
        if not self.info_guided:
            shape = torch.tensor(scan.image.shape[1:], device=self.device, dtype=torch.float64)
            return (self._random(self.spatial_dims) * shape).floor(), -1
        thresholds = self._thresholds()
        anchor = sample_anchors(scan.info[None], None, 1, self.info_alpha, self.generator,
                                category_ratios=self.info_category_ratios, thresholds_bits=thresholds)[0, 0]  # (D,)
        category = int(info_categories(scan.info[(0, *anchor.tolist())], thresholds))
        return anchor.double(), category

    def _view_matrices(self, geometry: GeometryAugmentation, anchors: torch.Tensor, spacing: torch.Tensor,
                       size: tuple[int, ...]) -> torch.Tensor:
        """``view_to_source`` ``(B, D+1, D+1)`` for one view (grid ``size``) of every sample."""
        batch, dims = anchors.shape
        patch = torch.tensor(size, dtype=torch.float64, device=self.device)
        view_spacing = spacing * self._log_uniform(geometry.scale, batch, 1) * self._log_uniform(geometry.aspect,
                                                                                                 batch, dims)
        shift = (self._random(batch, dims) * 2 - 1) * geometry.max_shift * patch / 2  # view pixels
        anchor_view = torch.div(patch, 2, rounding_mode="floor") + shift  # (B, D)
        orientation = random_orientation(batch, dims, geometry.rotate_deg, geometry.flip_prob, self.generator,
                                         self.device)
        return view_to_source(anchors, anchor_view, spacing, view_spacing, orientation)

    def sample(self, batch_size: int) -> PairBatch:
        """``batch_size`` view pairs on ``device``."""
        count = len(self.scans)
        indices = torch.randint(count, (batch_size,), generator=self.generator, device=self.device).tolist()
        drawn = [self._anchor(i) for i in indices]
        anchors = torch.stack([a for a, _ in drawn])  # (B, D)
        categories = torch.tensor([c for _, c in drawn], device=self.device)  # (B,)
        spacing = torch.tensor([self.scans[i].spacing_mm for i in indices], dtype=torch.float64, device=self.device)
        views = []
        for geometry, intensity, size in self.views:
            matrices = self._view_matrices(geometry, anchors, spacing, size)  # (B, D+1, D+1)
            displacement = None
            if geometry.elastic_mm > 0:
                displacement = smooth_displacement_mm(batch_size, size, geometry.elastic_mm,
                                                      _ELASTIC_CONTROL_POINTS, self.generator, self.device)
            views.append(self._render(indices, matrices, size, displacement, intensity, categories))
        return PairBatch(views[0], views[1], [self.scans[i].subject for i in indices])

    def _render(self, indices: list[int], matrices: torch.Tensor, size: tuple[int, ...],
                displacement: torch.Tensor | None, intensity: IntensityAugmentation | None,
                categories: torch.Tensor) -> ViewBatch:
        parts = []
        for row, index in enumerate(indices):
            scan = self.scans[index]
            source = scan.image if scan.info is None else torch.cat([scan.image, scan.info])  # (C[+1], *S)
            parts.append(render_views(source, scan.affine, matrices[row:row + 1], size,
                                      None if displacement is None else displacement[row:row + 1]))
        image, coords, valid = (torch.cat([p[k] for p in parts]) for k in range(3))
        view_to_world = None if displacement is not None else torch.cat([p[3] for p in parts])
        info = None
        if self.info_guided:
            image, info = image[:, :-1], image[:, -1:]  # (B, C, *P), (B, 1, *P)
        if intensity is not None:
            guided = dict(brightness=self.info_brightness[categories], contrast=self.info_contrast[categories]) \
                if self.info_guided else {}
            image = augment_intensity(image, valid, intensity, self.generator, **guided)
        return ViewBatch(image.contiguous(), coords, valid, info, view_to_world)

    def state_dict(self) -> dict:
        """The random state (and dataset thresholds): loading it makes the next batches identical."""
        return {"generator": self.generator.get_state(), "thresholds_bits": self.thresholds_bits}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu() if hasattr(state["generator"], "cpu")
                                 else state["generator"])
        if state.get("thresholds_bits") is not None:
            self.thresholds_bits, self._shares = tuple(state["thresholds_bits"]), None
