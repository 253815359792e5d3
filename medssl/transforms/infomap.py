"""Information maps (IGU-Aug, METHODS 2.3-2.5): local grey-level entropy in bits, its three categories, and
anchor sampling with probability proportional to ``IIE ** alpha``.

The entropy is computed with torch (quantise, compare every voxel's window values pairwise, ``-sum p log2 p``) so
that it runs on any device in 2D and 3D; it equals ``skimage.filters.rank.entropy`` with the same footprint (skimage
runs on the CPU only and takes no physical spacing, hence our own implementation).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from medssl.outputs import save_figure

#: the thresholds of the IGU-Aug code in bits (low < 2 <= medium < 4.5 <= high), the default of the functions here;
#: ``ViewPairSampler`` defaults to the dataset's 20/80 percentiles instead (a 2 mm window rarely reaches 4.5 bits)
DEFAULT_THRESHOLDS_BITS = (2.0, 4.5)
CATEGORY_NAMES = ("low", "medium", "high")
_SLAB_ELEMENTS = 1 << 25  # window values held at once by information_map (128 MB of int32)


def entropy_footprint(spacing_mm: Sequence[float], radius_mm: float) -> torch.Tensor:
    """The window: a bool disk/ball (ellipse/ellipsoid in voxels) of all offsets within ``radius_mm`` (D axes).

    With 1 mm spacing this is ``skimage.morphology.disk(r)`` / ``ball(r)``.
    """
    if radius_mm <= 0 or any(s <= 0 for s in spacing_mm):
        raise ValueError(f"radius_mm and spacing_mm must be positive, got {radius_mm} and {tuple(spacing_mm)}")
    half = [int(math.floor(radius_mm / s + 1e-9)) for s in spacing_mm]
    axes = [torch.arange(-h, h + 1, dtype=torch.float64) * s for h, s in zip(half, spacing_mm)]
    grids = torch.meshgrid(*axes, indexing="ij")  # D tensors (2h+1, ...)
    distance_sq = sum(g**2 for g in grids)
    return distance_sq <= radius_mm**2 * (1 + 1e-9)


def quantise(image: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Intensities in [0, 1] -> integer levels ``0 .. bins-1`` (values outside are clipped)."""
    return (image.float().clamp(0, 1) * (bins - 1)).round().long()


