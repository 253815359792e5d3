"""One-shot label propagation: a template's label map carried to a new image by dense feature correspondence, no
training (``medssl segment oneshot``).

Coarse to fine, in two stages:

1. **Where** (a feature-driven registration): about ``support`` points on the template's foreground are matched into
   the query as landmarks are (``OneShotMatcher``: best local maxima of their combined similarity maps, refined on
   the feature field), and a robust smoothing thin-plate spline from the matches back to the template points
   (``robust_spline``: least-median affine, then spline refits without the outliers) gives, for every query voxel,
   its template position.
2. **Refined** (a smooth vote): each query cell of a ``stride`` grid compares its features on the ``vote_levels``
   finest levels with the template's within ``window`` voxels of that position, weighted by a softmax of the
   combined similarity (``temperature``). With
   ``vote="positions"`` (default) the weighted mean template position is interpolated to every query voxel and the
   template's one-hot labels are read there (thin structures survive, as in a registration); with ``"labels"`` the
   labels themselves vote and the class probabilities are interpolated.

Written here because MONAI and SimpleITK propagate labels by intensity registration only (the baseline:
``registration_labels``), and self-supervised feature matchers (SAM-style anatomical embeddings) give points, not
label maps.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from medssl.data.geometry import spacing_mm as affine_spacing_mm
from medssl.data.inputs import resolve_images
from medssl.data.readers import check_image_shape, image_key, label_file_name, load_image, save_label_map
from medssl.errors import InputError
from medssl.matching.baselines import register, to_sitk
from medssl.matching.consistency import robust_spline
from medssl.matching.oneshot import (DEFAULT_SUPPORT_POINTS, SPLINE_SMOOTHING, Embedding, OneShotMatcher,
                                     support_points)
from medssl.matching.run import checkpoint_input, image_preparer, method_matcher, network_fit
from medssl.outputs import check_output
from medssl.registry import look_up
from medssl.transforms.preprocess import Preprocessing

log = logging.getLogger(__name__)

#: the vote's defaults per spatial dims: grid stride (voxels), search window (+- voxels of the template grid), and
#: the softmax temperature; chosen on the seed-0 2D/3D benchmark populations (docs/segmentation.md)
STRIDE, WINDOW, TEMPERATURE = {2: 2, 3: 2}, {2: 3, 3: 2}, 0.02
#: how many of the finest levels the vote compares, per spatial dims (the coarse ones barely change within a window
#: and hold most channels; 2026-12-04: 3D mean Dice 0.768 -> 0.796 and 26.3 -> 10.4 s per volume against every
#: level, 2D 0.814 -> 0.820 and 0.84 -> 0.51 s; benchmarks.bench_propagate, docs/segmentation.md)
VOTE_LEVELS = {2: 2, 3: 2}
#: the grid stride (voxels) the support points are searched on, per spatial dims (``OneShotMatcher.match_points``)
SUPPORT_STRIDE = {2: 4, 3: 4}
VOTES = ("positions", "labels")
_LINEAR = {2: "bilinear", 3: "trilinear"}
_CHUNK = 4096  # query positions voted at once


@dataclass(frozen=True)
class Propagated:
    """Class probabilities ``(K, *S)`` on the query's grid (``probabilities.affine`` = the query's) and how well the
    support points agreed with the spline (``inlier_fraction``; ``scale_mm``: their robust residual scale)."""

    probabilities: MetaTensor
    inlier_fraction: float
    scale_mm: float

    @property
    def labels(self) -> MetaTensor:
        """The arg-max label map ``(1, *S)`` (int64) on the query's grid."""
        labels = self.probabilities.as_tensor().argmax(dim=0, keepdim=True)
        return MetaTensor(labels, affine=self.probabilities.affine)


def _cells(shape: Sequence[int], stride: int) -> list[int]:
    """How many ``stride`` cells tile ``shape`` per axis (the last one may reach past the edge)."""
    return [math.ceil(size / stride) for size in shape]


