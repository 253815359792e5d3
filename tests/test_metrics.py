"""Landmark and segmentation scores against hand-computed values and an independent HD95 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from medssl.errors import InputError
from medssl.metrics.landmarks import landmark_scores, missing_predictions, radial_errors_mm, radius_key
from medssl.metrics.segmentation import image_scores, label_classes, segmentation_scores


def _points(**by_image: dict[str, tuple[float, ...]]) -> dict[str, dict[str, np.ndarray]]:
    return {image: {name: np.array(p, dtype=float) for name, p in names.items()} for image, names in by_image.items()}


# ---------------------------------------------------------------------------------------------- landmarks
TRUTH_2D = _points(a={"L1": (0, 0), "L2": (10, 10)}, b={"L1": (1, 1), "L2": (0, 0), "L3": (7, 7)},
                   d={"L1": (5, 5)})
# errors: a/L1 = 5 (3-4-5), a/L2 = 2 (exactly a radius), b/L1 = 0, b/L2 = 2.5 (exactly a radius); b/L3 missing
PRED_2D = _points(a={"L1": (3, 4), "L2": (10, 12)}, b={"L1": (1, 1), "L2": (0, 2.5)}, c={"L1": (0, 0)})


def test_radius_key_has_no_trailing_zero():
    assert [radius_key(r) for r in (2, 2.0, 2.5, 10.0, 0.25)] == ["2", "2", "2.5", "10", "0.25"]


def test_radial_errors_only_pairs_in_both():
    errors = radial_errors_mm(PRED_2D, TRUTH_2D)
    assert errors == {("a", "L1"): 5.0, ("a", "L2"): 2.0, ("b", "L1"): 0.0, ("b", "L2"): 2.5}


def test_landmark_scores_hand_computed_and_strict_sdr():
    scores = landmark_scores(PRED_2D, TRUTH_2D, sdr_radii_mm=(2, 2.5, 3, 4, 5.0, 5.5))
    errors = [5.0, 2.0, 0.0, 2.5]
    mean = sum(errors) / 4
    assert scores["n_images"] == 2
    assert scores["mre_mm"] == pytest.approx(2.375)
    assert scores["std_mm"] == pytest.approx(math.sqrt(sum((e - mean) ** 2 for e in errors) / 4))
    # strict "<": the error of exactly 2 mm does not count at r = 2, the 2.5 mm one not at r = 2.5, 5 mm not at 5
    assert scores["sdr"] == {"2": 0.25, "2.5": 0.5, "3": 0.75, "4": 0.75, "5": 0.75, "5.5": 1.0}
    assert scores["per_landmark"] == {"L1": {"mre_mm": 2.5}, "L2": {"mre_mm": 2.25}}
    assert scores["n_missing"] == 1
    assert (scores["unscored_images"], scores["unknown_images"]) == (["d"], ["c"])  # not in n_missing
    assert scores["median_mm"] == pytest.approx(2.25)  # of 0, 2, 2.5, 5
    assert set(scores) == {"n_images", "mre_mm", "std_mm", "median_mm", "sdr", "per_landmark", "n_missing",
                           "unscored_images", "unknown_images"}


def test_missing_predictions_counts_only_predicted_images():
    # image d has no prediction at all (not a missing landmark); image c has no truth (ignored)
    assert missing_predictions(PRED_2D, TRUTH_2D) == [("b", "L3")]


def test_landmark_scores_3d_identity_is_perfect():
    truth = _points(s1={"A": (1.5, -2.0, 30.0), "B": (0, 0, 0)}, s2={"A": (4, 5, 6)})
    scores = landmark_scores(truth, truth)
    assert (scores["n_images"], scores["mre_mm"], scores["std_mm"], scores["n_missing"]) == (2, 0.0, 0.0, 0)
    assert scores["sdr"] == {"2": 1.0, "2.5": 1.0, "3": 1.0, "4": 1.0}


@pytest.mark.parametrize("pred, truth, message", [
    (_points(x={"L1": (0, 0)}), _points(y={"L1": (0, 0)}), "share no image"),
    (_points(a={"L1": (0, 0, 0)}), _points(a={"L1": (0, 0)}), "3D but true landmarks are 2D"),
    (_points(a={"L9": (0, 0)}), _points(a={"L1": (0, 0)}), "no landmark name"),
])
def test_landmark_pairing_errors(pred, truth, message):
    with pytest.raises(InputError, match=message):
        radial_errors_mm(pred, truth)


@pytest.mark.parametrize("radii", [(), (2, -1), (float("nan"),)])
def test_bad_sdr_radii_rejected(radii):
    with pytest.raises(InputError, match="SDR radii"):
        landmark_scores(PRED_2D, TRUTH_2D, sdr_radii_mm=radii)


# ---------------------------------------------------------------------------------------------- segmentation
def _label(array: np.ndarray, spacing_mm: tuple[float, ...]) -> MetaTensor:
    affine = torch.diag(torch.tensor([*spacing_mm, 1.0], dtype=torch.float64))
    return MetaTensor(torch.as_tensor(array, dtype=torch.int64)[None], affine=affine)  # (1, *spatial)


def _reference_hd95_mm(a: np.ndarray, b: np.ndarray, spacing_mm: tuple[float, ...]) -> float:
    """Symmetric 95th-percentile surface distance by brute force: edges = mask minus its erosion."""
    def edge_points_mm(mask):
        edge = mask & ~ndimage.binary_erosion(mask)
        return np.argwhere(edge) * np.asarray(spacing_mm)

    pa, pb = edge_points_mm(a), edge_points_mm(b)
    distances = np.linalg.norm(pa[:, None] - pb[None], axis=-1)  # (Na, Nb)
    return max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))


def test_dice_and_hd95_of_shifted_squares_on_anisotropic_grid():
    spacing = (2.0, 0.5)
    truth, pred = np.zeros((12, 16), int), np.zeros((12, 16), int)
    truth[3:7, 4:10] = 1  # 4 x 6 pixels
    pred[4:8, 4:10] = 1  # shifted by 1 row (2 mm): overlap 3 x 6
    scores = segmentation_scores([(_label(pred, spacing), _label(truth, spacing))])
    assert scores["dice"]["1"] == pytest.approx(2 * 18 / (24 + 24))
    assert scores["hd95_mm"]["1"] == pytest.approx(_reference_hd95_mm(pred > 0, truth > 0, spacing))
    assert scores["hd95_mm"]["1"] == pytest.approx(2.0)  # every edge pixel is at most one 2 mm row away


def test_hd95_of_single_voxels_is_their_distance_in_mm_3d():
    spacing = (0.5, 1.2, 3.0)
    truth, pred = np.zeros((6, 6, 8), int), np.zeros((6, 6, 8), int)
    truth[2, 2, 1] = 1
    pred[2, 2, 4] = 1  # 3 voxels along axis 2 -> 9 mm
    truth[1:4, 1:5, 5:7] = 2
    pred[1:4, 2:6, 5:7] = 2  # class 2 shifted by one voxel along axis 1 -> 1.2 mm
    dice, hd95 = image_scores(_label(pred, spacing), _label(truth, spacing), [1, 2])
    assert hd95[0] == pytest.approx(9.0) and dice[0] == 0.0
    assert hd95[1] == pytest.approx(_reference_hd95_mm(pred == 2, truth == 2, spacing))
    assert hd95[1] == pytest.approx(1.2)
    assert dice[1] == pytest.approx(2 * (3 * 3 * 2) / (24 + 24))


def test_class_rules_empty_versus_present():
    spacing = (1.0, 1.0)
    truth_1, pred_1 = np.zeros((8, 8), int), np.zeros((8, 8), int)
    truth_1[2:4, 2:4] = 1
    pred_1[2:4, 2:4] = 1
    pred_1[6, 6] = 3  # class 3 predicted, absent from truth: Dice 0, HD95 NaN
    truth_2, pred_2 = truth_1.copy(), np.zeros((8, 8), int)  # class 1 missed entirely in image 2
    pairs = [(_label(pred_1, spacing), _label(truth_1, spacing)), (_label(pred_2, spacing), _label(truth_2, spacing))]
    assert label_classes(pairs) == [1, 3]
    scores = segmentation_scores(pairs)
    assert scores["n_images"] == 2
    assert scores["dice"] == {"1": pytest.approx(0.5), "3": 0.0}  # class 3 absent from image 2: left out
    assert scores["hd95_mm"]["1"] == 0.0  # image 2 (missed) has no HD95; image 1 is perfect
    assert math.isnan(scores["hd95_mm"]["3"])
    assert scores["mean_dice"] == pytest.approx(0.25)


def test_segmentation_without_foreground_and_shape_mismatch():
    empty = _label(np.zeros((4, 5), int), (1.0, 1.0))
    scores = segmentation_scores([(empty, empty)])
    assert scores["dice"] == {} and scores["hd95_mm"] == {} and math.isnan(scores["mean_dice"])
    with pytest.raises(InputError, match="differs from truth shape"):
        image_scores(_label(np.zeros((4, 4), int), (1.0, 1.0)), empty, [1])
    with pytest.raises(InputError, match="no prediction"):
        segmentation_scores([])
