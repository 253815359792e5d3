"""The demo population (``medssl data demo``): subjects made from the MNI template by known random deformations
and intensity changes, so labels and landmarks are known exactly.

Two variabilities: ``realistic`` (the default: pose, size, coarse and fine shape, per-tissue contrast, bias,
gamma, blur, noise; 2D slices cut at a jittered level and tilt) and ``low`` (the former population: small smooth
warps and mild intensity changes; byte-identical to it, for fast tests).

Layout written: ``images/subject_000.nii.gz`` (3D, float32) or ``.png`` (2D, 8-bit, 1 mm pixels),
``labels/`` (0 background, 1 CSF/other intracranial, 2 grey matter, 3 white matter), ``landmarks.csv``
(world mm), ``datalist.json`` and ``meta.json`` (the generator's settings and every subject's drawn parameters).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from medssl.data.demo_anatomy import Template, load_template, tilted_slice
from medssl.data.demo_figures import save_population_figure
from medssl.data.demo_warp import (RandomTransform, identity_transform, jacobian_determinant, random_control_grid,
                                   random_transform, realistic_transform, rotation_about_axis)
from medssl.data.geometry import world_to_voxel
from medssl.data.landmarks import write_landmarks
from medssl.data.readers import save_image
from medssl.errors import InputError
from medssl.outputs import write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subject:
    """One synthetic subject on the template's output grid.

    image:     (*S) float32 intensities (about [0, 1])
    label:     (*S) uint8 tissue labels 0-3
    landmarks: name -> world mm (D,), the template landmarks mapped by ``phi^-1``
    drawn:     what was drawn for it (JSON-ready; ``make_subject`` fills the appearance, ``draw_subject`` all)
    """

    image: np.ndarray
    label: np.ndarray
    landmarks: dict[str, np.ndarray]
    drawn: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Variability:
    """How much subjects differ from the template (see ``VARIABILITIES``); lengths in mm, angles in degrees."""

    name: str
    rotation_deg: float  # pose: angle uniform in ±rotation_deg (3D: about a random axis)
    scale_range: float  # per-axis scale in 1 ± scale_range
    shift_mm: float  # per-axis shift in ±shift_mm (the anatomy is not always centred in the field of view)
    fields: tuple[tuple[float, float], ...]  # shape: (control spacing, coefficient std) per B-spline scale
    tissue_contrast: float  # each tissue's intensity times a factor in 1 ± tissue_contrast
    bias_std: float  # log bias field coefficient std (control spacing 60 mm)
    gamma_log: float  # gamma = exp(uniform ±gamma_log)
    blur_max_mm: float  # Gaussian blur sigma in [0, blur_max_mm]
    noise: tuple[float, float]  # Rician noise sigma range
    slice_level_mm: float = 0.0  # 2D: the slice moved along its normal by ±slice_level_mm
    slice_tilt_deg: float = 0.0  # 2D: and tilted by up to ±slice_tilt_deg about an in-plane axis
    margin_mm: float = 12.0  # field of view around the template's head


FIGURE_SUBJECTS = 4  # subjects drawn in the QC figure beside the template

VARIABILITIES = {
    "low": Variability("low", rotation_deg=4.0, scale_range=0.05, shift_mm=3.0, fields=((24.0, 2.0),),
                       tissue_contrast=0.0, bias_std=0.15, gamma_log=0.25, blur_max_mm=1.0, noise=(0.01, 0.03)),
    "realistic": Variability("realistic", rotation_deg=12.0, scale_range=0.1, shift_mm=9.0,
                             fields=((36.0, 9.5), (12.0, 1.5)), tissue_contrast=0.2, bias_std=0.25,
                             gamma_log=0.3, blur_max_mm=1.2, noise=(0.015, 0.05), slice_level_mm=2.0,
                             slice_tilt_deg=3.0, margin_mm=16.0),
}


def variability_preset(name: str) -> Variability:
    """The preset called ``name`` (``low`` or ``realistic``); ``InputError`` naming the choices otherwise."""
    if name not in VARIABILITIES:
        raise InputError(f"--variability must be one of {', '.join(VARIABILITIES)}, got '{name}'")
    return VARIABILITIES[name]


def change_intensity(image: np.ndarray, affine: np.ndarray, rng: np.random.Generator, *, bias_std: float = 0.15,
                     gamma_log: float = 0.25, blur_max_mm: float = 1.0,
                     noise: tuple[float, float] = (0.01, 0.03)) -> tuple[np.ndarray, dict]:
    """Random MR-like intensity changes of ``image`` (*S) in [0, 1], and what was drawn: a smooth multiplicative
    bias field (log coefficients with std ``bias_std`` on a 60 mm grid), gamma ``exp(±gamma_log)``, Gaussian blur
    (sigma up to ``blur_max_mm``) and Rician noise (sigma in ``noise``)."""
    shape = image.shape
    dims = len(shape)
    limit = round(bias_std * 8 / 3, 6)  # clipped at 8/3 std: 0.4 at the former 0.15
    bias = random_control_grid(rng, affine, shape, 1, spacing_mm=60.0, std=bias_std, limit=limit)
    field = np.exp(bias.on_grid(affine, shape)[0])  # (*S)
    gamma = np.exp(rng.uniform(-gamma_log, gamma_log))
    spacing = np.linalg.norm(affine[:dims, :dims], axis=0)
    blur_mm = rng.uniform(0.0, blur_max_mm)
    sigma = rng.uniform(*noise)
    changed = np.clip(image * field, 0.0, None) ** gamma
    changed = ndimage.gaussian_filter(changed, blur_mm / spacing)
    real, imaginary = rng.normal(0.0, sigma, size=(2, *shape))
    drawn = {"bias_range": [float(field.min()), float(field.max())], "gamma": float(gamma),
             "blur_mm": float(blur_mm), "noise_sigma": float(sigma)}
    return np.sqrt((changed + real) ** 2 + imaginary**2).astype(np.float32), drawn  # Rician magnitude


def change_contrast(image: np.ndarray, tissue: np.ndarray, rng: np.random.Generator,
                    contrast: float) -> tuple[np.ndarray, list[float]]:
    """Each tissue's intensity times its own factor uniform in ``1 ± contrast`` (CSF, GM, WM; partial volumes mixed
    by their probabilities ``tissue`` ``(3, *S)``), so no one intensity threshold fits every subject."""
    factors = rng.uniform(1.0 - contrast, 1.0 + contrast, size=3)
    weight = 1.0 + np.tensordot(factors - 1.0, tissue, axes=1)  # (*S)
    return (image * weight).astype(np.float32), factors.tolist()


def make_subject(template: Template, transform: RandomTransform, intensity_rng: np.random.Generator | None = None,
                 variability: Variability | None = None) -> Subject:
    """Pull the template back through ``transform`` onto the output grid (linear interpolation); labels are the
    argmax of the warped background/CSF/GM/WM probabilities; intensities change only when ``intensity_rng`` is
    given, by ``variability``'s appearance settings (default ``low``). Raises ``RuntimeError`` if the map folds
    (Jacobian <= 0) or a landmark leaves the image."""
    dims, shape = template.spatial_dims, template.shape
    mapped = transform.on_grid(template.affine, shape)  # (*S, D) template world mm
    determinant = jacobian_determinant(mapped, template.affine)
    if determinant.min() <= 0:
        raise RuntimeError(f"demo deformation folds (min Jacobian determinant {determinant.min():.3g})")
    names = sorted(template.landmarks)
    positions = transform.inverse(np.stack([template.landmarks[n] for n in names])) if names else np.zeros((0, dims))
    voxels = world_to_voxel(template.affine, positions) if names else positions
    outside = [n for n, v in zip(names, voxels) if np.any(v < 0) or np.any(v > np.array(shape) - 1)]
    if outside:
        raise RuntimeError(f"demo landmarks {outside} left the image; use a larger margin")
    index = world_to_voxel(template.source_affine, mapped.reshape(-1, dims)).T  # (D, N) source voxel indices
    sample = lambda volume: ndimage.map_coordinates(volume, index, order=1, cval=0.0).reshape(shape)  # noqa: E731
    image = sample(template.image)
    tissue = np.stack([sample(channel) for channel in template.tissue])  # (3, *S)
    background = np.clip(1.0 - tissue.sum(axis=0, keepdims=True), 0.0, 1.0)  # (1, *S)
    label = np.argmax(np.concatenate([background, tissue]), axis=0).astype(np.uint8)  # (*S)
    drawn: dict = {}
    if intensity_rng is not None:
        preset = variability or VARIABILITIES["low"]
        if preset.tissue_contrast > 0:
            image, drawn["tissue_factors_csf_gm_wm"] = change_contrast(image, tissue, intensity_rng,
                                                                       preset.tissue_contrast)
        image, changes = change_intensity(image, template.affine, intensity_rng, bias_std=preset.bias_std,
                                          gamma_log=preset.gamma_log, blur_max_mm=preset.blur_max_mm,
                                          noise=preset.noise)
        drawn.update(changes)
    return Subject(image=image.astype(np.float32), label=label,
                   landmarks={n: p for n, p in zip(names, positions)}, drawn=drawn)


def _nonlinear_mm(transform: RandomTransform, landmarks: dict[str, np.ndarray]) -> dict:
    """Size of the non-linear part ``|u|`` at the subject's landmarks (mm)."""
    if not landmarks:
        return {}
    size = np.linalg.norm(transform.displacement.evaluate(np.stack(list(landmarks.values()))), axis=1)  # (L,)
    return {"landmark_nonlinear_mean_mm": float(size.mean()), "landmark_nonlinear_max_mm": float(size.max())}


