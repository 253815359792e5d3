"""The demo population (``medssl data demo``): subjects made from the MNI template by known random deformations
and intensity changes, so labels and landmarks are known exactly.

Layout written: ``images/subject_000.nii.gz`` (3D, float32) or ``.png`` (2D, 8-bit, 1 mm pixels),
``labels/`` (0 background, 1 CSF/other intracranial, 2 grey matter, 3 white matter), ``landmarks.csv``
(world mm) and ``datalist.json``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medssl.data.demo_anatomy import Template, load_template
from medssl.data.demo_warp import RandomTransform, jacobian_determinant, random_control_grid, random_transform
from medssl.data.geometry import world_to_voxel
from medssl.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subject:
    """One synthetic subject on the template's output grid.

    image:     (*S) float32 intensities (about [0, 1])
    label:     (*S) uint8 tissue labels 0-3
    landmarks: name -> world mm (D,), the template landmarks mapped by ``phi^-1``
    """

    image: np.ndarray
    label: np.ndarray
    landmarks: dict[str, np.ndarray]


def change_intensity(image: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random MR-like intensity changes of ``image`` (*S) in [0, 1]: a smooth multiplicative bias field (about
    ±15 %), gamma in [0.78, 1.28], Gaussian blur (sigma up to 1 mm) and Rician noise (sigma 1-3 %)."""
    shape = image.shape
    dims = len(shape)
    bias = random_control_grid(rng, affine, shape, 1, spacing_mm=60.0, std=0.15, limit=0.4)
    field = np.exp(bias.on_grid(affine, shape)[0])  # (*S)
    gamma = np.exp(rng.uniform(-0.25, 0.25))
    spacing = np.linalg.norm(affine[:dims, :dims], axis=0)
    blur_mm = rng.uniform(0.0, 1.0)
    noise = rng.uniform(0.01, 0.03)
    changed = np.clip(image * field, 0.0, None) ** gamma
    changed = ndimage.gaussian_filter(changed, blur_mm / spacing)
    real, imaginary = rng.normal(0.0, noise, size=(2, *shape))
    return np.sqrt((changed + real) ** 2 + imaginary**2).astype(np.float32)  # Rician magnitude


def make_subject(template: Template, transform: RandomTransform,
                 intensity_rng: np.random.Generator | None = None) -> Subject:
    """Pull the template back through ``transform`` onto the output grid (linear interpolation); labels are the
    argmax of the warped background/CSF/GM/WM probabilities; intensities change only when ``intensity_rng`` is
    given. Raises ``RuntimeError`` if the map folds (Jacobian <= 0) or a landmark leaves the image."""
    dims, shape = template.spatial_dims, template.shape
    mapped = transform.on_grid(template.affine, shape)  # (*S, D) template world mm
    determinant = jacobian_determinant(mapped, template.affine)
    if determinant.min() <= 0:
        raise RuntimeError(f"demo deformation folds (min Jacobian determinant {determinant.min():.3g})")
    index = world_to_voxel(template.source_affine, mapped.reshape(-1, dims)).T  # (D, N) source voxel indices
    sample = lambda volume: ndimage.map_coordinates(volume, index, order=1, cval=0.0).reshape(shape)  # noqa: E731
    image = sample(template.image)
    tissue = np.stack([sample(channel) for channel in template.tissue])  # (3, *S)
    background = np.clip(1.0 - tissue.sum(axis=0, keepdims=True), 0.0, 1.0)  # (1, *S)
    label = np.argmax(np.concatenate([background, tissue]), axis=0).astype(np.uint8)  # (*S)
    if intensity_rng is not None:
        image = change_intensity(image, template.affine, intensity_rng)
    names = sorted(template.landmarks)
    positions = transform.inverse(np.stack([template.landmarks[n] for n in names])) if names else np.zeros((0, dims))
    voxels = world_to_voxel(template.affine, positions) if names else positions
    outside = [n for n, v in zip(names, voxels) if np.any(v < 0) or np.any(v > np.array(shape) - 1)]
    if outside:
        raise RuntimeError(f"demo landmarks {outside} left the image; use a larger margin")
    return Subject(image=image.astype(np.float32), label=label,
                   landmarks={n: p for n, p in zip(names, positions)})


def _progress(n_subjects: int):
    """Subject indices, with a tqdm bar when stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(range(n_subjects), desc="demo subjects", unit="subject", disable=not sys.stderr.isatty())


def write_demo_dataset(out: str | Path, spatial_dims: int = 3, n_subjects: int = 8, seed: int = 0,
                       plane: str = "axial", spacing_mm: float | None = None) -> Path:
    """Write the demo population into the folder ``out`` and return ``out``.

    Every subject (subject 0 included) gets its own random transform and intensity changes, drawn from
    ``seed`` only (subject ``i`` is the same whatever ``n_subjects``). ``plane`` picks the 2D slice;
    ``spacing_mm`` is the 3D voxel size (default 2 mm; 2D is always 1 mm per pixel).
    """
    from medssl.data.landmarks import write_landmarks
    from medssl.data.readers import save_image

    out = Path(out)
    if n_subjects < 1:
        raise InputError(f"--subjects must be at least 1, got {n_subjects}")
    if out.exists() and not out.is_dir():
        raise InputError("output exists and is not a folder; choose another --out", path=out)
    started = time.perf_counter()
    template = load_template(spatial_dims, plane, spacing_mm)
    extension = ".nii.gz" if spatial_dims == 3 else ".png"
    seeds = np.random.SeedSequence(seed).spawn(n_subjects)
    items, landmarks = [], {}
    for i in _progress(n_subjects):
        rng = np.random.default_rng(seeds[i])
        subject = make_subject(template, random_transform(rng, template.affine, template.shape), rng)
        key = f"subject_{i:03d}"
        if spatial_dims == 2:  # 8-bit grey PNG; the labels PNG holds the class indices
            image = np.round(np.clip(subject.image, 0.0, 1.0) * 255.0).astype(np.uint8)
        else:
            image = subject.image
        save_image(image, template.affine, out / "images" / f"{key}{extension}")
        save_image(subject.label, template.affine, out / "labels" / f"{key}{extension}")
        landmarks[key] = subject.landmarks
        items.append({"image": f"images/{key}{extension}", "label": f"labels/{key}{extension}"})
        log.info("demo subject %d/%d written (%s)", i + 1, n_subjects, key)
    write_landmarks(out / "landmarks.csv", landmarks, spatial_dims=spatial_dims)
    datalist = out / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "validation": [], "test": []}, indent=2) + "\n",
                        encoding="utf-8")
    log.info("demo dataset: %d %dD subjects in %s (%.1f s)", n_subjects, spatial_dims, out,
             time.perf_counter() - started)
    return out
