"""The input/output contract through the command line (issue 16): every refusal exits 2 with one stderr line naming
the file or key, no traceback, and no input file changed; resuming never runs code from a checkpoint."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medssl.cli import main
from medssl.config import save_config
from medssl.data.readers import save_image
from medssl.networks import save_model
from medssl.engine.finetune_config import read_finetune_config
from medssl.engine.pretrain_config import read_pretrain_config
from medssl.networks import UNet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_FINETUNE = ["network.channels=[4,8,8]", "train.steps=2", "train.val_every=2", "train.batch_size=2",
                 "train.warmup_steps=0", "data.patch_size=[16,16]", "data.spacing_mm=2.0"]
TINY_PRETRAIN = ["network.channels=[4,8,8]", "train.steps=2", "train.batch_size=2", "train.warmup_steps=0",
                 "data.patch_size=[16,16]"]
SIDE = 32  # pixels of the tiny 2D images (1 mm)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png(path: Path, values: np.ndarray) -> Path:
    return save_image(values, np.diag([1.0, 1.0, 1.0]), path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four 32x32 PNG subjects with label maps (classes 0-2), two landmarks each and a datalist."""
    root = tmp_path_factory.mktemp("bad_inputs") / "data"
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
    rows, items = ["image,name,x,y"], []
    for k in range(4):
        cx, cy = 12 + 2 * k, 16 - k
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 40.0)
        image = (200 * blob + 30 * rng.random((SIDE, SIDE))).astype(np.uint8)
        label = (blob > 0.3).astype(np.uint8) + (blob > 0.7).astype(np.uint8)
        _png(root / "images" / f"s{k}.png", image)
        _png(root / "labels" / f"s{k}.png", label)
        rows += [f"s{k},centre,{cx},{cy}", f"s{k},corner,{cx + 6},{cy + 5}"]
        items.append({"image": f"images/s{k}.png", "label": f"labels/s{k}.png"})
    (root / "landmarks.csv").write_text("\n".join(rows) + "\n")
    (root / "datalist.json").write_text(json.dumps({"training": items}))
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A pretraining-style run folder holding a tiny U-Net's model.pt."""
    folder = tmp_path_factory.mktemp("bad_inputs") / "pretrained"
    torch.manual_seed(7)
    save_model(UNet(2, channels=[4, 8, 8]), folder, spatial_dims=2, preprocessing={})
    return folder


@pytest.fixture(scope="module")
def seg_model(data, tmp_path_factory) -> Path:
    """A fine-tuned segmentation run (two steps)."""
    run = tmp_path_factory.mktemp("bad_inputs") / "seg"
    assert main(["finetune", "seg", str(CONFIGS / "finetune_seg_2d.yaml"), "--checkpoint", "none", "--data",
                 str(data / "datalist.json"), "--out", str(run), *TINY_FINETUNE]) == 0
    return run


