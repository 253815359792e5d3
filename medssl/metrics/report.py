"""File-level evaluation behind ``medssl evaluate landmarks|seg``: read, match by image key, score, log a table,
optionally write the scores as JSON (atomically; NaN written as ``null``)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

from medssl.data import keys
from medssl.data.inputs import resolve_images, resolve_items
from medssl.data.landmarks import read_landmarks
from medssl.data.readers import image_key, load_label
from medssl.errors import InputError
from medssl.metrics.landmarks import DEFAULT_SDR_RADII_MM, check_sdr_radii, landmark_scores
from medssl.metrics.segmentation import segmentation_scores
from medssl.outputs import check_output, write_atomic

log = logging.getLogger(__name__)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows as aligned text columns (first column left-aligned, the others right-aligned); floats with 3 decimals."""
    cells = [list(header)] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(header))]
    lines = ["  ".join(row[0].ljust(widths[0]) if k == 0 else row[k].rjust(widths[k]) for k in range(len(row)))
             .rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _json_ready(value: object) -> object:
    """A copy of nested dicts/lists with NaN/inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_scores_json(scores: dict, path: str | Path) -> Path:
    """Write ``scores`` as indented JSON, atomically, NaN as ``null``; returns the path."""
    path = Path(path)
    write_atomic(path, json.dumps(_json_ready(scores), indent=2) + "\n")
    log.info("wrote %s", path)
    return path


def evaluate_landmarks_files(pred: str | Path, truth: str | Path,
                             sdr_radii_mm: Sequence[float] = DEFAULT_SDR_RADII_MM,
                             json_path: str | Path | None = None) -> dict:
    """Score a predicted landmark CSV against a true one (see ``landmark_scores``); images match by image key.

    Images in only one of the two are not scored (listed in the scores, and warned about); errors in the pairing
    name the prediction CSV.
    """
    check_sdr_radii(sdr_radii_mm)
    if json_path is not None:
        check_output(json_path, kind="file", inputs=[pred, truth])
    predicted, true = read_landmarks(pred), read_landmarks(truth)
    try:
        scores = landmark_scores(predicted, true, sdr_radii_mm)
    except InputError as error:
        raise InputError(f"{error.message} (truth: {truth})", path=pred) from None
    log.info("landmarks: %d image(s), %d missing prediction(s)\n%s\n\n%s", scores["n_images"], scores["n_missing"],
             format_table(["score", "value"], [["MRE (mm)", scores["mre_mm"]], ["SD (mm)", scores["std_mm"]]]
                          + [[f"SDR < {r} mm", value] for r, value in scores["sdr"].items()]),
             format_table(["landmark", "MRE (mm)"],
                          [[name, entry["mre_mm"]] for name, entry in scores["per_landmark"].items()]))
    if json_path is not None:
        write_scores_json(scores, json_path)
    return scores


def _truth_labels(truth: str | Path) -> dict[str, Path]:
    """Image key -> true label map: every image of a folder, or the ``label`` of every datalist item (keyed by its
    image's key; the label's own key also matches when it differs)."""
    truth = Path(truth)
    items = resolve_items(truth)
    is_datalist = truth.is_file() and truth.suffix.lower() == ".json"
    labels: dict[str, Path] = {}
    for item in items:
        label = item.get(keys.LABEL) if is_datalist else item[keys.IMAGE]
        if label is None:
            continue
        for key in dict.fromkeys([image_key(item[keys.IMAGE]), image_key(label)]):
            if key in labels and labels[key] != label:
                raise InputError(f"two true label maps for image '{key}': {labels[key]} and {label}", path=truth)
            labels[key] = label
    if not labels:
        raise InputError("the datalist has no 'label' entries to evaluate against", path=truth)
    return labels


def evaluate_segmentation_files(pred: str | Path, truth: str | Path, json_path: str | Path | None = None) -> dict:
    """Score a folder of predicted label maps against true ones (folder or datalist JSON), see
    ``segmentation_scores``, plus ``unscored_images`` (true label maps without a prediction, warned about). Every
    prediction needs a truth with the same image key and the same grid."""
    if json_path is not None:
        check_output(json_path, kind="file", inputs=[pred, truth])
    labels = _truth_labels(truth)
    predictions = resolve_images(pred)
    seen: dict[str, Path] = {}
    pairs = []
    for prediction in predictions:
        key = image_key(prediction)
        if key in seen:
            raise InputError(f"two predictions for image '{key}': {seen[key]} and {prediction}", path=pred)
        seen[key] = prediction
        if key not in labels:
            raise InputError(f"prediction for image '{key}' has no true label map in {truth}; names must match "
                             "without extension", path=prediction)
        true_label = load_label(labels[key])
        pairs.append((load_label(prediction, like=true_label), true_label))
    unscored = sorted(image_key(label) for label in set(labels.values()) - {labels[key] for key in seen})
    if unscored:
        log.warning("%d true label map(s) of %s have no prediction and are not scored: %s%s", len(unscored), truth,
                    ", ".join(unscored[:5]), " ..." if len(unscored) > 5 else "")
    scores = {**segmentation_scores(pairs), "unscored_images": unscored}
    log.info("segmentation: %d image(s), mean Dice %s\n%s", scores["n_images"], _cell(scores["mean_dice"]),
             format_table(["class", "Dice", "HD95 (mm)"],
                          [[c, scores["dice"][c], scores["hd95_mm"][c]] for c in scores["dice"]]))
    if json_path is not None:
        write_scores_json(scores, json_path)
    return scores
