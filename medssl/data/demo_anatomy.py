"""The demo anatomy: the MNI ICBM152 2009a (symmetric) T1 template and its tissue maps from the nilearn wheel,
as a 3D volume or a 2D slice, with named landmarks.

Landmarks are in MNI mm, each with the tissue label it sits in. They were chosen by reading the template
(T1 intensity profiles through each structure: the anterior commissure is the bright midline peak in front of the
third ventricle; ventricle points sit in dark CSF 1-3 mm inside the horn tips; poles 3 mm inside the brain's
extreme points), then moved by at most 4 mm to the nearest point whose 3x3x3 neighbourhood carries one tissue
label; the tests check every landmark's tissue on the template labels.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl.data.geometry import voxel_to_world, world_to_voxel
from medssl.errors import InputError

log = logging.getLogger(__name__)

_FILES = {kind: f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")}
CSF, GREY, WHITE = 1, 2, 3  # tissue label values; 0 is background


def _pair(name: str, right_mm: tuple[float, ...], tissue: int) -> dict[str, tuple[tuple[float, ...], int]]:
    """A left/right landmark pair from the right one (x > 0): the 2009a template is symmetric about x = 0."""
    left_mm = (-right_mm[0], *right_mm[1:])
    return {f"{name}_left": (left_mm, tissue), f"{name}_right": (right_mm, tissue)}


# name: (MNI mm, tissue label there)
LANDMARKS_MNI: dict[str, tuple[tuple[float, ...], int]] = {
    "anterior_commissure": ((0, 3, -5), WHITE),
    "posterior_commissure": ((0, -26, -3), GREY),
    "genu_corpus_callosum": ((0, 28, 8), WHITE),
    "splenium_corpus_callosum": ((0, -40, 11), WHITE),
    "body_corpus_callosum": ((0, -5, 25), WHITE),
    "fourth_ventricle": ((0, -44, -32), CSF),
    "pons": ((0, -26, -32), GREY),
    "vermis": ((0, -70, -30), GREY),
    **_pair("frontal_horn", (12, 25, 4), CSF),
    **_pair("occipital_horn", (31, -54, 3), CSF),
    **_pair("temporal_horn", (34, -8, -25), CSF),
    **_pair("frontal_pole", (17, 70, 2), GREY),
    **_pair("occipital_pole", (19, -104, -1), GREY),
    **_pair("temporal_pole", (41, 23, -31), GREY),
}

# plane: (axis held fixed, its MNI mm, in-plane (column, row) unit directions in MNI, landmarks in the slice)
PLANES: dict[str, tuple[int, float, tuple[tuple[int, ...], tuple[int, ...]], dict[str, tuple[tuple, int]]]] = {
    "axial": (2, 16.0, ((1, 0, 0), (0, -1, 0)), {  # through the bodies of the lateral ventricles
        "genu_corpus_callosum": ((0, 21, 16), WHITE),
        "splenium_corpus_callosum": ((0, -40, 16), WHITE),
        **_pair("frontal_horn", (8, 14, 16), CSF),
        **_pair("ventricle_atrium", (25, -42, 16), CSF),
        **_pair("caudate_head", (16, 9, 16), GREY),
        **_pair("thalamus", (12, -15, 16), GREY),
        **_pair("insula", (37, 0, 16), GREY),
        **_pair("frontal_pole", (12, 66, 16), GREY),
        **_pair("occipital_pole", (13, -102, 16), GREY),
    }),
    "coronal": (1, -8.0, ((1, 0, 0), (0, 0, -1)), {  # through the thalami and the temporal horns
        "corpus_callosum": ((0, -8, 27), WHITE),
        "third_ventricle": ((0, -8, -4), CSF),
        **_pair("lateral_ventricle", (11, -8, 22), CSF),
        **_pair("temporal_horn", (34, -8, -25), CSF),
        **_pair("thalamus", (10, -8, 5), GREY),
        **_pair("hippocampus", (27, -8, -20), GREY),
        **_pair("insula", (37, -8, 10), GREY),
        **_pair("superior_cortex", (7, -8, 70), GREY),
        **_pair("lateral_cortex", (65, -8, 4), GREY),
        **_pair("inferior_temporal", (40, -8, -45), GREY),
    }),
    "sagittal": (0, 0.0, ((0, -1, 0), (0, 0, -1)), {  # the midline
        "anterior_commissure": ((0, 3, -5), WHITE),
        "posterior_commissure": ((0, -26, -3), GREY),
        "genu_corpus_callosum": ((0, 28, 8), WHITE),
        "splenium_corpus_callosum": ((0, -40, 11), WHITE),
        "body_corpus_callosum": ((0, -5, 25), WHITE),
        "third_ventricle": ((0, -10, -4), CSF),
        "fourth_ventricle": ((0, -44, -32), CSF),
        "tectum": ((0, -33, -6), GREY),
        "pons": ((0, -26, -32), GREY),
        "medulla": ((0, -40, -60), GREY),
        "vermis": ((0, -70, -30), GREY),
        "cingulate_gyrus": ((0, 18, 30), GREY),
        "precuneus": ((0, -60, 44), GREY),
        "cuneus": ((0, -86, 15), GREY),
        "vertex": ((0, -34, 71), GREY),
    }),
}


@dataclass(frozen=True)
class Template:
    """Source anatomy and the output grid of the demo population (2D or 3D).

    image:        (*source) T1 intensities scaled to [0, 1] on the source grid
    tissue:       (3, *source) CSF, grey- and white-matter probabilities on the source grid
    source_affine:(D+1, D+1) source voxel -> world mm
    affine:       (D+1, D+1) output voxel -> world mm (every subject is written on this grid)
    shape:        output grid shape
    landmarks:    name -> world mm (D,) of the template's landmarks
    plane:        (2D) the MNI plane the slice was cut from, else None
    plane_to_mni: (2D) (3, 3) map from homogeneous template world mm (x, y, 1) to MNI mm, else None
    """

    image: np.ndarray
    tissue: np.ndarray
    source_affine: np.ndarray
    affine: np.ndarray
    shape: tuple[int, ...]
    landmarks: dict[str, np.ndarray]
    plane: str | None = None
    plane_to_mni: np.ndarray | None = None

    @property
    def spatial_dims(self) -> int:
        return len(self.shape)


def template_files() -> dict[str, Path]:
    """Paths of the T1, GM and WM files inside the installed nilearn package; ``InputError`` if missing."""
    try:
        import nilearn
    except ImportError:
        raise InputError("the demo anatomy comes from the nilearn package, which is not installed; "
                         "run 'pip install nilearn'") from None
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    paths = {kind: folder / name for kind, name in _FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise InputError(f"the installed nilearn lacks the MNI ICBM152 2009a files ({', '.join(missing)}); "
                         "reinstall nilearn>=0.10", path=folder)
    return paths


@functools.lru_cache(maxsize=1)
def _read_mni() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1 (*V) in [0, 1], tissue (3, *V) CSF/GM/WM probabilities and the (4, 4) MNI affine of the 1 mm files
    (read once per process; the arrays are read-only)."""
    import nibabel as nib
    from scipy import ndimage

    paths = template_files()
    volumes = {kind: nib.load(str(path)) for kind, path in paths.items()}
    t1, gm, wm = (np.asarray(volumes[k].dataobj, dtype=np.float32) / 255.0 for k in ("t1", "gm", "wm"))
    intracranial = ndimage.binary_fill_holes(t1 > 0.1).astype(np.float32)  # the T1 is skull-stripped
    csf = np.clip(intracranial - gm - wm, 0.0, 1.0)  # CSF and other intracranial tissue
    arrays = (t1, np.stack([csf, gm, wm]), np.asarray(volumes["t1"].affine, dtype=np.float64))
    for array in arrays:
        array.setflags(write=False)
    return arrays


