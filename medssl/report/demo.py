"""``medssl demo``: the whole story on embedded data in one command, ending in ``OUT/report.md``.

Stages (each logged with the elapsed time, and timed in the report):

1. dataset: the demo population (``medssl.data.demo``) split into a training pool, validation and test subjects
   (``data/split.json``; ``data/pool.json`` and ``data/test.json`` list the pool's and the test images);
2. pretraining: ``configs/<method>_<D>d.yaml`` on the pool's images, no labels. The weights it starts from (same
   architecture, preprocessing and seed) are saved as ``runs/random_init``: the baseline of both next stages, so
   the two rows of every table differ by the pretraining alone;
3. one-shot landmarks: the landmarks of one template (the pool's first subject) found in the test images by the
   pretrained network, its random initialisation and NCC, scored in mm;
4. segmentation transfer: ``finetune seg`` with N labeled pool subjects from both initialisations (same seed, same
   labeled images, images prepared like the pretraining scans), predicted and scored on the test images;

then ``report.md`` with the tables, the figures (``figures/``) and what ran, on what, for how long.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from monai.data import MetaTensor

from medssl.config import shipped_config, to_dict
from medssl.data.demo import write_demo_dataset
from medssl.data.demo_anatomy import CSF, GREY, WHITE
from medssl.data.landmarks import read_landmarks
from medssl.data.readers import image_key, load_image, load_label
from medssl.dist import pick_device
from medssl.engine.finetune import finetune
from medssl.engine.finetune_config import finetune_config_from_dict, read_finetune_config
from medssl.engine.monitor import clock
from medssl.engine.predict import predict_seg_files
from medssl.engine.pretrain import pretrain, save_initial_model
from medssl.engine.pretrain_config import read_pretrain_config
from medssl.errors import InputError
from medssl.matching.figures import save_landmark_figure
from medssl.matching.oneshot import OneShotMatcher
from medssl.matching.run import detect_landmarks_files, image_preparer, matching_network, template_rows
from medssl.metrics.landmarks import landmark_scores
from medssl.metrics.report import evaluate_segmentation_files
from medssl.objectives import OBJECTIVES
from medssl.outputs import write_atomic
from medssl.report.figures import save_curves_figure, save_segmentation_figure, save_similarity_figure
from medssl.report.markdown import DemoResults, Row, write_report
from medssl.report.plan import NCC, PRETRAINED, RANDOM_INIT, DemoSize, Split, slug
from medssl.report.provenance import commands, describe

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("medssl_demo")
MARKER = ".medssl-demo"  # written first: a folder holding it is a demo output that a new demo may replace
ENTRIES = ("data", "runs", "landmarks", "segmentation", "figures", "report.md", MARKER)  # what a demo writes



#: (spatial_dims, quick) -> size; the default 2D demo runs the shipped configs unchanged
PRESETS: dict[tuple[int, bool], DemoSize] = {
    (2, False): DemoSize(24, 6, 3, 3),
    (2, True): DemoSize(10, 3, 2, 1, ("train.steps=20", "train.batch_size=4", "data.patch_size=[96,96]",
                                      "train.warmup_steps=2"),
                        ("train.steps=40", "train.val_every=20", "train.warmup_steps=4")),
    (3, False): DemoSize(10, 3, 2, 3),
    (3, True): DemoSize(6, 2, 1, 1, ("train.steps=15", "train.batch_size=2", "train.warmup_steps=2"),
                        ("train.steps=30", "train.val_every=15", "train.warmup_steps=3")),
}


class StageClock:
    """Times the named stages of a run (``seconds``: name -> s) and logs each start and end, as ``PREFIX [i/count]
    name`` (``PREFIX name`` without a count), with the total so far."""

    def __init__(self, count: int | None = None, prefix: str = "demo"):
        self.count, self.prefix, self.seconds, self.started = count, prefix, {}, time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str, detail: str) -> Iterator[None]:
        counter = f" [{len(self.seconds) + 1}/{self.count}]" if self.count else ""
        label = f"{self.prefix}{counter} {name}"
        log.info("%s: %s", label, detail)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        log.info("%s done in %.1f s (total %s)", label, self.seconds[name], clock(time.perf_counter() - self.started))


def prepare_output(out: Path) -> None:
    """Make ``out`` ready for a demo: create it, or replace a previous demo's files in it (a warning says so). Any
    other non-empty folder, or a file, is refused, so a demo never deletes what it did not write."""
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder; choose another --out", path=out)
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise InputError("folder is not empty and holds no medssl demo; choose another --out", path=out)
        log.warning("%s holds a previous demo: replacing it (%s)", out, ", ".join(ENTRIES[:-1]))
        for name in ENTRIES:
            entry = out / name
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / MARKER, "written by medssl demo; a new demo into this folder replaces its files\n")


def make_dataset(root: Path, spatial_dims: int, size: DemoSize, seed: int, variability: str = "realistic") -> Split:
    """Write the population and its split: ``split.json`` (training = pool, validation, test), ``pool.json`` (the
    pretraining images) and ``test.json`` (the images every model is scored on)."""
    write_demo_dataset(root, spatial_dims=spatial_dims, n_subjects=size.subjects, seed=seed, variability=variability)
    items = json.loads((root / "datalist.json").read_text(encoding="utf-8"))["training"]
    n_pool = size.subjects - size.test - size.val
    split = Split(root, items[:n_pool], items[n_pool:n_pool + size.val], items[n_pool + size.val:])
    for name, content in (("split.json", {"training": split.pool, "validation": split.validation,
                                          "test": split.test}),
                          ("pool.json", {"training": split.pool}), ("test.json", {"test": split.test})):
        write_atomic(root / name, json.dumps(content, indent=2) + "\n")
    return split


def run_demo(out: str | Path = DEFAULT_OUT, spatial_dims: int = 2, quick: bool = False, *, method: str = "infoguided",
             subjects: int | None = None, test: int | None = None, val: int | None = None, labeled: int | None = None,
             pretrain_overrides: Sequence[str] = (), finetune_overrides: Sequence[str] = (), device: str = "auto",
             seed: int = 0, variability: str = "realistic") -> Path:
    """Run every stage (see the module docstring) into the folder ``out`` and return the path of its ``report.md``.

    ``spatial_dims`` and ``quick`` pick a ``PRESETS`` size; ``subjects``, ``test``, ``val``, ``labeled`` replace
    its numbers and ``pretrain_overrides`` / ``finetune_overrides`` (``key=value``) follow its config overrides.
    ``method`` names the pretraining config (``configs/<method>_<D>d.yaml``); ``device``: ``auto``, ``cpu`` or
    ``cuda``; ``seed`` and ``variability`` (``realistic`` or ``low``) draw the population. A previous demo in
    ``out`` is replaced (``prepare_output``).
    """

    if (spatial_dims, quick) not in PRESETS:
        raise InputError(f"--dim must be 2 or 3, got {spatial_dims}", path="--dim")
    OBJECTIVES.get(method)  # an unknown method fails here, with a "did you mean"
    preset = PRESETS[(spatial_dims, quick)]
    numbers = {"subjects": subjects, "test": test, "val": val, "labeled": labeled}
    size = replace(preset, **{k: v for k, v in numbers.items() if v is not None},
                   pretrain=preset.pretrain + tuple(pretrain_overrides),
                   finetune=preset.finetune + tuple(finetune_overrides))
    if min(size.test, size.val, size.labeled) < 1 or size.subjects - size.test - size.val < size.labeled:
        raise InputError(f"a demo needs test, val, labeled >= 1 and subjects - test - val >= labeled; got subjects "
                         f"{size.subjects}, test {size.test}, val {size.val}, labeled {size.labeled}")
    out, device = Path(out), pick_device(device).type
    prepare_output(out)
    runs, figures = out / "runs", out / "figures"
    class_names = {CSF: "CSF", GREY: "grey matter", WHITE: "white matter"}
    stage = StageClock(count=4)
    with stage("dataset", f"{size.subjects} {spatial_dims}D demo subjects ({variability} variability, seed {seed})"):
        split = make_dataset(out / "data", spatial_dims, size, seed, variability)
    with stage("pretraining", f"{method} on the {len(split.pool)} pool images ({device})"):
        config, checkpoints = pretrain_stage(runs, split, spatial_dims, method, size.pretrain, device)
    with stage("one-shot landmarks", f"template {split.template.name}, {len(split.test)} test images"):
        similarity = similarity_maps(split, spatial_dims, checkpoints, device)
        landmark_rows = landmarks_stage(out / "landmarks", split, checkpoints, device)
        landmark_pngs = landmark_figures(figures, split, similarity, landmark_rows)
    with stage("segmentation transfer", f"{size.labeled} labeled image(s), pretrained and random init"):
        seg_rows = segmentation_stage(runs, out / "segmentation", split, checkpoints, config, size, device)
        pretrained_run = next(iter(checkpoints.values()))
        curves = save_curves_figure(figures / "curves.png", pretrained_run / "metrics.csv",
                                    {row.label: row.source / "metrics.csv" for row in seg_rows})
        segmentation_png = segmentation_figure(figures / "segmentation.png", split, out / "segmentation",
                                               list(checkpoints), class_names)
    shown = {"Training curves": curves, **landmark_pngs, "Segmentation of the first test image (slice through the "
             "middle of the labels in 3D)": segmentation_png}
    results = DemoResults(
        title=f"medssl demo: {spatial_dims}D, {method}{' (--quick)' if quick else ''}",
        landmarks=landmark_rows, segmentation=seg_rows, class_names=class_names,
        setup=describe(split, config, size, checkpoints, seg_rows, device, seed),
        figures={caption: path.relative_to(out).as_posix() for caption, path in shown.items()},
        stages=dict(stage.seconds), commands=commands(out, split, checkpoints, seg_rows, spatial_dims, size, seed),
        notes=[f"Made by `medssl demo --out {out} --dim {spatial_dims}{' --quick' if quick else ''}`"
               f"{'' if size == preset else ' at a custom size (Python run_demo)'} on "
               f"{time.strftime('%Y-%m-%d %H:%M')}; all stages took {clock(sum(stage.seconds.values()))}."]
        + (["--quick is a smoke-size run (few subjects and steps): its numbers show that everything works, not "
            "how well pretraining helps; run without --quick for those."] if quick else []),
    )
    report = write_report(out / "report.md", results)
    log.info("demo finished in %s: %s", clock(sum(stage.seconds.values())), report)
    return report


def pretrain_stage(runs: Path, split: Split, spatial_dims: int, method: str, overrides: Sequence[str],
                   device: str) -> tuple[Any, dict[str, Path]]:
    """Pretrain on the pool; returns the config and ``{label: checkpoint}`` for the pretrained network and the
    random initialisation it started from."""

    config = read_pretrain_config(shipped_config(f"{method}_{spatial_dims}d"),
                                  [f"train.device={device}", *overrides])
    save_initial_model(config, runs / "random_init" / "model.pt")
    run = pretrain(config, data=split.root / "pool.json", out=runs / "pretrained")
    return config, {f"{PRETRAINED} ({method})": run, RANDOM_INIT: runs / "random_init"}


def landmarks_stage(out: Path, split: Split, checkpoints: dict[str, Path], device: str) -> list[Row]:
    """One-shot detection in the test images with each checkpoint and with NCC; rows of scores."""

    truth_csv = split.root / "landmarks.csv"
    truth = read_landmarks(truth_csv)
    cases = [(label, checkpoint, "embedding") for label, checkpoint in checkpoints.items()] + [(NCC, None, "ncc")]
    rows = []
    for label, checkpoint, method in cases:
        started = time.perf_counter()
        predicted = detect_landmarks_files(checkpoint, [split.template], [truth_csv], [split.root / "test.json"],
                                           out / f"{slug(label)}.csv", method=method, device=device)
        seconds = (time.perf_counter() - started) / len(split.test)
        rows.append(Row(label, landmark_scores(read_landmarks(predicted), truth), predicted, seconds))
    return rows


def similarity_maps(split: Split, spatial_dims: int, checkpoints: dict[str, Path],
                    device: str) -> tuple[str, MetaTensor, MetaTensor, dict[str, np.ndarray]]:
    """The template's first landmark, the prepared template and first test image, and the landmark's similarity map
    ``(*S)`` in that image per checkpoint. (Run before the timed detection, it also warms up the matcher.)"""

    template_mm = template_rows(split.template, split.root / "landmarks.csv")
    landmark = sorted(template_mm)[0]
    maps: dict[str, np.ndarray] = {}
    for label, checkpoint in checkpoints.items():
        network, preprocessing, levels, pyramid = matching_network(checkpoint, spatial_dims, device=device)
        prepare = image_preparer(preprocessing, split.template, spatial_dims)  # the same grid for every checkpoint
        template, query = prepare(split.template), prepare(split.test_images[0])
        matcher = OneShotMatcher(network, levels=levels, pyramid=pyramid, device=device)
        vectors = matcher.template_vectors(matcher.embed(template), template_mm[landmark][None])  # (1, D) point
        maps[label] = matcher.similarity(matcher.embed(query), vectors)[0].cpu().numpy()  # (*S)
    return landmark, template, query, maps


def landmark_figures(figures: Path, split: Split,
                     similarity: tuple[str, MetaTensor, MetaTensor, dict[str, np.ndarray]],
                     rows: list[Row]) -> dict[str, Path]:
    """The ``similarity_maps`` figure with each network's prediction, and the first row's (pretrained) landmarks in
    the first test image against the truth."""

    landmark, template, query, maps = similarity
    key = image_key(split.test_images[0])
    truth_table = read_landmarks(split.root / "landmarks.csv")
    truth = truth_table[key]
    predicted = {row.label: read_landmarks(row.source)[key] for row in rows}
    pretrained = rows[0].label
    return {
        f"Similarity map of '{landmark}' in test image {key} (green o: truth, red +: prediction)":
            save_similarity_figure(figures / "similarity.png", landmark, template,
                                   truth_table[image_key(split.template)][landmark], query, truth[landmark], maps,
                                   {label: predicted[label][landmark] for label in maps}),
        f"One-shot landmarks of {pretrained} in test image {key} (red +: predicted, green o: true)":
            save_landmark_figure(figures / "landmarks.png", query, predicted[pretrained], truth,
                                 title=f"{key}: {pretrained}"),
    }


def segmentation_stage(runs: Path, out: Path, split: Split, checkpoints: dict[str, Path], pretrain_config: Any,
                       size: DemoSize, device: str) -> list[Row]:
    """``finetune seg`` from each checkpoint with ``size.labeled`` pool subjects, then predict and score the test
    images; rows of scores (``source``: the fine-tuning run)."""

    base = read_finetune_config(shipped_config(f"finetune_seg_{pretrain_config.spatial_dims}d"),
                                [f"train.device={device}", *size.finetune])
    data = {**to_dict(base.data), **pretrain_config.preprocessing.to_dict()}
    config = finetune_config_from_dict({**to_dict(base), "data": data, "network": dict(pretrain_config.network)})
    rows = []
    for label, checkpoint in checkpoints.items():
        run = finetune(config, checkpoint=checkpoint, data=split.root / "split.json",
                       out=runs / f"seg_{slug(label)}", labeled=size.labeled)
        predict_seg_files(run, [split.root / "test.json"], out / slug(label), device=device)
        rows.append(Row(label, evaluate_segmentation_files(out / slug(label), split.root / "split.json"), run))
    return rows


def segmentation_figure(path: Path, split: Split, predictions: Path, labels: Sequence[str],
                        class_names: dict[int, str]) -> Path:
    """The first test image, its true labels and each model's prediction (``predictions/<slug of label>/``)."""

    image_path, label_path = split.test_images[0], split.root / split.test[0]["label"]
    image = load_image(image_path)
    predicted = {}
    for label in labels:
        found = [p for p in (predictions / slug(label)).iterdir() if image_key(p) == image_key(image_path)]
        predicted[label] = load_label(found[0], like=image)
    return save_segmentation_figure(path, image, load_label(label_path, like=image), predicted, class_names)
