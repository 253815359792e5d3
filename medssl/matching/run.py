"""File-level entry points of one-shot landmark detection (what ``medssl landmarks oneshot`` and
``medssl landmarks select-template`` call, and what the pretraining validation hook reuses): paths in, CSV (and PNG
figures) out."""

from __future__ import annotations

import csv
import functools
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from medssl.data.geometry import spacing_mm as affine_spacing_mm
from medssl.data.inputs import resolve_images
from medssl.data.landmarks import check_landmarks_in_image, read_landmarks, write_landmarks
from medssl.data.readers import image_key, load_image
from medssl.dist import pick_device
from medssl.errors import InputError
from medssl.matching.baselines import ncc_match, registration_match
from medssl.matching.figures import save_landmark_figure
from medssl.matching.oneshot import Matches, OneShotMatcher, check_levels, prepare_image
from medssl.matching.selection import rank_templates
from medssl.networks.model_file import is_random_init, load_network
from medssl.outputs import atomic_writer, check_output
from medssl.registry import did_you_mean, look_up
from medssl.transforms.preprocess import Preprocessing
from medssl.transforms.views import check_pyramid

log = logging.getLogger(__name__)

METHODS = ("embedding", "ncc", "registration")


def check_method(method: str) -> None:
    """``InputError`` (with a "did you mean") unless ``method`` is one of ``METHODS``."""
    look_up(method, METHODS, what="method", path="--method")


def parse_levels(text: str, option: str = "--levels") -> list[int]:
    """``--levels`` (or ``--pyramid``) text ``"0,1"`` -> ``[0, 1]`` (the values are checked by the matcher);
    ``InputError`` naming ``option`` unless it is comma-separated whole numbers."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        example = "0,1 (0 = bottleneck)" if option == "--levels" else "1,2 (1 = the working spacing)"
        raise InputError(f"expected comma-separated whole numbers such as {example}, got '{text}'",
                         path=option) from None


class MatchingSetup(NamedTuple):
    """What ``matching_network`` returns: the network, its preprocessing, the feature levels and the pyramid
    factors to match with."""

    network: nn.Module
    preprocessing: dict[str, Any]
    levels: list[int]
    pyramid: list[int]


def matching_network(checkpoint: str | Path, spatial_dims: int, arch: str | None = None,
                     device: str | torch.device = "cpu", levels: Sequence[int] | None = None,
                     pyramid: Sequence[int] | None = None) -> MatchingSetup:
    """The embedding network (``load_network``: a run folder / ``model.pt``, or ``"none"`` for a randomly initialised
    U-Net of size ``arch``, default ``"small"``, the baseline every pretrained model is compared with), its
    preprocessing, the feature levels to match: ``levels`` (``--levels``) if given, else those ``model.pt``
    records (the union of its objectives' ``trained_levels``), else all (random init, or a ``model.pt`` of an older
    medssl), and the pyramid factors: ``pyramid`` (``--pyramid``) if given, else ``model.pt``'s (its pretraining's
    ``data.pyramid``), else ``[1]``; logged."""
    random_init = is_random_init(checkpoint)
    if not random_init and arch is not None:
        log.warning("--arch %s ignored: the architecture comes from %s", arch, checkpoint)
    loaded = load_network(checkpoint, spatial_dims, device=device,
                          architecture={"size": arch or "small"} if random_init else None)
    if loaded.task is not None:
        raise InputError("this is a fine-tuned model (its network ends in a task head); pass a pretraining run here, "
                         "or use it with 'medssl predict'", path=checkpoint)
    recorded, methods = loaded.levels
    why = ("random init" if random_init else "model.pt records none: written by an older medssl" if recorded is None
           else f"trained by {'+'.join(methods)}, from model.pt" if methods else "from model.pt")
    count = len(loaded.network.feature_info)
    if levels is not None:
        chosen, why = check_levels(levels, count), "--levels"
    else:
        chosen = list(range(count)) if recorded is None else check_levels(recorded, count)
    described = f"all {count} levels" if chosen == list(range(count)) else f"levels {','.join(map(str, chosen))}"
    factors = list(check_pyramid(pyramid if pyramid is not None else loaded.pyramid or [1],
                                 "--pyramid" if pyramid is not None else f"{checkpoint}: matching.pyramid"))
    scales = "" if factors == [1] else (f" at spacing x {','.join(map(str, factors))} "
                                        f"({'--pyramid' if pyramid is not None else 'from model.pt'})")
    log.info("one-shot matching: %s (%s)%s", described, why, scales)
    return MatchingSetup(loaded.network, loaded.preprocessing, chosen, factors)


def method_matcher(method: str, checkpoint: str | Path | None, spatial_dims: int, *, arch: str | None = None,
                   device: str | torch.device = "auto", levels: Sequence[int] | None = None,
                   pyramid: Sequence[int] | None = None, amp: str = "off",
                   **options: Any) -> tuple[OneShotMatcher | None, dict[str, Any]]:
    """For ``method`` ``embedding``: the ``OneShotMatcher`` (``options``: its keyword arguments) on the network of
    ``checkpoint`` with its levels and pyramid (``matching_network``), embedding in precision ``amp``, and the
    model's preprocessing; for the other methods ``(None, {})`` (and a warning when ``levels``, ``pyramid`` or
    ``amp`` was given, as they use no network)."""
    if method != "embedding":
        for name, value in (("--levels", levels), ("--pyramid", pyramid), ("--amp", None if amp == "off" else amp)):
            if value is not None:
                log.warning("%s ignored: --method %s uses no network", name, method)
        return None, {}
    if checkpoint is None:
        raise InputError("the embedding method needs --checkpoint (a run, its model.pt, or 'none')")
    device = pick_device(device)
    setup = matching_network(checkpoint, spatial_dims, arch, device, levels, pyramid)
    matcher = OneShotMatcher(setup.network, levels=setup.levels, pyramid=setup.pyramid, device=device, amp=amp,
                             **options)
    return matcher, setup.preprocessing


def image_preparer(preprocessing: dict[str, Any], first_image: Path, spatial_dims: int,
                   file_spacing_mm: float | Sequence[float] | None = None,
                   network: Any = None) -> Callable[[Path], MetaTensor]:
    """``path -> prepared image`` as the network saw its training scans (``model.pt``'s ``preprocessing``), every
    image on one grid: the pretraining spacing if the model has one, else the first image's own spacing (so
    templates and queries are compared at one physical scale). ``file_spacing_mm`` (default: the model's
    ``file_spacing_mm``, else 1 mm) is the pixel size of 2D files without geometry; with the ``network``, images
    smaller than its divisor or with other than its input channels are refused."""
    spec = Preprocessing.from_options(preprocessing)
    if file_spacing_mm is not None:
        spec = replace(spec, file_spacing_mm=file_spacing_mm)
    grid = spec.grid(spatial_dims)
    if grid is None:  # the first image's own grid, as oriented (RAS) for the network
        grid = affine_spacing_mm(spec.read(first_image, spatial_dims)[0].affine)
    spec = replace(spec, spacing_mm=tuple(float(s) for s in grid))
    return functools.partial(prepare_image, spatial_dims=spatial_dims, **spec.to_dict(), **network_fit(network))


def checkpoint_input(checkpoint: str | Path | None, method: str = "embedding") -> str | Path | None:
    """The checkpoint as an input path for ``check_output`` (None when unused or ``none``)."""
    if method != "embedding" or checkpoint is None or is_random_init(checkpoint):
        return None
    return checkpoint


def network_fit(network: Any) -> dict[str, int]:
    """``prepare_image``'s ``min_size`` and ``channels`` for ``network`` (nothing without one)."""
    if network is None:
        return {}
    return {"min_size": int(network.min_size_divisor), "channels": int(network.in_channels)}


