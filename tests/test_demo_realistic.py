"""The realistic demo population: exact ground truth under pose, shape and slice changes (blobs painted at the
template landmarks are found where the generator says the landmarks are), determinism, the recorded draws, and the
QC figure."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from medssl.cli import main
from medssl.data.demo import VARIABILITIES, draw_subject, make_subject, write_demo_dataset
from medssl.data.demo_anatomy import LANDMARKS_MNI, PLANES, _read_mni, load_template, tilted_slice
from medssl.data.geometry import voxel_to_world, world_to_voxel
from medssl.errors import InputError

REALISTIC = VARIABILITIES["realistic"]


def _blob(affine: np.ndarray, shape: tuple[int, ...], centre_mm: np.ndarray, sigma_mm: float) -> np.ndarray:
    """A Gaussian blob at ``centre_mm`` on a grid (float64, zero beyond 4 sigma)."""
    volume = np.zeros(shape)
    centre = world_to_voxel(affine, centre_mm)
    spacing = np.linalg.norm(affine[:-1, :-1], axis=0)
    low = np.maximum(np.floor(centre - 4 * sigma_mm / spacing), 0).astype(int)
    high = np.minimum(np.ceil(centre + 4 * sigma_mm / spacing) + 1, shape).astype(int)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    index = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij"), axis=-1)
    distance = np.linalg.norm(voxel_to_world(affine, index.astype(float)) - centre_mm, axis=-1)
    volume[box] = np.exp(-0.5 * (distance / sigma_mm) ** 2)
    return volume


def _peak(image: np.ndarray) -> np.ndarray:
    """The sub-voxel peak of one blob, found without the answer: a quadratic fitted to log intensities in the
    3^D neighbourhood of the brightest voxel (exact for a Gaussian under any affine map)."""
    top = np.array(np.unravel_index(np.argmax(image), image.shape))
    offsets = np.stack(np.meshgrid(*[[-1, 0, 1]] * image.ndim, indexing="ij"), -1).reshape(-1, image.ndim)
    values = np.log(np.maximum([image[tuple(top + o)] for o in offsets], 1e-300))
    pairs = [(i, j) for i in range(image.ndim) for j in range(i, image.ndim)]
    design = np.column_stack([np.ones(len(offsets)), offsets] + [offsets[:, i] * offsets[:, j] for i, j in pairs])
    coefficients = np.linalg.lstsq(design, values, rcond=None)[0]
    gradient = coefficients[1:1 + image.ndim]
    hessian = np.zeros((image.ndim, image.ndim))
    for (i, j), c in zip(pairs, coefficients[1 + image.ndim:]):
        hessian[i, j] += c if i != j else 2 * c
        hessian[j, i] += c if i != j else 0
    return top - np.linalg.solve(hessian, gradient)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_blobs_at_template_landmarks_land_on_the_subject_landmarks(spatial_dims):
    """Paint a blob at each template landmark, warp it like the subject's image, find it, and compare with the
    landmark the generator wrote (found by inverting the map at points: a different computation)."""
    template = load_template(spatial_dims, spacing_mm=4.0 if spatial_dims == 3 else None,
                             margin_mm=REALISTIC.margin_mm)
    subject, geometry = draw_subject(template, np.random.default_rng(21), REALISTIC)
    if spatial_dims == 2:
        assert abs(subject.drawn["slice_tilt_deg"]) > 0.5 and geometry.tilt is not None  # a tilted slice is tested
    _, _, mni_affine = _read_mni()
    volume_shape = _read_mni()[0].shape
    errors = []
    for name, position in subject.landmarks.items():
        if spatial_dims == 3:
            blob = _blob(mni_affine, volume_shape, np.array(LANDMARKS_MNI[name][0], float), sigma_mm=5.0)
            source = replace(template, image=blob)
        else:  # painted in 3D at the landmark's MNI point, cut through the subject's tilted plane
            blob = _blob(mni_affine, volume_shape, np.array(PLANES[template.plane][3][name][0], float), sigma_mm=3.0)
            source = replace(geometry.source, image=tilted_slice(template, geometry.tilt, geometry.level_mm,
                                                                 volume=blob).image)
        warped = make_subject(source, geometry.transform).image
        errors.append(np.linalg.norm(_peak(warped) - world_to_voxel(template.affine, position)))
    assert len(errors) == len(template.landmarks)
    print(f"{spatial_dims}D blob errors (voxels): max {max(errors):.3f}, mean {np.mean(errors):.3f}")
    assert max(errors) <= 0.5, errors  # voxels


def test_tilted_slice_without_tilt_is_the_template():
    template = load_template(2, plane="coronal")
    same = tilted_slice(template, np.eye(3), 0.0)
    np.testing.assert_allclose(same.image, template.image, atol=1e-6)
    np.testing.assert_allclose(same.tissue, template.tissue, atol=1e-6)
    for name, position in template.landmarks.items():
        np.testing.assert_allclose(same.landmarks[name], position, atol=1e-9)
    moved = tilted_slice(template, np.eye(3), 3.0)
    assert not np.allclose(moved.image, template.image)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_realistic_population_is_deterministic_and_records_its_draws(tmp_path, spatial_dims):
    kwargs = dict(spatial_dims=spatial_dims, n_subjects=2, seed=4, spacing_mm=6.0 if spatial_dims == 3 else None)
    first = write_demo_dataset(tmp_path / "a", **kwargs)
    second = write_demo_dataset(tmp_path / "b", **kwargs)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 7  # 2 images, 2 labels, landmarks.csv, datalist.json, meta.json
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    meta = json.loads((first / "meta.json").read_text())
    assert meta["variability"]["name"] == "realistic" and meta["seed"] == 4
    for drawn in meta["per_subject"].values():
        assert abs(drawn["rotation_deg"]) <= REALISTIC.rotation_deg
        assert all(abs(s - 1) <= REALISTIC.scale_range for s in drawn["scale"])
        assert all(abs(t) <= REALISTIC.shift_mm for t in drawn["shift_mm"])
        assert all(abs(f - 1) <= REALISTIC.tissue_contrast for f in drawn["tissue_factors_csf_gm_wm"])
        assert drawn["landmark_nonlinear_mean_mm"] > 1.0
        if spatial_dims == 3:
            assert np.linalg.norm(drawn["rotation_axis"]) == pytest.approx(1.0)
        else:
            assert abs(drawn["slice_tilt_deg"]) <= REALISTIC.slice_tilt_deg
            assert abs(drawn["slice_level_mm"]) <= REALISTIC.slice_level_mm


def test_realistic_subjects_differ_more_than_low_ones(tmp_path):
    """Landmark spread over subjects and the non-linear shape change are larger in the realistic population."""
    spread, shape = {}, {}
    for name in ("low", "realistic"):
        out = write_demo_dataset(tmp_path / name, spatial_dims=2, n_subjects=6, seed=0, variability=name)
        rows = [line.split(",") for line in (out / "landmarks.csv").read_text().splitlines()[1:]]
        by_name: dict[str, list] = {}
        for _, landmark, x, y in rows:
            by_name.setdefault(landmark, []).append((float(x), float(y)))
        spread[name] = np.mean([np.linalg.norm(np.std(v, axis=0)) for v in by_name.values()])
        meta = json.loads((out / "meta.json").read_text())
        shape[name] = np.mean([d["landmark_nonlinear_mean_mm"] for d in meta["per_subject"].values()])
    assert spread["realistic"] > 1.5 * spread["low"]
    assert shape["realistic"] > 3 * shape["low"] and shape["realistic"] > 4.0


def test_cli_variability_and_qc_figure(tmp_path, capsys):
    out = tmp_path / "low"
    assert main(["data", "demo", "--out", str(out), "--dim", "2", "--subjects", "2", "--variability", "low",
                 "--figures"]) == 0
    figure = out / "figures" / "population.png"
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "meta.json").read_text())["variability"]["name"] == "low"
    with pytest.raises(SystemExit) as error:
        main(["data", "demo", "--out", str(tmp_path / "x"), "--variability", "extreme"])
    assert error.value.code == 2 and "--variability" in capsys.readouterr().err
    with pytest.raises(InputError, match="variability"):
        write_demo_dataset(tmp_path / "y", spatial_dims=2, n_subjects=1, variability="extreme")
    with pytest.raises(InputError, match="--seed"):  # the CLI refuses it already (tests/test_bad_inputs.py)
        write_demo_dataset(tmp_path / "z", spatial_dims=2, n_subjects=1, seed=-5)
