"""The one preprocessing of every path (pretraining, fine-tuning, prediction, one-shot matching): ``Preprocessing``,
a typed spec (modality, spacing, intensity window, pixel size of 2D files) recorded in ``model.pt`` and built into one
MONAI dictionary-transform chain: orientation to RAS, resampling to ``spacing_mm`` (labels by nearest neighbour;
a grid already at that spacing is left bit-exact), intensities to [0, 1] by modality preset. Pretraining stores
the prepared scans on disk (``medssl.transforms.prepared``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from monai.data import MetaTensor
from monai.transforms import (Compose, Orientationd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd,
                              Spacingd)

from medssl.data import keys
from medssl.data.readers import load_image, load_label
from medssl.errors import InputError
from medssl.registry import look_up


#: intensity presets: CT is windowed (HU), MR and X-ray are clipped at percentiles; all map to [0, 1]
INTENSITY_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "ct": {"window": (-1000.0, 1000.0)},
    "mr": {"percentiles": (0.5, 99.5)},
    "xray": {"percentiles": (0.5, 99.5)},
}
_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # world axis names of RAS


def _spacing(value: float | Sequence[float] | None, what: str) -> float | tuple[float, ...] | None:
    """``value`` as one positive number or a tuple of them (None stays None); ``InputError`` naming ``what``."""
    if value is None:
        return None
    values = [value] if np.isscalar(value) else list(value)
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        numbers = []
    if not numbers or not all(np.isfinite(v) and v > 0 for v in numbers):
        raise InputError(f"{what} must be one positive number or one per axis, got {value!r}", path=what)
    return numbers[0] if np.isscalar(value) else tuple(numbers)


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes what the network sees, in one place: ``modality`` picks the intensity preset
    (``INTENSITY_PRESETS``) unless ``intensity_window`` (absolute low, high) is given; ``spacing_mm`` is the working
    grid (one value for every axis, one per axis, or None to keep each file's); ``file_spacing_mm`` is the pixel
    size of 2D files without geometry (PNG/JPEG/TIFF; None: 1 mm). ``model.pt`` records ``to_dict()``."""

    modality: str = "mr"
    spacing_mm: float | tuple[float, ...] | None = None
    intensity_window: tuple[float, float] | None = None
    file_spacing_mm: float | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        look_up(self.modality, INTENSITY_PRESETS, what="modality", path="modality")
        object.__setattr__(self, "spacing_mm", _spacing(self.spacing_mm, "spacing_mm"))
        object.__setattr__(self, "file_spacing_mm", _spacing(self.file_spacing_mm, "file_spacing_mm"))
        if self.intensity_window is not None:
            window = tuple(float(v) for v in self.intensity_window)
            if len(window) != 2 or not window[1] > window[0]:
                raise InputError(f"intensity_window must be (low, high) with high > low, got "
                                 f"{tuple(self.intensity_window)}", path="intensity_window")
            object.__setattr__(self, "intensity_window", window)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "Preprocessing":
        """The spec from a mapping holding (some of) its fields and maybe more (a config's ``data`` section, the
        ``preprocessing`` of ``model.pt``); absent or null entries take the defaults."""
        options = options or {}
        return cls(**{f.name: options[f.name] for f in fields(cls) if options.get(f.name) is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples) for ``model.pt`` and YAML."""
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}

    def grid(self, spatial_dims: int) -> list[float] | None:
        """``spacing_mm`` as one value per axis (None: each file keeps its own)."""
        if self.spacing_mm is None:
            return None
        target = [float(self.spacing_mm)] * spatial_dims if np.isscalar(self.spacing_mm) else list(self.spacing_mm)
        if len(target) != spatial_dims:
            raise InputError(f"spacing_mm must be one positive number or {spatial_dims} of them, got "
                             f"{self.spacing_mm}")
        return target

    def transform(self, spatial_dims: int, with_label: bool = False) -> Compose:
        """The MONAI dictionary-transform chain over ``image`` (and ``label``)."""
        names = [keys.IMAGE] + ([keys.LABEL] if with_label else [])
        chain: list[Any] = [Orientationd(keys=names, axcodes="RAS"[:spatial_dims], labels=_LABELS)]
        target = self.grid(spatial_dims)
        if target is not None:
            chain.append(Spacingd(keys=names, pixdim=target, mode=["bilinear", "nearest"][: len(names)]))
        preset = INTENSITY_PRESETS[self.modality]
        window = self.intensity_window if self.intensity_window is not None else preset.get("window")
        if window is not None:
            chain.append(ScaleIntensityRanged(keys=keys.IMAGE, a_min=window[0], a_max=window[1], b_min=0.0,
                                              b_max=1.0, clip=True))
        else:
            lower, upper = preset["percentiles"]
            chain.append(ScaleIntensityRangePercentilesd(keys=keys.IMAGE, lower=lower, upper=upper, b_min=0.0,
                                                         b_max=1.0, clip=True, channel_wise=True))
        return Compose(chain)

    def __call__(self, image: MetaTensor, label: MetaTensor | None = None) -> tuple[MetaTensor, MetaTensor | None]:
        """``image`` ``(C, *S)`` (and its ``label`` ``(1, *S)``, returned as int64) as the network sees them."""
        dims = image.ndim - 1
        data = self.transform(dims, with_label=label is not None)(
            {keys.IMAGE: image, **({keys.LABEL: label} if label is not None else {})})
        if label is not None:
            label = MetaTensor(data[keys.LABEL].as_tensor().round().long(), affine=data[keys.LABEL].affine)
        return data[keys.IMAGE], label

    def load(self, path: str | Path, spatial_dims: int) -> MetaTensor:
        """Read ``path`` as it is (its own grid; 2D files at ``file_spacing_mm``), refusing another dimensionality."""
        image = load_image(path, spacing_mm=self.file_spacing_mm)
        dims = image.ndim - 1
        if dims != spatial_dims:
            raise InputError(f"expected a {spatial_dims}D image (spatial_dims={spatial_dims}), got a {dims}D one of "
                             f"shape {tuple(image.shape[1:])}; use spatial_dims={dims} or other images", path=path)
        return image

    def read(self, path: str | Path, spatial_dims: int,
             label_path: str | Path | None = None) -> tuple[MetaTensor, MetaTensor | None]:
        """Read and prepare ``path`` (and its label map, which must share the image's grid)."""
        raw = self.load(path, spatial_dims)
        label = load_label(label_path, like=raw) if label_path is not None else None
        return self(raw, label)
