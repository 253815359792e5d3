"""Read and write scans with their geometry: every image becomes a channel-first MetaTensor whose affine maps
voxel index -> world mm (axis k of the array = world axis k).

Frames: NIfTI keeps nibabel's affine; NRRD/MetaImage/DICOM are read by ITK and converted from LPS to the same RAS
frame (as MONAI does); 2D PNG/JPEG/TIFF have no geometry: axis 0 = column (x), axis 1 = row (y), and
``affine = diag(spacing, spacing, 1)``. A 3D file with one slice (2D NIfTI/MHA, one DICOM file) becomes 2D.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import ImageReader, ITKReader, MetaTensor, NibabelReader, PILReader
from monai.transforms import EnsureChannelFirst, ResampleToMatch

from medssl.data.geometry import spacing_mm as affine_spacing_mm
from medssl.errors import InputError
from medssl.outputs import staged_file

log = logging.getLogger(__name__)

# Longest first so that ".nii.gz" wins over ".gz"-less matches.
SUPPORTED_EXTENSIONS: tuple[str, ...] = (
    ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
)
_NO_GEOMETRY = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_ITK_FORMATS = (".nrrd", ".mha", ".mhd", ".dcm")
_SAVE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png")
_AFFINE_TOLERANCE_MM = 1e-3
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's "L" conversion
_SOURCE_LOCATION = re.compile(r"\S+\.(cxx|hxx|h|cpp):\d+:?")
_ITK_PREFIX = re.compile(r"^ITK ERROR: \w+\(0x[0-9a-f]+\): ")
_PIL_COLOUR_MODES = ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV")  # modes whose array values are not intensities


def image_extension(path: str | Path) -> str | None:
    """The supported extension ``path`` ends with (lower case, e.g. ``".nii.gz"``), or None."""
    name = Path(path).name.lower()
    return next((ext for ext in SUPPORTED_EXTENSIONS if name.endswith(ext) and len(name) > len(ext)), None)


#: output format of a label map per input format (others, e.g. DICOM: NIfTI)
_LABEL_FORMATS = {".nii.gz": ".nii.gz", ".nii": ".nii", ".nrrd": ".nrrd", ".mha": ".mha", ".mhd": ".mhd",
                  ".png": ".png", ".jpg": ".png", ".jpeg": ".png", ".tif": ".png", ".tiff": ".png"}


def label_file_name(path: str | Path) -> str:
    """The file name of the label map predicted for the image ``path``: ``<name><ext>`` in the input's format where
    it holds integer labels losslessly (JPEG/TIFF inputs get PNG), else ``.nii.gz``."""
    return f"{image_key(path)}{_LABEL_FORMATS.get(image_extension(path) or '', '.nii.gz')}"


def image_key(path: str | Path) -> str:
    """The image's name without its extension: ``a.nii.gz`` -> ``a``; a DICOM series folder -> the folder name."""
    name = Path(path).name
    extension = image_extension(name)
    return name[: -len(extension)] if extension else name


def is_dicom_file(path: str | Path) -> bool:
    """True for a ``.dcm`` file or a file carrying the DICOM preamble (``DICM`` at byte 128)."""
    path = Path(path)
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_series_ids(folder: str | Path) -> tuple[str, ...]:
    """The DICOM series UIDs of the files directly inside ``folder`` (empty when it holds no DICOM file)."""
    import SimpleITK as sitk

    folder = Path(folder)
    if not any(is_dicom_file(f) for f in folder.iterdir() if f.is_file()):
        return ()
    return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


@functools.lru_cache(maxsize=None)
def _reader(kind: str, grayscale: bool) -> ImageReader:
    """One MONAI reader per kind, built once. Used directly rather than through ``LoadImage``, which retries every
    registered reader on failure and buries the real error under their tracebacks."""
    if kind == "itk":
        return ITKReader()  # reverse_indexing -> array axes (x, y, z); affine_lps_to_ras=True
    if kind == "nibabel":
        return NibabelReader()
    convert = (lambda im: im.convert("RGBA") if im.mode in _PIL_COLOUR_MODES else im) if grayscale else None
    return PILReader(converter=convert)  # reverse_indexing -> axis 0 = column


