"""``medssl finetune seg|landmarks`` and ``medssl predict seg|landmarks``: tiny 2D and 3D runs on the demo
population, geometry of predictions, splits, missing landmarks, pseudo-labels, resume, bad inputs."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medssl.cli import main
from medssl.data.demo import write_demo_dataset
from medssl.data.landmarks import read_landmarks, read_scores
from medssl.data.readers import load_image, load_label, save_image
from medssl.engine import finetune as engine
from medssl.engine.finetune_config import read_finetune_config
from medssl.engine.finetune_data import PatchSampler, load_case, split_items
from medssl.errors import InputError
from medssl.networks import UNet, read_model_file, save_model
from medssl.networks.task import TaskUNet
from medssl.transforms.preprocess import Preprocessing

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["network.channels=[4,8,8]", "train.steps=2", "train.val_every=2", "train.batch_size=2",
        "train.warmup_steps=0", "train.log_every=1"]
TINY_2D = TINY + ["data.patch_size=[16,16]", "data.spacing_mm=4.0"]
TINY_3D = TINY + ["data.patch_size=[16,16,16]", "data.spacing_mm=8.0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo2d(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("ft") / "demo2d", spatial_dims=2, n_subjects=5, seed=3)


@pytest.fixture(scope="module")
def demo3d(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("ft") / "demo3d", spatial_dims=3, n_subjects=4, seed=3,
                              spacing_mm=6.0)


def _pretrained(folder: Path, spatial_dims: int) -> Path:
    """A pretraining-style run folder holding a tiny U-Net's model.pt."""
    torch.manual_seed(7)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(UNet(spatial_dims, channels=[4, 8, 8]), folder, spatial_dims=spatial_dims, preprocessing={})
    return folder


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medssl: error:"), lines
    return lines[0]


# ------------------------------------------------------------------------------------------------- segmentation
def test_seg_2d_run_folder_and_predictions_keep_geometry(demo2d, tmp_path):
    run, pretrained = tmp_path / "run", _pretrained(tmp_path / "pre", 2)
    args = ["finetune", "seg", str(CONFIGS / "finetune_seg_2d.yaml"), "--checkpoint", str(pretrained), "--data",
            str(demo2d / "datalist.json"), "--labeled", "2", "--out", str(run), *TINY_2D]
    assert main(args) == 0
    for name in ("config.yaml", "model.pt", "metrics.csv", "split.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    split = json.loads((run / "split.json").read_text())
    assert len(split["labeled"]) == 2 and len(split["validation"]) == 1  # 5 subjects: 1 held out, 2 of 4 chosen
    assert not set(split["labeled"]) & set(split["validation"])
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["checkpoint"] == str(pretrained.resolve()) and config["data"]["labeled"] == 2
    payload = read_model_file(run)
    assert payload["task"] == {"kind": "seg", "classes": [0, 1, 2, 3]}
    assert payload["preprocessing"]["patch_size"] == [16, 16] and payload["preprocessing"]["spacing_mm"] == 4.0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"] and 0 <= float(rows[-1]["val/mean_dice"]) <= 1

    out = tmp_path / "pred"
    image = demo2d / "images" / "subject_004.png"
    assert main(["predict", "seg", "--model", str(run), "--images", str(image), "--out", str(out)]) == 0
    predicted = load_label(out / "subject_004.png", like=load_image(image))  # same shape and affine, or it raises
    assert set(np.unique(predicted.numpy())) <= {0, 1, 2, 3}
    scores = tmp_path / "scores.json"
    assert main(["evaluate", "seg", "--pred", str(out), "--truth", str(demo2d / "datalist.json"),
                 "--json", str(scores)]) == 0


def test_seg_3d_prediction_follows_the_input_geometry(demo3d, tmp_path):
    """A flipped copy of a volume (same world content, another voxel order) gets the flipped prediction."""
    run = tmp_path / "run"
    assert main(["finetune", "seg", str(CONFIGS / "finetune_seg_3d.yaml"), "--checkpoint", "none", "--data",
                 str(demo3d / "datalist.json"), "--out", str(run), *TINY_3D]) == 0
    original = demo3d / "images" / "subject_001.nii.gz"
    nifti = nib.load(original)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = nifti.shape[0] - 1  # voxel i -> n-1-i
    flipped = tmp_path / "flipped" / "subject_001.nii.gz"
    flipped.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(nifti.dataobj)[::-1].copy(), nifti.affine @ flip), flipped)
    assert main(["predict", "seg", "--model", str(run), "--images", str(original), "--out", str(tmp_path / "a")]) == 0
    assert main(["predict", "seg", "--model", str(run), "--images", str(flipped), "--out", str(tmp_path / "b")]) == 0
    a = load_label(tmp_path / "a" / "subject_001.nii.gz", like=load_image(original))
    b = load_label(tmp_path / "b" / "subject_001.nii.gz", like=load_image(flipped))
    assert a.shape[1:] == nifti.shape  # 6 mm input, 8 mm working grid: resampled back onto the input grid
    np.testing.assert_array_equal(b.numpy()[0], a.numpy()[0][::-1])