def information_map(image: torch.Tensor, spacing_mm: Sequence[float], radius_mm: float = 2.0,
                    bins: int = 256) -> torch.Tensor:
    """Local grey-level entropy (bits) of an image normalised to [0, 1], same shape as ``image``.

    ``image`` is ``(*S)``, ``(C, *S)`` or ``(B, C, *S)`` with ``D = len(spacing_mm)`` trailing spatial axes; the
    window is :func:`entropy_footprint`. Like skimage's rank filters, only window pixels inside the image count.
    With ``F`` window offsets, each voxel's entropy is ``-sum_j log2(c_j / n) / n`` over its ``n`` neighbours inside
    the image, ``c_j`` counting the neighbours on neighbour ``j``'s grey level: ``F^2`` comparisons per voxel, done
    slab by slab along the first axis (memory ``~F x`` a slab), whatever the number of grey levels.
    """
    dims = len(spacing_mm)
    if image.ndim < dims:
        raise ValueError(f"image has {image.ndim} axes, fewer than the {dims} of spacing_mm")
    spatial = tuple(image.shape[-dims:])
    levels = quantise(image, bins).reshape(-1, *spatial)  # (N, *S)
    footprint = entropy_footprint(spacing_mm, radius_mm)
    half = [k // 2 for k in footprint.shape]
    offsets = (torch.nonzero(footprint) - torch.tensor(half)).tolist()  # (F, D)
    padding = [h for h in reversed(half) for _ in range(2)]  # F.pad order: last axis first
    entropy = torch.zeros((levels.shape[0], *spatial), dtype=torch.float32, device=image.device)  # (N, *S)
    plane = max(1, math.prod(spatial[1:]))
    rows = max(1, _SLAB_ELEMENTS // (len(offsets) * plane))  # slab of the first axis kept in memory at once
    for sample in range(levels.shape[0]):
        padded = F.pad(levels[sample][None, None].to(torch.int32), padding, value=-1)[0, 0]  # outside = -1
        for first in range(0, spatial[0], rows):
            last = min(spatial[0], first + rows)
            windows = [padded[tuple(slice(o + h + (first if axis == 0 else 0),
                                          o + h + (last if axis == 0 else spatial[axis]))
                                    for axis, (o, h) in enumerate(zip(offset, half)))] for offset in offsets]
            neighbours = torch.stack(windows)  # (F, slab...): each voxel's window values
            inside = neighbours >= 0
            count = inside.sum(dim=0).clamp_min(1).float()  # n per voxel
            total = torch.zeros_like(count)
            for j in range(len(offsets)):
                same = (neighbours == neighbours[j]).sum(dim=0).float()  # c_j (outside values never match inside)
                total += torch.where(inside[j], torch.log2(same / count), torch.zeros_like(count))
            entropy[sample, first:last] = -total / count
    return entropy.clamp_min(0).reshape(image.shape)


def info_categories(info: torch.Tensor, thresholds_bits: Sequence[float] = DEFAULT_THRESHOLDS_BITS) -> torch.Tensor:
    """0 (low: info < t0), 1 (medium: t0 <= info < t1) or 2 (high: info >= t1), same shape, int64."""
    low, high = float(thresholds_bits[0]), float(thresholds_bits[1])
    if not low <= high:
        raise ValueError(f"thresholds_bits must be increasing, got {tuple(thresholds_bits)}")
    return (info >= low).long() + (info >= high).long()


def histogram_percentiles(counts: torch.Tensor, max_bits: float,
                          percentiles: Sequence[float] = (20.0, 80.0)) -> tuple[float, float]:
    """Dataset thresholds (bits): the given percentiles of the information values counted in ``counts``, a
    histogram of equal bins over ``[0, max_bits]`` (summed over the scans), each rounded to the nearer edge of its
    bin (within one bin width; and the category of every counted value then follows from the histogram exactly,
    which the category shares rely on). A run never holds every map at once, hence the histogram."""
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    total = float(counts.sum())
    if total <= 0:
        raise ValueError("the information histogram is empty")
    width = max_bits / counts.numel()
    cumulative = torch.cat([counts.new_zeros(1), counts.cumsum(0)]) / total  # (K+1,) at the bin edges
    first = int(torch.nonzero(counts)[0]) + 1
    values = []
    for percentile in percentiles:
        q = min(max(percentile / 100.0, 0.0), 1.0)
        right = int(torch.searchsorted(cumulative, torch.tensor([q], dtype=torch.float64)))
        right = min(max(right, first), counts.numel())  # the first bin that holds values, at the latest the last
        below, inside = float(cumulative[right - 1]), float(cumulative[right] - cumulative[right - 1])
        fraction = 0.0 if inside <= 0 else (q - below) / inside
        values.append((right - 1 + (fraction >= 0.5)) * width)  # the nearer edge of the bin holding the percentile
    return values[0], values[1]


def weights_of(info: torch.Tensor, alpha: float = 0.3, category_ratios: Sequence[float] | None = None,
               thresholds_bits: Sequence[float] = DEFAULT_THRESHOLDS_BITS) -> torch.Tensor:
    """The unnormalised anchor weight of each information value (any shape): ``IIE ** alpha``, or with
    ``category_ratios = (low, medium, high)`` the ratio of the value's category."""
    if category_ratios is None:
        return info.float().clamp_min(0).pow(alpha)
    ratios = torch.as_tensor(category_ratios, dtype=torch.float32, device=info.device)
    return ratios[info_categories(info, thresholds_bits)]


def anchor_weights(info: torch.Tensor, valid: torch.Tensor | None = None, alpha: float = 0.3,
                   category_ratios: Sequence[float] | None = None,
                   thresholds_bits: Sequence[float] = DEFAULT_THRESHOLDS_BITS) -> torch.Tensor:
    """Unnormalised sampling weights ``(B, N)`` over the flattened voxels of ``info`` ``(B, 1, *S)``.

    ``IIE ** alpha`` (exponential map, METHODS 2.5) or, with ``category_ratios = (low, medium, high)``, the
    ratio of each voxel's category (piecewise map); zero outside ``valid``. A sample whose weights are all zero
    falls back to uniform over its valid voxels (or over all voxels when none is valid).
    """
    flat = info.reshape(info.shape[0], -1).float().clamp_min(0)  # (B, N)
    weights = weights_of(flat, alpha, category_ratios, thresholds_bits)
    inside = torch.ones_like(flat, dtype=torch.bool) if valid is None else valid.reshape(flat.shape).bool()
    inside = inside | ~inside.any(dim=1, keepdim=True)  # no valid voxel: every voxel
    weights = weights * inside
    empty = weights.sum(dim=1, keepdim=True) <= 0
    return torch.where(empty, inside.float(), weights)


def sample_anchors(info: torch.Tensor, valid: torch.Tensor | None, n: int, alpha: float = 0.3,
                   generator: torch.Generator | None = None, *, category_ratios: Sequence[float] | None = None,
                   thresholds_bits: Sequence[float] = DEFAULT_THRESHOLDS_BITS) -> torch.Tensor:
    """``n`` voxel indices per sample, ``LongTensor (B, n, D)``, drawn with replacement with probability
    proportional to :func:`anchor_weights` (``IIE ** alpha`` inside ``valid``). ``info``/``valid``: ``(B, 1, *S)``."""
    spatial = tuple(info.shape[2:])
    weights = anchor_weights(info, valid, alpha, category_ratios, thresholds_bits)  # (B, N)
    flat_index = torch.multinomial(weights, n, replacement=True, generator=generator)  # (B, n)
    return torch.stack(torch.unravel_index(flat_index, spatial), dim=-1)  # (B, n, D)


def save_information_png(image: torch.Tensor, info: torch.Tensor, path: str | Path,
                         thresholds_bits: Sequence[float] = DEFAULT_THRESHOLDS_BITS) -> Path:
    """Write a PNG with the image, its information map (bits) and the three categories over the image.

    ``image``/``info``: ``(*S)`` or ``(1, *S)``; a 3D volume shows its middle slice along the last axis.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    def plane(tensor: torch.Tensor):
        tensor = tensor.detach().float().cpu().squeeze()
        while tensor.ndim > 2:
            tensor = tensor[..., tensor.shape[-1] // 2]  # drop the last axis at its middle
        return tensor.T.numpy()  # rows = axis 1, columns = axis 0 (as the 2D readers' x = column)

    picture, entropy = plane(image), plane(info)
    categories = info_categories(torch.from_numpy(entropy), thresholds_bits).numpy()
    figure = Figure(figsize=(12, 4.2))
    axes = figure.subplots(1, 3)
    axes[0].imshow(picture, cmap="gray")
    axes[0].set_title("image")
    shown = axes[1].imshow(entropy, cmap="magma")
    axes[1].set_title("information (bits)")
    figure.colorbar(shown, ax=axes[1], fraction=0.046)
    axes[2].imshow(picture, cmap="gray")
    colours = ListedColormap(["#3b4cc0", "#f7b32b", "#d7263d"])
    axes[2].imshow(categories, cmap=colours, vmin=0, vmax=2, alpha=0.45)
    low, high = thresholds_bits
    axes[2].set_title(f"low < {low:g} <= medium < {high:g} <= high")
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    return save_figure(figure, path, dpi=100)