def _voxel_grid(shape: Sequence[int], stride: int, device: torch.device) -> torch.Tensor:
    """The centres ``(N, D)`` (fractional voxel indices) of the ``stride`` cells tiling ``shape``, row-major."""
    axes = [(stride - 1) / 2 + stride * torch.arange(count, dtype=torch.float32, device=device)
            for count in _cells(shape, stride)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def dense_features(embedding: Embedding, vote_levels: int | None = None) -> list[torch.Tensor]:
    """The unit features of the ``vote_levels`` finest levels (None: every level) at every voxel of the image,
    flattened voxel-major: ``(N, C_l)`` per level (the values ``OneShotMatcher.template_vectors`` samples at whole
    voxel indices; a voxel's vector is contiguous, so gathering the candidates of a vote reads whole rows)."""
    crop = tuple(slice(0, s) for s in embedding.shape)
    dense = []
    for level in _finest(embedding.features, vote_levels):
        fine = F.interpolate(level[None], size=list(embedding.padded_shape), mode=_LINEAR[embedding.spatial_dims],
                             align_corners=False)[0][(slice(None), *crop)]
        dense.append(F.normalize(fine.reshape(level.shape[0], -1), dim=0).T.contiguous())
    return dense


def _finest(levels: Sequence, count: int | None) -> list:
    """The ``count`` finest of ``levels`` (ordered coarse -> fine); all of them for None or a larger ``count``."""
    if count is not None and count < 1:
        raise ValueError(f"need vote_levels >= 1 (None: VOTE_LEVELS of the dimension), got {count}")
    return list(levels) if count is None else list(levels)[-count:]


def resolve_vote_levels(vote_levels: int | None, spatial_dims: int) -> int:
    """``vote_levels``, or ``VOTE_LEVELS`` of the dimension for None."""
    return VOTE_LEVELS[spatial_dims] if vote_levels is None else int(vote_levels)


def _one_hot(label: torch.Tensor, classes: int) -> torch.Tensor:
    """``(1, *S)`` integer labels -> ``(K, *S)`` float one-hot."""
    return F.one_hot(label[0].long().clamp(0, classes - 1), classes).movedim(-1, 0).float()


def propagate_labels(matcher: OneShotMatcher, template: MetaTensor, template_label: MetaTensor, query: MetaTensor, *,
                     classes: int | None = None, stride: int | None = None, window: int | None = None,
                     temperature: float = TEMPERATURE, vote: str = "positions", vote_levels: int | None = None,
                     support_stride: int | None = None, template_embedding: Embedding | None = None,
                     query_embedding: Embedding | None = None,
                     template_features: list[torch.Tensor] | None = None) -> Propagated:
    """The template's labels on the query's grid (both images prepared alike, one physical scale; the label map on
    the template's grid). ``classes``: the number of classes (default: 1 + the template's largest label);
    ``stride``, ``window``, ``vote_levels`` (None: ``STRIDE``/``WINDOW``/``VOTE_LEVELS`` of the dimension; all levels
    when ``vote_levels`` >= their number), ``temperature`` and ``vote`` (``VOTES``): the refinement (module
    docstring); ``support_stride`` (None: ``SUPPORT_STRIDE`` of the dimension): the grid the support points are
    searched on. Embeddings already computed may be passed in, and the template's ``dense_features`` of the voting
    levels (computed once for many queries: in 3D they cost about as much as the support matching).
    Faster at some cost in Dice: a coarser ``stride`` and fewer ``matcher.support`` points (docs/segmentation.md)."""
    look_up(vote, VOTES, what="vote", path="vote")
    dims = query.ndim - 1
    stride = STRIDE[dims] if stride is None else int(stride)
    window = WINDOW[dims] if window is None else int(window)
    if stride < 1 or window < 0 or temperature <= 0:
        raise ValueError(f"need stride >= 1, window >= 0 and temperature > 0, got {stride}, {window}, {temperature}")
    vote_levels = resolve_vote_levels(vote_levels, dims)
    device = matcher.device
    labels = template_label.as_tensor().to(device)
    classes = int(classes or int(labels.max()) + 1)
    template_embedding = template_embedding or matcher.embed(template)
    query_embedding = query_embedding or matcher.embed(query)

    # 1. where: support matches -> a robust spline query mm -> template mm
    support_mm = template_embedding.to_world(support_points(template, matcher.support))  # (P, D)
    vectors = matcher.template_vectors(template_embedding, support_mm)
    support_stride = SUPPORT_STRIDE[dims] if support_stride is None else int(support_stride)
    matched_mm = query_embedding.to_world(matcher.match_points(query_embedding, vectors, support_stride))  # (P, D)
    spacing = np.asarray(affine_spacing_mm(query_embedding.affine.numpy()))
    fit = robust_spline(matched_mm, support_mm, smoothing=SPLINE_SMOOTHING[dims], min_scale_mm=float(spacing.max()))
    query_voxels = _voxel_grid(query_embedding.shape, stride, device)  # (N, D)
    here_mm = query_embedding.to_world(query_voxels.double().cpu().numpy())  # (N, D) world mm of the cell centres
    pulled_mm = fit.transform(here_mm)  # (N, D) their template positions
    centres = torch.as_tensor(template_embedding.to_voxel(pulled_mm), dtype=torch.float32, device=device)

    # 2. refined: a softmax vote within `window` voxels of each position, by feature similarity
    offsets = torch.as_tensor(list(itertools.product(range(-window, window + 1), repeat=dims)), device=device)  # (M, D)
    shape_t = torch.as_tensor(template_embedding.shape, device=device)
    dense_t = template_features or dense_features(template_embedding, vote_levels)  # per level (N_t, C_l)
    voting = replace(query_embedding, features=_finest(query_embedding.features, vote_levels))  # sampled per cell
    if len(dense_t) != len(voting.features):
        raise ValueError(f"template_features hold {len(dense_t)} level(s), the vote compares {len(voting.features)}: "
                         "compute them with dense_features(template_embedding, vote_levels)")
    strides_t = torch.as_tensor([int(np.prod(template_embedding.shape[a + 1:])) for a in range(dims)], device=device)
    flat_labels = labels.reshape(-1).long().clamp(0, classes - 1)  # (N_t,)
    votes = []
    for start in range(0, len(query_voxels), _CHUNK):
        count = len(query_voxels[start:start + _CHUNK])
        query_vectors = matcher.template_vectors(voting, here_mm[start:start + _CHUNK])  # [(n, C_l)]
        candidates = centres[start:start + _CHUNK].round().long()[:, None] + offsets  # (n, M, D) template voxels
        candidates = torch.minimum(candidates.clamp(min=0), shape_t - 1)
        index = (candidates * strides_t).sum(dim=-1)  # (n, M) flat template voxel
        cosines = [torch.einsum("nc,nmc->nm", q, t[index]) for q, t in zip(query_vectors, dense_t)]
        weights = torch.softmax(matcher.combine_levels(cosines) / temperature, dim=1)  # (n, M)
        if vote == "labels":
            votes.append(torch.zeros(count, classes, device=device).scatter_add_(1, flat_labels[index], weights))
        else:  # the weighted mean template position
            votes.append(torch.einsum("nm,nmd->nd", weights, candidates.float()))
    cells = _cells(query_embedding.shape, stride)
    coarse = torch.cat(votes).T.reshape(-1, *cells)  # (K or D, *S / stride)
    if vote == "labels":
        probabilities = _upsample(coarse, query_embedding.shape, stride)
    else:  # the template's one-hot labels read (linearly) at the position field, upsampled to every voxel
        field = _upsample(coarse, query_embedding.shape, stride)  # (D, *S) template voxels
        probabilities = _read_at(_one_hot(labels, classes), field)
    inliers = float(np.mean(fit.inliers))
    log.debug("label propagation: %.0f %% of %d support matches inliers (scale %.2f mm)", 100 * inliers,
              len(support_mm), fit.scale_mm)
    return Propagated(MetaTensor(probabilities.cpu(), affine=query.affine), inliers, float(fit.scale_mm))


def _read_at(values: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
    """``values`` ``(K, *S_t)`` read (bi/trilinearly, border-clamped) at template voxel positions ``(D, *S)``."""
    dims = voxels.shape[0]
    sizes = torch.as_tensor(values.shape[1:], dtype=voxels.dtype, device=voxels.device).reshape(dims, *[1] * dims)
    grid = (2.0 * (voxels + 0.5) / sizes - 1.0).flip(0).movedim(0, -1)  # (*S, D), x first for grid_sample
    return F.grid_sample(values[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0]


def _upsample(coarse: torch.Tensor, shape: Sequence[int], stride: int) -> torch.Tensor:
    """Probabilities at the centres of ``stride`` cells ``(K, *C)`` -> every voxel of ``shape`` ``(K, *S)`` (linear
    between the centres, constant beyond the outer ones: ``align_corners=False`` puts the centres exactly there)."""
    if stride == 1:
        return coarse
    sizes = [count * stride for count in coarse.shape[1:]]  # >= shape: the cells tile past the edge
    fine = F.interpolate(coarse[None], size=sizes, mode=_LINEAR[len(shape)], align_corners=False)[0]
    return fine[(slice(None), *[slice(0, s) for s in shape])]


def registration_labels(template: MetaTensor, template_label: MetaTensor, query: MetaTensor, *,
                        classes: int | None = None, bspline_spacing_mm: float | None = 32.0,
                        iterations: int = 30, samples: int = 20000) -> MetaTensor:
    """The baseline: the template's labels warped onto the query's grid by SimpleITK registration (affine then
    B-spline, Mattes MI, as ``baselines.register``; the query is the fixed image) with nearest-neighbour
    interpolation; returned one-hot ``(K, *S)`` like ``propagate_labels``' probabilities."""
    import SimpleITK as sitk

    transform = register(query, template, bspline_spacing_mm=bspline_spacing_mm, iterations=iterations,
                         samples=samples)  # query mm -> template mm
    label_image = to_sitk(MetaTensor(template_label.as_tensor().float(), affine=template_label.affine))
    warped = sitk.Resample(label_image, to_sitk(query), transform, sitk.sitkNearestNeighbor, 0.0)
    array = sitk.GetArrayFromImage(warped)
    array = array.transpose(*reversed(range(array.ndim)))  # (z, y, x) -> our axis order
    labels = torch.as_tensor(np.rint(array), dtype=torch.long)[None]
    classes = int(classes or int(template_label.max()) + 1)
    return MetaTensor(_one_hot(labels, classes), affine=query.affine)


SEGMENT_METHODS = ("embedding", "registration")


def propagate_labels_files(checkpoint: str | Path | None, template: str | Path, template_label: str | Path,
                           images: Sequence[str | Path], out_dir: str | Path, *, method: str = "embedding",
                           arch: str | None = None, spacing_mm: float | Sequence[float] | None = None,
                           device: str | torch.device = "auto", levels: Sequence[int] | None = None,
                           pyramid: Sequence[int] | None = None, support: int | None = None,
                           stride: int | None = None, window: int | None = None,
                           vote_levels: int | None = None, temperature: float = TEMPERATURE,
                           support_stride: int | None = None, amp: str = "off") -> list[Path]:
    """Write one label map per image of ``images`` (folders, datalists or files) into ``out_dir``
    (``label_file_name``: the input's name and format) with the input's shape and affine: the ``template``'s label
    map ``template_label`` carried over by ``method`` ``embedding`` (``propagate_labels`` with ``checkpoint``, a run
    folder / ``model.pt`` or ``"none"`` = random init of ``arch``) or ``registration`` (``registration_labels``;
    ignores ``checkpoint``). ``spacing_mm``: the pixel size of 2D files without geometry; ``levels`` and
    ``pyramid``: the feature levels matched and the spacing factors embedded at (default: those ``model.pt``
    records); ``amp``: the network's precision and ``support`` its support points (None: ``DEFAULT_SUPPORT_POINTS``;
    ``OneShotMatcher``); ``stride``, ``window``, ``vote_levels``,
    ``temperature``, ``support_stride``: as ``propagate_labels``. Returns the written paths."""
    look_up(method, SEGMENT_METHODS, what="method", path="--method")
    if method != "embedding":
        for name, value in (("--support-points", support), ("--stride", stride)):
            if value is not None:
                log.warning("%s ignored: --method %s has no vote and no support points", name, method)
    template, template_label = Path(template), Path(template_label)
    queries = [image for path in images for image in resolve_images(path)]
    if not queries:
        raise InputError("no images to segment; pass --images PATH")
    names = [label_file_name(path) for path in queries]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise InputError(f"two images would both write '{twice}'; outputs are named after the inputs")
    check_output(out_dir, kind="folder", inputs=[checkpoint_input(checkpoint, method), template, template_label,
                                                 *images, *queries])
    dims = load_image(template, spacing_mm=spacing_mm).ndim - 1
    matcher, preprocessing = method_matcher(method, checkpoint, dims, arch=arch, device=device, levels=levels,
                                            pyramid=pyramid, amp=amp,
                                            support=DEFAULT_SUPPORT_POINTS if support is None else support)
    prepare = image_preparer(preprocessing, template, dims, spacing_mm,
                             network=None if matcher is None else matcher.network)
    spec, fit = Preprocessing.from_options(prepare.keywords), network_fit(None if matcher is None else matcher.network)
    template_image, label = spec.read(template, dims, label_path=template_label)
    check_image_shape(template_image, template, **fit)
    classes = int(label.max()) + 1
    log.info("one-shot segmentation (%s): template %s (%d classes), %d image(s), grid %s mm", method,
             image_key(template), classes, len(queries), tuple(round(s, 4) for s in prepare.keywords["spacing_mm"]))
    template_embedding = matcher.embed(template_image) if matcher is not None else None
    template_features = None
    if matcher is not None:  # the template's, once for every image
        vote_levels = resolve_vote_levels(vote_levels, dims)
        template_features = dense_features(template_embedding, vote_levels)
    written, seconds = [], 0.0
    for path, name in zip(queries, names):
        started = time.perf_counter()
        raw = spec.load(path, dims)  # read once: prepared for matching, and the grid of the output
        query = spec(raw)[0]
        check_image_shape(query, path, **fit)
        if matcher is not None:
            probabilities = propagate_labels(matcher, template_image, label, query, classes=classes, stride=stride,
                                             window=window, temperature=temperature, vote_levels=vote_levels,
                                             support_stride=support_stride,
                                             template_embedding=template_embedding,
                                             template_features=template_features).probabilities
        else:
            probabilities = registration_labels(template_image, label, query, classes=classes)
        seconds += time.perf_counter() - started
        written.append(save_label_map(probabilities, raw, Path(out_dir) / name))
    log.info("%d image(s) segmented in %.1f s (%.2f s per image) -> %s", len(queries), seconds,
             seconds / len(queries), out_dir)
    return written
