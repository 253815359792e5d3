"""File-level entry points of one-shot landmark detection (what ``medssl landmarks oneshot`` and
``medssl landmarks select-template`` call): paths in, CSV (and PNG figures) out."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medssl.data.geometry import spacing_mm as affine_spacing_mm
from medssl.data.inputs import resolve_images
from medssl.data.landmarks import check_landmarks_in_image, read_landmarks, write_landmarks
from medssl.data.readers import image_key, load_image
from medssl.errors import InputError
from medssl.registry import did_you_mean

log = logging.getLogger(__name__)

METHODS = ("embedding", "ncc", "registration")
NO_CHECKPOINT = "none"
_PREPROCESSING_KEYS = ("modality", "intensity_window")  # model.pt preprocessing entries that prepare_image takes


def load_network(checkpoint: str | Path, spatial_dims: int, arch: str | None = None,
                 device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The embedding network and its preprocessing: a run folder / ``model.pt``, or ``"none"`` for a randomly
    initialised U-Net of size ``arch`` (default ``"small"``), the baseline every pretrained model is compared with."""
    import torch

    from medssl.engine.checkpoint import load_model, read_model_file
    from medssl.networks import build_network

    if str(checkpoint).lower() == NO_CHECKPOINT:
        torch.manual_seed(0)
        return build_network(spatial_dims=spatial_dims, size=arch or "small").to(device).eval(), {}
    payload = read_model_file(checkpoint)
    if int(payload.get("spatial_dims", spatial_dims)) != spatial_dims:
        raise InputError(f"the model is {payload['spatial_dims']}D but the images are {spatial_dims}D; use a "
                         f"{spatial_dims}D pretraining run", path=checkpoint)
    if arch is not None:
        log.warning("--arch %s ignored: the architecture comes from %s", arch, checkpoint)
    return load_model(checkpoint, device=device), dict(payload.get("preprocessing") or {})


def _working_spacing(preprocessing: dict[str, Any], first_image: Path, spatial_dims: int,
                     file_spacing_mm: float | Sequence[float] | None) -> tuple[float, ...]:
    """The grid every image is resampled to: the pretraining spacing if the model has one, else the first
    template's own spacing (so template and queries are compared at one physical scale)."""
    spacing = preprocessing.get("spacing_mm")
    if spacing is not None:
        return tuple([float(spacing)] * spatial_dims if np.isscalar(spacing) else [float(s) for s in spacing])
    return affine_spacing_mm(load_image(first_image, spacing_mm=file_spacing_mm).affine)


def _template_landmarks(templates: Sequence[Path], csv_paths: Sequence[Path]) -> list[dict[str, np.ndarray]]:
    """Landmarks (name -> mm) of each template: one CSV per template, or one CSV for all of them (rows matched by
    image name; a CSV that holds a single image serves a template of any name)."""
    if len(csv_paths) not in (1, len(templates)):
        raise InputError(f"give one --template-landmarks CSV, or one per --template ({len(templates)}); "
                         f"got {len(csv_paths)}")
    result = []
    for index, template in enumerate(templates):
        csv_path = Path(csv_paths[index if len(csv_paths) > 1 else 0])
        table = read_landmarks(csv_path)
        key = image_key(template)
        if key not in table and len(table) != 1:
            raise InputError(f"no rows for template '{key}' (images in the CSV: {', '.join(sorted(table))}"
                             f"{did_you_mean(key, list(table))})", path=csv_path)
        result.append(table.get(key) or next(iter(table.values())))
    names = sorted(result[0])
    for template, landmarks in zip(templates, result):
        if sorted(landmarks) != names:
            raise InputError(f"template landmarks differ from the first template's ({', '.join(names)}): "
                             f"{', '.join(sorted(landmarks))}", path=template)
    return result


