"""Landmark detection scores in millimetres: radial error, MRE, SDR.

Written here because the scores are simple sums over our landmark dictionaries (image key -> name -> world mm
``(D,)``, as ``medssl.data.landmarks.read_landmarks`` returns them); MONAI has no landmark metrics.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

from medssl.errors import InputError

log = logging.getLogger(__name__)

Landmarks = Mapping[str, Mapping[str, np.ndarray]]
DEFAULT_SDR_RADII_MM: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0)


def radius_key(radius_mm: float) -> str:
    """The JSON key of an SDR radius: ``2.0 -> "2"``, ``2.5 -> "2.5"`` (no trailing ``.0``)."""
    radius_mm = float(radius_mm)
    return str(int(radius_mm)) if radius_mm.is_integer() else repr(radius_mm)


def _dimension(landmarks: Landmarks, what: str) -> int:
    """The one spatial dimension (2 or 3) of every point in ``landmarks``; ``InputError`` when they disagree."""
    dims = {int(np.asarray(point).shape[-1]) for by_name in landmarks.values() for point in by_name.values()}
    if len(dims) != 1:
        raise InputError(f"{what} landmarks mix dimensions {sorted(dims) or 'none'}; use one of x,y or x,y,z")
    return dims.pop()


def check_sdr_radii(sdr_radii_mm: Sequence[float]) -> list[float]:
    """The radii as floats; ``InputError`` (naming ``--sdr``) unless there is at least one and all are positive."""
    radii = [float(r) for r in sdr_radii_mm]
    if not radii or not all(np.isfinite(r) and r > 0 for r in radii):
        raise InputError(f"SDR radii must be positive numbers of mm such as 2,2.5,3,4, got {list(sdr_radii_mm)}",
                         path="--sdr")
    return radii


def missing_predictions(pred: Landmarks, truth: Landmarks) -> list[tuple[str, str]]:
    """``(image, name)`` of every true landmark of a predicted image that has no prediction, sorted."""
    return sorted((image, name) for image in pred.keys() & truth.keys() for name in truth[image]
                  if name not in pred[image])


def radial_errors_mm(pred: Landmarks, truth: Landmarks) -> dict[tuple[str, str], float]:
    """Euclidean distance in mm between prediction and truth for every ``(image, name)`` present in both.

    Pairs present in only one are left out here; ``landmark_scores`` counts the missing predictions.
    Raises ``InputError`` when the two share no image or no landmark, or when their dimensions differ.
    """
    shared_images = sorted(pred.keys() & truth.keys())
    if not shared_images:
        raise InputError(f"predictions and truth share no image (predicted: {', '.join(sorted(pred)[:5]) or 'none'}; "
                         f"true: {', '.join(sorted(truth)[:5]) or 'none'}); image names must match without extension")
    pred_dims, truth_dims = _dimension(pred, "predicted"), _dimension(truth, "true")
    if pred_dims != truth_dims:
        raise InputError(f"predicted landmarks are {pred_dims}D but true landmarks are {truth_dims}D")
    errors = {
        (image, name): float(np.linalg.norm(np.asarray(pred[image][name], float) - np.asarray(truth[image][name], float)))
        for image in shared_images for name in sorted(pred[image].keys() & truth[image].keys())
    }
    if not errors:
        raise InputError("predictions and truth share images but no landmark name; names must match exactly")
    return errors


def landmark_scores(pred: Landmarks, truth: Landmarks,
                    sdr_radii_mm: Sequence[float] = DEFAULT_SDR_RADII_MM) -> dict:
    """MRE, its standard deviation (population, ddof=0) and SDR over every landmark present in both.

    Returns ``{"n_images", "mre_mm", "std_mm", "median_mm", "sdr": {"2": f, ...}, "per_landmark": {NAME: {"mre_mm"}},
    "n_missing", "unscored_images", "unknown_images"}``. ``n_images`` counts images with at least one scored
    landmark; SDR at radius r is the fraction of errors strictly below r. ``n_missing`` counts true landmarks of
    predicted images without a prediction: they are excluded from MRE and SDR. ``unscored_images`` lists the true
    images without any prediction, ``unknown_images`` the predicted images not in the truth (both sorted, not
    scored). Each of the three is logged as a warning when not empty.
    """
    radii = check_sdr_radii(sdr_radii_mm)
    errors = radial_errors_mm(pred, truth)
    missing = missing_predictions(pred, truth)
    unscored, unknown = sorted(truth.keys() - pred.keys()), sorted(pred.keys() - truth.keys())
    for what, found in (("true landmark(s) of predicted images have no prediction",
                         [f"{image}/{name}" for image, name in missing]),
                        ("true image(s) have no prediction", unscored),
                        ("predicted image(s) are not in the truth", unknown)):
        if found:
            log.warning("%d %s and are not scored: %s%s", len(found), what, ", ".join(found[:5]),
                        " ..." if len(found) > 5 else "")
    values = np.array(list(errors.values()))  # (N,)
    names = sorted({name for _, name in errors})
    return {
        "n_images": len({image for image, _ in errors}),
        "mre_mm": float(values.mean()),
        "std_mm": float(values.std()),
        "median_mm": float(np.median(values)),
        "sdr": {radius_key(r): float((values < r).mean()) for r in radii},
        "per_landmark": {
            name: {"mre_mm": float(np.mean([e for (_, n), e in errors.items() if n == name]))} for name in names
        },
        "n_missing": len(missing),
        "unscored_images": unscored,
        "unknown_images": unknown,
    }