def _source(path: str | Path) -> tuple[Path, str, bool]:
    """Check that ``path`` can be read: (path, reader kind, whether the file has no geometry)."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such image file or folder; check the path", path=path)
    if path.is_dir():
        series = dicom_series_ids(path)
        if len(series) != 1:
            found = "no DICOM series" if not series else f"{len(series)} DICOM series"
            raise InputError(f"folder holds {found}; pass an image file or a folder holding exactly one DICOM series",
                             path=path)
        return path, "itk", False
    extension = image_extension(path)
    if extension is None:
        raise InputError(f"cannot read image: unknown extension '{''.join(path.suffixes) or path.name}'; "
                         f"supported: {', '.join(SUPPORTED_EXTENSIONS)} or a DICOM series folder", path=path)
    kind = "pil" if extension in _NO_GEOMETRY else "itk" if extension in _ITK_FORMATS else "nibabel"
    return path, kind, extension in _NO_GEOMETRY


def _one_line(error: Exception) -> str:
    """The informative line of a reader's error (ITK puts its source location first and a pointer in the text)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not _SOURCE_LOCATION.fullmatch(line)]
    text = useful[0] if useful else type(error).__name__
    return _ITK_PREFIX.sub("", text)[:300]


def _reduce_to_2d(array: torch.Tensor, affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop a singleton third spatial axis (and the matching affine row/column)."""
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]  # (C, X, Y)
    if array.ndim == 3 and affine.shape == (4, 4):
        affine = affine[[0, 1, 3]][:, [0, 1, 3]]  # (3, 3): the in-plane geometry
    return array, affine


def _read(path: str | Path, spacing_mm: float | Sequence[float] | None, grayscale: bool) -> MetaTensor:
    """Read any supported image to ``(C, *spatial)`` (reader dtype) with a ``(D+1, D+1)`` float64 affine."""
    path, kind, no_geometry = _source(path)
    reader = _reader(kind, grayscale)
    try:
        array, meta = reader.get_data(reader.read(str(path)))
    except Exception as error:  # reader errors vary (RuntimeError, OSError, EOFError, zlib.error...): one line
        raise InputError(f"cannot read image (corrupt or truncated?): {_one_line(error)}",
                         path=path) from None
    array = array if array.flags.writeable else array.copy()  # PIL hands out read-only arrays
    loaded = EnsureChannelFirst()(MetaTensor(array, meta=meta))  # (C, *spatial)
    array = loaded.as_tensor()
    affine = torch.as_tensor(loaded.affine, dtype=torch.float64)
    array, affine = _reduce_to_2d(array, affine)
    dims = array.ndim - 1
    if dims not in (2, 3):
        raise InputError(f"expected a 2D or 3D image, got array shape {tuple(array.shape)} (channel first)", path=path)
    if no_geometry:
        affine = torch.diag(torch.tensor([*_spacing_pair(spacing_mm), 1.0], dtype=torch.float64))
    if affine.shape != (dims + 1, dims + 1):
        raise InputError(f"image geometry {tuple(affine.shape)} does not fit its {dims}D array", path=path)
    return MetaTensor(array, affine=affine, meta={"filename_or_obj": str(path)})


def _spacing_pair(spacing_mm: float | Sequence[float] | None) -> tuple[float, float]:
    values = [1.0, 1.0] if spacing_mm is None else [float(spacing_mm)] * 2 if np.isscalar(spacing_mm) \
        else [float(v) for v in spacing_mm]
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise InputError(f"spacing_mm must be one positive number or two (x, y) for a 2D image, got {spacing_mm}")
    return values[0], values[1]


def _to_grey(array: torch.Tensor) -> torch.Tensor:
    """RGB(A) or grey+alpha ``(C, *spatial)`` -> one grey channel ``(1, *spatial)``; alpha is dropped."""
    if array.shape[0] >= 3:
        weights = torch.tensor(_LUMA_WEIGHTS, dtype=array.dtype).reshape(3, *[1] * (array.ndim - 1))
        return (array[:3] * weights).sum(dim=0, keepdim=True)  # (1, *spatial)
    return array[:1]  # (1, *spatial)


def check_image_shape(array: torch.Tensor, path: str | Path, *, min_size: int = 1,
                      channels: int | None = None) -> None:
    """Refuse (``InputError`` naming ``path``) an image ``(C, *spatial)`` with a side shorter than ``min_size`` or
    (where ``channels`` is given: the network's input channels) another number of channels."""
    if channels is not None and array.shape[0] != channels:
        raise InputError(f"image has {array.shape[0]} channel(s) (shape {tuple(array.shape)}, channel first; a 4D "
                         f"series?) but the network takes {channels}; pass {channels}-channel 2D or 3D images",
                         path=path)
    if min(array.shape[1:]) < min_size:
        raise InputError(f"image of shape {tuple(array.shape[1:])} is too small: every side needs at least "
                         f"{min_size} pixels for this network", path=path)


def check_image_values(array: torch.Tensor, path: str | Path) -> None:
    """Refuse (``InputError`` naming ``path``) an image ``(C, *spatial)`` that holds NaN/inf or is constant
    (nothing to learn or match; intensity normalisation would divide by zero)."""
    finite = torch.isfinite(array)
    if not bool(finite.all()):
        raise InputError(f"image holds {int((~finite).sum())} NaN or infinite value(s); fix or remove the file",
                         path=path)
    if array.numel() == 0 or bool((array == array.reshape(-1)[0]).all()):
        value = array.reshape(-1)[0].item() if array.numel() else "nothing"
        raise InputError(f"image is constant (every value is {value}): it holds no anatomy; fix or remove the file",
                         path=path)


def load_image(path: str | Path, *, spacing_mm: float | Sequence[float] | None = None,
               grayscale: bool = True, min_size: int = 1) -> MetaTensor:
    """Read a scan as float32 ``(C, *spatial)`` with ``.affine`` (float64, ``(D+1, D+1)``) voxel index -> world mm.

    ``spacing_mm`` (default 1.0) is the pixel size of 2D files without geometry (PNG/JPEG/TIFF); files with
    geometry keep their own. ``grayscale`` turns RGB(A) 2D images into one luma channel. Images that are non-finite,
    constant or have a side shorter than ``min_size`` (the network's divisor, where known) are refused
    (``check_image_values``).
    """
    image = _read(path, spacing_mm, grayscale)
    array = image.as_tensor().to(torch.float32)
    if grayscale and array.ndim == 3 and array.shape[0] in (2, 3, 4):
        array = _to_grey(array)
    check_image_shape(array, path, min_size=min_size)
    check_image_values(array, path)
    return MetaTensor(array, affine=image.affine, meta={"filename_or_obj": str(path)})


def load_label(path: str | Path, like: MetaTensor | None = None) -> MetaTensor:
    """Read an integer label map ``(1, *spatial)`` (int64) that must share ``like``'s shape and affine (None: the
    map on its own grid; 2D files without geometry at 1 mm)."""
    dims = None if like is None else like.ndim - 1
    label = _read(path, affine_spacing_mm(like.affine)[:2] if dims == 2 else None, grayscale=False)
    path = Path(path)
    like = label if like is None else like
    if label.shape[0] != 1:
        raise InputError(f"a label map must have one channel, got {label.shape[0]}", path=path)
    if tuple(label.shape[1:]) != tuple(like.shape[1:]):
        raise InputError(f"label map shape {tuple(label.shape[1:])} differs from its image's "
                         f"{tuple(like.shape[1:])} ({like.meta.get('filename_or_obj', 'image')})", path=path)
    like_affine = torch.as_tensor(like.affine, dtype=torch.float64)
    difference_mm = (label.affine - like_affine).abs().max().item()
    if difference_mm > _AFFINE_TOLERANCE_MM:
        raise InputError(f"label map geometry (affine) differs from its image's by {difference_mm:.4g} mm "
                         f"({like.meta.get('filename_or_obj', 'image')}); resample the label onto the image",
                         path=path)
    values = label.as_tensor()
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise InputError("label map holds NaN or infinite values; labels must be class indices 0, 1, 2, ...",
                         path=path)
    if values.is_floating_point():
        rounded = values.round()
        if (values - rounded).abs().max().item() > 1e-3:
            raise InputError("label map holds non-integer values; labels must be class indices 0, 1, 2, ...",
                             path=path)
        values = rounded
    return MetaTensor(values.to(torch.int64), affine=like_affine.clone(), meta={"filename_or_obj": str(path)})


def _as_numpy(array: np.ndarray | torch.Tensor, dims: int, path: Path) -> np.ndarray:
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if data.ndim == dims + 1 and data.shape[0] == 1:
        data = data[0]  # (*spatial)
    if data.ndim != dims:
        raise ValueError(f"cannot save {path}: data shape {data.shape} is not (*spatial) or (1, *spatial) "
                         f"for a {dims}D affine")
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if data.dtype == np.int64 and data.size and np.abs(data).max() < 2**31:
        return data.astype(np.int32)  # nibabel refuses int64 without an explicit header dtype
    return data


def _write_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    affine_3d = np.eye(4)
    dims = data.ndim
    affine_3d[:dims, :dims], affine_3d[:dims, 3] = affine[:dims, :dims], affine[:dims, dims]
    nib.save(nib.Nifti1Image(data, affine_3d), str(path))


def _write_itk(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    dims = data.ndim
    lps = affine.copy()
    lps[:2] *= -1  # RAS -> LPS: negate world x and y (rows 0 and 1), as MONAI's orientation_ras_lps
    spacing = np.linalg.norm(lps[:dims, :dims], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(*reversed(range(dims)))))  # (z, y, x)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:dims, :dims] / spacing).flatten()])
    image.SetOrigin([float(v) for v in lps[:dims, dims]])
    sitk.WriteImage(image, str(path))


def _write_png(data: np.ndarray, path: Path) -> None:
    from PIL import Image

    if data.ndim != 2 or data.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"cannot save {path}: PNG needs 2D uint8 or uint16 data, got {data.ndim}D {data.dtype}")
    Image.fromarray(np.ascontiguousarray(data.T)).save(str(path))  # (rows, columns)


def save_image(array: np.ndarray | torch.Tensor, affine: np.ndarray | torch.Tensor, path: str | Path) -> Path:
    """Write ``(*spatial)`` or ``(1, *spatial)`` data with its geometry, atomically; returns the path.

    NIfTI via nibabel, NRRD/MetaImage via SimpleITK (RAS -> LPS), PNG for 2D uint8/uint16 (geometry dropped,
    axis 0 = column). A ``.mhd`` gets its ``.raw`` sidecar next to it.
    """
    path = Path(path)
    extension = image_extension(path)
    if extension not in _SAVE_EXTENSIONS:
        raise InputError(f"cannot write images with this extension; use one of {', '.join(_SAVE_EXTENSIONS)}",
                         path=path)
    affine_np = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    dims = affine_np.shape[0] - 1
    data = _as_numpy(array, dims, path)
    with staged_file(path) as staged:  # the final name in a private folder, then moved (sidecar first, header last)
        if extension in (".nii", ".nii.gz"):
            _write_nifti(data, affine_np, staged)
        elif extension == ".png":
            _write_png(data, staged)
        else:
            _write_itk(data, affine_np, staged)
    log.debug("wrote %s", path)
    return path


def save_label_map(probabilities: MetaTensor, like: MetaTensor, path: str | Path) -> Path:
    """Class probabilities ``(K, *S)`` on any grid -> the arg-max label map on ``like``'s grid (its shape and
    affine; the probabilities are resampled linearly first), written to ``path``; returns the path."""
    resampled = ResampleToMatch(mode="bilinear", padding_mode="border")(
        probabilities, img_dst=MetaTensor(like.as_tensor(), affine=like.affine))  # (K, *S_like)
    dtype = np.uint8 if probabilities.shape[0] <= 256 else np.int32
    labels = resampled.as_tensor().argmax(dim=0).cpu().numpy().astype(dtype)  # (*S_like)
    return save_image(labels, like.affine, path)
