"""Template choice (METHODS 5.3, SCP-style): rank unlabeled images by how well their salient points are found in
every other image of the pool; the best-ranked image is the one to label as the one-shot template.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from monai.data import MetaTensor

from medssl.data.geometry import spacing_mm as affine_spacing_mm
from medssl.matching.oneshot import Embedding, OneShotMatcher

log = logging.getLogger(__name__)


def salient_points(image: MetaTensor, *, n_points: int = 16, min_distance_mm: float = 10.0,
                   border_fraction: float = 0.1, sigma_mm: float = 2.0) -> np.ndarray:
    """Up to ``n_points`` corner-like voxels ``(K, D)`` of ``image`` (channel 0): local maxima of the smallest
    structure-tensor eigenvalue (Shi-Tomasi, n-D, scikit-image) at least ``min_distance_mm`` apart, away from a
    ``border_fraction`` margin. Stands in for SCP's SIFT keypoints, which have no 3D version."""
    from skimage.feature import peak_local_max, structure_tensor, structure_tensor_eigenvalues

    array = image.as_tensor()[0].detach().cpu().double().numpy()
    spacing = np.asarray(affine_spacing_mm(image.affine))
    sigma = [sigma_mm / s for s in spacing]
    response = structure_tensor_eigenvalues(structure_tensor(array, sigma=sigma, order="rc"))[-1]  # smallest
    margin = np.maximum(1, np.round(border_fraction * np.asarray(array.shape))).astype(int)
    mask = np.zeros(array.shape, dtype=bool)
    mask[tuple(slice(m, s - m) for m, s in zip(margin, array.shape))] = True
    min_distance = max(1, int(round(min_distance_mm / float(spacing.min()))))
    return peak_local_max(np.where(mask, response, 0.0), min_distance=min_distance, num_peaks=n_points,
                          exclude_border=False, labels=mask.astype(np.uint8)).astype(np.float64)


def rank_templates(matcher: OneShotMatcher, images: Sequence[MetaTensor], *, n_points: int = 16,
                   min_distance_mm: float = 10.0) -> np.ndarray:
    """Representativeness score per image ``(N,)``: the mean, over its salient points and over every other image,
    of the best combined similarity found there (higher = a better template). Needs at least two images."""
    if len(images) < 2:
        raise ValueError("ranking templates needs at least two images")
    embeddings: list[Embedding] = [matcher.embed(image) for image in images]
    scores = np.zeros(len(images))
    for index, (image, embedding) in enumerate(zip(images, embeddings)):
        points = salient_points(image, n_points=n_points, min_distance_mm=min_distance_mm)
        if len(points) == 0:
            log.warning("image %d has no salient point; it ranks last", index)
            continue
        vectors = matcher.template_vectors(embedding, embedding.to_world(points))
        best = [matcher.similarity(other, vectors).flatten(1).max(dim=1).values.mean().item()  # (K,) -> mean
                for other_index, other in enumerate(embeddings) if other_index != index]
        scores[index] = float(np.mean(best))
        log.debug("template candidate %d: %d points, score %.4f", index, len(points), scores[index])
    return scores