def detect_landmarks_files(checkpoint: str | Path | None, templates: Sequence[Path],
                           template_landmarks: Sequence[Path], images: Sequence[str | Path], out_csv: str | Path,
                           method: str = "embedding", arch: str | None = None,
                           spacing_mm: float | Sequence[float] | None = None, figure_dir: str | Path | None = None,
                           device: str = "cpu", truth: str | Path | None = None) -> Path:
    """Predict the templates' landmarks in every image of ``images`` (folders, datalists or files) and write
    ``out_csv`` (world mm + ``score``); returns its path.

    ``method``: ``embedding`` (one-shot matching with ``checkpoint``; ``"none"`` = random init of ``arch``),
    ``ncc`` (intensity template matching) or ``registration`` (affine + B-spline atlas registration); the last
    two ignore ``checkpoint``. ``spacing_mm`` is the pixel size of 2D files without geometry. ``figure_dir``
    receives a PNG per template and per image (with ``truth`` landmarks CSV drawn too, if given).
    """
    from medssl.matching.oneshot import OneShotMatcher, prepare_image

    if method not in METHODS:
        raise InputError(f"unknown method '{method}'{did_you_mean(method, list(METHODS))}; "
                         f"choose one of: {', '.join(METHODS)}")
    templates = [Path(t) for t in templates]
    if not templates:
        raise InputError("give at least one --template image")
    landmarks = _template_landmarks(templates, [Path(p) for p in template_landmarks])
    names = sorted(landmarks[0])
    queries = [image for path in images for image in resolve_images(path)]
    if not queries:
        raise InputError("no images to detect landmarks in; pass --images PATH")
    dims = load_image(templates[0], spacing_mm=spacing_mm).ndim - 1
    matcher, preprocessing = None, {}
    if method == "embedding":
        if checkpoint is None:
            raise InputError("the embedding method needs --checkpoint (a run, its model.pt, or 'none')")
        network, preprocessing = load_network(checkpoint, dims, arch, device)
        matcher = OneShotMatcher(network, device=device)
    options = {key: preprocessing[key] for key in _PREPROCESSING_KEYS if preprocessing.get(key) is not None}
    working_spacing = _working_spacing(preprocessing, templates[0], dims, spacing_mm)
    log.info("one-shot landmarks (%s): %d template(s), %d image(s), grid %s mm", method, len(templates),
             len(queries), tuple(round(s, 4) for s in working_spacing))

    def prepare(path: Path):
        return prepare_image(path, spatial_dims=dims, spacing_mm=working_spacing, file_spacing_mm=spacing_mm, **options)

    prepared_templates = []
    for template, by_name in zip(templates, landmarks):
        image = prepare(template)
        check_landmarks_in_image(by_name, image, template, template)
        points = np.stack([by_name[name] for name in names])  # (L, D)
        reference = matcher.template_vectors(matcher.embed(image), points) if matcher is not None else None
        prepared_templates.append((image, points, reference))
    truth_table = read_landmarks(truth) if truth is not None else {}
    if figure_dir is not None:
        from medssl.matching.figures import save_landmark_figure

        for template, by_name, (image, _, _) in zip(templates, landmarks, prepared_templates):
            save_landmark_figure(Path(figure_dir) / f"template_{image_key(template)}.png", image, by_name,
                                 title=f"template {image_key(template)}")

    predictions: dict[str, dict[str, np.ndarray]] = {}
    scores: dict[str, dict[str, float]] = {}
    seconds = 0.0  # preparing and matching only (figures excluded): the per-image cost that benchmarks report
    for query_path in queries:
        started = time.perf_counter()
        query = prepare(query_path)
        if method == "embedding":
            points, values = matcher.match([reference for _, _, reference in prepared_templates], matcher.embed(query))
        elif method == "ncc":
            from medssl.matching.baselines import ncc_match

            points, values = ncc_match([(image, p) for image, p, _ in prepared_templates], query)
        else:
            from medssl.matching.baselines import registration_match

            points, values = registration_match([(image, p) for image, p, _ in prepared_templates], query)
        seconds += time.perf_counter() - started
        key = image_key(query_path)
        if key in predictions:
            raise InputError(f"two images are named '{key}'; landmark CSV rows are matched by name", path=query_path)
        predictions[key] = {name: points[i] for i, name in enumerate(names)}
        scores[key] = {name: float(values[i]) for i, name in enumerate(names)}
        if figure_dir is not None:
            save_landmark_figure(Path(figure_dir) / f"{key}.png", query, predictions[key], truth_table.get(key),
                                 title=f"{key} ({method})")
    log.info("%d image(s) matched in %.1f s (%.2f s per image) -> %s", len(queries), seconds, seconds / len(queries),
             out_csv)
    return write_landmarks(out_csv, predictions, scores=scores, spatial_dims=dims)


def rank_templates_files(checkpoint: str | Path, images: Sequence[str | Path], out_csv: str | Path, *,
                         arch: str | None = None, spacing_mm: float | Sequence[float] | None = None,
                         n_points: int = 16, device: str = "cpu") -> Path:
    """Rank the images of ``images`` as one-shot templates (SCP-style, ``selection.rank_templates``) and write
    ``out_csv`` with columns ``rank,image,score`` (rank 1 = the image to label first); returns its path."""
    from medssl.matching.oneshot import OneShotMatcher, prepare_image
    from medssl.matching.selection import rank_templates

    paths = [image for path in images for image in resolve_images(path)]
    if len(paths) < 2:
        raise InputError(f"ranking templates needs at least two images, got {len(paths)}")
    dims = load_image(paths[0], spacing_mm=spacing_mm).ndim - 1
    network, preprocessing = load_network(checkpoint, dims, arch, device)
    options = {key: preprocessing[key] for key in _PREPROCESSING_KEYS if preprocessing.get(key) is not None}
    working_spacing = _working_spacing(preprocessing, paths[0], dims, spacing_mm)
    prepared = [prepare_image(p, spatial_dims=dims, spacing_mm=working_spacing, file_spacing_mm=spacing_mm, **options)
                for p in paths]
    values = rank_templates(OneShotMatcher(network, device=device), prepared, n_points=n_points)
    order = np.argsort(-values, kind="stable")
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["rank", "image", "score"])
        for rank, index in enumerate(order, start=1):
            writer.writerow([rank, image_key(paths[index]), f"{values[index]:.6g}"])
    log.info("template ranking of %d images -> %s (best: %s)", len(paths), out_csv, image_key(paths[order[0]]))
    return out_csv
