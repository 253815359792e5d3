"""``ViewPairSampler``: scans -> batches of two augmented views of the same anatomy with exact world coordinates.

Per sample: pick a scan, draw an anchor voxel (uniform, or with probability proportional to ``IIE ** alpha`` when
``info_guided``, by rejection from the stored map), place both views so that they contain the anchor (so they
overlap), render them on ``device`` with ``grid_sample`` from the box of the prepared scan they touch
(``medssl.transforms.prepared``) and augment their intensities. Sample ``i`` of step ``s`` draws every random number
from its own generator seeded with ``(seed, s, i)``: a batch depends only on ``(seed, step)``, whichever process
renders it (DataLoader workers, ``torchrun`` ranks holding slices of the global batch) and after a resume. Presets (``medssl.transforms.views.VIEW_PRESETS``):

- ``symmetric``: both views get the full geometric and intensity augmentation.
- ``weak_strong`` (MSF): view ``a`` (target) weak = crop, zoom and flips only; view ``b`` (query) strong = full.
- ``raw_patch`` (CC2D / InfoGuided, METHODS 2.9): both views at the scan's (working) spacing, so a stride-1 target
  is one voxel of either view: view ``a`` = a ``context_size`` canvas centred on the anchor, axis-aligned, with no
  augmentation; view ``b`` = a crop around the anchor with shift, flips, rotation (and elastic) as configured and
  intensity augmentation. ``scale`` and ``aspect`` do not apply (one scale by design).

``pyramid`` (default ``[1]``): working-spacing factors; each sample draws one and cuts both of its views at the
scan's spacing times that factor (one scale within a pair, several across pairs), so the network also learns the
coarse scales the one-shot matcher embeds images at (``OneShotMatcher(pyramid=...)``): at factor 2 a 32^3 patch
spans twice the anatomy.

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

import numpy as np
import torch

from medssl.data.batch import PairBatch, ViewBatch, concat_views
from medssl.errors import InputError
from medssl.registry import look_up
from medssl.transforms.infomap import (CATEGORY_NAMES, histogram_percentiles, info_categories, sample_anchors,
                                       weights_of)
from medssl.transforms.intensity import INFO_BRIGHTNESS, INFO_CONTRAST, IntensityAugmentation, augment_intensity
from medssl.transforms.prepared import DEFAULT_CACHE_MB, HISTOGRAM_BINS, PreparedScans
from medssl.transforms.preprocess import Preprocessing
from medssl.transforms.views import (VIEW_PRESETS, check_pyramid, random_orientation, render_views,
                                     smooth_displacement_mm, view_to_source)

log = logging.getLogger(__name__)
_ELASTIC_CONTROL_POINTS = 5
_RARE_CATEGORY_PERCENT = 1.0  # a category under this share of the anchors is warned about
_MAX_EXPECTED_TRIES = 256.0  # rejection sampling of anchors: beyond this, draw from the whole map instead
_MAX_ROUNDS = 16


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
    ``context_size`` (``raw_patch`` only: view ``a``'s grid in voxels; None = ``patch_size``), ``pyramid`` (working-
    spacing factors, whole numbers, one drawn per sample for both views; see the module docstring). Intensity (augmented
    views only): ``brightness``, ``contrast``, ``gamma``, ``blur_sigma`` (view pixels) with ``blur_prob``,
    ``bias_field``, ``noise_std``. Preprocessing: ``modality`` (``ct``, ``mr``, ``xray``), ``spacing_mm``
    (resample; None keeps), ``intensity_window``, ``file_spacing_mm`` (2D files without geometry). Prepared data:
    ``cache_dir`` (the prepared-data cache; None: a temporary folder), ``cache_mb`` (whole scans kept in memory),
    ``prepare_workers`` (processes preparing missing entries; None: the CPU count, at most 8).
    Information (``info_guided``): ``info_radius_mm``, ``info_bins``, ``info_alpha``, ``info_category_ratios``
    (low, medium, high; replaces ``IIE ** alpha`` by a piecewise map), ``info_thresholds_bits`` (None, the default:
    the dataset's ``info_percentiles``, so all three categories occur), ``info_brightness``/``info_contrast`` (one
    range per category); :meth:`category_shares` says how often each category occurs (logged at the first batch).
    """

    def __init__(self, images: Sequence[str | Path], *, spatial_dims: int, patch_size: Sequence[int],
                 context_size: Sequence[int] | None = None, pyramid: Sequence[int] = (1,), preset: str = "symmetric",
                 info_guided: bool = False, device: str | torch.device = "cpu", seed: int = 0, modality: str = "mr",
                 spacing_mm: float | Sequence[float] | None = None,
                 intensity_window: Sequence[float] | None = None,
                 file_spacing_mm: float | Sequence[float] | None = None, cache_dir: str | None = None,
                 cache_mb: float = DEFAULT_CACHE_MB, prepare_workers: int | None = None,
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
        self.pyramid = check_pyramid(pyramid, "pyramid")
        self.spatial_dims, self.preset, self.info_guided = spatial_dims, preset, bool(info_guided)
        self.device = torch.device(device)
        preprocessing = Preprocessing(modality=modality, spacing_mm=spacing_mm, intensity_window=intensity_window,
                                      file_spacing_mm=file_spacing_mm)
        # every scan is read, checked and prepared now, so a bad file is refused before the first batch
        self.scans = PreparedScans(images, spatial_dims=spatial_dims, preprocessing=preprocessing,
                                   info_radius_mm=info_radius_mm if info_guided else None, info_bins=info_bins,
                                   folder=cache_dir, cache_mb=cache_mb, workers=prepare_workers)
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
        self.seed, self.step = int(seed), 0
        self._bounds: list[tuple[float, float]] = []
        if self.info_guided:
            self._thresholds()

    def _thresholds(self) -> tuple[float, float]:
        """The category thresholds in bits (configured, or the dataset percentiles from the prepared histograms);
        the first call also measures and logs the category shares and each scan's rejection bound."""
        if self.thresholds_bits is None:
            total = sum(self.scans.histogram(i) for i in range(len(self.scans)))
            self.thresholds_bits = histogram_percentiles(total, self.scans.spec.max_bits, self.info_percentiles)
            log.info("information thresholds from the dataset's %s percentiles: %.3f, %.3f bits",
                     self.info_percentiles, *self.thresholds_bits)
        if self._shares is None:
            self._shares = self._measure_shares(self.thresholds_bits)
        return self.thresholds_bits

    def category_shares(self) -> dict[str, dict[str, float]]:
        """Share (%) of each information category (``low``, ``medium``, ``high``) under the thresholds in use:
        ``positions`` = of all scan voxels, ``anchors`` = expected share of the drawn anchors (scans uniform, voxels
        by the anchor weights), from the prepared histograms (to one bin of ``log2(info_bins) / HISTOGRAM_BINS``
        bits). Measured and logged when the sampler is built; needs ``info_guided``."""
        if not self.info_guided:
            raise ValueError("category shares need information maps: the sampler was built with info_guided=False")
        self._thresholds()
        return self._shares

    def _measure_shares(self, thresholds: tuple[float, float]) -> dict[str, dict[str, float]]:
        """The category shares of :meth:`category_shares` and the anchor-rejection bounds; logs the shares and warns
        about a category under 1 % of the anchors (its brightness/contrast ranges are then hardly ever used)."""
        width = self.scans.spec.max_bits / HISTOGRAM_BINS
        centres = (torch.arange(HISTOGRAM_BINS, dtype=torch.float64) + 0.5) * width
        categories = info_categories(centres, thresholds)  # (K,)
        weights = weights_of(centres, self.info_alpha, self.info_category_ratios, thresholds).double()  # (K,)
        positions = torch.zeros(3, dtype=torch.float64)
        anchors = torch.zeros(3, dtype=torch.float64)
        low, high = math.inf, -math.inf
        self._bounds = []
        for index in range(len(self.scans)):
            counts = self.scans.histogram(index)  # (K,)
            mass = counts * weights
            positions += torch.bincount(categories, weights=counts, minlength=3)
            drawn = mass if float(mass.sum()) > 0 else counts  # no weight anywhere: anchors are uniform
            anchors += torch.bincount(categories, weights=drawn, minlength=3) / float(drawn.sum())
            present = torch.nonzero(counts).flatten()
            low = min(low, float(present[0]) * width)
            info_max = float(self.scans.records[index]["info_max"])
            high = max(high, info_max)
            self._bounds.append(self._rejection_bound(info_max, float(mass.sum() / counts.sum())))
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

    def _rejection_bound(self, info_max: float, mean_weight: float) -> tuple[float, float]:
        """``(bound on a voxel's weight, expected tries)`` of rejection sampling for one scan; ``(0, 0)``: every
        weight is zero (anchors uniform); infinite tries: draw from the whole map."""
        if self.info_category_ratios is not None:
            bound = max(float(r) for r in self.info_category_ratios)
        elif self.info_alpha >= 0:
            bound = max(info_max, 0.0) ** self.info_alpha
        else:
            return math.inf, math.inf  # weights unbounded near zero information
        if bound <= 0:
            return 0.0, 0.0
        return bound, (bound / mean_weight if mean_weight > 0 else math.inf)

    def _anchor(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """One anchor voxel index ``(D,)`` of scan ``index`` and its information category (-1 when not guided).
        Guided anchors are exact draws with probability proportional to the weights, by rejection from the stored
        map (a few voxels read, not the whole map)."""
        shape = torch.tensor(self.scans.shapes[index], device=self.device, dtype=torch.float64)
        if not self.info_guided:
            return (self._random(generator, self.spatial_dims) * shape).floor(), -1
        thresholds = self._thresholds()
        bound, tries = self._bounds[index]
        if bound == 0.0:  # no voxel has weight: uniform, as anchor_weights does
            anchor = (self._random(generator, self.spatial_dims) * shape).floor()
            return anchor, int(info_categories(self.scans.info_at(index, anchor[None]), thresholds)[0])
        if tries <= _MAX_EXPECTED_TRIES:
            count = int(min(4096, math.ceil(2 * tries) + 4))
            for _ in range(_MAX_ROUNDS):
                voxels = (self._random(generator, count, self.spatial_dims) * shape).floor()  # (K, D)
                info = self.scans.info_at(index, voxels).to(self.device)  # (K,)
                weights = weights_of(info, self.info_alpha, self.info_category_ratios, thresholds).double()
                accepted = torch.nonzero(self._random(generator, count) * bound < weights).flatten()
                if accepted.numel():
                    first = int(accepted[0])
                    return voxels[first], int(info_categories(info[first], thresholds))
        info = self.scans[index].info.to(self.device)  # (1, *S): rare fallback, the whole map
        anchor = sample_anchors(info[None], None, 1, self.info_alpha, generator,
                                category_ratios=self.info_category_ratios, thresholds_bits=thresholds)[0, 0]
        return anchor.double(), int(info_categories(info[(0, *anchor.tolist())], thresholds))

    def _random(self, generator: torch.Generator, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=self.device, dtype=torch.float64)

    def _log_uniform(self, generator: torch.Generator, bounds: tuple[float, float], *shape: int) -> torch.Tensor:
        low, high = math.log(bounds[0]), math.log(bounds[1])
        return torch.exp(low + self._random(generator, *shape) * (high - low))

    def _view_matrix(self, geometry: GeometryAugmentation, anchor: torch.Tensor, spacing: torch.Tensor,
                     size: tuple[int, ...], generator: torch.Generator, factor: int = 1) -> torch.Tensor:
        """``view_to_source`` ``(1, D+1, D+1)`` of one view (grid ``size``) around ``anchor`` ``(D,)`` at the
        scan's ``spacing`` times the pyramid ``factor``."""
        dims = anchor.shape[0]
        patch = torch.tensor(size, dtype=torch.float64, device=self.device)
        view_spacing = spacing * factor * self._log_uniform(generator, geometry.scale, 1) \
            * self._log_uniform(generator, geometry.aspect, dims)
        shift = (self._random(generator, dims) * 2 - 1) * geometry.max_shift * patch / 2  # view pixels
        anchor_view = torch.div(patch, 2, rounding_mode="floor") + shift  # (D,)
        orientation = random_orientation(1, dims, geometry.rotate_deg, geometry.flip_prob, generator, self.device)
        return view_to_source(anchor[None], anchor_view[None], spacing[None], view_spacing[None], orientation)

    def sample_generator(self, step: int, index: int) -> torch.Generator:
        """The generator of sample ``index`` of the global batch of ``step``: seeded from ``(seed, step, index)``."""
        words = np.random.SeedSequence([self.seed, int(step), int(index)]).generate_state(2, np.uint32)
        generator = torch.Generator(device=self.device)
        generator.manual_seed((int(words[0]) << 32) | int(words[1]))
        return generator

    def sample(self, batch_size: int, step: int | None = None, first: int = 0) -> PairBatch:
        """``batch_size`` view pairs on ``device``: samples ``first .. first + batch_size - 1`` of the global batch of
        ``step`` (None: the sampler's own counter, which then advances; a rank takes ``first = rank * batch_size``)."""
        if step is None:
            step, self.step = self.step, self.step + 1
        pairs = [self._pair(self.sample_generator(step, first + i)) for i in range(batch_size)]
        return PairBatch(concat_views([a for a, _, _ in pairs]), concat_views([b for _, b, _ in pairs]),
                         [subject for _, _, subject in pairs])

    def _pair(self, generator: torch.Generator) -> tuple[ViewBatch, ViewBatch, str]:
        """One sample's two views (batch of one each) and its subject."""
        index = int(torch.randint(len(self.scans), (1,), generator=generator, device=self.device))
        self.scans.use(index)
        anchor, category = self._anchor(index, generator)
        spacing = torch.tensor(self.scans.spacing_mm(index), dtype=torch.float64, device=self.device)
        factor = 1
        if len(self.pyramid) > 1:  # one working scale for both views (drawn only then: old streams unchanged)
            factor = self.pyramid[int(torch.randint(len(self.pyramid), (1,), generator=generator, device=self.device))]
        views = []
        for geometry, intensity, size in self.views:
            matrix = self._view_matrix(geometry, anchor, spacing, size, generator, factor)  # (1, D+1, D+1)
            displacement = None
            if geometry.elastic_mm > 0:
                displacement = smooth_displacement_mm(1, size, geometry.elastic_mm, _ELASTIC_CONTROL_POINTS,
                                                      generator, self.device)
            views.append(self._render(index, matrix, size, displacement, intensity, category, generator))
        return views[0], views[1], self.scans.subjects[index]

    def _render(self, index: int, matrix: torch.Tensor, size: tuple[int, ...], displacement: torch.Tensor | None,
                intensity: IntensityAugmentation | None, category: int, generator: torch.Generator) -> ViewBatch:
        image, coords, valid, view_to_world = render_views(
            lambda low, high: self.scans.region(index, low, high), self.scans.affines[index], matrix, size,
            displacement, source_shape=self.scans.shapes[index], device=self.device)
        info = None
        if self.info_guided:
            image, info = image[:, :-1], image[:, -1:]  # (1, C, *P), (1, 1, *P)
        if intensity is not None:
            guided = dict(brightness=self.info_brightness[category][None], contrast=self.info_contrast[category][None]) \
                if self.info_guided else {}
            image = augment_intensity(image, valid, intensity, generator, **guided)
        return ViewBatch(image.contiguous(), coords, valid, info, view_to_world)

    def state_dict(self) -> dict:
        """The step counter of :meth:`sample` without ``step`` and the dataset thresholds: loading it makes the next
        batches identical."""
        return {"step": self.step, "thresholds_bits": self.thresholds_bits}

    def load_state_dict(self, state: dict) -> None:
        if "step" not in state:
            log.warning("this checkpoint's view sampler state comes from an earlier medssl (one random stream, not "
                        "per-step seeds): the batches after the resume differ from those of an uninterrupted run")
        self.step = int(state.get("step", 0))
        if state.get("thresholds_bits") is not None:
            self.thresholds_bits, self._shares = tuple(state["thresholds_bits"]), None
            self._thresholds()