def test_model_pt_holds_the_best_validation_step(demo2d, tmp_path):
    run = tmp_path / "run"
    assert main(["finetune", "seg", str(CONFIGS / "finetune_seg_2d.yaml"), "--checkpoint", "none", "--data",
                 str(demo2d / "datalist.json"), "--out", str(run), *TINY_2D, "train.steps=3", "train.val_every=1",
                 "train.lr=0.05"]) == 0
    dice = {int(r["step"]): float(r["val/mean_dice"]) for r in csv.DictReader((run / "metrics.csv").open())}
    best_step = max(dice, key=lambda step: (dice[step], -step))  # the first of equal scores is kept
    saved = read_model_file(run)["validation"]
    assert saved["step"] == best_step and saved["mean_dice"] == pytest.approx(dice[best_step], abs=1e-5)


def test_finetune_leaves_the_callers_rng_and_determinism_flags(demo2d, tmp_path):
    config = read_finetune_config(CONFIGS / "finetune_seg_2d.yaml", TINY_2D)
    torch.manual_seed(123)
    np.random.seed(123)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), torch.are_deterministic_algorithms_enabled()
    engine.finetune(config, checkpoint="none", data=demo2d / "datalist.json", out=tmp_path / "run")
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.are_deterministic_algorithms_enabled() == before[2]