@dataclass(frozen=True)
class Templates:
    """Prepared template images and their landmarks: ``points_mm[k]`` is ``(L, D)`` world mm in ``names`` order."""

    paths: list[Path]
    images: list[MetaTensor]
    names: list[str]
    points_mm: list[np.ndarray]


def template_rows(template: str | Path, csv_path: str | Path) -> dict[str, np.ndarray]:
    """The landmarks (name -> world mm) of ``template`` in ``csv_path``: its rows by image name, or every row of a
    CSV that holds a single image."""
    table = read_landmarks(csv_path)
    key = image_key(template)
    if key not in table and len(table) != 1:
        raise InputError(f"no rows for template '{key}' (images in the CSV: {', '.join(sorted(table))}"
                         f"{did_you_mean(key, list(table))})", path=csv_path)
    return table.get(key) or next(iter(table.values()))


def load_templates(templates: Sequence[str | Path], csv_paths: Sequence[str | Path],
                   prepare: Callable[[Path], MetaTensor]) -> Templates:
    """Read and prepare the template images with their landmarks: one CSV per template, or one CSV for all of
    them (rows matched by image name; a CSV that holds a single image serves a template of any name). One or more
    templates, each carrying the same landmark names, inside its image."""
    templates, csv_paths = [Path(t) for t in templates], [Path(p) for p in csv_paths]
    if len(csv_paths) not in (1, len(templates)):
        raise InputError(f"give one --template-landmarks CSV, or one per --template ({len(templates)}); "
                         f"got {len(csv_paths)}")
    tables = []
    for index, template in enumerate(templates):
        csv_path = csv_paths[index if len(csv_paths) > 1 else 0]
        tables.append((csv_path, template_rows(template, csv_path)))
    names = sorted(tables[0][1])
    images, points = [], []
    for template, (csv_path, by_name) in zip(templates, tables):
        if sorted(by_name) != names:
            raise InputError(f"landmarks of template '{image_key(template)}' ({', '.join(sorted(by_name))}) differ "
                             f"from the first template's ({', '.join(names)})", path=csv_path)
        image = prepare(template)
        check_landmarks_in_image(by_name, image, csv_path, template)
        images.append(image)
        points.append(np.stack([by_name[name] for name in names]))  # (L, D)
    return Templates(templates, images, names, points)