def _head_box_mm(tissue: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-mm corners (low, high) of the intracranial region."""

    inside = np.argwhere(tissue.sum(axis=0) > 0.1)  # (N, D)
    corners = voxel_to_world(affine, np.stack([inside.min(axis=0), inside.max(axis=0)]).astype(float))  # (2, D)
    return corners.min(axis=0), corners.max(axis=0)


def _sample_plane(volume: np.ndarray, affine: np.ndarray, plane_mm: np.ndarray) -> np.ndarray:
    """Linear interpolation of a 3D ``volume`` (voxel -> MNI ``affine``) at MNI points ``plane_mm`` ``(*P, 3)``."""
    from scipy import ndimage


    index = world_to_voxel(affine, plane_mm.reshape(-1, 3)).T  # (3, N)
    return ndimage.map_coordinates(volume, index, order=1).reshape(plane_mm.shape[:-1])


def _slice(t1: np.ndarray, tissue: np.ndarray, affine: np.ndarray, plane: str
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One MNI plane sampled on its 1 mm in-plane grid: image (A, B), tissue (3, A, B), the plane coordinates
    (a, b) of array index 0, and the (3, 3) map from homogeneous plane coordinates (a, b, 1) to MNI mm."""

    axis, value_mm, (column, row), _ = PLANES[plane]
    u, v = np.array(column, dtype=float), np.array(row, dtype=float)
    normal = np.zeros(3)
    normal[axis] = 1.0
    plane_to_mni = np.stack([u, v, normal * value_mm], axis=1)  # (3, 3): (a, b, 1) -> MNI mm
    corners = voxel_to_world(affine, np.array(np.meshgrid(*[[0, n - 1] for n in t1.shape], indexing="ij"),
                                              dtype=float).reshape(3, -1).T)  # (8, 3)
    a_range, b_range = corners @ u, corners @ v
    a = np.arange(np.round(a_range.min()), np.round(a_range.max()) + 1)
    b = np.arange(np.round(b_range.min()), np.round(b_range.max()) + 1)
    plane_ab = np.stack(np.meshgrid(a, b, indexing="ij"), axis=-1)  # (A, B, 2)
    mni = plane_ab @ plane_to_mni[:, :2].T + plane_to_mni[:, 2]  # (A, B, 3): integer voxel centres, sampled exactly
    return (_sample_plane(t1, affine, mni), np.stack([_sample_plane(channel, affine, mni) for channel in tissue]),
            np.array([a[0], b[0]]), plane_to_mni)


def tilted_slice(template: Template, rotation: np.ndarray, offset_mm: float,
                 volume: np.ndarray | None = None) -> Template:
    """The 2D ``template`` cut again from the 3D MNI volume through a tilted and shifted plane: the plane is
    rotated by ``rotation`` ``(3, 3)`` about the MNI point under the output grid's centre and moved ``offset_mm``
    along its normal. The source grid, output grid and landmark names stay; each landmark becomes the projection
    of its 3D MNI point onto the new plane, in the new plane's in-plane frame (so it stays in the slice).

    ``volume`` replaces the T1 intensities (a 3D array on the 1 mm MNI grid; the tests paint blobs in it)."""

    if template.plane_to_mni is None or template.plane is None:
        raise ValueError("tilted_slice needs a 2D template from load_template(2, ...)")
    t1, tissue, mni_affine = _read_mni()
    frame = template.plane_to_mni  # (3, 3): (x, y, 1) -> MNI mm
    centre = frame @ np.append(voxel_to_world(template.affine, (np.array(template.shape) - 1.0) / 2.0), 1.0)
    normal = np.cross(frame[:, 0], frame[:, 1])
    tilted = np.concatenate([rotation @ frame[:, :2],
                             (centre + rotation @ (frame[:, 2] - centre) + offset_mm * normal)[:, None]], axis=1)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in template.image.shape], indexing="ij"), -1)
    world = voxel_to_world(template.source_affine, index)  # (A, B, 2)
    mni = world @ tilted[:, :2].T + tilted[:, 2]  # (A, B, 3)
    image = _sample_plane(t1 if volume is None else volume, mni_affine, mni).astype(np.float32)
    tissue_slice = np.stack([_sample_plane(channel, mni_affine, mni) for channel in tissue]).astype(np.float32)
    landmarks = {name: tilted[:, :2].T @ (np.array(mni_mm, dtype=float) - tilted[:, 2])  # orthonormal columns
                 for name, (mni_mm, _) in PLANES[template.plane][3].items()}
    return Template(image=image, tissue=tissue_slice, source_affine=template.source_affine, affine=template.affine,
                    shape=template.shape, landmarks=landmarks, plane=template.plane, plane_to_mni=tilted)