def test_nan_loss_stops_with_exit_2_and_one_line(demo2d, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(engine, "task_loss", lambda config: lambda outputs, batch: outputs.sum() * float("nan"))
    code = main(["finetune", "seg", str(CONFIGS / "finetune_seg_2d.yaml"), "--checkpoint", "none", "--data",
                 str(demo2d / "datalist.json"), "--out", str(tmp_path / "run"), *TINY_2D])
    assert code == 2
    assert "loss became nan at step 1; training stopped and no model had been written yet" in _one_error_line(capsys)


def test_splits_are_seeded_nested_and_never_overlap_validation(tmp_path):
    items = [{"image": Path(f"s{i}.png"), "label": Path(f"l{i}.png")} for i in range(10)]
    items.append({"image": Path("unlabeled.png")})
    labeled = lambda item: "label" in item  # noqa: E731
    options = dict(val_fraction=0.2, seed=4, source=tmp_path)
    one, val, rest = split_items(items, [], labeled, labeled=1, **options)
    three, val3, _ = split_items(items, [], labeled, labeled=3, **options)
    everything, val_all, _ = split_items(items, [], labeled, labeled=None, **options)
    assert len(val) == 2 and val == val3 == val_all and one == three[:1] and three == everything[:3]
    assert len(everything) == 8 and not {i["image"] for i in everything} & {i["image"] for i in val}
    assert {"image": Path("unlabeled.png")} in rest and len(rest) == 8  # the unlabeled one + 7 labeled not chosen
    other_seeds = [split_items(items, [], labeled, labeled=1, val_fraction=0.2, seed=s, source=tmp_path)
                   for s in (5, 6)]
    assert any(chosen != one or held != val for chosen, held, _ in other_seeds)
    given = [{"image": Path("v.png"), "label": Path("lv.png")}]
    chosen, held, _ = split_items(items, given, labeled, labeled=None, **options)
    assert held == given and len(chosen) == 10  # the datalist's validation entries: nothing held out
    with pytest.raises(InputError, match="both training and validation"):
        split_items(items, items[:1], labeled, labeled=None, **options)
    with pytest.raises(InputError, match="--labeled 9 exceeds the 8"):
        split_items(items, [], labeled, labeled=9, **options)


@pytest.mark.parametrize("decoder_init", ["pretrained", "random"])
def test_start_weights_per_part_and_the_head_shared_with_random_init(tmp_path, decoder_init):
    """The encoder comes from the checkpoint, the decoder from it or (``train.decoder_init=random``) from the random
    init of the same seed, the head always from that random init."""
    pretrained = _pretrained(tmp_path / "pre", 2)
    config = read_finetune_config(CONFIGS / "finetune_seg_2d.yaml",
                                  ["network.channels=[4,8,8]", f"train.decoder_init={decoder_init}"])
    start, _ = engine.build_task_network(replace(config, checkpoint=str(pretrained)), 3)
    random_init = engine.build_task_network(replace(config, checkpoint="none"), 3)[0].state_dict()
    backbone = read_model_file(pretrained)["state_dict"]
    parts = {name: part for part, modules in start.parts().items()
             for name, module in start.named_children() if module in modules}
    from_checkpoint = {"encoder", "decoder"} if decoder_init == "pretrained" else {"encoder"}
    for key, value in start.state_dict().items():
        expected = backbone if parts[key.split(".")[0]] in from_checkpoint else random_init
        assert torch.equal(value, expected[key]), key
    assert not all(torch.equal(backbone[k], random_init[k]) for k in backbone)  # they can differ
    with pytest.raises(InputError, match="train.decoder_init"):
        read_finetune_config(CONFIGS / "finetune_seg_2d.yaml", ["train.decoder_init=fresh"])


def test_task_unet_loads_into_stock_monai():
    from monai.networks.nets import BasicUNet

    from medssl.networks.unet import ACTIVATION, NORMS, SIZES

    network = TaskUNet(2, 4, size="small").eval()
    stock = BasicUNet(2, 1, 4, features=SIZES["small"], act=ACTIVATION, norm=NORMS["instance"]).eval()
    stock.load_state_dict(network.state_dict(), strict=True)
    x = torch.randn(1, 1, 32, 32)
    assert torch.allclose(stock(x), network(x), atol=1e-6)


def test_layerwise_learning_rates_and_frozen_encoder():
    network = TaskUNet(2, 3, channels=[4, 8, 8])
    config = read_finetune_config(CONFIGS / "finetune_seg_2d.yaml",
                                  ["train.encoder_lr_scale=0", "train.decoder_lr_scale=0.1", "train.lr=0.01"])
    optimizer, frozen = engine.layerwise_optimizer(network, config.train)
    in_optimizer = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for module in network.parts()["encoder"]:
        assert module in frozen
        assert all(not p.requires_grad and id(p) not in in_optimizer for p in module.parameters())
    decoder_lrs = {in_optimizer[id(p)] for m in network.parts()["decoder"] for p in m.parameters()}
    assert len(decoder_lrs) == 1 and decoder_lrs.pop() == pytest.approx(1e-3)
    assert {in_optimizer[id(p)] for p in network.final_conv.parameters()} == {0.01}


def test_freeze_encoder_steps_hold_the_encoder_then_train_it(demo2d, tmp_path, monkeypatch):
    pretrained = _pretrained(tmp_path / "pre", 2)
    start = read_model_file(pretrained)["state_dict"]
    weights = {}
    save = engine.save_checkpoint

    def spy(run, payload):  # the weights after each step (val_every=1 checkpoints every step)
        weights[payload["state"]["step"]] = {k: v.clone() for k, v in payload["network"].items()}
        return save(run, payload)

    monkeypatch.setattr(engine, "save_checkpoint", spy)
    assert main(["finetune", "seg", str(CONFIGS / "finetune_seg_2d.yaml"), "--checkpoint", str(pretrained), "--data",
                 str(demo2d / "datalist.json"), *TINY_2D, "train.steps=3", "train.val_every=1", "train.lr=0.01",
                 "train.freeze_encoder_steps=2", "--out", str(tmp_path / "warm")]) == 0
    encoder = [k for k in start if k.split(".")[0] == "conv_0" or k.startswith("down_")]
    decoder = [k for k in start if k.startswith("upcat_")]
    assert encoder and decoder and sorted(weights) == [1, 2, 3]
    for step in (1, 2):  # warm-up: the encoder as pretrained, the decoder already training
        assert all(torch.equal(weights[step][k], start[k]) for k in encoder)
        assert not all(torch.equal(weights[step][k], start[k]) for k in decoder)
    assert not all(torch.equal(weights[3][k], start[k]) for k in encoder)  # released at step 3
    with pytest.raises(InputError, match="freeze_encoder_steps"):
        read_finetune_config(CONFIGS / "finetune_seg_2d.yaml", ["train.steps=100", "train.freeze_encoder_steps=100"])


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(demo2d, tmp_path, monkeypatch, capsys):
    base = ["finetune", "seg", str(CONFIGS / "finetune_seg_2d.yaml"), "--checkpoint", "none", "--data",
            str(demo2d / "datalist.json"), *TINY_2D, "train.steps=4"]
    assert main(base + ["--out", str(tmp_path / "whole")]) == 0
    sample = PatchSampler.sample

    def interrupted(self, step, batch_size):
        if step == 2:
            raise KeyboardInterrupt
        return sample(self, step, batch_size)

    monkeypatch.setattr(PatchSampler, "sample", interrupted)
    assert main(base + ["--out", str(tmp_path / "part")]) == 130
    monkeypatch.setattr(PatchSampler, "sample", sample)
    part = tmp_path / "part"
    assert main(["finetune", "seg", str(part / "config.yaml"), "--resume", str(part)]) == 0
    whole = torch.load(tmp_path / "whole" / engine.CHECKPOINT, weights_only=False)["network"]
    resumed = torch.load(part / engine.CHECKPOINT, weights_only=False)["network"]
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert [r["step"] for r in csv.DictReader((part / "metrics.csv").open())] == ["1", "2", "3", "4"]
    capsys.readouterr()
    changed = ["finetune", "seg", str(part / "config.yaml"), "--resume", str(part), "train.lr=0.5", "train.device=cpu"]
    assert main(changed) == 2  # a changed learning rate is refused; the device may change
    assert "(train.lr differ)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- landmarks
def test_landmarks_2d_missing_annotations_are_masked_and_reported(demo2d, tmp_path, caplog):
    truth = read_landmarks(demo2d / "landmarks.csv")
    names = sorted(truth["subject_000"])
    rows = [(key, name, *point) for key, by_name in truth.items() for name, point in by_name.items()
            if not (key == "subject_001" and name in names[:2])]  # subject_001 lacks two landmarks
    partial = tmp_path / "partial.csv"
    partial.write_text("image,name,x,y\n" + "".join(f"{k},{n},{x},{y}\n" for k, n, x, y in rows))
    content = json.loads((demo2d / "datalist.json").read_text())
    content["validation"] = [content["training"].pop()]  # subject_004 validates; subject_001 trains
    datalist = demo2d / "with_validation.json"
    datalist.write_text(json.dumps(content))
    run = tmp_path / "run"
    args = ["finetune", "landmarks", str(CONFIGS / "finetune_landmarks_2d.yaml"), "--checkpoint", "none",
            "--data", str(datalist), "--landmarks", str(partial), "--out", str(run), *TINY_2D]
    assert main(args) == 0
    split = json.loads((run / "split.json").read_text())
    assert split["validation"] == ["subject_004"] and sorted(split["labeled"]) == [f"subject_00{i}" for i in range(4)]
    assert split["missing_landmarks"] == {"subject_001": names[:2]}
    assert f"2 landmark annotation(s) missing in 1 training image(s), masked in the loss: subject_001: " \
           f"{names[0]}, {names[1]}" in caplog.text
    payload = read_model_file(run)
    assert payload["task"] == {"kind": "landmarks", "names": names, "sigma_mm": 6.0}
    out = tmp_path / "pred.csv"
    assert main(["predict", "landmarks", "--model", str(run), "--images", str(demo2d / "images"), "--out",
                 str(out)]) == 0
    assert out.read_text().splitlines()[0] == "image,name,x,y,score"
    predicted, scores = read_landmarks(out), read_scores(out)
    assert sorted(predicted) == sorted(truth) and all(sorted(p) == names for p in predicted.values())
    assert all(np.isfinite(v) for by_name in scores.values() for v in by_name.values())


def test_landmark_sampler_masks_absent_landmarks_and_anchors_the_template(demo2d):
    truth = read_landmarks(demo2d / "landmarks.csv")
    names = sorted(truth["subject_000"])
    cases = []
    for index, key in enumerate(("subject_000", "subject_001", "subject_002")):
        landmarks = {n: p for n, p in truth[key].items() if not (index == 2 and n == names[0])}
        cases.append(load_case(demo2d / "images" / f"{key}.png", spatial_dims=2, preprocessing=Preprocessing(), landmarks=landmarks,
                               names=names))
    sampler = PatchSampler(cases, patch_size=[32, 32], augment=False, seed=1, anchors=[0])
    for step in range(6):
        batch = sampler.sample(step, 3)
        first = batch.points_mm[0].numpy()
        np.testing.assert_allclose(first, cases[0].points_mm, rtol=1e-6)  # the anchor leads every batch
        for row, present in zip(batch.points_mm, batch.present):
            assert torch.equal(present, torch.isfinite(row).all(dim=-1))
    assert not torch.isfinite(torch.as_tensor(cases[2].points_mm[0])).any()
    again = sampler.sample(4, 3)
    assert torch.equal(again.image, sampler.sample(4, 3).image)  # a batch depends only on (seed, step)


def test_landmarks_3d_pseudo_labels_train_on_the_unlabeled_pool(demo3d, tmp_path):
    truth = read_landmarks(demo3d / "landmarks.csv")
    pseudo = tmp_path / "oneshot.csv"
    with pseudo.open("w") as handle:  # stage-1 "predictions": the truth moved by 2 mm, with a score column
        handle.write("image,name,x,y,z,score\n")
        for key, by_name in truth.items():
            for name, (x, y, z) in by_name.items():
                handle.write(f"{key},{name},{x + 2},{y},{z},0.5\n")
    run = tmp_path / "run"
    args = ["finetune", "landmarks", str(CONFIGS / "finetune_landmarks_3d.yaml"), "--checkpoint", "none",
            "--data", str(demo3d / "datalist.json"), "--landmarks", str(demo3d / "landmarks.csv"), "--labeled", "1",
            "--pseudo", str(pseudo), "--out", str(run), *TINY_3D]
    assert main(args) == 0
    split = json.loads((run / "split.json").read_text())
    assert len(split["labeled"]) == 1 and len(split["validation"]) == 1
    assert sorted(split["pseudo"] + split["labeled"] + split["validation"]) == sorted(truth)  # the whole pool
    out = tmp_path / "pred.csv"
    assert main(["predict", "landmarks", "--model", str(run), "--images", str(demo3d / "images" / "subject_000.nii.gz"),
                 "--out", str(out)]) == 0
    assert out.read_text().splitlines()[0] == "image,name,x,y,z,score"


def test_segmentation_pseudo_label_maps_train_on_the_unlabeled_pool(demo2d, tmp_path, capsys):
    """Stage 2 for segmentation: one labeled image plus label maps of the same names (e.g. from segment oneshot)."""
    pseudo = tmp_path / "oneshot"
    pseudo.mkdir()
    for path in sorted((demo2d / "labels").iterdir()):  # stage-1 "predictions": the true maps, one class dropped
        label = load_label(path)
        save_image(np.where(label.as_tensor()[0].numpy() == 1, 0, label.as_tensor()[0].numpy()).astype(np.uint8),
                   label.affine, pseudo / path.name)
    run = tmp_path / "run"
    args = ["finetune", "seg", str(CONFIGS / "finetune_seg_2d.yaml"), "--checkpoint", "none", "--data",
            str(demo2d / "datalist.json"), "--labeled", "1", "--pseudo", str(pseudo), "--out", str(run), *TINY_2D]
    assert main(args) == 0
    split = json.loads((run / "split.json").read_text())
    assert len(split["labeled"]) == 1 and split["pseudo"] and not set(split["pseudo"]) & set(split["validation"])
    assert sorted(split["pseudo"] + split["labeled"] + split["validation"]) == sorted(
        path.name.split(".")[0] for path in (demo2d / "images").iterdir())  # the whole pool
    empty = tmp_path / "empty"
    empty.mkdir()
    save_image(np.ones((4, 4), dtype=np.uint8), np.eye(3), empty / "other.png")
    assert main([*args[:-len(TINY_2D) - 4], "--pseudo", str(empty), "--out", str(tmp_path / "run2"), *TINY_2D]) == 2
    assert "no unlabeled training image has a label map" in _one_error_line(capsys)


# --------------------------------------------------------------------------------------------------- bad inputs
def _bad_label_datalist(demo2d: Path, tmp_path: Path) -> Path:
    from PIL import Image

    small = tmp_path / "small_label.png"
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(small)
    content = json.loads((demo2d / "datalist.json").read_text())
    content["training"][0]["label"] = str(small)
    for item in content["training"][1:]:
        item["image"], item["label"] = str(demo2d / item["image"]), str(demo2d / item["label"])
    content["training"][0]["image"] = str(demo2d / content["training"][0]["image"])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    return path


def _outside_csv(demo2d: Path, tmp_path: Path) -> Path:
    text = (demo2d / "landmarks.csv").read_text().splitlines()
    key, name = text[1].split(",")[:2]
    path = tmp_path / "outside.csv"
    path.write_text("\n".join(text + [f"{key},far_away,5000,5000"]) + "\n")
    return path


@pytest.mark.parametrize(("case", "expected"), [
    ("missing_datalist", "nope.json: no such datalist file"),
    ("label_shape", "small_label.png: label map shape (12, 10) differs"),
    ("landmark_outside", "outside.csv: landmark 'far_away'"),
    ("too_many_labeled", "--labeled 9 exceeds"),
    ("wrong_task", "finetune_landmarks_2d.yaml: this is a 'landmarks' config"),
    ("no_landmarks", "pass --landmarks CSV"),
    ("unknown_key", "unknown config key 'train.stepz' (did you mean 'steps'?)"),
    ("not_a_model", "model.pt: not a medssl model file"),
    ("checkpoint_dims", "pre3d: the checkpoint is 3D but the config is 2D"),
    ("patch_divisor", "data.patch_size [15, 15] must be a multiple of 2"),
])
def test_bad_inputs_exit_2_with_one_line_naming_the_file(demo2d, tmp_path, capsys, case, expected):
    seg = ["finetune", "seg", str(CONFIGS / "finetune_seg_2d.yaml"), "--checkpoint", "none", "--out",
           str(tmp_path / "run"), *TINY_2D]
    landmarks = ["finetune", "landmarks", str(CONFIGS / "finetune_landmarks_2d.yaml"), "--checkpoint", "none",
                 "--data", str(demo2d / "datalist.json"), "--out", str(tmp_path / "run"), *TINY_2D]
    datalist = str(demo2d / "datalist.json")
    args = {
        "missing_datalist": seg + ["--data", str(tmp_path / "nope.json")],
        "label_shape": seg + ["--data", str(_bad_label_datalist(demo2d, tmp_path)), "data.split_seed=1",
                              "data.val_fraction=0.9"],
        "landmark_outside": landmarks + ["--landmarks", str(_outside_csv(demo2d, tmp_path)), "data.val_fraction=0.9"],
        "too_many_labeled": seg + ["--data", datalist, "--labeled", "9"],
        "wrong_task": ["finetune", "seg", str(CONFIGS / "finetune_landmarks_2d.yaml"), "--checkpoint", "none",
                       "--data", datalist],
        "no_landmarks": landmarks,
        "unknown_key": seg + ["--data", datalist, "train.stepz=3"],
        "not_a_model": ["predict", "seg", "--model", str(_fake_model(tmp_path)), "--images", datalist, "--out",
                        str(tmp_path / "p")],
        "checkpoint_dims": seg[:4] + [str(_pretrained(tmp_path / "pre3d", 3))] + seg[5:] + ["--data", datalist],
        "patch_divisor": seg + ["--data", datalist, "data.patch_size=[15,15]"],
    }[case]
    assert main(args) == 2
    assert expected in _one_error_line(capsys)


def _fake_model(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save({"something": 1}, path)
    return path


def test_predicting_with_the_other_tasks_model_exits_2(demo2d, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", "seg", str(CONFIGS / "finetune_seg_2d.yaml"), "--checkpoint", "none", "--data",
                 str(demo2d / "datalist.json"), "--out", str(run), *TINY_2D, "train.steps=1", "train.val_every=1"]) == 0
    capsys.readouterr()
    assert main(["predict", "landmarks", "--model", str(run), "--images", str(demo2d / "images"), "--out",
                 str(tmp_path / "p.csv")]) == 2
    assert "this is a segmentation model; use 'medssl predict seg'" in _one_error_line(capsys)


def test_every_new_command_has_help_with_an_example(capsys):
    for command in (["finetune", "seg"], ["finetune", "landmarks"], ["predict", "seg"], ["predict", "landmarks"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert "example:" in capsys.readouterr().out
