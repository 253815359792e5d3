"""Landmark CSV: round trips in 2D and 3D, key matching, scores, and every bad-input case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl.data.landmarks import check_landmarks_in_image, read_landmarks, read_scores, write_landmarks
from medssl.errors import InputError


def test_round_trip_3d_with_scores_sorted_and_rounded(tmp_path):
    landmarks = {"s2": {"nose": np.array([1.0, -2.5, 3.123456])},
                 "s1": {"tip": np.array([0.0, 0.0, 0.0]), "base": np.array([10.5, 20.25, -30.0])}}
    scores = {"s2": {"nose": 0.5}, "s1": {"tip": 0.875, "base": 0.25}}
    path = write_landmarks(tmp_path / "pred.csv", landmarks, scores=scores)
    assert path.read_text().splitlines() == [
        "image,name,x,y,z,score",
        "s1,base,10.5000,20.2500,-30.0000,0.25",
        "s1,tip,0.0000,0.0000,0.0000,0.875",
        "s2,nose,1.0000,-2.5000,3.1235,0.5",
    ]
    back = read_landmarks(path)
    assert set(back) == {"s1", "s2"} and set(back["s1"]) == {"tip", "base"}
    np.testing.assert_allclose(back["s2"]["nose"], [1.0, -2.5, 3.1235])
    np.testing.assert_allclose(back["s1"]["base"], landmarks["s1"]["base"])
    assert read_scores(path) == scores


def test_round_trip_2d_without_scores(tmp_path):
    landmarks = {"xray": {"a": np.array([1.25, 2.5]), "b": np.array([3.0, 4.0])}}
    path = write_landmarks(tmp_path / "truth.csv", landmarks)
    assert path.read_text().splitlines()[0] == "image,name,x,y"
    back = read_landmarks(path)
    assert {name: p.tolist() for name, p in back["xray"].items()} == {"a": [1.25, 2.5], "b": [3.0, 4.0]}
    assert read_scores(path) == {}


def test_image_cells_match_by_file_name_without_extension(tmp_path):
    path = tmp_path / "lm.csv"
    path.write_text("image,name,x,y,z\nimgs/a.nii.gz,p,1,2,3\nb.mha,p,4,5,6\n\nc,p,7,8,9\n")
    assert sorted(read_landmarks(path)) == ["a", "b", "c"]


def test_empty_landmarks_need_spatial_dims(tmp_path):
    assert write_landmarks(tmp_path / "e.csv", {}, spatial_dims=2).read_text() == "image,name,x,y\n"
    with pytest.raises(ValueError):
        write_landmarks(tmp_path / "f.csv", {})


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("image,name,x,y\n", "no rows"),
    ("image,name,x\na,p,1\n", "lacks column.*y"),
    ("file,label,x,y\na,p,1,2\n", "lacks column.*image, name"),
    ("image,name,x,y\na,p,1,2\na,q,one,2\n", "line 3: column 'x' must be a finite number, got 'one'"),
    ("image,name,x,y\na,p,1,nan\n", "line 2: column 'y'"),
    ("image,name,x,y\na.png,p,1,2\na,p,3,4\n", "line 3: duplicate row for image 'a' landmark 'p'"),
    ("image,name,x,y,score\na,p,1,2,high\n", "column 'score'"),
])
def test_bad_csv_raises_naming_the_file(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as error:
        read_landmarks(path)
    assert str(path) in str(error.value)


def image_3d() -> MetaTensor:
    affine = torch.tensor([[2.0, 0, 0, 10], [0, 1.0, 0, 0], [0, 0, 0.5, -5], [0, 0, 0, 1]], dtype=torch.float64)
    return MetaTensor(torch.zeros(1, 8, 9, 10), affine=affine)


def test_landmarks_on_the_image_border_are_inside(tmp_path):
    # voxel (-0.5, -0.5, -0.5) and (7.5, 8.5, 9.5): the outer faces of the corner voxels
    corners = {"low": np.array([9.0, -0.5, -5.25]), "high": np.array([25.0, 8.5, -0.25])}
    check_landmarks_in_image(corners, image_3d(), tmp_path / "lm.csv", tmp_path / "a.nii.gz")


def test_landmark_outside_its_image_names_the_csv(tmp_path):
    csv_path, image_path = tmp_path / "lm.csv", tmp_path / "a.nii.gz"
    with pytest.raises(InputError, match="'far' .* lies outside image") as error:
        check_landmarks_in_image({"ok": np.array([12.0, 1.0, -4.0]), "far": np.array([25.1, 1.0, -4.0])},
                                 image_3d(), csv_path, image_path)
    assert str(csv_path) in str(error.value) and str(image_path) in str(error.value)


def test_2d_csv_for_3d_image_names_the_csv(tmp_path):
    csv_path = tmp_path / "lm.csv"
    csv_path.write_text("image,name,x,y\na.nii.gz,p,12,1\n")
    landmarks = read_landmarks(csv_path)["a"]
    with pytest.raises(InputError, match="2 coordinates but image .* is 3D") as error:
        check_landmarks_in_image(landmarks, image_3d(), csv_path, tmp_path / "a.nii.gz")
    assert str(csv_path) in str(error.value)
