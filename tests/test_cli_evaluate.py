"""``medssl evaluate landmarks|seg`` end to end through ``medssl.cli.main``: JSON contents and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medssl.cli import main
from medssl.data.landmarks import write_landmarks
from medssl.data.readers import save_image
from medssl.metrics.report import format_table

TRUTH_2D = {"a": {"L1": np.array([10.0, 20.0]), "L2": np.array([0.0, -3.5])},
            "b": {"L1": np.array([1.0, 2.0]), "L2": np.array([7.0, 7.0])}}
TRUTH_3D = {"s1": {"L1": np.array([10.0, 20.0, 5.0]), "L2": np.array([0.0, -3.5, 1.0])}}


def _shifted(landmarks: dict, shift_mm: tuple[float, ...]) -> dict:
    return {image: {name: p + np.array(shift_mm) for name, p in names.items()} for image, names in landmarks.items()}


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("truth", [TRUTH_2D, TRUTH_3D], ids=["2d", "3d"])
def test_landmarks_against_itself_is_perfect(tmp_path: Path, truth):
    csv, out = write_landmarks(tmp_path / "truth.csv", truth), tmp_path / "scores.json"
    assert main(["evaluate", "landmarks", "--pred", str(csv), "--truth", str(csv), "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["n_images"] == len(truth) and scores["mre_mm"] == 0.0 and scores["std_mm"] == 0.0
    assert scores["sdr"] == {"2": 1.0, "2.5": 1.0, "3": 1.0, "4": 1.0}
    assert scores["per_landmark"] == {"L1": {"mre_mm": 0.0}, "L2": {"mre_mm": 0.0}}


@pytest.mark.parametrize("truth, shift", [(TRUTH_2D, (3.0, 4.0)), (TRUTH_3D, (3.0, 4.0, 0.0))], ids=["2d", "3d"])
def test_landmarks_345_shift(tmp_path: Path, truth, shift):
    truth_csv = write_landmarks(tmp_path / "truth.csv", truth)
    pred_csv = write_landmarks(tmp_path / "pred.csv", _shifted(truth, shift))
    out = tmp_path / "scores.json"
    argv = ["evaluate", "landmarks", "--pred", str(pred_csv), "--truth", str(truth_csv), "--sdr", "4,5.5",
            "--json", str(out)]
    assert main(argv) == 0
    scores = json.loads(out.read_text())
    assert scores["mre_mm"] == pytest.approx(5.0) and scores["std_mm"] == pytest.approx(0.0, abs=1e-9)
    assert scores["sdr"] == {"4": 0.0, "5.5": 1.0}
    assert scores["n_missing"] == 0


def test_landmarks_missing_pred_file_exits_2(tmp_path: Path, capsys):
    truth_csv = write_landmarks(tmp_path / "truth.csv", TRUTH_2D)
    missing = tmp_path / "nowhere.csv"
    assert main(["evaluate", "landmarks", "--pred", str(missing), "--truth", str(truth_csv)]) == 2
    assert str(missing) in _error_line(capsys)


def test_landmarks_csv_without_columns_exits_2(tmp_path: Path, capsys):
    truth_csv = write_landmarks(tmp_path / "truth.csv", TRUTH_2D)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,name,x\na,L1,3\n")
    assert main(["evaluate", "landmarks", "--pred", str(bad), "--truth", str(truth_csv)]) == 2
    line = _error_line(capsys)
    assert str(bad) in line and "y" in line


def test_landmarks_no_shared_image_names_the_prediction(tmp_path: Path, capsys):
    truth_csv = write_landmarks(tmp_path / "truth.csv", TRUTH_2D)
    pred_csv = write_landmarks(tmp_path / "pred.csv", {"zz": TRUTH_2D["a"]})
    assert main(["evaluate", "landmarks", "--pred", str(pred_csv), "--truth", str(truth_csv)]) == 2
    assert str(pred_csv) in _error_line(capsys)


# ---------------------------------------------------------------------------------------------- segmentation
AFFINE_3D = np.diag([0.8, 1.5, 2.5, 1.0])


def _seg_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """labels/ with two 3D label maps (classes 1, 2) and a datalist pointing to images + labels."""
    (tmp_path / "labels").mkdir()
    entries = []
    for index in range(2):
        label = np.zeros((10, 9, 6), np.uint8)
        label[2:6, 2:7, 1:4] = 1
        label[6:9, 1:4, 2:5 + index] = 2
        save_image(label, AFFINE_3D, tmp_path / "labels" / f"case{index}.nii.gz")
        save_image(label.astype(np.float32) * 10, AFFINE_3D, tmp_path / "images" / f"case{index}.nii.gz")
        entries.append({"image": f"images/case{index}.nii.gz", "label": f"labels/case{index}.nii.gz"})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": entries[:1], "test": entries[1:]}))
    return tmp_path / "labels", datalist


def test_seg_against_itself_folder_and_datalist(tmp_path: Path):
    labels, datalist = _seg_dataset(tmp_path)
    for truth in (labels, datalist):
        out = tmp_path / f"{truth.stem}_scores.json"  # not the datalist itself: an input
        assert main(["evaluate", "seg", "--pred", str(labels), "--truth", str(truth), "--json", str(out)]) == 0
        scores = json.loads(out.read_text())
        assert scores == {"n_images": 2, "mean_dice": 1.0, "dice": {"1": 1.0, "2": 1.0},
                          "hd95_mm": {"1": 0.0, "2": 0.0}, "unscored_images": []}


def test_seg_shift_and_missing_class_in_json(tmp_path: Path):
    labels, datalist = _seg_dataset(tmp_path)
    truth = np.zeros((10, 9, 6), np.uint8)
    truth[2:6, 2:7, 1:4] = 1
    truth[6:9, 1:4, 2:5] = 2
    pred = np.zeros_like(truth)
    pred[2:6, 3:8, 1:4] = 1  # class 1 shifted one voxel along axis 1 (1.5 mm); class 2 missed
    save_image(pred, AFFINE_3D, tmp_path / "pred" / "case0.nii.gz")
    out = tmp_path / "scores.json"
    assert main(["evaluate", "seg", "--pred", str(tmp_path / "pred"), "--truth", str(datalist),
                 "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["n_images"] == 1 and scores["unscored_images"] == ["case1"]  # its truth has no prediction
    assert scores["dice"] == {"1": pytest.approx(2 * 48 / 120), "2": 0.0}
    assert scores["hd95_mm"] == {"1": pytest.approx(1.5), "2": None}  # NaN -> null


def test_seg_prediction_with_other_shape_exits_2(tmp_path: Path, capsys):
    labels, _ = _seg_dataset(tmp_path)
    bad = save_image(np.zeros((10, 9, 5), np.uint8), AFFINE_3D, tmp_path / "pred" / "case0.nii.gz")
    assert main(["evaluate", "seg", "--pred", str(tmp_path / "pred"), "--truth", str(labels)]) == 2
    line = _error_line(capsys)
    assert str(bad) in line and "shape" in line


def test_seg_prediction_without_truth_exits_2(tmp_path: Path, capsys):
    labels, _ = _seg_dataset(tmp_path)
    stray = save_image(np.zeros((10, 9, 6), np.uint8), AFFINE_3D, tmp_path / "pred" / "other.nii.gz")
    assert main(["evaluate", "seg", "--pred", str(tmp_path / "pred"), "--truth", str(labels)]) == 2
    line = _error_line(capsys)
    assert str(stray) in line and "no true label map" in line


def test_seg_2d_png_labels(tmp_path: Path):
    truth, pred = np.zeros((12, 10), np.uint8), np.zeros((12, 10), np.uint8)
    truth[2:6, 2:6] = 1
    pred[2:6, 4:8] = 1  # shifted two pixels along axis 1 (1 mm pixels for PNG)
    save_image(truth, np.eye(3), tmp_path / "truth" / "slice.png")
    save_image(pred, np.eye(3), tmp_path / "pred" / "slice.png")
    out = tmp_path / "scores.json"
    assert main(["evaluate", "seg", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["dice"] == {"1": pytest.approx(0.5)} and scores["hd95_mm"] == {"1": pytest.approx(2.0)}


def test_landmarks_bad_sdr_radius_names_the_option(tmp_path: Path, capsys):
    csv = write_landmarks(tmp_path / "truth.csv", TRUTH_2D)
    assert main(["evaluate", "landmarks", "--pred", str(csv), "--truth", str(csv), "--sdr", "2,0"]) == 2
    assert "--sdr" in _error_line(capsys)


def test_format_table_aligns_columns():
    table = format_table(["class", "Dice"], [["1", 0.5], ["10", float("nan")]])
    assert table.splitlines() == ["class   Dice", "1      0.500", "10       n/a"]
