"""One-shot landmark validation during pretraining (the optional ``validation`` config section).

Every ``validation.every`` steps rank 0 embeds a labeled template and a few labeled images with the network being
trained (eval mode, no gradients), matches the template landmarks (``medssl.matching``) and scores them in mm
(``medssl.metrics``): ``val/mre_mm`` and ``val/sdr_<r>mm``. The network's train/eval modes and every global RNG
are restored afterwards, so a run with validation trains exactly like one without (and resumes bit-exactly).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medssl.data.inputs import resolve_images
from medssl.data.landmarks import read_landmarks
from medssl.data.readers import image_key
from medssl.engine.monitor import VALIDATION_PREFIX
from medssl.errors import InputError
from medssl.matching.oneshot import OneShotMatcher
from medssl.matching.run import Detector, image_preparer, load_templates, template_rows
from medssl.metrics.landmarks import check_sdr_radii, landmark_scores
from medssl.rng import capture_rng, restore_rng

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationConfig:
    """The ``validation`` section of a pretraining config: every ``every`` steps (and at the last), match the
    landmarks of ``template`` (rows in ``template_landmarks``) into ``images`` and score them against ``truth``
    (MRE, SDR at ``sdr_radii_mm``). Paths as for ``data.path``."""

    template: str
    template_landmarks: str
    images: str
    truth: str
    every: int = 50
    sdr_radii_mm: tuple[float, ...] = (2.0, 4.0)


def _labeled_images(template: str | Path, template_landmarks: str | Path, images: str | Path,
                    truth: str | Path) -> tuple[list[Path], dict[str, dict[str, np.ndarray]]]:
    """The validation images (the template left out) and their true landmarks; checks every path and that each
    image has true landmarks (cheap: no image is decoded)."""
    template = Path(template)
    if not template.is_file():
        raise InputError("no such template image; check the path", path=template)
    template_rows(template, template_landmarks)
    table = read_landmarks(truth)
    paths = [path for path in resolve_images(images) if image_key(path) != image_key(template)]
    if not paths:
        raise InputError("no validation images besides the template", path=images)
    unlabeled = [image_key(path) for path in paths if image_key(path) not in table]
    if unlabeled:
        raise InputError(f"no true landmarks for validation image(s) {', '.join(unlabeled[:5])}", path=truth)
    return paths, {image_key(path): table[image_key(path)] for path in paths}


def check_validation(validation: ValidationConfig) -> None:
    """Config-time checks of the ``validation`` section: ``every``, the SDR radii and every path (``InputError``
    naming the config key and the file)."""
    if validation.every < 1:
        raise InputError(f"config key 'validation.every' must be >= 1, got {validation.every}")
    try:
        check_sdr_radii(validation.sdr_radii_mm)
        _labeled_images(validation.template, validation.template_landmarks, validation.images, validation.truth)
    except InputError as err:
        raise InputError(f"config section 'validation': {err}") from None


class LandmarkValidator:
    """Scores one-shot landmark matching with a network: ``validator(network)`` -> ``{"val/mre_mm": ...,
    "val/sdr_2mm": ...}``. Images are read and prepared once, as ``model.pt``'s ``preprocessing`` prescribes."""

    def __init__(self, *, template: str | Path, template_landmarks: str | Path, images: str | Path,
                 truth: str | Path, sdr_radii_mm: Sequence[float], spatial_dims: int,
                 preprocessing: dict[str, Any], device: str | torch.device):
        paths, self.truth = _labeled_images(template, template_landmarks, images, truth)
        prepare = image_preparer(preprocessing, Path(template), spatial_dims)
        self.templates = load_templates([template], [template_landmarks], prepare)
        self.queries = {image_key(path): prepare(path) for path in paths}
        self.sdr_radii_mm = check_sdr_radii(sdr_radii_mm)
        self.device = device
        log.info("validation: %d landmark(s) of %s matched into %d image(s)", len(self.templates.names),
                 image_key(template), len(self.queries))

    def __call__(self, network: nn.Module, levels: Sequence[int] | None = None,
                 pyramid: Sequence[int] = (1,)) -> dict[str, float]:
        """MRE (mm) and SDR (fractions) of ``network``'s one-shot predictions matched on feature ``levels`` (default
        all; the pretraining loop passes its objectives' ``trained_levels``) at the spacing factors ``pyramid`` (the
        loop passes ``data.pyramid``); leaves ``network``'s modes and the global RNG states as they were."""
        modes = [(module, module.training) for module in network.modules()]
        rng = capture_rng()
        try:
            with torch.no_grad():
                # each landmark's own match: validation scores the features (and skips support-point matching)
                matcher = OneShotMatcher(network, levels=levels, consistency="none", pyramid=pyramid,
                                         device=self.device)
                detector = Detector("embedding", self.templates, matcher)
                predictions = {key: dict(zip(self.templates.names, detector(query).points_mm))
                               for key, query in self.queries.items()}
        finally:
            restore_rng(rng)
            for module, training in modes:
                module.train(training)
        scores = landmark_scores(predictions, self.truth, self.sdr_radii_mm)
        return {f"{VALIDATION_PREFIX}mre_mm": scores["mre_mm"],
                **{f"{VALIDATION_PREFIX}sdr_{radius}mm": value for radius, value in scores["sdr"].items()}}
