"""Reading and writing scans: geometry against nibabel / SimpleITK, DICOM, PNG, labels, and every bad input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nibabel.affines import apply_affine
from PIL import Image

from medssl.data.geometry import voxel_to_world
from medssl.data.readers import image_key, load_image, load_label, save_image
from medssl.errors import InputError

LPS_FLIP = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS: negate world x and y
RNG = np.random.default_rng(0)
VOLUME = RNG.uniform(0, 100, size=(8, 9, 10)).astype(np.float32)  # (x, y, z)


def write_with_simpleitk(array_xyz: np.ndarray, affine_ras: np.ndarray, path: Path) -> sitk.Image:
    """Reference writer: the RAS affine turned into ITK's LPS spacing/direction/origin by hand."""
    image = sitk.GetImageFromArray(array_xyz.transpose(2, 1, 0).copy())  # (z, y, x)
    spacing = np.linalg.norm(affine_ras[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((LPS_FLIP @ affine_ras[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin((LPS_FLIP @ affine_ras[:3, 3]).tolist())
    sitk.WriteImage(image, str(path))
    return image


def test_nifti_geometry_matches_nibabel_apply_affine(tmp_path, oblique_affine):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(VOLUME, oblique_affine), str(path))
    image = load_image(path)
    assert image.shape == (1, 8, 9, 10) and image.dtype == torch.float32
    assert image.affine.dtype == torch.float64 and image.affine.shape == (4, 4)
    ijk = RNG.uniform(0, 8, size=(6, 3))
    np.testing.assert_allclose(voxel_to_world(image.affine, ijk).numpy(), apply_affine(oblique_affine, ijk), atol=1e-5)
    np.testing.assert_allclose(image[0].numpy(), VOLUME)


@pytest.mark.parametrize("extension", [".nrrd", ".mha"])
def test_itk_formats_match_simpleitk_physical_points_in_ras(tmp_path, oblique_affine, extension):
    reference = write_with_simpleitk(VOLUME, oblique_affine, tmp_path / f"scan{extension}")
    image = load_image(tmp_path / f"scan{extension}")
    assert image.shape == (1, 8, 9, 10)
    for ijk in [(0, 0, 0), (7, 8, 9), (3, 1, 6)]:
        lps = np.array(reference.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(voxel_to_world(image.affine, torch.tensor(ijk)).numpy(), LPS_FLIP @ lps,
                                   atol=1e-5)
        assert image[0][ijk].item() == pytest.approx(reference[ijk])  # SimpleITK indexes (x, y, z) too


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii", "out.nrrd", "out.mha", "out.mhd"])
def test_save_image_round_trips_3d(tmp_path, oblique_affine, name):
    written = save_image(torch.as_tensor(VOLUME)[None], oblique_affine, tmp_path / name)
    image = load_image(written)
    np.testing.assert_allclose(image.affine.numpy(), oblique_affine, atol=1e-5)
    np.testing.assert_allclose(image[0].numpy(), VOLUME)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no staging leftovers


@pytest.mark.parametrize("name", ["slice.nii.gz", "slice.mha"])
def test_2d_files_with_geometry_round_trip_as_2d(tmp_path, name):
    affine_2d = np.array([[0.8, -0.6, 3.0], [0.6, 0.8, 4.0], [0.0, 0.0, 1.0]])
    image = load_image(save_image(VOLUME[:, :, 0], affine_2d, tmp_path / name))
    assert image.shape == (1, 8, 9)
    np.testing.assert_allclose(image.affine.numpy(), affine_2d, atol=1e-6)
    np.testing.assert_allclose(image[0].numpy(), VOLUME[:, :, 0])


def test_single_slice_nifti_becomes_2d(tmp_path, oblique_affine):
    path = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(VOLUME[:, :, :1], oblique_affine), str(path))
    image = load_image(path)
    assert image.shape == (1, 8, 9)
    np.testing.assert_allclose(image.affine.numpy(), oblique_affine[[0, 1, 3]][:, [0, 1, 3]])


def test_dicom_series_folder_and_single_file(dicom_series):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(dicom_series)))
    reference = reader.Execute()
    volume = load_image(dicom_series)
    assert volume.shape == (1, 8, 9, 4)
    x, y, z = np.meshgrid(np.arange(8), np.arange(9), np.arange(4), indexing="ij")
    np.testing.assert_allclose(volume[0].numpy(), x + 10 * y + 100 * z)
    for ijk in [(0, 0, 0), (7, 8, 3), (2, 5, 1)]:
        lps = np.array(reference.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(voxel_to_world(volume.affine, np.array(ijk)), LPS_FLIP @ lps, atol=1e-4)
    one_slice = load_image(dicom_series / "slice002.dcm")  # a single file: 2D with the in-plane geometry
    assert one_slice.shape == (1, 8, 9)
    np.testing.assert_allclose(one_slice[0].numpy(), volume[0, :, :, 2].numpy())
    np.testing.assert_allclose(one_slice.affine.numpy(), volume.affine.numpy()[[0, 1, 3]][:, [0, 1, 3]], atol=1e-4)
    assert image_key(dicom_series) == "series"


def test_png_axis_0_is_the_column_and_spacing_scales_world(tmp_path):
    rows_cols = RNG.integers(0, 255, size=(5, 7)).astype(np.uint8)  # (rows, columns) as PIL stores it
    Image.fromarray(rows_cols).save(tmp_path / "xray.png")
    image = load_image(tmp_path / "xray.png", spacing_mm=0.3)
    assert image.shape == (1, 7, 5)
    np.testing.assert_allclose(image[0].numpy(), rows_cols.T)
    np.testing.assert_allclose(image.affine.numpy(), np.diag([0.3, 0.3, 1.0]))
    column_6_row_4 = torch.tensor([6.0, 4.0])
    np.testing.assert_allclose(voxel_to_world(image.affine, column_6_row_4).numpy(), [1.8, 1.2])
    written = save_image(image[0].to(torch.uint8), image.affine, tmp_path / "copy.png")
    np.testing.assert_array_equal(np.asarray(Image.open(written)), rows_cols)


@pytest.mark.parametrize("name", ["rgb.png", "rgba.png", "rgb.tif", "rgb.jpg"])
def test_colour_2d_images_become_one_grey_channel(tmp_path, name):
    rgb = RNG.integers(0, 255, size=(4, 6, 3)).astype(np.uint8)
    pixels = np.concatenate([rgb, np.full((4, 6, 1), 128, np.uint8)], axis=-1) if "rgba" in name else rgb
    Image.fromarray(pixels).save(tmp_path / name, **({"quality": 100} if name.endswith(".jpg") else {}))
    stored = np.asarray(Image.open(tmp_path / name).convert("RGB"), dtype=np.float64)  # what the file holds
    luma = stored @ np.array([0.299, 0.587, 0.114])  # (rows, columns)
    image = load_image(tmp_path / name)
    assert image.shape == (1, 6, 4)
    np.testing.assert_allclose(image[0].numpy(), luma.T, atol=1e-3)
    assert load_image(tmp_path / name, grayscale=False).shape == (pixels.shape[-1], 6, 4)


def test_load_label_returns_integers_on_the_image_grid(tmp_path, oblique_affine):
    labels = RNG.integers(0, 4, size=(8, 9, 10))
    save_image(VOLUME, oblique_affine, tmp_path / "img.nii.gz")
    save_image(labels.astype(np.float32), oblique_affine, tmp_path / "lab.nii.gz")
    label = load_label(tmp_path / "lab.nii.gz", like=load_image(tmp_path / "img.nii.gz"))
    assert label.shape == (1, 8, 9, 10) and label.dtype == torch.int64
    np.testing.assert_array_equal(label[0].numpy(), labels)


def test_image_key_strips_only_known_extensions():
    assert image_key("dir/a.nii.gz") == "a"
    assert image_key("b.PNG") == "b"
    assert image_key("subject.01.mha") == "subject.01"
    assert image_key("c") == "c"


# ------------------------------------------------------------------------------------------------ bad input
def assert_names(error: pytest.ExceptionInfo, path: Path) -> None:
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["bad.nii.gz", "bad.mha", "bad.png", "bad.dcm", "bad.nrrd"])
def test_corrupt_file_raises_input_error_naming_it(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image at all" * 5)
    with pytest.raises(InputError, match="cannot read image") as error:
        load_image(path)
    assert_names(error, path)


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.mha", "cut.png"])
def test_truncated_file_raises_input_error_naming_it(tmp_path, oblique_affine, name):
    data = (VOLUME[:, :, 0] if name.endswith(".png") else VOLUME).astype(np.uint8)
    affine = np.diag([1.0, 1.0, 1.0]) if name.endswith(".png") else oblique_affine
    whole = save_image(data, affine, tmp_path / f"whole_{name}").read_bytes()
    path = tmp_path / name
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="cannot read image") as error:
        load_image(path)
    assert_names(error, path)


def test_unknown_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "scan.xyz"
    path.write_bytes(b"data")
    with pytest.raises(InputError, match=r"unknown extension '\.xyz'.*\.nii\.gz.*\.png") as error:
        load_image(path)
    assert_names(error, path)


def test_missing_file_and_folder_without_dicom(tmp_path):
    with pytest.raises(InputError, match="no such") as error:
        load_image(tmp_path / "absent.nii.gz")
    assert_names(error, tmp_path / "absent.nii.gz")
    with pytest.raises(InputError, match="no DICOM series") as error:
        load_image(tmp_path)
    assert_names(error, tmp_path)


def test_label_with_other_shape_names_the_label(tmp_path, oblique_affine):
    image = load_image(save_image(VOLUME, oblique_affine, tmp_path / "img.nii.gz"))
    label_path = save_image(np.zeros((8, 9, 9), np.uint8), oblique_affine, tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match="shape") as error:
        load_label(label_path, like=image)
    assert_names(error, label_path)


def test_label_with_other_affine_names_the_label(tmp_path, oblique_affine):
    image = load_image(save_image(VOLUME, oblique_affine, tmp_path / "img.nii.gz"))
    shifted = oblique_affine.copy()
    shifted[0, 3] += 0.01  # 0.01 mm: beyond the 1e-3 mm tolerance
    label_path = save_image(np.zeros((8, 9, 10), np.uint8), shifted, tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match="affine") as error:
        load_label(label_path, like=image)
    assert_names(error, label_path)
