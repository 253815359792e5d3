"""One-shot landmark matching with dense multi-scale embeddings (CC2D / SAM style, METHODS 5.1, 5.5, 5.6).

Template and query are embedded by the same network (``forward_features``: ``[bottleneck, decoder coarse -> fine]``)
through ``monai.inferers.SlidingWindowInferer``; each landmark's template vector is sampled at its sub-pixel
position on every level; cosine similarity maps per level are combined by product (CC2D's coarse-to-fine cascade:
a coarse level vetoes far false matches, fine levels sharpen the peak) or by mean (SAM), upsampled to the image grid,
averaged over templates; its few best local maxima are then re-scored on the interpolated feature field, where a
sub-pixel search picks the answer (cheap maps propose, exact features decide).

Two guards against a landmark jumping to a look-alike structure far away (an arg-max over the whole image has no
notion of where the landmark should be): ``search="coarse-to-fine"`` finds each landmark on the coarsest level
first and lets every finer level search only a window around the previous answer; ``consistency="thin-plate"``
also matches a grid of support points over the template's foreground and reads each landmark off a robust
thin-plate spline through all the matches (``consistency.robust_spline``): a feature-driven registration
(``"outliers"``: the spline replaces only the landmarks whose own match it rejects); ``consistency="dense"`` refines
that spline by a dense feature registration (``feature_registration``: thousands of template points pull on one smooth
displacement) and reads every landmark off the refined map.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.networks.layers import Pool
from monai.transforms import DivisiblePad
from monai.utils import convert_to_tensor
from torch import nn

from medssl.correspondence import flat_index, offset_cube, peak_positions
from medssl.data.geometry import spacing_mm as affine_spacing_mm
from medssl.data.geometry import voxel_to_world, world_to_voxel
from medssl.data.readers import check_image_shape
from medssl.errors import InputError
from medssl.matching.consistency import robust_spline
from medssl.matching.feature_registration import DEFAULT_SAMPLES, register_features, sample_voxels
from medssl.registry import look_up
from medssl.transforms.preprocess import Preprocessing
from medssl.transforms.views import check_pyramid


log = logging.getLogger(__name__)

COMBINE_MODES = ("product", "mean")
SEARCH_MODES = ("global", "coarse-to-fine")
#: the precision the network embeds images in: float32, or autocast to bfloat16 (on a CPU with native bfloat16, AMX:
#: a 3D demo volume's network pass 1.2 -> 0.8 s on 2 cores, features at cosine >= 0.999 to float32's; on CUDA and
#: on CPUs that emulate bfloat16 not measured)
AMP_MODES = ("off", "bf16")
CONSISTENCY_MODES = ("thin-plate", "outliers", "dense", "none")
#: the consistency check per spatial dims when none is chosen (measured, docs/oneshot.md: in 3D the spline refined
#: by the dense registration, one template 3.40 -> 2.60 mm against "outliers" at 3.6 s more per template; in 2D it
#: gains 6-8 % at 6x the matching time, so there the spline alone)
DEFAULT_CONSISTENCY = {2: "thin-plate", 3: "dense"}
#: thin-plate smoothing per spatial dims (SciPy ``RBFInterpolator`` units: the kernels are in mm)
SPLINE_SMOOTHING = {2: 3000.0, 3: 100.0}
DEFAULT_SUPPORT_POINTS = 512
FOREGROUND = 0.1  # support points lie where the intensity is above this fraction of the image's range
_PEAK_POOL = 16  # candidate_peaks looks for local maxima among this many highest voxels per wanted peak first
_SUPPORT_STRIDE = 2  # support points are searched on every second voxel, then refined
_PAD_MULTIPLE = 4  # padded images are multiples of this too: support search strides up to 4 divide their grid
_SUPPORT_MAP_VOXELS = 2 ** 24  # similarity-map voxels held at once when matching support points (64 MiB float32)
#: linear interpolation mode of F.interpolate per number of spatial dims
_LINEAR = {2: "bilinear", 3: "trilinear"}
#: default sliding-window size per spatial dims (voxels); smaller images are embedded in one window
DEFAULT_ROI_SIZE = {2: 512, 3: 128}


def check_levels(levels: Sequence[int], count: int) -> list[int]:
    """``levels`` as a list of indices into ``count`` feature levels (0 = bottleneck, ``count - 1`` = finest);
    ``InputError`` naming ``--levels`` for an empty list, a non-integer or an index out of range."""
    levels = list(levels)
    if not levels or any(isinstance(level, bool) or not isinstance(level, (int, np.integer)) for level in levels):
        raise InputError(f"expected one or more whole level indices such as 0,1, got {levels}", path="--levels")
    outside = [int(level) for level in levels if not 0 <= level < count]
    if outside:
        raise InputError(f"level(s) {', '.join(map(str, outside))} out of range: the network has {count} feature "
                         f"levels, 0 (bottleneck) to {count - 1} (finest)", path="--levels")
    return [int(level) for level in levels]


def prepare_image(path: str | Path, *, spatial_dims: int, spacing_mm: float | Sequence[float] | None = None,
                  file_spacing_mm: float | Sequence[float] | None = None, modality: str = "mr",
                  intensity_window: Sequence[float] | None = None, min_size: int = 1,
                  channels: int | None = None) -> MetaTensor:
    """Read ``path`` as the network saw its training scans (``Preprocessing``: RAS, resampled to ``spacing_mm``,
    intensities in [0, 1]); ``spacing_mm`` is one value for every axis, one per axis, or None to keep the file's.
    A file already on that grid is not resampled (bit-exact). An image whose grid has a side under ``min_size`` (the
    network's divisor) or other than ``channels`` channels (the network's input) is refused."""
    spec = Preprocessing(modality=modality, spacing_mm=spacing_mm, intensity_window=intensity_window,
                         file_spacing_mm=file_spacing_mm)
    image, _ = spec.read(path, spatial_dims)
    check_image_shape(image, path, min_size=min_size, channels=channels)
    return image


@dataclass(frozen=True)
class Embedding:
    """Dense multi-scale features of one image.

    ``features``: per level ``(C_l, *P / stride_l)``, unit length along channels, coarse -> fine, computed on the
    image padded at the end to ``P`` (a multiple of the network's divisor). ``affine``: voxel -> world mm (float64).
    ``shape``: the image's own spatial shape ``S`` (``S <= P``).
    """

    features: list[torch.Tensor]
    affine: torch.Tensor
    shape: tuple[int, ...]
    padded_shape: tuple[int, ...]

    @property
    def spatial_dims(self) -> int:
        return len(self.shape)

    def to_voxel(self, points_mm: np.ndarray) -> np.ndarray:
        """World mm ``(L, D)`` -> fractional voxel indices ``(L, D)`` of this image."""
        return world_to_voxel(self.affine.cpu().numpy(), np.asarray(points_mm, dtype=np.float64))

    def to_world(self, voxels: np.ndarray) -> np.ndarray:
        """Fractional voxel indices ``(L, D)`` -> world mm ``(L, D)``."""
        return voxel_to_world(self.affine.cpu().numpy(), np.asarray(voxels, dtype=np.float64))


@dataclass(frozen=True)
class Reference:
    """A template as the matcher uses it: unit feature vectors per level ``(L + N + M, C_l)`` and world positions
    ``points_mm`` ``(L + N + M, D)`` of its ``landmarks`` (the first ``L``), then of its ``N`` support points, then
    of its ``samples`` (``M``, the points a dense feature registration compares; 0 without one)."""

    vectors: list[torch.Tensor]
    points_mm: np.ndarray
    landmarks: int
    samples: int = 0

    @property
    def landmark_vectors(self) -> list[torch.Tensor]:
        return [vector[:self.landmarks] for vector in self.vectors]

    @property
    def support_vectors(self) -> list[torch.Tensor]:
        return [vector[self.landmarks:len(vector) - self.samples] for vector in self.vectors]

    @property
    def spline_points_mm(self) -> np.ndarray:
        """The landmarks and support points ``(L + N, D)`` mm: the points the robust spline is fitted on."""
        return self.points_mm[:len(self.points_mm) - self.samples]

    @property
    def sample_vectors(self) -> list[torch.Tensor]:
        return [vector[len(vector) - self.samples:] for vector in self.vectors]

    @property
    def sample_points_mm(self) -> np.ndarray:
        return self.points_mm[len(self.points_mm) - self.samples:]


@dataclass(frozen=True)
class Matches:
    """Landmarks found in one query: ``points_mm`` ``(L, D)`` world mm, ``scores`` ``(L,)`` (combined similarity at
    the answer) and ``residual_mm`` ``(L,)``: how far the landmark's own best match lies from the answer the
    consistency check gave (large = its own match jumped; NaN without a consistency check)."""

    points_mm: np.ndarray
    scores: np.ndarray
    residual_mm: np.ndarray


def support_points(image: MetaTensor, count: int = DEFAULT_SUPPORT_POINTS) -> np.ndarray:
    """About ``count`` voxels ``(N, D)`` on a regular grid over the foreground of ``image`` (channel 0 above
    ``FOREGROUND`` of its intensity range: the body, not the air around it), the grid step equal in mm along every
    axis."""
    array = image.as_tensor()[0].detach().cpu().float().numpy()
    spacing = np.asarray(affine_spacing_mm(image.affine))
    low, high = float(array.min()), float(array.max())
    foreground = array > low + FOREGROUND * (high - low) if high > low else np.ones(array.shape, dtype=bool)
    volume_mm = float(foreground.sum()) * float(np.prod(spacing))
    step_mm = (volume_mm / max(int(count), 1)) ** (1.0 / array.ndim)
    steps = np.maximum(1, np.round(step_mm / spacing)).astype(int)
    axes = [np.arange(step // 2, size, step) for step, size in zip(steps, array.shape)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, array.ndim)  # (M, D)
    return grid[foreground[tuple(grid.T)]].astype(np.float64)


def _unit_channels(features: torch.Tensor) -> torch.Tensor:
    """``features`` ``(C, *S)`` scaled to unit length along C at every voxel (``F.normalize(dim=0)`` to rounding:
    a sum over rows and one multiply: 0.16 -> 0.10 s for a 16 x 96 x 128 x 96 level on the 2-core CPU)."""
    return features * features.square().sum(dim=0, keepdim=True).clamp_min(1e-24).rsqrt()


def _normalised_grid(voxels: torch.Tensor, padded_shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices ``(L, D)`` -> ``grid_sample`` coordinates (align_corners=False) ``(1, L, 1[, 1], D)``.

    Pixel centres sit at ``(i + 0.5) / P`` of the padded extent at every level, so one grid serves all strides."""
    sizes = torch.as_tensor(padded_shape, dtype=voxels.dtype, device=voxels.device)
    normalised = 2.0 * (voxels + 0.5) / sizes - 1.0  # (L, D), axis order of the array
    dims = voxels.shape[1]
    return normalised.flip(-1).reshape(1, -1, *[1] * (dims - 1), dims)  # (1, L, 1[, 1], D), grid_sample wants x last


def candidate_peaks(maps: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` highest local maxima (over the 3^D neighbourhood) of every map ``(L, *S)``, as voxel indices
    ``(L, count, D)`` (the global arg-max first; repeated when a map has fewer maxima).

    Searched among each map's ``_PEAK_POOL * count`` highest voxels first (their neighbours gathered: a 3^D max pool
    over every voxel costs ~10x more in 3D); a map with fewer maxima there is pooled in full (same answer)."""
    flat = maps.reshape(maps.shape[0], -1)  # (L, N)
    values, index = flat.topk(min(_PEAK_POOL * count, flat.shape[1]), dim=1)  # (L, M), highest first
    cells = torch.stack(torch.unravel_index(index, tuple(maps.shape[1:])), dim=-1)  # (L, M, D)
    dims, sizes = cells.shape[-1], torch.as_tensor(maps.shape[1:], device=maps.device)
    around = cells[:, :, None, :] + offset_cube(torch.arange(-1, 2, device=maps.device), dims)  # (L, M, 3^D, D)
    inside = ((around >= 0) & (around < sizes)).all(-1)
    linear = flat_index(torch.minimum(around.clamp_min(0), sizes - 1), sizes)  # (L, M, 3^D)
    neighbours = flat.gather(1, linear.flatten(1)).reshape(linear.shape).masked_fill(~inside, -torch.inf)
    peak = (values[..., None] >= neighbours).all(-1) & torch.isfinite(values)  # (L, M)
    rank = peak.long().cumsum(dim=1)  # peaks so far, in value order
    found = peak & (rank <= count)
    enough = rank[:, -1] >= min(count, flat.shape[1])
    order = torch.where(found, torch.arange(found.shape[1], device=maps.device), found.shape[1]).sort(dim=1).indices
    result = cells.gather(1, order[:, :count, None].expand(-1, -1, dims))  # (L, count, D) where ``enough``
    if not bool(enough.all()):
        rest = ~enough
        result[rest] = _pooled_peaks(maps[rest], count)
    return result


def _pooled_peaks(maps: torch.Tensor, count: int) -> torch.Tensor:
    """``candidate_peaks`` by a 3^D max pool over every voxel (maps with few local maxima near their top)."""
    dims = maps.ndim - 1
    pooled = Pool["max", dims](kernel_size=3, stride=1, padding=1)(maps[:, None])[:, 0]  # (L, *S)
    flat = torch.where(maps >= pooled, maps, torch.full_like(maps, -torch.inf)).reshape(maps.shape[0], -1)  # (L, N)
    index = flat.topk(min(count, flat.shape[1]), dim=1).indices  # (L, K)
    index = torch.where(torch.isfinite(flat.gather(1, index)), index, index[:, :1])  # fewer maxima: repeat the best
    return torch.stack(torch.unravel_index(index, tuple(maps.shape[1:])), dim=-1)  # (L, K, D)


class OneShotMatcher:
    """Match template landmarks into query images with a network's multi-scale dense features (METHODS 5.6).

    ``levels`` selects entries of ``forward_features`` (default all; e.g. ``[0]`` = bottleneck only, for methods
    that pretrain only the encoder; checked against ``network.feature_info``). ``combine`` is ``"product"`` (CC2D:
    cosine clamped to [0, 1], multiplied; reported as the geometric mean, which has the same arg-max) or ``"mean"``
    (SAM: raw cosine averaged).
    ``roi_size`` is the sliding-window size in voxels (default ``DEFAULT_ROI_SIZE``; rounded up to twice the
    network's divisor so that every window starts on the coarsest grid). ``candidates``: how many local maxima of
    the combined map per landmark are re-scored on the feature field (``refine``). ``search``: ``"coarse-to-fine"``
    (each finer level searched only within two cells of the coarser levels' answer) or ``"global"`` (the arg-max
    of the combined map over the whole image). ``consistency``: ``"thin-plate"`` (``support`` grid points of the
    template's foreground are matched too; each landmark is read off a robust thin-plate spline through all
    matches, ``smoothing`` default ``SPLINE_SMOOTHING``), ``"outliers"`` (the same spline, but a landmark whose
    own match is an inlier of it keeps that match), ``"dense"`` (the spline refined by a dense feature registration
    of ``samples`` random template voxels, ``feature_registration.register_features``, every landmark read off
    it), ``"none"`` (each landmark's own best match) or None (``DEFAULT_CONSISTENCY`` of the image's dimension).
    ``pyramid``: working-spacing factors the image is embedded at (default ``(1,)``): at factor ``f`` the image is
    averaged over ``f^D`` voxel blocks before the network sees it (``f`` times the receptive field in mm); its levels
    join the others as levels of stride ``f`` times theirs.
    ``amp``: ``"off"`` (float32) or ``"bf16"`` (the network's forward pass autocast to bfloat16; ``AMP_MODES``); the
    features are compared in float32 either way.
    """

    def __init__(self, network: nn.Module, *, levels: Sequence[int] | None = None, combine: str = "product",
                 roi_size: int | Sequence[int] | None = None, candidates: int = 4, search: str = "global",
                 consistency: str | None = None, support: int = DEFAULT_SUPPORT_POINTS,
                 smoothing: float | None = None, pyramid: Sequence[int] = (1,), device: str | torch.device = "cpu",
                 amp: str = "off", samples: int = DEFAULT_SAMPLES):
        look_up(combine, COMBINE_MODES, what="combine mode", path="combine")
        look_up(amp, AMP_MODES, what="precision", path="--amp")
        look_up(search, SEARCH_MODES, what="search", path="--search")
        look_up(consistency or "none", CONSISTENCY_MODES, what="consistency check", path="--consistency")
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.levels = None if levels is None else check_levels(levels, len(network.feature_info))
        self.combine = combine
        self.roi_size = roi_size
        self.candidates = int(candidates)
        self.search = search
        self.consistency = consistency
        if int(support) < 1:
            raise InputError(f"the number of support points must be >= 1, got {support}")
        self.support = int(support)
        if int(samples) < 1:
            raise InputError(f"the number of dense registration samples must be >= 1, got {samples}")
        self.samples = int(samples)
        self.smoothing = smoothing
        self.pyramid = check_pyramid(pyramid, "--pyramid")
        self.amp = amp

    # ------------------------------------------------------------------------------------------------ embedding
    def _windows(self, padded_shape: Sequence[int]) -> SlidingWindowInferer | None:
        """The sliding-window inferer over an image of ``padded_shape``; None when one window covers it (the
        network then runs on the whole image directly: the same features, without the window bookkeeping, which
        cost a third of a 3D embedding)."""
        dims, divisor = len(padded_shape), 2 * int(self.network.min_size_divisor)
        roi = self.roi_size if self.roi_size is not None else DEFAULT_ROI_SIZE[dims]
        roi = [int(roi)] * dims if np.isscalar(roi) else [int(r) for r in roi]
        roi = [min(math.ceil(r / divisor) * divisor, size) for r, size in zip(roi, padded_shape)]
        if roi == [int(size) for size in padded_shape]:
            return None
        return SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=0.5, mode="gaussian")

    def _precision(self) -> contextlib.AbstractContextManager:
        """The network's forward-pass precision (``amp``)."""
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def embed(self, image: MetaTensor) -> Embedding:
        """Features of ``image`` ``(C, *S)`` (already prepared: oriented, resampled, in [0, 1]): the chosen levels
        in ``levels`` order, or with several ``pyramid`` factors every factor's, coarse -> fine by stride."""
        shape = tuple(int(s) for s in image.shape[1:])
        # every factor's image divisible by the network's divisor (windows then start on its coarsest grid) and the
        # support searches' strides, no more: the network pays for padded voxels (90x108x94 -> 96x112x96 in 3D)
        divisor = math.lcm(int(self.network.min_size_divisor) * math.lcm(*self.pyramid), _PAD_MULTIPLE)
        padded = convert_to_tensor(DivisiblePad(k=divisor, mode="constant", method="end")(image.as_tensor().float()),
                                   track_meta=False)  # (C, *P)
        padded_shape = tuple(int(s) for s in padded.shape[1:])
        pool = Pool["avg", len(shape)]

        def fine_first(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # MONAI 1.6 reuses the window weights resized for one output for the next: feed outputs fine -> coarse
            with self._precision():
                return tuple(level.float() for level in reversed(self.network.forward_features(x)))

        features = []
        for factor in self.pyramid:
            # block means: voxel j of factor f sits at (j + 0.5) f - 0.5 of the padded grid, the stride-f convention
            scaled = padded[None] if factor == 1 else pool(kernel_size=factor)(padded[None])  # (1, C, *P / f)
            windows = self._windows(scaled.shape[2:])
            scaled = scaled.to(self.device)
            outputs = fine_first(scaled) if windows is None else windows(scaled, fine_first)
            levels = list(reversed(outputs))  # coarse -> fine, each (1, C_l, *P / (f * stride_l))
            chosen = levels if self.levels is None else [levels[level] for level in self.levels]
            features += [_unit_channels(level[0]) for level in chosen]  # (C_l, *P_l), float32 (fine_first)
        if len(self.pyramid) > 1:  # coarse -> fine across factors (stable: on ties the factor-1 level first)
            features.sort(key=lambda level: level.shape[1])
        affine = torch.as_tensor(image.affine, dtype=torch.float64)
        return Embedding(features, affine, shape, padded_shape)

    # ------------------------------------------------------------------------------------------------ matching
    def template_vectors(self, template: Embedding, points_mm: np.ndarray) -> list[torch.Tensor]:
        """Unit feature vectors ``(L, C_l)`` per level, sampled (bi/trilinearly) at the landmarks ``(L, D)`` mm."""
        voxels = torch.as_tensor(template.to_voxel(points_mm), dtype=torch.float32, device=self.device)
        grid = _normalised_grid(voxels, template.padded_shape)  # (1, L, 1[, 1], D)
        vectors = []
        for level in template.features:
            sampled = F.grid_sample(level[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
            # contiguous rows: an einsum with the transposed view was 14x slower in the vote (4.4 vs 0.3 ms)
            vectors.append(_unit_channels(sampled.reshape(level.shape[0], -1)).T.contiguous())  # (L, C_l)
        return vectors

    def reference(self, template: Embedding, image: MetaTensor, points_mm: np.ndarray) -> Reference:
        """The ``Reference`` of a template: its landmarks ``(L, D)`` mm and, with a consistency check, the
        ``support_points`` of its ``image`` (the image ``template`` embeds); with the dense check also ``samples``
        random voxels of it (``sample_voxels``, seed 0)."""
        landmarks = np.asarray(points_mm, dtype=np.float64).reshape(-1, template.spatial_dims)
        points, samples = landmarks, 0
        mode = self.consistency or DEFAULT_CONSISTENCY[template.spatial_dims]
        if mode != "none":
            points = np.concatenate([landmarks, template.to_world(support_points(image, self.support))])
        if mode == "dense":
            dense = template.to_world(sample_voxels(template.shape, self.samples))
            points, samples = np.concatenate([points, dense]), len(dense)
        return Reference(self.template_vectors(template, points), points, landmarks=len(landmarks), samples=samples)

    def combine_levels(self, cosines: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-level cosine maps (same shape) -> combined score: geometric mean of the clamped cosines (product
        mode, same arg-max as CC2D's product) or their mean (SAM)."""
        if self.combine == "product":
            return torch.stack([c.clamp(min=1e-6, max=1.0).log() for c in cosines]).mean(dim=0).exp()
        return torch.stack(list(cosines)).mean(dim=0)

    def combined_maps(self, query: Embedding, vectors: Sequence[torch.Tensor], stride: int = 1) -> torch.Tensor:
        """``combine_levels`` of the cosine maps of the template ``vectors`` on every ``stride``-th voxel of the
        padded grid, ``(L, *P / stride)``, of the first ``len(vectors)`` levels (coarse first), in place: each
        level's cosine (clamped to [1e-6, 1] in product mode) upsampled to the grid and multiplied into (product) or
        added to (mean) the running result, then the geometric or arithmetic mean (``(prod c)^(1/n)`` equals
        ``exp(mean log c)`` without a log, an exp and a stack of every level's map). Levels finer than the grid have
        their features sampled on it first."""
        size = [s // stride for s in query.padded_shape]
        mode = _LINEAR[query.spatial_dims]
        total = None
        for level, vector in zip(query.features, vectors):
            if level.shape[1] > size[0]:  # finer than the evaluation grid: features sampled there, then compared
                level = _unit_channels(F.interpolate(level[None], size=size, mode=mode, align_corners=False)[0])
            term = torch.einsum("lc,c...->l...", vector, level)  # (L, *P_l)
            if self.combine == "product":
                term = term.clamp_(0.0, 1.0)  # CC2D: negative similarity is no evidence
            if list(term.shape[1:]) != size:
                term = F.interpolate(term[None], size=size, mode=mode, align_corners=False)[0]  # (L, *P / stride)
            if self.combine == "product":
                term = term.clamp_(1e-6, 1.0)
            total = term if total is None else (total.mul_(term) if self.combine == "product" else total.add_(term))
        return total.pow_(1.0 / len(vectors)) if self.combine == "product" else total.div_(len(vectors))

    def similarity(self, query: Embedding, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Combined similarity maps ``(L, *S)`` of the template ``vectors`` over the query's grid."""
        return self.combined_maps(query, vectors)[(slice(None), *[slice(0, s) for s in query.shape])]  # (L, *S)

    def _searched_maps(self, query: Embedding, templates: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """Combined maps ``(L, *S)`` averaged over templates, limited (``-inf`` elsewhere) to where ``search``
        allows the answer: everywhere (global), or the window each finer level leaves (coarse-to-fine)."""
        crop = (slice(None), *[slice(0, s) for s in query.shape])

        def coarsest(count: int) -> torch.Tensor:  # the maps of the ``count`` coarsest levels, template mean
            return torch.stack([self.combined_maps(query, vectors[:count]) for vectors in templates]).mean(dim=0)[crop]

        if self.search == "global" or len(query.features) == 1:
            return coarsest(len(query.features))
        strides = [query.padded_shape[0] // level.shape[1] for level in query.features]
        allowed = None
        for count in range(1, len(strides) + 1):
            maps = coarsest(count)
            if allowed is not None:
                maps = torch.where(allowed, maps, torch.full_like(maps, -torch.inf))
            if count < len(strides):  # the next level searches within two cells of this level around its answer
                centres = torch.as_tensor(peak_positions(maps, subpixel=False)[0], dtype=torch.float32,
                                          device=maps.device)
                allowed = _ball(query.shape, centres, 2.0 * strides[count - 1] * torch.ones(len(centres),
                                                                                             device=maps.device))
        return maps

    def _scores_at(self, query: Embedding, templates: Sequence[Sequence[torch.Tensor]],
                   voxels: torch.Tensor) -> torch.Tensor:
        """Combined scores ``(L, K)`` at candidate voxels ``(L, K, D)``, from the query's feature field interpolated
        at each candidate (so a query equal to the template scores exactly 1 at the template's sub-pixel point)."""
        count, candidates, dims = voxels.shape
        grid = _normalised_grid(voxels.reshape(-1, dims), query.padded_shape)  # (1, L*K, 1[, 1], D)
        per_template = []
        for vectors in templates:
            cosines = []
            for level, vector in zip(query.features, vectors):
                sampled = F.grid_sample(level[None], grid, mode="bilinear", padding_mode="border",
                                        align_corners=False)  # (1, C_l, L*K, 1[, 1])
                field = sampled.reshape(level.shape[0], count, candidates)  # (C_l, L, K)
                # the dot product scaled by 1 / |field| instead of normalising a copy of the field first: the same
                # cosines to rounding, 2.3 -> 0.1 ms for 16 x 128 x 100 samples (F.normalize(dim=0) is slow here)
                inverse_norm = field.square().sum(dim=0).clamp_min(1e-24).rsqrt()  # (L, K)
                cosines.append(torch.einsum("lc,clk->lk", vector, field) * inverse_norm)  # (L, K)
            per_template.append(self.combine_levels(cosines))
        return torch.stack(per_template).mean(dim=0)  # (L, K)

    def refine(self, query: Embedding, templates: Sequence[Sequence[torch.Tensor]], starts: torch.Tensor,
               radius_voxels: float = 1.0, steps: int = 4, passes: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """Sub-pixel search from candidate voxels ``starts`` ``(L, K, D)``: ``passes`` rounds of a ``(2*steps+1)^D``
        grid, the first spanning ``+-radius_voxels`` around every candidate, each next one a ``steps``-times finer
        grid around the best point so far. Returns voxels ``(L, D)`` and their scores ``(L,)``."""
        dims = starts.shape[-1]
        best = starts.to(device=self.device, dtype=torch.float32)  # (L, K, D)
        upper = torch.as_tensor([s - 1 for s in query.shape], dtype=torch.float32, device=self.device)
        step = radius_voxels / steps
        offsets_1d = torch.arange(-steps, steps + 1, dtype=torch.float32, device=self.device)
        unit = offset_cube(offsets_1d, dims)  # (M, D)
        rows = torch.arange(best.shape[0], device=self.device)
        scores = None
        for _ in range(passes):
            candidates = best[:, :, None, :] + step * unit[None, None]  # (L, K, M, D)
            candidates = torch.minimum(candidates.clamp(min=0.0), upper).flatten(1, 2)  # (L, K*M, D)
            values = self._scores_at(query, templates, candidates)  # (L, K*M)
            scores, choice = values.max(dim=1)
            best = candidates[rows, choice][:, None, :]  # (L, 1, D)
            step /= steps
        return best[:, 0].double().cpu().numpy(), scores.double().cpu().numpy()

    def match_points(self, query: Embedding, vectors: Sequence[torch.Tensor], stride: int | None = None) -> np.ndarray:
        """Voxels ``(N, D)`` of the best match of every support vector: the best local maxima of its combined map on
        a grid of ``stride`` voxels (default ``_SUPPORT_STRIDE``: the spline averages many matches, so a coarser
        search is enough and 2^D times cheaper; it must divide the padded grid), then ``refine`` on the feature
        field within +-``stride`` voxels; a chunk of maps at a time."""
        stride = _SUPPORT_STRIDE if stride is None else int(stride)
        if stride < 1 or any(size % stride for size in query.padded_shape):
            raise ValueError(f"the support search stride must divide the padded grid {tuple(query.padded_shape)}, "
                             f"got {stride}")
        coarse = [s // stride for s in query.padded_shape]
        crop = (slice(None), *[slice(0, math.ceil(s / stride)) for s in query.shape])
        chunk = max(1, _SUPPORT_MAP_VOXELS // int(np.prod(coarse)))
        found = []
        for start in range(0, vectors[0].shape[0], chunk):
            part = [vector[start:start + chunk] for vector in vectors]
            maps = self.combined_maps(query, part, stride)[crop]
            starts = (candidate_peaks(maps, self.candidates).float() + 0.5) * stride - 0.5  # full-grid voxels
            found.append(self.refine(query, [part], starts, radius_voxels=float(stride), steps=2, passes=2)[0])
        return np.concatenate(found) if found else np.zeros((0, query.spatial_dims))

    def match(self, references: Sequence[Reference], query: Embedding) -> Matches:
        """The landmarks of one or more templates' ``references`` (same landmarks, same order) in ``query``.

        Every landmark's own best match: the best local maxima of its combined map (averaged over templates, an
        ensemble; within the ``search`` windows), re-scored and refined on the feature field (``refine``). With
        a consistency check the support points are matched too, a robust thin-plate spline from each template's
        points to the matches gives each landmark's answer (``"outliers"``: only where the landmark's own match is
        an outlier of the spline; ``"dense"``: off the spline refined by a dense feature registration), and several
        templates vote by the median."""
        landmark_vectors = [reference.landmark_vectors for reference in references]
        maps = self._searched_maps(query, landmark_vectors)  # (L, *S)
        voxels, scores = self.refine(query, landmark_vectors, candidate_peaks(maps, self.candidates))
        own = query.to_world(voxels)  # (L, D)
        mode = self.consistency or DEFAULT_CONSISTENCY[query.spatial_dims]
        too_few = [len(reference.spline_points_mm) for reference in references
                   if len(reference.spline_points_mm) < own.shape[1] + 2]
        if mode == "none" or too_few:
            if mode != "none":
                log.warning("no consistency check: a template has %d landmark and support point(s), a robust fit "
                            "needs %d; each landmark keeps its own best match", too_few[0], own.shape[1] + 2)
            return Matches(own, scores, np.full(len(own), np.nan))
        spacing = np.asarray(affine_spacing_mm(query.affine.numpy()))
        smoothing = self.smoothing if self.smoothing is not None else SPLINE_SMOOTHING[query.spatial_dims]
        answers = []
        for reference in references:
            support = query.to_world(self.match_points(query, reference.support_vectors))  # (N, D)
            fit = robust_spline(reference.spline_points_mm, np.concatenate([own, support]), smoothing=smoothing,
                                min_scale_mm=float(spacing.max()))
            answer = fit.predicted[:len(own)]
            if mode == "outliers":  # a landmark whose own match agrees with the spline keeps it
                answer = np.where(fit.inliers[:len(own), None], own, answer)
            elif mode == "dense" and reference.samples:  # a reference made for another check has none: the spline
                samples = reference.sample_points_mm
                displacement = register_features(reference.sample_vectors, samples, fit.transform(samples),
                                                 query.features, query.padded_shape, query.affine, query.shape)
                landmarks = reference.points_mm[:reference.landmarks]
                answer = fit.transform(landmarks) + displacement(landmarks)
            answers.append(answer)
        points = np.median(np.stack(answers), axis=0)  # (L, D): the templates vote
        at = torch.as_tensor(query.to_voxel(points), dtype=torch.float32, device=self.device)[:, None]  # (L, 1, D)
        scores = self._scores_at(query, landmark_vectors, at)[:, 0].double().cpu().numpy()
        return Matches(points, scores, np.linalg.norm(own - points, axis=1))


def _ball(shape: Sequence[int], centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """``(L, *shape)`` True within ``radii`` ``(L,)`` voxels of ``centres`` ``(L, D)`` voxels (clamped into the
    grid); always the voxels nearest each centre."""
    dims = len(shape)
    axes = [torch.arange(size, dtype=torch.float32, device=centres.device) for size in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (D, *S)
    upper = torch.as_tensor([size - 1 for size in shape], dtype=torch.float32, device=centres.device)
    centres = torch.minimum(centres.clamp(min=0.0), upper)
    distance = (grid[None] - centres.reshape(len(centres), dims, *[1] * dims)).pow(2).sum(dim=1).sqrt()  # (L, *S)
    return distance <= radii.clamp(min=0.5 * math.sqrt(dims)).reshape(-1, *[1] * dims)  # half a voxel diagonal
