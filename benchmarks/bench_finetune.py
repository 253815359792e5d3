"""Few-label transfer on the demo population: pretrained checkpoints against random initialisation.

For each task (segmentation, landmarks), each number of labeled images N, each initialisation (every
``--checkpoint`` run folder and ``none``) and each seed: ``finetune`` on the training part of a fresh demo
population (``split_seed`` = seed, so the labeled images vary with the seed too; the validation part picks the best
model), ``predict`` the held-out test images, score them (Dice and HD95 per class; MRE and SDR). Prints a Markdown
table of mean ± SD over seeds and writes it to ``OUT/finetune_table.md`` (the table in ``docs/finetuning.md``).
Each finished run keeps its scores (``scores.json``), so a rerun into the same ``--out`` skips it and an interrupted
benchmark continues where it stopped.

Run from the repository root (the full benchmark takes hours on a CPU):
    python -m benchmarks.bench_finetune --checkpoint runs/pgssl_2d --checkpoint runs/msf_2d --dim 2 --out bench/ft2d
Toy size (a check that it works):
    python -m benchmarks.bench_finetune --checkpoint runs/pgssl_2d --dim 2 --subjects 6 --test 2 --val 1 \\
        --labeled 1,all --seeds 0 --out /tmp/ft_toy train.steps=2 train.val_every=2 train.warmup_steps=0
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from benchmarks.common import argument_parser
from medssl.report.markdown import markdown_table

MODULE = "benchmarks.bench_finetune"
SDR_RADII_MM = (2.0, 2.5, 3.0, 4.0)
SDR_KEYS = [str(int(r)) if float(r).is_integer() else str(r) for r in SDR_RADII_MM]  # the scores' "sdr" keys


def split_dataset(root: Path, n_test: int, n_val: int) -> Path:
    """Write ``root/datalist_split.json``: the last ``n_test`` subjects are the test set, the ``n_val`` before them
    validate, the others train."""
    items = json.loads((root / "datalist.json").read_text())["training"]
    if len(items) <= n_test + n_val:
        raise SystemExit(f"--subjects must exceed --test + --val ({n_test} + {n_val})")
    train, val, test = items[: -n_test - n_val], items[-n_test - n_val: -n_test], items[-n_test:]
    path = root / "datalist_split.json"
    path.write_text(json.dumps({"training": train, "validation": val, "test": test}, indent=2) + "\n")
    return path


def _cached(out: Path, case: dict, compute: Callable[[], dict]) -> dict:
    """``compute()``'s scores (as JSON has them: NaN is None), kept in ``out/scores.json`` with ``case``: a finished
    run of the same case (same checkpoint file, by modification time) is reused; anything else in ``out`` is
    replaced (an interrupted run, or another case)."""
    from medssl.metrics.report import write_scores_json
    from medssl.networks.model_file import MODEL_FILE

    checkpoint = Path(case["checkpoint"])
    model = checkpoint / MODEL_FILE if checkpoint.is_dir() else checkpoint
    case = {**case, "model_mtime": model.stat().st_mtime_ns if model.is_file() else None}
    done = out / "scores.json"
    if done.is_file() and (saved := json.loads(done.read_text()))["case"] == case:
        return saved["scores"]
    shutil.rmtree(out, ignore_errors=True)
    write_scores_json({"case": case, "scores": compute()}, done)  # atomically, NaN as null
    return json.loads(done.read_text())["scores"]


def random_start_overrides(checkpoint: str | Path) -> list[str]:
    """Config overrides that give a random start (``checkpoint: none``) the architecture of ``checkpoint``'s
    ``model.pt`` (its ``network`` options): the pretrained and the random start then differ in their weights only
    (the 3D pretraining configs use a depth-3 U-Net, the fine-tuning configs' ``size: small`` is depth 4)."""
    from medssl.networks.model_file import read_model_file

    network = read_model_file(checkpoint)["network"]
    return [f"network.{key}={json.dumps(network[key])}" for key in ("channels", "dropout", "norm") if key in network]


def run_one(task: str, dims: int, checkpoint: str, n_labeled: int | None, seed: int, datalist: Path,
            landmarks_csv: Path, out: Path, overrides: Sequence[str]) -> dict:
    """Fine-tune, predict the test images and score them; returns the scores, reused by ``_cached``."""
    case = {"task": task, "checkpoint": checkpoint, "labeled": n_labeled, "seed": seed, "data": str(datalist),
            "overrides": list(overrides)}
    return _cached(out, case, lambda: _finetune_and_score(task, dims, checkpoint, n_labeled, seed, datalist,
                                                          landmarks_csv, out, overrides))


def _finetune_and_score(task: str, dims: int, checkpoint: str, n_labeled: int | None, seed: int, datalist: Path,
                        landmarks_csv: Path, out: Path, overrides: Sequence[str]) -> dict:
    from medssl.data.inputs import read_datalist
    from medssl.engine.finetune import finetune
    from medssl.config import shipped_config
    from medssl.engine.finetune_config import read_finetune_config
    from medssl.engine.predict import predict_landmarks_files, predict_seg_files
    from medssl.metrics.report import evaluate_landmarks_files, evaluate_segmentation_files

    config = read_finetune_config(shipped_config(f"finetune_{task}_{dims}d"),
                                  [f"seed={seed}", f"data.split_seed={seed}", *overrides])
    extra = {"landmarks": landmarks_csv} if task == "landmarks" else {}
    run = finetune(config, checkpoint=checkpoint, data=datalist, out=out, labeled=n_labeled, **extra)
    test_images = [item["image"] for item in read_datalist(datalist)["test"]]
    if task == "seg":  # only the test images have predictions, so only they are scored
        predict_seg_files(run, test_images, out / "test_predictions")
        return evaluate_segmentation_files(out / "test_predictions", datalist)
    predict_landmarks_files(run, test_images, out / "test_predictions.csv")
    return evaluate_landmarks_files(out / "test_predictions.csv", landmarks_csv, sdr_radii_mm=SDR_RADII_MM)


def stage2_one(dims: int, checkpoint: str, seed: int, datalist: Path, landmarks_csv: Path, supervised_run: Path,
               out: Path, overrides: Sequence[str]) -> dict:
    """CC2D's stage 2 against the one-shot predictions it starts from: the single labeled image of the N = 1 run
    ``supervised_run`` is the template; one-shot landmarks (``checkpoint``) on the training pool and the test
    images; landmark fine-tuning with ``--labeled 1 --pseudo``; both scored on the test images.
    Returns ``{"oneshot": scores, "stage2": scores}``, reused by ``_cached``."""
    from medssl.engine.finetune import SPLIT_FILE

    template_key = json.loads((supervised_run / SPLIT_FILE).read_text())["labeled"][0]
    case = {"checkpoint": checkpoint, "seed": seed, "template": template_key, "data": str(datalist),
            "overrides": list(overrides)}
    return _cached(out, case, lambda: _stage2(dims, checkpoint, seed, template_key, datalist, landmarks_csv, out,
                                              overrides))


def stage2_seg_one(dims: int, checkpoint: str, seed: int, datalist: Path, supervised_run: Path, out: Path,
                   overrides: Sequence[str]) -> dict:
    """Stage 2 for segmentation against the propagated labels it starts from: the single labeled image of the N = 1
    segmentation run ``supervised_run`` is the template; its label map is propagated (``segment oneshot`` with
    ``checkpoint``) onto the rest of the training pool and onto the test images; segmentation fine-tuning with
    ``--labeled 1 --pseudo``; both scored on the test images. Returns ``{"oneshot": scores, "stage2": scores}``,
    reused by ``_cached``."""
    from medssl.engine.finetune import SPLIT_FILE

    template_key = json.loads((supervised_run / SPLIT_FILE).read_text())["labeled"][0]
    case = {"task": "seg", "checkpoint": checkpoint, "seed": seed, "template": template_key, "data": str(datalist),
            "overrides": list(overrides)}
    return _cached(out, case, lambda: _stage2_seg(dims, checkpoint, seed, template_key, datalist, out, overrides))


def _stage2_seg(dims: int, checkpoint: str, seed: int, template_key: str, datalist: Path, out: Path,
                overrides: Sequence[str]) -> dict:
    from medssl.config import shipped_config
    from medssl.data import keys
    from medssl.data.inputs import read_datalist
    from medssl.data.readers import image_key
    from medssl.engine.finetune import finetune
    from medssl.engine.finetune_config import read_finetune_config
    from medssl.engine.predict import predict_seg_files
    from medssl.matching.propagate import propagate_labels_files
    from medssl.metrics.report import evaluate_segmentation_files

    out.mkdir(parents=True)
    sections = read_datalist(datalist)
    template = next(item for item in sections["training"] if image_key(item[keys.IMAGE]) == template_key)
    pool = [item[keys.IMAGE] for item in sections["training"] if item is not template]
    test = [item[keys.IMAGE] for item in sections["test"]]
    started = time.perf_counter()  # one call: the network and the template's features are loaded once
    written = propagate_labels_files(checkpoint, template[keys.IMAGE], template[keys.LABEL], pool + test,
                                     out / "pseudo")
    seconds_per_image = (time.perf_counter() - started) / len(written)
    (out / "oneshot_test").mkdir()
    for path in written[len(pool):]:  # the test images' maps apart: they are scored alone, not trained on
        path.rename(out / "oneshot_test" / path.name)
    config = read_finetune_config(shipped_config(f"finetune_seg_{dims}d"),
                                  [f"seed={seed}", f"data.split_seed={seed}", *overrides])
    run = finetune(config, checkpoint=checkpoint, data=datalist, out=out / "run", labeled=1, pseudo=out / "pseudo")
    predict_seg_files(run, test, out / "test_predictions")
    oneshot = evaluate_segmentation_files(out / "oneshot_test", datalist)
    return {"oneshot": {**oneshot, "seconds_per_image": seconds_per_image},
            "stage2": evaluate_segmentation_files(out / "test_predictions", datalist)}


def _stage2(dims: int, checkpoint: str, seed: int, template_key: str, datalist: Path, landmarks_csv: Path, out: Path,
            overrides: Sequence[str]) -> dict:
    from medssl.data.inputs import read_datalist
    from medssl.data.landmarks import read_landmarks, write_landmarks
    from medssl.data.readers import image_key
    from medssl.engine.finetune import finetune
    from medssl.config import shipped_config
    from medssl.engine.finetune_config import read_finetune_config
    from medssl.engine.predict import predict_landmarks_files
    from medssl.matching.run import detect_landmarks_files
    from medssl.metrics.report import evaluate_landmarks_files

    out.mkdir(parents=True)
    sections = read_datalist(datalist)
    pool = [item["image"] for item in sections["training"]]
    test = [item["image"] for item in sections["test"]]
    template = next(path for path in pool if image_key(path) == template_key)
    oneshot_csv = detect_landmarks_files(checkpoint, [template], [landmarks_csv],
                                         [path for path in pool + test if path != template], out / "oneshot.csv")
    test_keys = {image_key(path) for path in test}
    oneshot_test = write_landmarks(out / "oneshot_test.csv", {key: points for key, points in
                                                              read_landmarks(oneshot_csv).items() if key in test_keys})
    config = read_finetune_config(shipped_config(f"finetune_landmarks_{dims}d"),
                                  [f"seed={seed}", f"data.split_seed={seed}", *overrides])
    run = finetune(config, checkpoint=checkpoint, data=datalist, out=out / "run", labeled=1,
                   landmarks=landmarks_csv, pseudo=oneshot_csv)
    predict_landmarks_files(run, test, out / "test_predictions.csv")
    return {"oneshot": evaluate_landmarks_files(oneshot_test, landmarks_csv, sdr_radii_mm=SDR_RADII_MM),
            "stage2": evaluate_landmarks_files(out / "test_predictions.csv", landmarks_csv, sdr_radii_mm=SDR_RADII_MM)}


def _cell(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    finite = np.array([v for v in values if v is not None and np.isfinite(v)]) * scale
    if finite.size == 0:
        return "n/a"
    return (f"{finite.mean():.{digits}f} ± {finite.std():.{digits}f}" if finite.size > 1
            else f"{finite.mean():.{digits}f}")


def table(results: dict, task: str) -> str:
    """Markdown table of one task: a row per (N, initialisation), mean ± SD over seeds."""
    rows = [(key, scores) for key, scores in results.items() if key[0] == task]
    if task == "seg":
        classes = sorted({c for _, runs in rows for s in runs for c in s["dice"]}, key=int)
        header = (["N labeled", "init", "mean Dice"] + [f"Dice {c}" for c in classes]
                  + [f"HD95 {c} (mm)" for c in classes])
        lines = [[str(n), init, _cell([s["mean_dice"] for s in runs])]
                 + [_cell([s["dice"].get(c) for s in runs]) for c in classes]
                 + [_cell([s["hd95_mm"].get(c) for s in runs]) for c in classes] for (_, n, init), runs in rows]
    else:
        header = ["N labeled", "init", "MRE (mm)"] + [f"SDR {k} mm (%)" for k in SDR_KEYS]
        lines = [[str(n), init, _cell([s["mre_mm"] for s in runs])]
                 + [_cell([s["sdr"][k] for s in runs], 100.0) for k in SDR_KEYS] for (_, n, init), runs in rows]
    return "\n".join(markdown_table(header, lines))


def population(out: Path, dims: int, *, subjects: int = 24, data_seed: int = 1, test: int = 6, val: int = 3,
               variability: str = "realistic") -> Path:
    """The split datalist of the demo population ``out/data`` (written unless there, with ``variability``; one made
    with another variability is refused)."""
    from medssl.data.demo import population_variability, write_demo_dataset

    root = out / "data"
    if not (root / "datalist.json").is_file():
        write_demo_dataset(root, spatial_dims=dims, n_subjects=subjects, seed=data_seed, variability=variability)
    elif population_variability(root) != variability:
        raise SystemExit(f"{root} holds a {population_variability(root)}-variability population, not {variability}; "
                         "choose another --out")
    return split_dataset(root, test, val)


def run_grid(inits: dict[str, str], dims: int, out: Path, *, subjects: int = 24, data_seed: int = 1, test: int = 6,
             val: int = 3, counts: Sequence[int | None] = (1, 3, None), seeds: Sequence[int] = (0, 1),
             tasks: Sequence[str] = ("seg", "landmarks"), overrides: Sequence[str] = (), stage2: bool = False,
             variability: str = "realistic", progress: Callable[[str], None] = print) -> dict[tuple, list[dict]]:
    """``run_one`` for every task x N labeled (None: all) x initialisation (name -> run folder or ``none``) x seed on
    the demo population ``out/data`` (written unless there, with ``variability``; one made with another variability is
    refused); ``{(task, N or "all", name): [scores per seed]}``.
    With ``stage2`` (needs N = 1): for every pretrained initialisation and seed, ``stage2_one`` (landmarks task,
    under ``("stage2", 1, name)``) and ``stage2_seg_one`` (seg task, under ``("stage2_seg", 1, name)``)."""
    datalist = population(out, dims, subjects=subjects, data_seed=data_seed, test=test, val=val,
                          variability=variability)
    root = datalist.parent
    pretrained = [init for init in inits.values() if init != "none"]
    random_start = random_start_overrides(pretrained[0]) if pretrained else []  # the first pretrained network's
    results: dict[tuple, list[dict]] = {}
    for task in tasks:
        for n in counts:
            for name, init in inits.items():
                for seed in seeds:
                    started = time.perf_counter()
                    scores = run_one(task, dims, init, n, seed, datalist, root / "landmarks.csv",
                                     out / "runs" / f"{task}_{name}_n{n or 'all'}_s{seed}",
                                     [*overrides, *(random_start if init == "none" else [])])
                    results.setdefault((task, n or "all", name), []).append(scores)
                    score = _cell([scores["mean_dice"] if task == "seg" else scores["mre_mm"]])
                    seconds = time.perf_counter() - started
                    progress(f"{task} N={n or 'all'} {name} seed {seed}: {score} ({seconds:.0f} s)")
    if stage2 and 1 in counts:
        runs = out / "runs"
        for name, init in inits.items():
            for seed in seeds:
                if init == "none":
                    continue
                if "landmarks" in tasks:
                    started = time.perf_counter()
                    scores = stage2_one(dims, init, seed, datalist, root / "landmarks.csv",
                                        runs / f"landmarks_{name}_n1_s{seed}", runs / f"stage2_{name}_s{seed}",
                                        overrides)
                    results.setdefault(("stage2", 1, name), []).append(scores)
                    progress(f"stage 2 {name} seed {seed}: one-shot {scores['oneshot']['mre_mm']:.2f} mm -> "
                             f"{scores['stage2']['mre_mm']:.2f} mm ({time.perf_counter() - started:.0f} s)")
                if "seg" in tasks:
                    started = time.perf_counter()
                    scores = stage2_seg_one(dims, init, seed, datalist, runs / f"seg_{name}_n1_s{seed}",
                                            runs / f"stage2_seg_{name}_s{seed}", overrides)
                    results.setdefault(("stage2_seg", 1, name), []).append(scores)
                    progress(f"stage 2 seg {name} seed {seed}: propagated {scores['oneshot']['mean_dice']:.3f} -> "
                             f"{scores['stage2']['mean_dice']:.3f} mean Dice ({time.perf_counter() - started:.0f} s)")
    return results


def stage2_table(results: dict) -> str:
    """Markdown table of the stage-2 rows: one-shot start, stage 2 and supervised N = 1, mean ± SD over seeds."""
    header = ["init", "labels", "MRE (mm)"] + [f"SDR {k} mm (%)" for k in SDR_KEYS]
    lines = []
    for (kind, _, name), runs in results.items():
        if kind != "stage2":
            continue
        supervised = results.get(("landmarks", 1, name), [])
        for label, scores in (("one-shot (1 template)", [r["oneshot"] for r in runs]),
                              ("stage 2 (1 template + one-shot pseudo-labels)", [r["stage2"] for r in runs]),
                              ("supervised, N = 1", supervised)):
            lines.append([name, label, _cell([s["mre_mm"] for s in scores])]
                         + [_cell([s["sdr"][k] for s in scores], 100.0) for k in SDR_KEYS])
    return "\n".join(markdown_table(header, lines))


def stage2_seg_table(results: dict) -> str:
    """Markdown table of the segmentation stage-2 rows: propagation from the template, stage 2 and supervised
    N = 1; mean Dice ± SD over seeds (3 decimals: the rows differ by about 0.01) and per seed."""
    header = ["init", "labels", "mean Dice", "per seed"]
    lines = []
    for (kind, _, name), runs in results.items():
        if kind != "stage2_seg":
            continue
        for label, scores in (("one-shot propagation (1 template, no training)", [r["oneshot"] for r in runs]),
                              ("stage 2 (1 template + propagated label maps)", [r["stage2"] for r in runs]),
                              ("supervised, N = 1", results.get(("seg", 1, name), []))):
            dice = [s["mean_dice"] for s in scores]
            lines.append([name, label, _cell(dice, digits=3), ", ".join(f"{d:.3f}" for d in dice)])
    return "\n".join(markdown_table(header, lines))


def tables(results: dict, dims: int, tasks: Sequence[str]) -> str:
    """The Markdown tables of ``run_grid``'s results, one per task under a bold title (and the stage-2 tables when
    ``run_grid`` ran them)."""
    titles = {"seg": "Segmentation (test Dice, HD95)", "landmarks": "Landmarks (test MRE, SDR)"}
    text = "\n\n".join(f"**{titles[task]}, {dims}D**\n\n{table(results, task)}" for task in tasks)
    if any(key[0] == "stage2" for key in results):
        text += f"\n\n**Stage 2 on one-shot pseudo-labels (test MRE, SDR), {dims}D**\n\n{stage2_table(results)}"
    if any(key[0] == "stage2_seg" for key in results):
        text += (f"\n\n**Stage 2 on propagated label maps (test mean Dice), {dims}D**\n\n"
                 f"{stage2_seg_table(results)}")
    return text


def parse_counts(text: str) -> list[int | None]:
    """``"1,3,all"`` -> ``[1, 3, None]``."""
    return [None if n == "all" else int(n) for n in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(MODULE, __doc__, full=True)
    parser.add_argument("--checkpoint", action="append", default=[], help="pretraining run folder (repeatable)")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2)
    parser.add_argument("--subjects", type=int, default=24, help="demo subjects (default 24)")
    parser.add_argument("--data-seed", type=int, default=1, help="demo population seed (default 1)")
    parser.add_argument("--variability", choices=("realistic", "low"), default="realistic",
                        help="demo population variability (default realistic)")
    parser.add_argument("--test", type=int, default=6, help="test subjects (default 6)")
    parser.add_argument("--val", type=int, default=3, help="validation subjects (default 3)")
    parser.add_argument("--labeled", default="1,3,all", help="numbers of labeled images (default 1,3,all)")
    parser.add_argument("--seeds", default="0,1", help="seeds (default 0,1)")
    parser.add_argument("--tasks", default="seg,landmarks", help="tasks (default seg,landmarks)")
    parser.add_argument("--stage2", action="store_true",
                        help="also CC2D stage 2 (one template + one-shot pseudo-labels: landmarks, or propagated label "
                             "maps: seg) for each --checkpoint and task; needs N = 1 in --labeled")
    parser.add_argument("--skip-random-init", action="store_true",
                        help="leave out the random-init runs (e.g. for stage 2 alone, which needs only the checkpoints)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.steps=300")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    inits = {Path(c).name: str(Path(c).resolve()) for c in args.checkpoint}
    if not args.skip_random_init:
        inits["none"] = "none"
    if not inits:
        parser.error("nothing to fine-tune: pass --checkpoint or drop --skip-random-init")
    tasks = args.tasks.split(",")
    results = run_grid(inits, args.dim, args.out, subjects=args.subjects, data_seed=args.data_seed, test=args.test,
                       val=args.val, counts=parse_counts(args.labeled),
                       seeds=[int(s) for s in args.seeds.split(",")], tasks=tasks, overrides=args.overrides,
                       stage2=args.stage2, variability=args.variability, progress=lambda line: print(line, flush=True))
    text = tables(results, args.dim, tasks)
    (args.out / "finetune_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