def load_template(spatial_dims: int = 3, plane: str = "axial", spacing_mm: float | None = None,
                  margin_mm: float = 12.0) -> Template:
    """The demo template: 3D MNI volume on a ``spacing_mm`` (default 2) isotropic grid cropped to the head plus
    ``margin_mm``, or (2D) one ``plane`` slice at 1 mm whose world frame is ``x = column``, ``y = row`` (mm)."""
    from scipy import ndimage

    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if plane not in PLANES:
        raise InputError(f"plane must be one of {', '.join(PLANES)}, got '{plane}'")
    spacing_mm = float(spacing_mm if spacing_mm is not None else 2.0 if spatial_dims == 3 else 1.0)
    if spatial_dims == 2 and spacing_mm != 1.0:
        raise InputError(f"2D demo images are PNG files read at 1.0 mm per pixel; spacing_mm must be 1, "
                         f"got {spacing_mm}")
    if not spacing_mm > 0:
        raise InputError(f"spacing_mm must be positive, got {spacing_mm}")
    t1, tissue, mni_affine = _read_mni()
    if spatial_dims == 3:
        sigma = 0.4 * np.sqrt(max(spacing_mm**2 - 1.0, 0.0))  # anti-aliasing before sampling a coarser grid
        if sigma > 0:
            t1 = ndimage.gaussian_filter(t1, sigma)
            tissue = np.stack([ndimage.gaussian_filter(channel, sigma) for channel in tissue])
        source_affine = mni_affine.copy()
        landmarks = {name: np.array(mni, dtype=float) for name, (mni, _) in LANDMARKS_MNI.items()}
    else:
        t1, tissue, start_ab, plane_to_mni = _slice(t1, tissue, mni_affine, plane)
        source_affine = np.array([[1.0, 0.0, start_ab[0]], [0.0, 1.0, start_ab[1]], [0.0, 0.0, 1.0]])
        landmarks = {name: plane_to_mni[:, :2].T @ np.array(mni, dtype=float)  # (2,): in-plane (a, b) mm
                     for name, (mni, _) in PLANES[plane][3].items()}
    low, high = _head_box_mm(tissue, source_affine)
    origin = low - margin_mm
    shape = tuple(int(n) for n in np.floor((high + margin_mm - origin) / spacing_mm) + 1)
    affine = np.diag([spacing_mm] * spatial_dims + [1.0])
    affine[:spatial_dims, spatial_dims] = origin
    frame = None
    if spatial_dims == 2:  # shift the plane frame so that the output grid starts at world (0, 0)
        source_affine[:2, 2] -= origin
        landmarks = {name: position - origin for name, position in landmarks.items()}
        affine[:2, 2] = 0.0
        frame = plane_to_mni.copy()
        frame[:, 2] += plane_to_mni[:, :2] @ origin  # (x, y, 1) world -> MNI mm
    log.debug("demo template: %dD grid %s at %.2f mm", spatial_dims, shape, spacing_mm)
    return Template(image=t1, tissue=tissue, source_affine=source_affine, affine=affine, shape=shape,
                    landmarks=landmarks, plane=plane if spatial_dims == 2 else None, plane_to_mni=frame)
