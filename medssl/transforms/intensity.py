"""Intensity augmentation of a batch of views (image only, never geometry), batched on the training device.

Every sample draws its own factors from one ``torch.Generator``, so results are reproducible. Written here rather
than with MONAI's ``RandScaleIntensity``/``RandAdjustContrast``/... because those randomise once per call for a
single image on the CPU; we need per-sample parameters for a whole batch on the device, and per-sample ranges
(IGU-Aug's per-category brightness/contrast, METHODS 2.6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

Range = tuple[float, float]

#: IGU-Aug's brightness and contrast factor ranges per information category (low, medium, high), METHODS 2.6
INFO_BRIGHTNESS: tuple[Range, Range, Range] = ((0.505, 1.997), (0.505, 1.997), (0.5617, 1.612))
INFO_CONTRAST: tuple[Range, Range, Range] = ((0.340, 2.329), (0.340, 2.329), (0.416, 1.817))


@dataclass(frozen=True)
class IntensityAugmentation:
    """Factor ranges of one view's intensity augmentation (identity ranges switch an operation off).

    Applied in this order to images normalised to [0, 1]: brightness (multiply), contrast (blend with the mean of
    the valid pixels), clip to [0, 1] (ColorJitter semantics), gamma (log-uniform), Gaussian blur (sigma in view
    pixels, with probability ``blur_prob``), multiplicative smooth bias field (``exp`` of a coarse random field
    of std ``bias_field``), additive Gaussian noise (std uniform in ``[0, noise_std]``).
    """

    brightness: Range = (1.0, 1.0)
    contrast: Range = (1.0, 1.0)
    gamma: Range = (1.0, 1.0)
    blur_sigma: Range = (0.0, 0.0)
    blur_prob: float = 0.0
    bias_field: float = 0.0
    noise_std: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self == IntensityAugmentation()


def _uniform(bounds: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of ``bounds`` ``(B, 2)`` uniform in ``[low, high]`` -> ``(B,)``."""
    u = torch.rand(bounds.shape[0], generator=generator, device=bounds.device, dtype=bounds.dtype)
    return bounds[:, 0] + u * (bounds[:, 1] - bounds[:, 0])


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(-1, *[1] * (ndim - 1))  # (B, 1, ...) for broadcasting


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (pixels) per sample ``(B,)``; sigma 0 leaves the sample unchanged."""
    batch, channels, *spatial = image.shape
    dims = len(spatial)
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    safe = sigma.clamp_min(1e-6)[:, None]  # (B, 1)
    kernel = torch.exp(-0.5 * (offsets[None] / safe) ** 2)  # (B, K)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(channels, dim=0)  # (B*C, K)
    conv = getattr(F, f"conv{dims}d")
    out = image.reshape(1, batch * channels, *spatial)  # (1, B*C, *S)
    for axis in range(dims):
        shape = [batch * channels, 1] + [1] * dims
        shape[2 + axis] = kernel.shape[1]
        padding = [0] * dims
        padding[axis] = radius
        out = conv(out, kernel.reshape(shape), padding=padding, groups=batch * channels)  # (1, B*C, *S)
    return out.reshape(image.shape)


def bias_field(shape: Sequence[int], strength: torch.Tensor, generator: torch.Generator | None,
               control_points: int = 4) -> torch.Tensor:
    """Smooth multiplicative fields ``(B, 1, *S)`` = ``exp(strength * coarse Gaussian field)``, interpolated."""
    batch, _, *spatial = shape
    dims = len(spatial)
    coarse = torch.randn((batch, 1, *[control_points] * dims), generator=generator, device=strength.device)
    mode = ("linear", "bilinear", "trilinear")[dims - 1]
    smooth = F.interpolate(coarse, size=spatial, mode=mode, align_corners=True)  # (B, 1, *S)
    return torch.exp(smooth * _per_sample(strength, smooth.ndim))


def augment_intensity(image: torch.Tensor, valid: torch.Tensor, augmentation: IntensityAugmentation,
                      generator: torch.Generator | None = None, *, brightness: torch.Tensor | None = None,
                      contrast: torch.Tensor | None = None) -> torch.Tensor:
    """Augmented copy of ``image`` ``(B, C, *S)``; pixels outside ``valid`` ``(B, 1, *S)`` stay 0.

    ``brightness``/``contrast`` ``(B, 2)`` override the ranges per sample (IGU-Aug categories).
    """
    batch = image.shape[0]
    options = dict(dtype=torch.float32, device=image.device)
    if augmentation.is_identity and brightness is None and contrast is None:
        return image * valid
    mask = valid.to(image.dtype)
    bright = torch.tensor(augmentation.brightness, **options).expand(batch, 2) if brightness is None \
        else brightness.to(**options)
    contr = torch.tensor(augmentation.contrast, **options).expand(batch, 2) if contrast is None \
        else contrast.to(**options)
    out = image * _per_sample(_uniform(bright, generator), image.ndim)
    mean = (out * mask).flatten(1).sum(1) / (mask.flatten(1).sum(1) * image.shape[1]).clamp_min(1)  # (B,)
    mean = _per_sample(mean, image.ndim)
    out = ((out - mean) * _per_sample(_uniform(contr, generator), image.ndim) + mean).clamp(0, 1)
    log_gamma = torch.tensor(augmentation.gamma, **options).log().expand(batch, 2)
    out = out.pow(_per_sample(_uniform(log_gamma, generator).exp(), image.ndim))
    if augmentation.blur_prob > 0 and augmentation.blur_sigma[1] > 0:
        sigma = _uniform(torch.tensor(augmentation.blur_sigma, **options).expand(batch, 2), generator)
        applied = torch.rand(batch, generator=generator, **options) < augmentation.blur_prob
        out = gaussian_blur(out, sigma * applied)
    if augmentation.bias_field > 0:
        out = out * bias_field(out.shape, torch.full((batch,), augmentation.bias_field, **options), generator)
    if augmentation.noise_std > 0:
        std = torch.rand(batch, generator=generator, **options) * augmentation.noise_std
        out = out + torch.randn(out.shape, generator=generator, **options) * _per_sample(std, out.ndim)
    return out * mask
