"""Scan preprocessing for pretraining (MONAI): orientation to RAS, optional resampling to ``spacing_mm``, intensity
normalisation to [0, 1] by modality preset, and a cache of the decoded scans (memory, optionally disk).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, ScaleIntensityRange, ScaleIntensityRangePercentiles, Spacing

from medssl.data.geometry import spacing_mm as affine_spacing_mm
from medssl.data.readers import image_key, load_image
from medssl.errors import InputError
from medssl.outputs import atomic_writer
from medssl.registry import did_you_mean
from medssl.transforms.infomap import information_map

log = logging.getLogger(__name__)

#: intensity presets: CT is windowed (HU), MR and X-ray are clipped at percentiles; all map to [0, 1]
INTENSITY_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "ct": {"window": (-1000.0, 1000.0)},
    "mr": {"percentiles": (0.5, 99.5)},
    "xray": {"percentiles": (0.5, 99.5)},
}
_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def check_modality(modality: object) -> None:
    """``InputError`` naming the config key unless ``modality`` is one of ``INTENSITY_PRESETS``."""
    if modality not in INTENSITY_PRESETS:
        raise InputError(f"config key 'data.modality': unknown modality '{modality}'"
                         f"{did_you_mean(str(modality), list(INTENSITY_PRESETS))}; "
                         f"choose one of: {', '.join(INTENSITY_PRESETS)}")


def normalise_intensity(image: torch.Tensor, modality: str = "mr",
                        window: Sequence[float] | None = None) -> torch.Tensor:
    """Map intensities to [0, 1] (clipped): ``window`` (absolute low, high) if given, else the modality preset."""
    check_modality(modality)
    preset = INTENSITY_PRESETS[modality]
    window = window if window is not None else preset.get("window")
    if window is not None:
        low, high = float(window[0]), float(window[1])
        if not high > low:
            raise InputError(f"intensity_window must be (low, high) with high > low, got {tuple(window)}")
        return ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(image)
    lower, upper = preset["percentiles"]
    return ScaleIntensityRangePercentiles(lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True,
                                          channel_wise=True)(image)


def preprocess_image(path: str | Path, *, spatial_dims: int, modality: str = "mr",
                     spacing_mm: float | Sequence[float] | None = None,
                     intensity_window: Sequence[float] | None = None,
                     file_spacing_mm: float | Sequence[float] | None = None) -> MetaTensor:
    """Read one scan and return it RAS-oriented, resampled to ``spacing_mm`` (None keeps the file's), in [0, 1].

    ``file_spacing_mm`` is the pixel size of 2D files without geometry (PNG/JPEG/TIFF; default 1 mm).
    """
    image = load_image(path, spacing_mm=file_spacing_mm)
    dims = image.ndim - 1
    if dims != spatial_dims:
        raise InputError(f"expected a {spatial_dims}D image (spatial_dims={spatial_dims}), got a {dims}D one of "
                         f"shape {tuple(image.shape[1:])}; use spatial_dims={dims} or other images", path=path)
    image = Orientation(axcodes="RAS"[:dims], labels=_LABELS)(image)
    if spacing_mm is not None:
        target = [float(spacing_mm)] * dims if isinstance(spacing_mm, (int, float)) else [float(s) for s in spacing_mm]
        if len(target) != dims or not all(s > 0 for s in target):
            raise InputError(f"spacing_mm must be one positive number or {dims} of them, got {spacing_mm}")
        image = Spacing(pixdim=target, mode="bilinear")(image)
    return normalise_intensity(image, modality, intensity_window)


@dataclass
class Scan:
    """One preprocessed scan on the sampling device: ``image (C, *S)`` in [0, 1], ``affine (D+1, D+1)`` float64
    voxel -> world mm, ``info (1, *S)`` its information map in bits (or None)."""

    image: torch.Tensor
    affine: torch.Tensor
    subject: str
    info: torch.Tensor | None = None

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        return affine_spacing_mm(self.affine)


class ScanCache:
    """Preprocessed scans by index, decoded once and kept in memory (on ``device``); with ``cache_dir`` also
    written to disk (``torch.save``), keyed by the file, its size and time, and the preprocessing options.

    ``info_radius_mm`` (None: no maps) adds the information map of each scan, computed once at its resolution.
    """

    def __init__(self, images: Sequence[str | Path], *, spatial_dims: int, device: str | torch.device = "cpu",
                 modality: str = "mr", spacing_mm: float | Sequence[float] | None = None,
                 intensity_window: Sequence[float] | None = None,
                 file_spacing_mm: float | Sequence[float] | None = None, info_radius_mm: float | None = None,
                 info_bins: int = 256, cache_dir: str | Path | None = None):
        if not images:
            raise InputError("no images to sample views from; pass a folder, a datalist or image files")
        self.paths = [Path(p) for p in images]
        self.device = torch.device(device)
        self.options = dict(spatial_dims=spatial_dims, modality=modality, spacing_mm=spacing_mm,
                            intensity_window=intensity_window, file_spacing_mm=file_spacing_mm)
        self.info_radius_mm, self.info_bins = info_radius_mm, info_bins
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._scans: dict[int, Scan] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Scan:
        if index not in self._scans:
            self._scans[index] = self._load(index)
        return self._scans[index]

    def load_all(self) -> None:
        """Read and prepare every scan now, so that a bad file (unreadable, non-finite, constant, wrong
        dimensionality) is refused before training starts rather than when it is first sampled."""
        for index in range(len(self)):
            self[index]
        log.info("%d scan(s) read and checked", len(self))

    def _disk_path(self, path: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        stat = path.stat()
        text = repr((str(path.absolute()), stat.st_size, stat.st_mtime_ns, sorted(self.options.items()),
                     self.info_radius_mm, self.info_bins))
        return self.cache_dir / f"{image_key(path)}-{hashlib.sha1(text.encode()).hexdigest()[:16]}.pt"

    def _load(self, index: int) -> Scan:
        path = self.paths[index]
        stored = self._disk_path(path)
        if stored is not None and stored.is_file():
            content = torch.load(stored, map_location=self.device, weights_only=True)
            return Scan(content["image"], content["affine"], image_key(path), content.get("info"))
        image = preprocess_image(path, **self.options)
        affine = torch.as_tensor(image.affine, dtype=torch.float64)
        scan = Scan(image.as_tensor().float().to(self.device), affine.to(self.device), image_key(path))
        if self.info_radius_mm is not None:
            grey = scan.image.mean(dim=0, keepdim=True)  # (1, *S)
            scan.info = information_map(grey, scan.spacing_mm, self.info_radius_mm, self.info_bins)
        if stored is not None:
            with atomic_writer(stored) as handle:
                torch.save({"image": scan.image.cpu(), "affine": scan.affine.cpu(),
                            **({"info": scan.info.cpu()} if scan.info is not None else {})}, handle)
        log.debug("preprocessed %s: shape %s, spacing %s mm", path, tuple(scan.image.shape[1:]), scan.spacing_mm)
        return scan
