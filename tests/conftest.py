"""Shared test fixtures: a tiny oblique, anisotropic geometry, a tiny DICOM series (written by SimpleITK), and one
torch thread for modules that train tiny networks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny convolutions on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waits (>10x faster).
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def oblique_affine() -> np.ndarray:
    """A 3D RAS affine (4, 4): voxel size (0.5, 1.2, 2.0) mm, rotated 36.87 deg about z and 10 deg about x."""
    about_z = np.array([[0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    about_x = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    affine = np.eye(4)
    affine[:3, :3] = about_x @ about_z @ np.diag([0.5, 1.2, 2.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


@pytest.fixture
def dicom_series(tmp_path: Path) -> Path:
    """A folder holding one 8x9x4 (x, y, z) int16 DICOM series, spacing (0.5, 0.7, 2.0) mm; values x + 10y + 100z."""
    import SimpleITK as sitk

    x, y, z = np.meshgrid(np.arange(8), np.arange(9), np.arange(4), indexing="ij")
    values_zyx = (x + 10 * y + 100 * z).astype(np.int16).transpose(2, 1, 0)  # (z, y, x) for SimpleITK
    volume = sitk.GetImageFromArray(values_zyx)
    volume.SetSpacing((0.5, 0.7, 2.0))
    volume.SetOrigin((-4.0, 6.0, 12.0))
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetDepth()):
        slice_k = volume[:, :, k]
        slice_k.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.7")  # series instance UID
        slice_k.SetMetaData("0020|0013", str(k + 1))  # instance number
        slice_k.SetMetaData("0020|0032", "\\".join(f"{v:g}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))))
        slice_k.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")  # row / column directions (LPS)
        slice_k.SetMetaData("0028|0030", "0.7\\0.5")  # pixel spacing: row spacing (y), column spacing (x)
        slice_k.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)
    return folder


def validation_section(demo: Path, every: int = 2) -> dict:
    """A pretraining config's ``validation`` section on a demo folder: template ``subject_000``, every image scored
    against ``landmarks.csv``."""
    return {"template": str(demo / "images" / "subject_000.png"), "template_landmarks": str(demo / "landmarks.csv"),
            "images": str(demo / "images"), "truth": str(demo / "landmarks.csv"), "every": every}


def toy_demo_run(root: Path, subjects: int) -> tuple[Path, Path]:
    """A 2D demo population of ``subjects`` (seed 0) in ``root/data`` and a tiny random-init network saved as a run
    in ``root/run`` (its ``model.pt``): the inputs of the benchmarks' toy-size tests. Returns ``(data, run)``."""
    import torch

    from medssl.data.demo import write_demo_dataset
    from medssl.networks import build_network, save_model

    data = write_demo_dataset(root / "data", spatial_dims=2, n_subjects=subjects, seed=0)
    torch.manual_seed(0)
    run = root / "run"
    save_model(build_network(spatial_dims=2, channels=(4, 8, 8, 8)), run / "model.pt", spatial_dims=2,
               preprocessing={"modality": "mr"})
    return data, run