@dataclass(frozen=True)
class Geometry:
    """Where a subject's anatomy comes from: the (2D: tilted) template ``source`` pulled back through ``transform``;
    2D realistic slices also keep the plane's ``tilt`` rotation ``(3, 3)`` and ``level_mm`` (``tilted_slice``)."""

    source: Template
    transform: RandomTransform
    tilt: np.ndarray | None = None
    level_mm: float = 0.0


def draw_subject(template: Template, rng: np.random.Generator, preset: Variability,
                 attempts: int = 20) -> tuple[Subject, Geometry]:
    """One random subject of ``preset`` (its ``drawn`` holds everything drawn, JSON-ready) and its geometry.

    ``low`` draws as the former population did (same random numbers, same bytes). ``realistic`` draws a tilted,
    shifted slice (2D), a pose, a coarse + fine deformation and an appearance; a draw whose map folds or moves a
    landmark out of the field of view is drawn again (up to ``attempts`` times; all from ``rng``)."""
    if preset.name == "low":
        transform = random_transform(rng, template.affine, template.shape, rotation_deg=preset.rotation_deg,
                                     scale_range=preset.scale_range, shift_mm=preset.shift_mm,
                                     control_spacing_mm=preset.fields[0][0],
                                     displacement_mm=2.0 * preset.fields[0][1])  # std, clipped at 2 std
        subject = make_subject(template, transform, rng, preset)
        drawn = {**_nonlinear_mm(transform, subject.landmarks), **subject.drawn}
        return replace(subject, drawn=drawn), Geometry(template, transform)
    for attempt in range(1, attempts + 1):
        drawn: dict = {"attempt": attempt}
        source, rotation, level = template, None, 0.0
        if template.spatial_dims == 2:
            axis = rng.normal(size=2)
            in_plane = template.plane_to_mni[:, :2] @ (axis / np.linalg.norm(axis))  # (3,) tilt axis in the plane
            tilt = float(rng.uniform(-preset.slice_tilt_deg, preset.slice_tilt_deg))
            level = float(rng.uniform(-preset.slice_level_mm, preset.slice_level_mm))
            rotation = rotation_about_axis(in_plane, tilt)
            source = tilted_slice(template, rotation, level)
            drawn.update(slice_tilt_deg=tilt, slice_tilt_axis_mni=in_plane.tolist(), slice_level_mm=level)
        transform, pose = realistic_transform(rng, template.affine, template.shape, rotation_deg=preset.rotation_deg,
                                              scale_range=preset.scale_range, shift_mm=preset.shift_mm,
                                              fields=preset.fields)
        geometry = Geometry(source, transform, rotation, level)
        try:
            subject = make_subject(geometry.source, transform, rng, preset)
        except RuntimeError as error:
            log.debug("demo draw %d rejected: %s", attempt, error)
            continue
        drawn = {**drawn, **pose, **_nonlinear_mm(transform, subject.landmarks), **subject.drawn}
        return replace(subject, drawn=drawn), geometry
    raise RuntimeError(f"no valid demo subject in {attempts} draws; the variability is too large for the grid")


