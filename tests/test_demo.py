"""The demo population: files in the contract's formats, determinism, exact ground truth (maps and landmarks)."""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medssl.cli import main
from medssl.data import demo_anatomy
from medssl.data.demo import VARIABILITIES, change_intensity, make_subject, write_demo_dataset
from medssl.data.demo_anatomy import LANDMARKS_MNI, PLANES, load_template
from medssl.data.demo_warp import grid_points, identity_transform, jacobian_determinant, random_transform
from medssl.data.geometry import coordinate_grid, world_to_voxel
from medssl.data.inputs import read_datalist
from medssl.data.landmarks import check_landmarks_in_image, read_landmarks
from medssl.data.readers import load_image, load_label
from medssl.errors import InputError

COARSE_MM = 6.0  # 3D voxel size for fast tests


def _interpolate(volume: np.ndarray, affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``volume`` at world points ``(N, D)`` (the reference, independent of the code)."""
    return ndimage.map_coordinates(volume, world_to_voxel(affine, points_mm).T, order=1)


def _labels_of(tissue: np.ndarray) -> np.ndarray:
    background = np.clip(1.0 - tissue.sum(axis=0), 0.0, 1.0)
    return np.argmax(np.concatenate([background[None], tissue]), axis=0)


def test_2d_files_follow_the_contract(tmp_path):
    out = write_demo_dataset(tmp_path / "demo", spatial_dims=2, n_subjects=3, seed=1, plane="axial")
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["validation"] == [] and datalist["test"] == []
    assert [item["image"] for item in datalist["training"]] == [f"images/subject_{i:03d}.png" for i in range(3)]
    items = read_datalist(out / "datalist.json")["training"]
    truth = read_landmarks(out / "landmarks.csv")
    assert sorted(truth) == [f"subject_{i:03d}" for i in range(3)]
    assert (out / "landmarks.csv").read_text().splitlines()[0] == "image,name,x,y"
    for item in items:
        image = load_image(item["image"])
        label = load_label(item["label"], like=image)
        np.testing.assert_array_equal(np.asarray(image.affine), np.eye(3))  # 1 mm pixels, x = column
        assert set(np.unique(label.numpy())) == {0, 1, 2, 3}
        rows_columns = np.asarray(Image.open(item["label"]))  # PNG order (row, column)
        np.testing.assert_array_equal(rows_columns.T, label[0].numpy())
        landmarks = truth[item["image"].name.removesuffix(".png")]
        assert len(landmarks) == len(PLANES["axial"][3])
        check_landmarks_in_image(landmarks, image, out / "landmarks.csv", item["image"])
        # anatomy orientation: the frontal pole lies above (smaller row than) the occipital pole
        assert landmarks["frontal_pole_left"][1] < landmarks["occipital_pole_left"][1]


def test_same_seed_same_files_other_seed_other_subjects(tmp_path):
    low = dict(spatial_dims=2, n_subjects=2, plane="coronal", variability="low")
    first = write_demo_dataset(tmp_path / "a", seed=3, **low)
    second = write_demo_dataset(tmp_path / "b", seed=3, **low)
    other = write_demo_dataset(tmp_path / "c", seed=4, **low)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 7
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "landmarks.csv").read_text() != (other / "landmarks.csv").read_text()
    subjects = read_landmarks(first / "landmarks.csv")
    assert not np.allclose(subjects["subject_000"]["thalamus_left"], subjects["subject_001"]["thalamus_left"])


def test_3d_files_have_world_affines_and_landmarks_inside(tmp_path):
    out = write_demo_dataset(tmp_path / "demo3d", spatial_dims=3, n_subjects=1, seed=0, spacing_mm=COARSE_MM)
    template = load_template(3, spacing_mm=COARSE_MM, margin_mm=VARIABILITIES["realistic"].margin_mm)
    scan = nib.load(out / "images" / "subject_000.nii.gz")
    np.testing.assert_allclose(scan.affine, template.affine)
    assert scan.shape == template.shape
    item = read_datalist(out / "datalist.json")["training"][0]
    image = load_image(item["image"])
    label = load_label(item["label"], like=image)
    assert set(np.unique(label.numpy())) == {0, 1, 2, 3}
    truth = read_landmarks(out / "landmarks.csv")["subject_000"]
    assert sorted(truth) == sorted(LANDMARKS_MNI)
    check_landmarks_in_image(truth, image, out / "landmarks.csv", item["image"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_map_on_the_grid_and_its_inverse_are_exact(spatial_dims):
    template = load_template(spatial_dims, spacing_mm=COARSE_MM if spatial_dims == 3 else None)
    transform = random_transform(np.random.default_rng(7), template.affine, template.shape)
    points = grid_points(template.affine, template.shape)[::97]  # (N, D) spread over the image
    on_grid = transform.on_grid(template.affine, template.shape).reshape(-1, spatial_dims)[::97]  # fast path
    np.testing.assert_allclose(on_grid, transform(points), atol=1e-9)
    recovered = transform(transform.inverse(points))
    assert np.abs(recovered - points).max() < 1e-6
    with pytest.raises(RuntimeError, match="invert"):
        transform.inverse(points, iterations=1)


def test_jacobian_of_an_affine_map_is_its_determinant():
    affine = np.diag([2.0, 1.5, 3.0, 1.0])
    matrix = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.3], [0.0, 0.1, 1.2]])
    mapped = grid_points(affine, (5, 6, 4)) @ matrix.T + 7.0  # (N, 3)
    determinant = jacobian_determinant(mapped.reshape(5, 6, 4, 3), affine)
    np.testing.assert_allclose(determinant, np.linalg.det(matrix), rtol=1e-10)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_random_maps_do_not_fold_and_stay_within_a_few_mm(spatial_dims):
    template = load_template(spatial_dims, spacing_mm=COARSE_MM if spatial_dims == 3 else None)
    for seed in range(3):
        transform = random_transform(np.random.default_rng(seed), template.affine, template.shape)
        points = grid_points(template.affine, template.shape)
        mapped = transform(points)
        assert jacobian_determinant(mapped.reshape(*template.shape, spatial_dims), template.affine).min() > 0.5
        assert np.abs(transform.displacement.evaluate(points)).max() <= 4.0
        assert np.linalg.norm(mapped - points, axis=1).max() < 20.0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_landmarks_are_ground_truth(spatial_dims):
    """Noise-free subject: its intensity at a true subject landmark equals the template's at the template landmark.

    To interpolation accuracy of a smooth map for a linear intensity ramp; on the real anatomy, far closer than at
    the undeformed positions."""
    template = load_template(spatial_dims, spacing_mm=COARSE_MM if spatial_dims == 3 else None)
    transform = random_transform(np.random.default_rng(11), template.affine, template.shape)
    names = sorted(template.landmarks)
    at_template = np.stack([template.landmarks[n] for n in names])  # (L, D)
    world = coordinate_grid(template.source_affine, template.image.shape).numpy()  # (D, *source)
    ramp = np.tensordot(np.arange(1.0, spatial_dims + 1.0), world, axes=1) / 100.0  # (*source), spans ~3.5
    ramp_subject = make_subject(replace(template, image=ramp.astype(np.float32)), transform)
    at_subject = np.stack([ramp_subject.landmarks[n] for n in names])
    expected = _interpolate(ramp, template.source_affine, at_template)
    measured = _interpolate(ramp_subject.image, template.affine, at_subject)
    np.testing.assert_allclose(measured, expected, atol=0.02)

    if spatial_dims == 3:  # the real anatomy needs a finer grid than the ramp
        template = load_template(3, spacing_mm=4.0)
        transform = random_transform(np.random.default_rng(11), template.affine, template.shape)
    subject = make_subject(template, transform)
    at_subject = np.stack([subject.landmarks[n] for n in names])
    reference = _interpolate(make_subject(template, identity_transform(spatial_dims)).image, template.affine, at_template)
    error_true = np.abs(_interpolate(subject.image, template.affine, at_subject) - reference)
    error_undeformed = np.abs(_interpolate(subject.image, template.affine, at_template) - reference)
    assert np.median(error_true) < 0.04  # intensities span [0, 1]
    assert error_true.mean() < 0.5 * error_undeformed.mean()


def test_template_landmarks_sit_on_their_structures():
    """Each 3D landmark's tissue on the 1 mm template, and each slice landmark lies in its plane with its tissue."""
    volume = load_template(3, spacing_mm=1.0)
    labels = _labels_of(volume.tissue)
    for name, (mni, tissue) in LANDMARKS_MNI.items():
        voxel = tuple(np.round(world_to_voxel(volume.source_affine, np.array(mni, float))).astype(int))
        assert labels[voxel] == tissue, name
    for plane, (axis, value_mm, _, landmarks) in PLANES.items():
        assert 13 <= len(landmarks) <= 20
        template = load_template(2, plane=plane)
        slice_labels = _labels_of(template.tissue)
        for name, (mni, tissue) in landmarks.items():
            assert mni[axis] == value_mm, (plane, name)
            voxel = tuple(np.round(world_to_voxel(template.source_affine, template.landmarks[name])).astype(int))
            assert slice_labels[voxel] == tissue, (plane, name)


def test_bad_requests_raise_input_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="plane"):
        load_template(2, plane="oblique")
    with pytest.raises(InputError, match="1.0 mm"):
        load_template(2, spacing_mm=0.5)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        write_demo_dataset(tmp_path / "file", spatial_dims=2, n_subjects=1)
    monkeypatch.setattr(demo_anatomy, "_FILES", {"t1": "missing_t1.nii.gz"})
    with pytest.raises(InputError, match="ICBM152"):
        demo_anatomy.template_files()


def test_cli_writes_a_2d_dataset_and_rejects_zero_subjects(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path / "d"), "--dim", "2", "--subjects", "1",
                 "--plane", "sagittal"]) == 0
    assert (tmp_path / "d" / "images" / "subject_000.png").is_file()
    assert main(["data", "demo", "--out", str(tmp_path / "e"), "--subjects", "0"]) == 2
    assert "--subjects" in capsys.readouterr().err


def test_intensity_changes_keep_the_anatomy_and_follow_the_seed():
    template = load_template(2)
    image = make_subject(template, identity_transform(2)).image
    changed, drawn = change_intensity(image, template.affine, np.random.default_rng(5))
    assert changed.shape == image.shape and changed.dtype == np.float32
    assert set(drawn) == {"bias_range", "gamma", "blur_mm", "noise_sigma"}
    assert not np.allclose(changed, image)
    assert np.corrcoef(changed.ravel(), image.ravel())[0, 1] > 0.9
    np.testing.assert_array_equal(changed, change_intensity(image, template.affine, np.random.default_rng(5))[0])
