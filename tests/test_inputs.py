"""PATH resolution: folders (nested, hidden files, DICOM series folders), datalist JSON, single files, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medssl.data.inputs import read_datalist, resolve_images, resolve_items
from medssl.data.readers import load_image, save_image
from medssl.errors import InputError

EYE_3D = np.eye(4)


def write(path, shape=(4, 5, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_image(np.zeros(shape, np.float32), EYE_3D, path)


def test_folder_lists_every_image_below_it_sorted(tmp_path, dicom_series):
    root = tmp_path / "data"
    write(root / "b.nii.gz")
    write(root / "a.mha")
    write(root / "sub" / "c.nrrd")
    write(root / "sub" / "d.mhd")  # its d.raw sidecar is not an image
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.nii.gz").write_bytes(b"")
    write(root / ".cache" / "e.nii.gz")
    shutil.move(dicom_series, root / "ct")
    expected = [root / "a.mha", root / "b.nii.gz", root / "ct", root / "sub" / "c.nrrd", root / "sub" / "d.mhd"]
    assert resolve_images(root) == expected
    assert resolve_items(root) == [{"image": p} for p in expected]


def test_a_dicom_series_folder_is_one_image(dicom_series):
    assert resolve_images(dicom_series) == [dicom_series]


def test_dicom_files_without_extension_are_found_by_their_preamble(tmp_path, dicom_series):
    for index, dicom_file in enumerate(sorted(dicom_series.iterdir())):
        dicom_file.rename(dicom_series / f"IM{index:04d}")
    write(tmp_path / "other.nii.gz")
    assert resolve_images(tmp_path) == [tmp_path / "other.nii.gz", dicom_series]
    assert load_image(dicom_series).shape == (1, 8, 9, 4)


def test_two_series_in_one_folder_are_rejected(tmp_path, dicom_series):
    import SimpleITK as sitk

    extra = sitk.Image(3, 3, sitk.sitkInt16)
    extra.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.8")  # another series UID
    sitk.WriteImage(extra, str(dicom_series / "other.dcm"))
    with pytest.raises(InputError, match="2 DICOM series") as error:
        resolve_images(tmp_path)
    assert str(dicom_series) in str(error.value)


def test_single_file(tmp_path):
    path = write(tmp_path / "one.nii.gz")
    assert resolve_images(path) == [path]


def test_datalist_paths_are_relative_to_the_json(tmp_path):
    images = [write(tmp_path / "imgs" / f"{n}.nii.gz") for n in "abc"]
    label = write(tmp_path / "labs" / "a.nii.gz")
    datalist = {
        "name": "toy",
        "training": [{"image": "../imgs/a.nii.gz", "label": "../labs/a.nii.gz", "extra": 3}],
        "validation": [{"image": str(images[1])}],  # absolute paths are kept
        "test": ["../imgs/c.nii.gz"],  # Decathlon style: bare image paths
    }
    (tmp_path / "lists").mkdir()
    json_path = tmp_path / "lists" / "datalist.json"
    json_path.write_text(json.dumps(datalist))
    sections = read_datalist(json_path)
    assert sections == {"training": [{"image": images[0], "label": label}],
                        "validation": [{"image": images[1]}], "test": [{"image": images[2]}]}
    assert resolve_images(json_path) == images
    assert resolve_items(json_path)[0] == {"image": images[0], "label": label}


def test_empty_folder_raises_naming_it(tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images") as error:
        resolve_images(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(error.value)


def test_missing_path_raises_naming_it(tmp_path):
    with pytest.raises(InputError, match="no such") as error:
        resolve_images(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_datalist_entry_pointing_nowhere_names_json_and_entry(tmp_path):
    write(tmp_path / "a.nii.gz")
    json_path = tmp_path / "list.json"
    entries = [{"image": "a.nii.gz"}, {"image": "a.nii.gz", "label": "gone.nii.gz"}]
    json_path.write_text(json.dumps({"training": entries}))
    with pytest.raises(InputError, match=r"training\[1\] 'label': 'gone\.nii\.gz' points to no file") as error:
        resolve_items(json_path)
    assert str(json_path) in str(error.value)


def test_invalid_datalists_raise_naming_the_json(tmp_path):
    cases = {"broken.json": "{not json", "nosection.json": json.dumps({"images": ["a.nii.gz"]}),
             "noimage.json": json.dumps({"training": [{"label": "a.nii.gz"}]}),
             "empty.json": json.dumps({"training": [], "test": []})}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError) as error:
            read_datalist(tmp_path / name)
        assert str(tmp_path / name) in str(error.value), name


def test_file_with_unknown_extension_raises(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b")
    with pytest.raises(InputError, match="unknown extension '.csv'") as error:
        resolve_images(path)
    assert str(path) in str(error.value)