class Detector:
    """Find the landmarks of ``templates`` in prepared query images with ``method``: ``embedding`` (needs
    ``matcher``; template vectors are computed once here), ``ncc`` or ``registration``."""

    def __init__(self, method: str, templates: Templates, matcher: OneShotMatcher | None = None):
        check_method(method)
        self.method, self.templates, self.matcher = method, templates, matcher
        self.references = None
        if method == "embedding":
            self.references = [matcher.reference(matcher.embed(image), image, points)
                                for image, points in zip(templates.images, templates.points_mm)]

    def __call__(self, query: MetaTensor) -> Matches:
        """The landmarks (in ``templates.names`` order) found in ``query``."""
        if self.method == "embedding":
            return self.matcher.match(self.references, self.matcher.embed(query))
        pairs = list(zip(self.templates.images, self.templates.points_mm))
        if self.method == "ncc":
            points, scores = ncc_match(pairs, query)
        else:
            points, scores = registration_match(pairs, query)
        return Matches(points, scores, np.full(len(scores), np.nan))


def detect_landmarks_files(checkpoint: str | Path | None, templates: Sequence[Path],
                           template_landmarks: Sequence[Path], images: Sequence[str | Path], out_csv: str | Path,
                           method: str = "embedding", arch: str | None = None,
                           spacing_mm: float | Sequence[float] | None = None, figure_dir: str | Path | None = None,
                           device: str = "auto", truth: str | Path | None = None,
                           levels: Sequence[int] | None = None, search: str = "global",
                           consistency: str | None = None, min_score: float | None = None,
                           pyramid: Sequence[int] | None = None, amp: str = "off") -> Path:
    """Predict the templates' landmarks in every image of ``images`` (folders, datalists or files) and write
    ``out_csv`` (world mm, ``score`` and, for the embedding, ``residual_mm``: how far the landmark's own best
    match lay from the consistent answer); returns its path.

    ``method``: ``embedding`` (one-shot matching with ``checkpoint``; ``"none"`` = random init of ``arch``),
    ``ncc`` (intensity template matching) or ``registration`` (affine + B-spline atlas registration); the last
    two ignore ``checkpoint``. ``spacing_mm`` is the pixel size of 2D files without geometry. ``figure_dir``
    receives a PNG per template and per image (with ``truth`` landmarks CSV drawn too, if given). ``levels``: the
    feature levels the embedding matches with and ``pyramid`` the spacing factors it embeds images at (default:
    those ``model.pt`` records, see ``matching_network``). ``search``, ``consistency`` (None: the default of the
    dimension) and ``amp`` (the network's precision): see ``OneShotMatcher``. ``min_score``: landmarks scoring below it are left out of ``out_csv`` (reported missing by
    ``evaluate``) instead of guessed.
    """
    check_method(method)
    if min_score is not None and not np.isfinite(min_score):
        raise InputError(f"expected a finite number, got {min_score}", path="--min-score")
    templates = [Path(t) for t in templates]
    if not templates:
        raise InputError("give at least one --template image")
    queries = [image for path in images for image in resolve_images(path)]
    if not queries:
        raise InputError("no images to detect landmarks in; pass --images PATH")
    inputs = [checkpoint_input(checkpoint, method), *templates, *template_landmarks, *images, *queries, truth]
    check_output(out_csv, kind="file", inputs=inputs)
    if figure_dir is not None:
        check_output(figure_dir, kind="folder", inputs=[*inputs, out_csv])
    truth_table = read_landmarks(truth) if truth is not None else {}
    also_queries = sorted({image_key(t) for t in templates} & {image_key(q) for q in queries} & truth_table.keys())
    if also_queries:
        log.warning("template(s) %s are also among the images: their own landmarks come back (error ~0) and count "
                    "in the scores against %s", ", ".join(also_queries), truth)
    dims = load_image(templates[0], spacing_mm=spacing_mm).ndim - 1
    matcher, preprocessing = method_matcher(method, checkpoint, dims, arch=arch, device=device, levels=levels,
                                            pyramid=pyramid, amp=amp, search=search, consistency=consistency)
    prepare = image_preparer(preprocessing, templates[0], dims, spacing_mm,
                             network=None if matcher is None else matcher.network)
    log.info("one-shot landmarks (%s): %d template(s), %d image(s), grid %s mm", method, len(templates),
             len(queries), tuple(round(s, 4) for s in prepare.keywords["spacing_mm"]))
    loaded = load_templates(templates, template_landmarks, prepare)
    detector = Detector(method, loaded, matcher)
    if figure_dir is not None:
        for path, image, points in zip(loaded.paths, loaded.images, loaded.points_mm):
            save_landmark_figure(Path(figure_dir) / f"template_{image_key(path)}.png", image,
                                 dict(zip(loaded.names, points)), title=f"template {image_key(path)}")

    predictions: dict[str, dict[str, np.ndarray]] = {}
    scores: dict[str, dict[str, float]] = {}
    residuals: dict[str, dict[str, float]] = {}
    left_out = 0
    seconds = 0.0  # preparing and matching only (figures excluded): the per-image cost that benchmarks report
    for query_path in queries:
        key = image_key(query_path)
        if key in predictions:
            raise InputError(f"two images are named '{key}'; landmark CSV rows are matched by name", path=query_path)
        started = time.perf_counter()
        query = prepare(query_path)
        found = detector(query)
        seconds += time.perf_counter() - started
        keep = np.ones(len(loaded.names), dtype=bool) if min_score is None else found.scores >= min_score
        left_out += int((~keep).sum())
        names = [name for name, kept in zip(loaded.names, keep) if kept]
        predictions[key] = dict(zip(names, found.points_mm[keep]))
        scores[key] = dict(zip(names, found.scores[keep].tolist()))
        residuals[key] = dict(zip(names, found.residual_mm[keep].tolist()))
        if figure_dir is not None:
            save_landmark_figure(Path(figure_dir) / f"{key}.png", query, predictions[key], truth_table.get(key),
                                 title=f"{key} ({method})")
    log.info("%d image(s) matched in %.1f s (%.2f s per image) -> %s", len(queries), seconds, seconds / len(queries),
             out_csv)
    if min_score is not None:
        log.info("--min-score %g: %d of %d landmark(s) scored below it and are left out of %s (missing, not "
                 "guessed)", min_score, left_out, len(queries) * len(loaded.names), out_csv)
    columns = {"residual_mm": residuals} if method == "embedding" else None
    return write_landmarks(out_csv, predictions, scores=scores, spatial_dims=dims, columns=columns)