def _hashes(*roots: Path) -> dict[Path, str]:
    """sha256 of every file at or below ``roots``."""
    files = [f for root in roots for f in ([root] if root.is_file() else sorted(root.rglob("*"))) if f.is_file()]
    return {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def refused(capsys, args: list[str], *named: str, inputs: tuple[Path, ...] = ()) -> str:
    """Run the CLI; assert exit 2, no traceback, one stderr line holding every ``named`` text, ``inputs`` intact."""
    before = _hashes(*inputs)
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medssl: error:"), lines
    for text in named:
        assert str(text) in lines[0], (text, lines[0])
    assert _hashes(*inputs) == before
    return lines[0]


# ------------------------------------------------------------------------------------------- 1: resume is safe
class _Payload:
    """Unpickling this creates ``marker`` (what a crafted checkpoint could do with any command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _crafted_run(run: Path, config) -> Path:
    """A run folder with ``config`` and a ``checkpoints/last.pt`` whose unpickling would create ``run/PWNED``."""
    (run / "checkpoints").mkdir(parents=True)
    save_config(config, run / "config.yaml")
    torch.save({"step": 1, "evil": _Payload(run / "PWNED")}, run / "checkpoints" / "last.pt")
    return run / "PWNED"


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_resume_never_unpickles_code(data, tmp_path, capsys, command):
    run = tmp_path / "run"
    if command == "pretrain":
        config = read_pretrain_config(CONFIGS / "pgssl_2d.yaml", [*TINY_PRETRAIN, f"data.path={data / 'images'}"])
        args = ["pretrain", run / "config.yaml", "--resume", run]
    else:
        config = read_finetune_config(CONFIGS / "finetune_seg_2d.yaml",
                                      [*TINY_FINETUNE, "checkpoint=none", f"data.path={data / 'datalist.json'}"])
        args = ["finetune", "seg", run / "config.yaml", "--resume", run]
    marker = _crafted_run(run, config)
    refused(capsys, args, run / "checkpoints" / "last.pt", "cannot resume", inputs=(data, run))
    assert not marker.exists()
    torch.load(run / "checkpoints" / "last.pt", weights_only=False)  # the payload is real: the unsafe load runs it
    assert marker.exists()


def test_corrupt_checkpoint_is_refused_and_stale_partial_files_removed(data, tmp_path, capsys):
    run = tmp_path / "run"
    config = read_pretrain_config(CONFIGS / "pgssl_2d.yaml", [*TINY_PRETRAIN, f"data.path={data / 'images'}"])
    (run / "checkpoints").mkdir(parents=True)
    save_config(config, run / "config.yaml")
    (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    partial = run / "checkpoints" / ".last.pt.abc123.tmp"
    partial.write_bytes(b"half a checkpoint")
    line = refused(capsys, ["pretrain", run / "config.yaml", "--resume", run], run / "checkpoints" / "last.pt",
                   "new --out", inputs=(data, run / "config.yaml", run / "checkpoints" / "last.pt"))
    assert "corrupt" in line
    assert not partial.exists()


# ------------------------------------------------------------------------------- 2: outputs never overwrite inputs
def test_predict_seg_into_its_image_folder_is_refused(data, seg_model, capsys):
    images = data / "images"
    for out in (images, data):  # the folder itself, or one holding it
        refused(capsys, ["predict", "seg", "--model", seg_model, "--images", images, "--out", out], out,
                "also an input" if out == images else "holds an input", inputs=(data, seg_model))


def test_oneshot_output_equal_to_an_input_is_refused(data, tmp_path, capsys):
    template, csv = data / "images" / "s0.png", data / "landmarks.csv"
    base = ["landmarks", "oneshot", "--method", "ncc", "--template", template, "--template-landmarks", csv,
            "--images", data / "images"]
    for out in (csv, template, data / "images" / "s2.png"):
        refused(capsys, [*base, "--out", out], out, "also an input", inputs=(data,))
    refused(capsys, [*base, "--out", tmp_path / "p.csv", "--figures", data / "images"], data / "images",
            "holds an input", inputs=(data,))
    assert not (tmp_path / "p.csv").exists()


def test_oneshot_out_equal_to_truth_is_refused(data, tmp_path, capsys):
    truth = tmp_path / "truth.csv"
    truth.write_bytes((data / "landmarks.csv").read_bytes())
    refused(capsys, ["landmarks", "oneshot", "--method", "ncc", "--template", data / "images" / "s0.png",
                     "--template-landmarks", data / "landmarks.csv", "--images", data / "images", "--truth", truth,
                     "--out", truth], truth, inputs=(data, truth))


def test_select_template_and_evaluate_outputs_equal_to_inputs_are_refused(data, pretrained, tmp_path, capsys):
    image = data / "images" / "s1.png"
    refused(capsys, ["landmarks", "select-template", "--checkpoint", pretrained, "--images", data / "images",
                     "--out", image], image, inputs=(data,))
    csv = data / "landmarks.csv"
    refused(capsys, ["evaluate", "landmarks", "--pred", csv, "--truth", csv, "--json", csv], csv, inputs=(data,))
    datalist = data / "datalist.json"
    refused(capsys, ["evaluate", "seg", "--pred", data / "labels", "--truth", datalist, "--json", datalist],
            datalist, inputs=(data,))


def test_a_new_run_folder_holding_its_config_or_data_is_refused(data, tmp_path, capsys):
    folder = tmp_path / "project"
    folder.mkdir()
    config = folder / "my.yaml"
    config.write_bytes((CONFIGS / "pgssl_2d.yaml").read_bytes())
    refused(capsys, ["pretrain", config, "--data", data / "images", "--out", folder, *TINY_PRETRAIN], folder,
            "holds an input", inputs=(config, data))
    refused(capsys, ["finetune", "seg", CONFIGS / "finetune_seg_2d.yaml", "--checkpoint", "none", "--data",
                     data / "datalist.json", "--out", data, *TINY_FINETUNE], data, "holds an input", inputs=(data,))
    assert sorted(p.name for p in folder.iterdir()) == ["my.yaml"]


# --------------------------------------------------------------------------------------- 3: outputs checked first
@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "occupied.txt"
    path.write_text("not a folder\n")
    return path


def _commands(data: Path, pretrained: Path, seg_model: Path, out: Path, kind: str) -> list[list]:
    """Every command with ``out`` as its output of ``kind`` (file or folder)."""
    images, csv = data / "images", data / "landmarks.csv"
    oneshot = ["landmarks", "oneshot", "--method", "ncc", "--template", images / "s0.png", "--template-landmarks", csv,
               "--images", images]
    if kind == "folder":
        return [
            ["pretrain", CONFIGS / "pgssl_2d.yaml", "--data", images, "--out", out, *TINY_PRETRAIN],
            ["finetune", "seg", CONFIGS / "finetune_seg_2d.yaml", "--checkpoint", "none", "--data",
             data / "datalist.json", "--out", out, *TINY_FINETUNE],
            ["predict", "seg", "--model", seg_model, "--images", images, "--out", out],
            [*oneshot, "--out", out.parent / "fine.csv", "--figures", out],
        ]
    return [
        [*oneshot, "--out", out],
        ["landmarks", "select-template", "--checkpoint", pretrained, "--images", images, "--out", out],
        ["predict", "landmarks", "--model", seg_model, "--images", images, "--out", out],
        ["evaluate", "landmarks", "--pred", csv, "--truth", csv, "--json", out],
        ["evaluate", "seg", "--pred", data / "labels", "--truth", data / "labels", "--json", out],
    ]


def test_a_file_where_a_folder_is_expected_is_refused(data, pretrained, seg_model, a_file, capsys):
    for args in _commands(data, pretrained, seg_model, a_file, "folder"):
        refused(capsys, args, a_file, "is a file", inputs=(data, a_file))
    for args in _commands(data, pretrained, seg_model, a_file / "inside", "folder"):
        refused(capsys, args, a_file, "is a file", inputs=(data, a_file))


def test_a_folder_where_a_file_is_expected_is_refused(data, pretrained, seg_model, tmp_path, a_file, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    for args in _commands(data, pretrained, seg_model, folder, "file"):
        refused(capsys, args, folder, "is a folder", inputs=(data,))
    for args in _commands(data, pretrained, seg_model, a_file / "scores.json", "file"):
        refused(capsys, args, a_file, "is a file", inputs=(data, a_file))


def test_a_read_only_output_folder_is_refused(data, pretrained, seg_model, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))  # root ignores modes
    for kind, out in (("folder", locked / "run"), ("file", locked / "out.csv")):
        for args in _commands(data, pretrained, seg_model, out, kind):
            refused(capsys, args, locked, "not writable", inputs=(data,))
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_for_real(data, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(capsys, ["evaluate", "landmarks", "--pred", data / "landmarks.csv", "--truth",
                         data / "landmarks.csv", "--json", locked / "s.json"], locked, "not writable", inputs=(data,))
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------------- 4, 7: degenerate images, checked first
def _bad_image(folder: Path, kind: str) -> Path:
    """A 2D image that must be refused: NaN-holding (NIfTI), constant, one pixel wide, a 4D series, or corrupt."""
    folder.mkdir(parents=True, exist_ok=True)
    values = np.random.default_rng(1).random((SIDE, SIDE)).astype(np.float32)
    if kind == "nan":
        values[3:9, 4:7] = np.nan
        return save_image(values, np.eye(3), folder / "nan.nii.gz")
    if kind == "constant":
        return _png(folder / "constant.png", np.zeros((SIDE, SIDE), np.uint8))
    if kind == "thin":
        return _png(folder / "thin.png", (255 * values[:1]).astype(np.uint8))  # 1 x 32: under the U-Net's divisor
    if kind == "4d":
        import nibabel as nib

        path = folder / "series.nii.gz"
        frames = np.random.default_rng(2).random((SIDE, SIDE, 1, 5)).astype(np.float32)  # 5: not read as RGB(A)
        nib.save(nib.Nifti1Image(frames, np.eye(4)), str(path))
        return path
    path = folder / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return path


IMAGE_PROBLEMS = {"nan": "NaN or infinite", "constant": "constant", "thin": "too small", "4d": "channel"}


@pytest.mark.parametrize("kind", IMAGE_PROBLEMS)
def test_a_bad_query_or_template_image_is_refused_by_name(data, pretrained, seg_model, tmp_path, capsys, kind):
    bad = _bad_image(tmp_path / "bad", kind)
    csv = tmp_path / "template.csv"
    csv.write_text(f"image,name,x,y\n{bad.name.split('.')[0]},centre,10,10\n")
    good = data / "images" / "s0.png"
    oneshot = ["landmarks", "oneshot", "--checkpoint", pretrained, "--out", tmp_path / "p.csv"]
    for args in (
        [*oneshot, "--template", good, "--template-landmarks", data / "landmarks.csv", "--images", bad],
        [*oneshot, "--template", bad, "--template-landmarks", csv, "--images", data / "images"],
        ["landmarks", "select-template", "--checkpoint", pretrained, "--images", data / "images", bad,
         "--out", tmp_path / "r.csv"],
        ["predict", "seg", "--model", seg_model, "--images", bad, "--out", tmp_path / "pred"],
    ):
        refused(capsys, args, bad, IMAGE_PROBLEMS[kind], inputs=(data, bad))
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("kind", ["nan", "constant", "corrupt"])
def test_a_bad_scan_in_a_training_pool_is_refused_before_step_1(data, tmp_path, capsys, kind):
    pool = tmp_path / "pool"
    pool.mkdir()
    for image in (data / "images").iterdir():
        (pool / image.name).write_bytes(image.read_bytes())
    bad = _bad_image(pool, kind)
    out = tmp_path / "run"
    refused(capsys, ["pretrain", CONFIGS / "pgssl_2d.yaml", "--data", pool, "--out", out, *TINY_PRETRAIN], bad,
            inputs=(pool,))
    assert not out.exists()  # refused before the run folder is made


def test_a_bad_image_in_a_finetuning_datalist_is_refused(data, tmp_path, capsys):
    bad = _bad_image(tmp_path / "bad", "nan")
    label = save_image(np.ones((SIDE, SIDE), np.uint8), np.eye(3), tmp_path / "bad" / "nan_label.nii.gz")
    items = [{"image": str(data / f"images/s{k}.png"), "label": str(data / f"labels/s{k}.png")} for k in range(3)]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [*items, {"image": str(bad), "label": str(label)}]}))
    out = tmp_path / "run"
    refused(capsys, ["finetune", "seg", CONFIGS / "finetune_seg_2d.yaml", "--checkpoint", "none", "--data", datalist,
                     "--out", out, *TINY_FINETUNE], bad, "NaN", inputs=(data, tmp_path / "bad"))
    assert not out.exists()


def test_a_folder_with_its_own_datalist_leaves_out_the_label_maps_it_names(data, tmp_path, capsys):
    from medssl.data.inputs import resolve_images

    images = resolve_images(data)  # what pretrain --data, oneshot/select-template/predict --images read
    assert sorted(p.name for p in images) == [f"s{k}.png" for k in range(4)]
    assert all(p.parent.name == "images" for p in images)
    out = tmp_path / "pred.csv"
    assert main([str(a) for a in ["landmarks", "oneshot", "--method", "ncc", "--template", data / "images" / "s0.png",
                                  "--template-landmarks", data / "landmarks.csv", "--images", data, "--out", out]]) == 0
    rows = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert sorted(rows) == sorted(2 * [f"s{k}" for k in range(4)])  # 4 images x 2 landmarks: no label map matched
    broken = tmp_path / "broken"
    broken.mkdir()
    _png(broken / "a.png", np.arange(16, dtype=np.uint8).reshape(4, 4))
    (broken / "datalist.json").write_text("{not json")
    assert [p.name for p in resolve_images(broken)] == ["a.png"]  # an unreadable datalist.json is only warned about


# ------------------------------------------------------------------------------------ 5: files that are not text
def test_binary_files_as_csv_config_or_pred_are_refused(data, tmp_path, capsys):
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    refused(capsys, ["evaluate", "landmarks", "--pred", binary, "--truth", data / "landmarks.csv"], binary, "UTF-8",
            inputs=(data, binary))
    refused(capsys, ["landmarks", "oneshot", "--method", "ncc", "--template", data / "images" / "s0.png",
                     "--template-landmarks", binary, "--images", data / "images", "--out", tmp_path / "p.csv"],
            binary, "UTF-8", inputs=(data, binary))
    refused(capsys, ["pretrain", binary, "--data", data / "images", "--out", tmp_path / "run"], binary, "UTF-8",
            inputs=(data, binary))
    refused(capsys, ["finetune", "seg", binary, "--checkpoint", "none", "--data", data / "datalist.json",
                     "--out", tmp_path / "run"], binary, "UTF-8", inputs=(data, binary))


# ------------------------------------------------------------------------------ 10: messages that name the key
@pytest.mark.parametrize(("override", "key"), [
    ("data.patch_size=[7,7]", "data.patch_size"),
    ("data.context_size=[18,18]", "data.context_size"),
    ("data.modality=mri", "data.modality"),
    ("data.spacing_mm=-1", "config key 'data.spacing_mm'"),
    ("objective.pgssl.uncertainty=maybe", "config key 'objective.pgssl.uncertainty'"),
    ("objective.pgssl.mc_samples=1", "config section 'objective.pgssl'"),
    ("method=foo", "foo"),
])
def test_config_mistakes_name_the_key(data, tmp_path, capsys, override, key):
    refused(capsys, ["pretrain", CONFIGS / "pgssl_2d.yaml", "--data", data / "images", "--out", tmp_path / "run",
                     *TINY_PRETRAIN, override], key, inputs=(data,))
    assert not (tmp_path / "run").exists()


def test_a_negative_demo_seed_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["data", "demo", "--out", str(tmp_path / "d"), "--seed=-5"])
    assert stop.value.code == 2
    assert "--seed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 9: silent drops
def test_finetune_landmarks_reports_csv_images_not_found_and_unlabeled_images(data, tmp_path, caplog):
    table = tmp_path / "landmarks.csv"
    rows = (data / "landmarks.csv").read_text().splitlines()
    table.write_text("\n".join([r for r in rows if not r.startswith("s3,")] + ["s9,centre,10,10"]) + "\n")
    run = tmp_path / "run"
    assert main(["finetune", "landmarks", str(CONFIGS / "finetune_landmarks_2d.yaml"), "--checkpoint", "none",
                 "--data", str(data / "images"), "--landmarks", str(table), "--out", str(run), *TINY_FINETUNE]) == 0
    split = json.loads((run / "split.json").read_text())
    assert split["csv_images_not_found"] == ["s9"] and split["unlabeled"] == ["s3"]
    assert sorted(split["labeled"] + split["validation"]) == ["s0", "s1", "s2"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "s9" in r.getMessage()]
    assert len(warned) == 1 and str(table) in warned[0]


def test_a_validation_image_without_finite_landmarks_is_refused(data, tmp_path, capsys):
    items = [{"image": str(data / f"images/s{k}.png")} for k in range(4)]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items[:3], "validation": items[3:]}))
    table = tmp_path / "landmarks.csv"
    rows = (data / "landmarks.csv").read_text().splitlines()
    args = ["finetune", "landmarks", CONFIGS / "finetune_landmarks_2d.yaml", "--checkpoint", "none", "--data",
            datalist, "--landmarks", table, "--out", tmp_path / "run", *TINY_FINETUNE]
    table.write_text("\n".join(r for r in rows if not r.startswith("s3,")) + "\n")  # s3: no rows
    refused(capsys, args, table, "validation image(s) s3", inputs=(data, table, datalist))
    table.write_text("\n".join(r.replace("s3,centre,18,13", "s3,centre,nan,13") for r in rows) + "\n")
    refused(capsys, args, table, "finite", inputs=(data, table, datalist))  # a NaN coordinate: refused when read
    assert not (tmp_path / "run").exists()


def test_evaluate_landmarks_reports_unscored_and_unknown_images(data, tmp_path, caplog):
    rows = (data / "landmarks.csv").read_text().splitlines()
    pred = tmp_path / "pred.csv"
    pred.write_text("\n".join(rows[:5] + ["s7,centre,1,1"]) + "\n")  # s0, s1 and an image not in the truth
    out = tmp_path / "scores.json"
    assert main(["evaluate", "landmarks", "--pred", str(pred), "--truth", str(data / "landmarks.csv"),
                 "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["unscored_images"] == ["s2", "s3"] and scores["unknown_images"] == ["s7"]
    assert scores["n_images"] == 2 and scores["n_missing"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("s2, s3" in w for w in warnings) and any("s7" in w for w in warnings)


# ------------------------------------------------------------------------- 11: resumed clock, failed runs, ranks
def test_metrics_seconds_continue_across_a_resume(data, tmp_path, monkeypatch):
    from medssl.transforms.sampler import ViewPairSampler

    run = tmp_path / "run"
    args = ["pretrain", str(CONFIGS / "pgssl_2d.yaml"), "--data", str(data / "images"), "--out", str(run),
            *TINY_PRETRAIN, "train.steps=4", "train.checkpoint_every=2", "train.log_every=1"]
    sample, calls = ViewPairSampler.sample, []

    def interrupted(self, batch_size, **where):
        calls.append(batch_size)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return sample(self, batch_size, **where)

    monkeypatch.setattr(ViewPairSampler, "sample", interrupted)
    assert main(args) == 130
    monkeypatch.setattr(ViewPairSampler, "sample", sample)
    assert main(["pretrain", str(run / "config.yaml"), "--resume", str(run)]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[2] >= seconds[1] > 0, seconds


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("existed", [False, True])
def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_nothing(data, tmp_path, capsys, caplog, command,
                                                                          existed):
    run = tmp_path / "run"
    if existed:
        run.mkdir()
        (run / "notes.txt").write_text("the user's own file\n")
    if command == "pretrain":
        args = ["pretrain", CONFIGS / "pgssl_2d.yaml", "--data", data / "images", *TINY_PRETRAIN]
    else:
        args = ["finetune", "seg", CONFIGS / "finetune_seg_2d.yaml", "--checkpoint", "none", "--data",
                data / "datalist.json", *TINY_FINETUNE]
    capsys.readouterr()
    assert main([str(a) for a in [*args, "--out", run, "train.lr=1e30"]]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medssl: error:") and "loss became nan" in lines[0], lines
    if existed:
        assert [p.name for p in run.iterdir()] == ["notes.txt"]
    else:
        assert not run.exists()
    assert any("removed" in r.getMessage() and str(run) in r.getMessage() for r in caplog.records)


def test_a_run_folder_error_on_rank_0_is_raised_on_every_rank(data, tmp_path, capsys, monkeypatch):
    from medssl import dist
    from medssl.errors import InputError

    taken = tmp_path / "taken"
    (taken / "checkpoints").mkdir(parents=True)
    (taken / "checkpoints" / "last.pt").write_bytes(b"a run's checkpoint")
    refused(capsys, ["pretrain", CONFIGS / "pgssl_2d.yaml", "--data", data / "images", "--out", taken,
                     *TINY_PRETRAIN], taken, "already holds a run", inputs=(data, taken))
    sent: list = []
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, context: sent.append(obj) or obj)
    single = dist.Context(rank=0, world_size=1, device=torch.device("cpu"))

    def taken_run() -> Path:
        raise InputError("already holds a run", path=taken)

    with pytest.raises(InputError, match="already holds") as on_rank_0:
        dist.on_main(taken_run, single)
    # another rank gets what rank 0 broadcast, and raises the same error without computing anything itself
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, context: sent[0])
    other = dist.Context(rank=1, world_size=2, device=torch.device("cpu"))
    with pytest.raises(InputError) as on_rank_1:
        dist.on_main(lambda: pytest.fail("rank 1 must not compute"), other)
    assert str(on_rank_1.value) == str(on_rank_0.value) and on_rank_1.value.path == taken


# ------------------------------------------------------------------------------------------------ 7: out of memory
def _pretrain_args(data: Path, run: Path) -> list:
    return ["pretrain", CONFIGS / "pgssl_2d.yaml", "--data", data / "images", "--out", run, *TINY_PRETRAIN]


def _finetune_args(data: Path, run: Path) -> list:
    return ["finetune", "seg", CONFIGS / "finetune_seg_2d.yaml", "--checkpoint", "none", "--data",
            data / "datalist.json", "--out", run, *TINY_FINETUNE]


@pytest.mark.parametrize("make_args", [_pretrain_args, _finetune_args])
def test_a_step_that_cannot_fit_in_memory_is_refused_before_training(data, tmp_path, capsys, monkeypatch,
                                                                      make_args):
    from medssl.engine import memory

    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 1024)  # a machine with 1 KiB free
    run = tmp_path / "run"
    line = refused(capsys, make_args(data, run), "train.batch_size (now 2)", "data.patch_size (now [16, 16])",
                   "MiB free", inputs=(data,))
    assert "at least" in line and not run.exists()


@pytest.mark.parametrize("make_args", [_pretrain_args, _finetune_args])
def test_running_out_of_memory_in_a_step_says_what_to_lower(data, tmp_path, capsys, monkeypatch, make_args):
    def exhausted(self, *args, **kwargs):  # the first backward pass of the training loop
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 68719476736 bytes.")

    monkeypatch.setattr(torch.Tensor, "backward", exhausted)
    run = tmp_path / "run"
    line = refused(capsys, make_args(data, run), run, "ran out of memory on cpu", "batch 2 of [16, 16] patches",
                   "lower train.batch_size", inputs=(data,))
    assert "no " in line and not run.exists()  # nothing was saved, and the run left no folder


def test_an_error_that_is_not_out_of_memory_stays_a_bug(data, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(torch.Tensor, "backward", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main([str(a) for a in _pretrain_args(data, tmp_path / "run")])


def test_the_memory_estimate_grows_with_the_batch_and_the_patch_volume():
    from medssl.engine.memory import estimate_step_bytes

    network = UNet(spatial_dims=2, channels=[4, 8, 8])
    params = sum(p.numel() for p in network.parameters()) * 16
    def activations(batch: int, side: int, views: int = 1) -> int:
        return estimate_step_bytes(network, spatial_dims=2, patch_size=[side, side], batch_size=batch,
                                   images_per_sample=views) - params

    base = activations(1, 16)
    assert base > 0
    assert activations(4, 16) == pytest.approx(4 * base, rel=1e-6)
    assert activations(1, 32) == pytest.approx(4 * base, rel=1e-6)
    assert activations(1, 16, views=2) == pytest.approx(2 * base, rel=1e-6)
