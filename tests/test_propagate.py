"""One-shot label propagation (``medssl segment oneshot``): a template carried onto itself and onto a shifted copy
of itself, the registration baseline, outputs with each input's geometry, and bad inputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl.cli import main
from medssl.data.demo import write_demo_dataset
from medssl.data.readers import load_image, load_label, save_image
from medssl.errors import InputError
from medssl.matching.oneshot import OneShotMatcher, prepare_image
from medssl.matching import propagate
from medssl.matching.propagate import (dense_features, propagate_labels, propagate_labels_files,
                                       registration_labels)
from medssl.matching.run import matching_network
from medssl.metrics.report import evaluate_segmentation_files
from medssl.metrics.segmentation import segmentation_scores
from medssl.transforms.preprocess import Preprocessing

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=[2, 3])
def demo(request, tmp_path_factory) -> tuple[int, Path]:
    dims = request.param
    return dims, write_demo_dataset(tmp_path_factory.mktemp(f"seg{dims}d"), spatial_dims=dims, n_subjects=3, seed=2,
                                    spacing_mm=4.0 if dims == 3 else None)


def _case(root: Path, dims: int, index: int, spacing: float) -> tuple[MetaTensor, MetaTensor]:
    ext = ".png" if dims == 2 else ".nii.gz"
    image = prepare_image(root / "images" / f"subject_{index:03d}{ext}", spatial_dims=dims, spacing_mm=spacing)
    raw = load_image(root / "images" / f"subject_{index:03d}{ext}")
    label = load_label(root / "labels" / f"subject_{index:03d}{ext}", like=raw)
    return image, Preprocessing(spacing_mm=spacing)(raw, label)[1]


def _dice(labels: MetaTensor, truth: MetaTensor) -> float:
    return segmentation_scores([(labels, truth)])["mean_dice"]


def test_a_template_carried_onto_itself_and_onto_a_shifted_copy(demo):
    dims, root = demo
    spacing = 2.0 if dims == 2 else 4.0
    image, label = _case(root, dims, 0, spacing)
    network = matching_network("none", dims)[0]
    matcher = OneShotMatcher(network, support=256 if dims == 2 else 128)
    itself = propagate_labels(matcher, image, label, image)  # random-init features suffice for a copy
    assert _dice(itself.labels, label) > 0.98 and itself.inlier_fraction > 0.9
    shift = 4  # voxels along axis 0: the anatomy moves, the grid stays
    moved = MetaTensor(torch.roll(image.as_tensor(), shift, dims=1), affine=image.affine)
    moved_truth = MetaTensor(torch.roll(label.as_tensor(), shift, dims=1), affine=label.affine)
    for vote, expected in (("positions", 0.9), ("labels", 0.6)):
        shifted = propagate_labels(matcher, image, label, moved, vote=vote)
        assert _dice(shifted.labels, moved_truth) > max(expected, _dice(label, moved_truth) + 0.2), vote  # followed
        probabilities = shifted.probabilities.as_tensor()
        assert probabilities.shape[1:] == image.shape[1:]
        assert torch.allclose(probabilities.sum(0), torch.ones(1), atol=1e-4)
    embedding = matcher.embed(image)
    every = dense_features(embedding, None)
    shared = propagate_labels(matcher, image, label, moved, template_features=every, vote_levels=len(every))
    assert torch.equal(shared.probabilities.as_tensor(),
                       propagate_labels(matcher, image, label, moved, vote_levels=len(every)).probabilities)
    assert propagate.resolve_vote_levels(None, dims) == propagate.VOTE_LEVELS[dims]
    assert propagate.resolve_vote_levels(3, dims) == 3
    finest = dense_features(embedding, 2)  # the vote on the two finest levels: their features alone
    assert len(finest) == 2 and all(torch.equal(a, b) for a, b in zip(finest, every[-2:]))
    fine = propagate_labels(matcher, image, label, moved, vote_levels=1)
    assert _dice(fine.labels, moved_truth) > max(0.8, _dice(label, moved_truth) + 0.2)  # random features, one level
    with pytest.raises(ValueError, match="vote_levels >= 1"):
        propagate_labels(matcher, image, label, moved, vote_levels=0)
    with pytest.raises(ValueError, match="dense_features"):  # features of other levels than the vote compares
        propagate_labels(matcher, image, label, moved, template_features=every)  # the default: VOTE_LEVELS
    other = 2 if propagate.SUPPORT_STRIDE[dims] == 4 else 4  # the support search on the other grid follows too
    coarser = propagate_labels(matcher, image, label, moved, support_stride=other)
    assert _dice(coarser.labels, moved_truth) > max(0.9, _dice(label, moved_truth) + 0.2)
    with pytest.raises(ValueError, match="support search stride must divide the padded grid"):
        propagate_labels(matcher, image, label, moved, support_stride=3)


def test_registration_baseline_carries_a_template_onto_itself():
    image = np.zeros((48, 40), dtype=np.float32)
    image[12:36, 10:30] = 1.0
    image[20:28, 16:24] = 2.0
    affine = torch.eye(3, dtype=torch.float64)
    noise = 0.01 * torch.rand(1, 48, 40, generator=torch.Generator().manual_seed(0))
    template = MetaTensor(torch.as_tensor(image)[None] + noise, affine=affine)
    label = MetaTensor(torch.as_tensor(np.rint(image)).long()[None], affine=affine)
    warped = registration_labels(template, label, template, bspline_spacing_mm=None, iterations=10)
    assert warped.shape == (3, 48, 40) and _dice(MetaTensor(warped.as_tensor().argmax(0, keepdim=True), affine=affine), label) > 0.9


@pytest.fixture(scope="module")
def demo2d(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("seg2d"), spatial_dims=2, n_subjects=3, seed=2)


def test_segment_oneshot_writes_each_inputs_geometry_and_scores(demo2d, tmp_path, capsys, monkeypatch):
    dims, root = 2, demo2d  # 3D runs the same code (the test above)
    computed = []
    monkeypatch.setattr(propagate, "dense_features", lambda e, *rest: computed.append(e) or dense_features(e, *rest))
    ext = ".png" if dims == 2 else ".nii.gz"
    template, template_label = root / "images" / f"subject_000{ext}", root / "labels" / f"subject_000{ext}"
    out = tmp_path / "seg"
    assert main(["segment", "oneshot", "--checkpoint", "none", "--template", str(template), "--template-label",
                 str(template_label), "--images", str(root / "images"), "--out", str(out), "--truth",
                 str(root / "datalist.json")]) == 0
    assert len(computed) == 1  # the template's dense features, once for its 3 images
    for index in range(3):
        written = out / f"subject_{index:03d}{ext}"
        raw = load_image(root / "images" / f"subject_{index:03d}{ext}")
        assert load_label(written, like=raw).shape == raw.shape  # same grid, or load_label refuses it
    scores = evaluate_segmentation_files(out, root / "datalist.json")
    assert scores["n_images"] == 3 and scores["mean_dice"] > 0.3  # the template itself is among them
    truth = load_label(template_label)  # through the file path (prepare, propagate, back to the input grid):
    itself = load_label(out / template_label.name, like=truth)  # the template onto itself is its own labels
    assert segmentation_scores([(itself, truth)])["mean_dice"] > 0.95


def test_segment_oneshot_speed_options(demo2d, tmp_path, caplog, capsys, monkeypatch):
    """``--amp bf16``, ``--support-points`` and ``--stride`` reach the matcher and the vote (the template onto itself
    still gives its own labels); with ``--method registration`` they are ignored with a warning; a stride of 0 is a
    usage error."""
    from medssl.matching import run as matching_run

    root, made, voted = demo2d, [], []
    original, vote = matching_run.OneShotMatcher, propagate.propagate_labels
    monkeypatch.setattr(matching_run, "OneShotMatcher",
                        lambda *args, **kwargs: made.append(kwargs) or original(*args, **kwargs))
    monkeypatch.setattr(propagate, "propagate_labels",
                        lambda *args, **kwargs: voted.append(kwargs) or vote(*args, **kwargs))
    template, template_label = root / "images" / "subject_000.png", root / "labels" / "subject_000.png"
    common = ["segment", "oneshot", "--template", str(template), "--template-label", str(template_label),
              "--images", str(template), "--amp", "bf16", "--support-points", "64", "--stride", "4"]
    assert main([*common, "--checkpoint", "none", "--out", str(tmp_path / "fast")]) == 0
    assert [(kwargs["amp"], kwargs["support"]) for kwargs in made] == [("bf16", 64)]
    assert [kwargs["stride"] for kwargs in voted] == [4]
    truth = load_label(template_label)
    itself = load_label(tmp_path / "fast" / template_label.name, like=truth)
    assert segmentation_scores([(itself, truth)])["mean_dice"] > 0.95
    with caplog.at_level(logging.WARNING, logger="medssl"):
        assert main([*common, "--method", "registration", "--out", str(tmp_path / "reg")]) == 0
    for name in ("--amp", "--support-points", "--stride"):
        assert f"{name} ignored: --method registration" in caplog.text
    with pytest.raises(SystemExit) as stopped:  # argparse: a usage error
        main([*common[:-2], "--stride", "0", "--checkpoint", "none", "--out", str(tmp_path / "bad")])
    assert stopped.value.code == 2
    assert "--stride: expected at least 1 of voxels, got 0" in capsys.readouterr().err


def test_segment_oneshot_refuses_bad_input(demo2d, tmp_path, capsys):
    dims, root = 2, demo2d
    ext = ".png" if dims == 2 else ".nii.gz"
    template = root / "images" / f"subject_000{ext}"
    wrong = tmp_path / f"small{ext}"
    save_image(np.ones([8] * dims, dtype=np.uint8), np.eye(dims + 1), wrong)
    with pytest.raises(InputError, match="shape"):
        propagate_labels_files("none", template, wrong, [root / "images"], tmp_path / "a")
    with pytest.raises(InputError, match="needs --checkpoint"):
        propagate_labels_files(None, template, root / "labels" / f"subject_000{ext}", [root / "images"],
                               tmp_path / "b")
    with pytest.raises(InputError, match="did you mean 'registration'"):
        propagate_labels_files("none", template, template, [root / "images"], tmp_path / "c", method="registratio")
    code = main(["segment", "oneshot", "--checkpoint", "none", "--template", str(template), "--template-label",
                 str(root / "labels" / f"subject_000{ext}"), "--images", str(root / "images"), "--out",
                 str(root / "images")])  # the output would overwrite the inputs
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("medssl: error:")


def test_every_default_support_search_stride_divides_the_padded_grid():
    """Images are padded to a multiple of ``_PAD_MULTIPLE`` (and the network's divisor) so that the support search
    grid of every dimension divides them: the two constants live in two modules and must agree."""
    from medssl.matching.oneshot import _PAD_MULTIPLE, _SUPPORT_STRIDE
    from medssl.matching.propagate import SUPPORT_STRIDE

    assert all(_PAD_MULTIPLE % stride == 0 for stride in SUPPORT_STRIDE.values())
    assert _PAD_MULTIPLE % _SUPPORT_STRIDE == 0  # the landmark matcher's support search too