def rank_templates_files(checkpoint: str | Path, images: Sequence[str | Path], out_csv: str | Path, *,
                         arch: str | None = None, spacing_mm: float | Sequence[float] | None = None,
                         n_points: int = 16, device: str = "auto", levels: Sequence[int] | None = None,
                         pyramid: Sequence[int] | None = None, amp: str = "off") -> Path:
    """Rank the images of ``images`` as one-shot templates (SCP-style, ``selection.rank_templates``) and write
    ``out_csv`` with columns ``rank,image,score`` (rank 1 = the image to label first); returns its path.
    ``levels`` and ``pyramid``: the feature levels matched and the spacing factors embedded at (default: those
    ``model.pt`` records, see ``matching_network``); ``amp``: the network's precision (``OneShotMatcher``)."""
    paths = [image for path in images for image in resolve_images(path)]
    if len(paths) < 2:
        raise InputError(f"ranking templates needs at least two images, got {len(paths)}")
    if n_points < 1:
        raise InputError(f"the number of salient points must be >= 1, got {n_points}", path="--points")
    check_output(out_csv, kind="file", inputs=[checkpoint_input(checkpoint), *images, *paths])
    dims = load_image(paths[0], spacing_mm=spacing_mm).ndim - 1
    matcher, preprocessing = method_matcher("embedding", checkpoint, dims, arch=arch, device=device, levels=levels,
                                            pyramid=pyramid, amp=amp)
    prepare = image_preparer(preprocessing, paths[0], dims, spacing_mm, network=matcher.network)
    values = rank_templates(matcher, [prepare(p) for p in paths], n_points=n_points)
    order = np.argsort(-values, kind="stable")
    out_csv = Path(out_csv)
    with atomic_writer(out_csv, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["rank", "image", "score"])
        for rank, index in enumerate(order, start=1):
            writer.writerow([rank, image_key(paths[index]), f"{values[index]:.6g}"])
    log.info("template ranking of %d images -> %s (best: %s)", len(paths), out_csv, image_key(paths[order[0]]))
    return out_csv