def population_variability(root: str | Path) -> str:
    """The variability of the demo population in the folder ``root``, from its ``meta.json`` (populations written
    before ``meta.json`` existed: ``low``)."""
    meta = Path(root) / "meta.json"
    return json.loads(meta.read_text(encoding="utf-8"))["variability"]["name"] if meta.is_file() else "low"


def _progress(n_subjects: int):
    """Subject indices, with a tqdm bar when stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(range(n_subjects), desc="demo subjects", unit="subject", disable=not sys.stderr.isatty())


def write_demo_dataset(out: str | Path, spatial_dims: int = 3, n_subjects: int = 8, seed: int = 0,
                       plane: str = "axial", spacing_mm: float | None = None, variability: str = "realistic",
                       figures: bool = False) -> Path:
    """Write the demo population into the folder ``out`` and return ``out``.

    Every subject (subject 0 included) gets its own random transform and intensity changes, drawn from
    ``seed`` only (subject ``i`` is the same whatever ``n_subjects``). ``plane`` picks the 2D slice;
    ``spacing_mm`` is the 3D voxel size (default 2 mm; 2D is always 1 mm per pixel); ``variability`` is
    ``realistic`` or ``low`` (``VARIABILITIES``); ``figures`` also writes QC PNGs into ``out/figures/``.
    """

    out = Path(out)
    preset = variability_preset(variability)
    if n_subjects < 1:
        raise InputError(f"--subjects must be at least 1, got {n_subjects}")
    if seed < 0:
        raise InputError(f"--seed must be 0 or more, got {seed}")
    if out.exists() and not out.is_dir():
        raise InputError("output exists and is not a folder; choose another --out", path=out)
    started = time.perf_counter()
    template = load_template(spatial_dims, plane, spacing_mm, margin_mm=preset.margin_mm)
    extension = ".nii.gz" if spatial_dims == 3 else ".png"
    seeds = np.random.SeedSequence(seed).spawn(n_subjects)
    items, landmarks, subjects_meta = [], {}, {}
    shown = {}  # the template and the first subjects, for the QC figure
    if figures:
        itself = make_subject(template, identity_transform(spatial_dims))
        shown["template"] = (itself.image, itself.label, template.affine, itself.landmarks)
    for i in _progress(n_subjects):
        rng = np.random.default_rng(seeds[i])
        subject, _ = draw_subject(template, rng, preset)
        key = f"subject_{i:03d}"
        if spatial_dims == 2:  # 8-bit grey PNG; the labels PNG holds the class indices
            image = np.round(np.clip(subject.image, 0.0, 1.0) * 255.0).astype(np.uint8)
        else:
            image = subject.image
        save_image(image, template.affine, out / "images" / f"{key}{extension}")
        save_image(subject.label, template.affine, out / "labels" / f"{key}{extension}")
        landmarks[key] = subject.landmarks
        subjects_meta[key] = subject.drawn
        if figures and len(shown) < FIGURE_SUBJECTS + 1:
            shown[key] = (subject.image, subject.label, template.affine, subject.landmarks)
        items.append({"image": f"images/{key}{extension}", "label": f"labels/{key}{extension}"})
        log.info("demo subject %d/%d written (%s)", i + 1, n_subjects, key)
    write_landmarks(out / "landmarks.csv", landmarks, spatial_dims=spatial_dims)
    write_atomic(out / "datalist.json",
                      json.dumps({"training": items, "validation": [], "test": []}, indent=2) + "\n")
    meta = {"generator": "medssl data demo", "spatial_dims": spatial_dims, "seed": seed, "subjects": n_subjects,
            "plane": plane if spatial_dims == 2 else None, "spacing_mm": float(abs(template.affine[0, 0])),
            "shape": list(template.shape), "variability": asdict(preset), "per_subject": subjects_meta}
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    if figures:

        figure = save_population_figure(out / "figures" / "population.png", shown,
                                        title=f"{spatial_dims}D demo population, {preset.name} variability, "
                                              f"seed {seed}: template and first subjects")
        log.info("QC figure written to %s", figure)
    log.info("demo dataset: %d %dD subjects (%s variability) in %s (%.1f s)", n_subjects, spatial_dims,
             preset.name, out, time.perf_counter() - started)
    return out

