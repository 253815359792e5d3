"""One preprocessing for every path: the same file through pretraining, fine-tuning, prediction and one-shot
matching gives the same tensor on the same grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.data.readers import save_image
from medssl.engine.finetune_data import load_case
from medssl.engine.predict import _read
from medssl.errors import InputError
from medssl.matching.run import image_preparer
from medssl.networks.task import TaskUNet
from medssl.transforms.prepared import PreparedScans
from medssl.transforms.preprocess import Preprocessing


def _scan(tmp_path, dims):
    rng = np.random.default_rng(0)
    if dims == 2:
        return save_image((rng.random((40, 36)) * 255).astype(np.uint8), np.eye(3), tmp_path / "scan.png")
    affine = np.diag([-1.5, 2.0, 3.0, 1.0])  # LAS, anisotropic: orientation and resampling both matter
    affine[:3, 3] = [30.0, -20.0, 5.0]
    return save_image(rng.normal(100, 30, (20, 16, 12)).astype(np.float32), affine, tmp_path / "scan.nii.gz")


@pytest.mark.parametrize("dims, options", [(2, {"spacing_mm": 1.5, "file_spacing_mm": 0.8}),
                                           (3, {"spacing_mm": [2.0, 2.5, 2.0], "modality": "ct",
                                                "intensity_window": [0, 200]})])
def test_every_path_prepares_a_file_alike(tmp_path, dims, options):
    path = _scan(tmp_path, dims)
    spec = Preprocessing.from_options(options)
    recorded = {**spec.to_dict(), "patch_size": [16] * dims}  # what model.pt stores
    network = TaskUNet(dims, 2, channels=[4, 8, 4])
    prepared = {
        "pretraining": PreparedScans([path], spatial_dims=dims, preprocessing=spec)[0],
        "fine-tuning": load_case(path, spatial_dims=dims, preprocessing=spec).image,
        "prediction": _read(path, recorded, network)[1],
        "one-shot": image_preparer(recorded, path, dims)(path),
    }
    reference = prepared["fine-tuning"]
    assert np.allclose(np.abs(np.diag(np.asarray(reference.affine))[:dims]),
                       spec.grid(dims))  # on the working grid
    for name, image in prepared.items():
        tensor = image.image if hasattr(image, "image") else image.as_tensor()
        affine = image.affine if hasattr(image, "image") else image.affine
        assert torch.equal(torch.as_tensor(tensor).float().cpu(), reference.as_tensor().float()), name
        np.testing.assert_allclose(np.asarray(affine, dtype=float), np.asarray(reference.affine, dtype=float),
                                   err_msg=name)


def test_spec_round_trips_and_refuses_bad_values():
    spec = Preprocessing(modality="ct", spacing_mm=(1, 2, 3), intensity_window=(-100, 300))
    assert Preprocessing.from_options({**spec.to_dict(), "patch_size": [8, 8, 8]}) == spec
    assert spec.to_dict() == {"modality": "ct", "spacing_mm": [1.0, 2.0, 3.0], "intensity_window": [-100.0, 300.0],
                              "file_spacing_mm": None}
    assert Preprocessing.from_options({"modality": None}) == Preprocessing()
    with pytest.raises(InputError, match="did you mean 'xray'"):
        Preprocessing(modality="xrya")
    with pytest.raises(InputError, match="spacing_mm must be one positive number"):
        Preprocessing(spacing_mm=[1.0, -2.0])
    with pytest.raises(InputError, match="high > low"):
        Preprocessing(intensity_window=(10, 10))
    with pytest.raises(InputError, match="spacing_mm must be one positive number or 2 of them"):
        Preprocessing(spacing_mm=(1.0, 1.0, 1.0)).grid(2)
