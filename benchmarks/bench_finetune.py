"""Few-label transfer on the demo population: pretrained checkpoints against random initialisation.

For each task (segmentation, landmarks), each number of labeled images N, each initialisation (every
``--checkpoint`` run folder and ``none``) and each seed: ``finetune`` on the training part of a fresh demo
population (``split_seed`` = seed, so the labeled images vary with the seed too; the validation part picks the best
model), ``predict`` the held-out test images, score them (Dice and HD95 per class; MRE and SDR). Prints a Markdown
table of mean ± SD over seeds and writes it to ``OUT/finetune_table.md`` (the table in ``docs/finetuning.md``).

Run (the full benchmark takes hours on a CPU):
    python benchmarks/bench_finetune.py --checkpoint runs/pgssl_2d --checkpoint runs/msf_2d --dim 2 --out bench/ft2d
Toy size (a check that it works):
    python benchmarks/bench_finetune.py --checkpoint runs/pgssl_2d --dim 2 --subjects 6 --test 2 --val 1 \\
        --labeled 1,all --seeds 0 --out /tmp/ft_toy train.steps=2 train.val_every=2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SDR_RADII_MM = (2.0, 2.5, 3.0, 4.0)


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


def run_one(task: str, dims: int, checkpoint: str, n_labeled: int | None, seed: int, datalist: Path,
            landmarks_csv: Path, out: Path, overrides: list[str]) -> dict:
    """Fine-tune, predict the test images and score them; returns the scores."""
    from medssl.data.inputs import read_datalist
    from medssl.engine.finetune import finetune
    from medssl.engine.finetune_config import read_finetune_config
    from medssl.engine.predict import predict_landmarks_files, predict_seg_files
    from medssl.metrics.report import evaluate_landmarks_files, evaluate_segmentation_files

    config = read_finetune_config(CONFIGS / f"finetune_{task}_{dims}d.yaml",
                                  [f"seed={seed}", f"data.split_seed={seed}", *overrides])
    extra = {"landmarks": landmarks_csv} if task == "landmarks" else {}
    run = finetune(config, checkpoint=checkpoint, data=datalist, out=out, labeled=n_labeled, **extra)
    test_images = [item["image"] for item in read_datalist(datalist)["test"]]
    if task == "seg":  # only the test images have predictions, so only they are scored
        predict_seg_files(run, test_images, out / "test_predictions")
        return evaluate_segmentation_files(out / "test_predictions", datalist)
    predict_landmarks_files(run, test_images, out / "test_predictions.csv")
    return evaluate_landmarks_files(out / "test_predictions.csv", landmarks_csv, sdr_radii_mm=SDR_RADII_MM)


def _cell(values: list[float], scale: float = 1.0) -> str:
    finite = np.array([v for v in values if v is not None and np.isfinite(v)]) * scale
    if finite.size == 0:
        return "n/a"
    return f"{finite.mean():.2f} ± {finite.std():.2f}" if finite.size > 1 else f"{finite.mean():.2f}"


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
        keys = [str(int(r)) if float(r).is_integer() else str(r) for r in SDR_RADII_MM]
        header = ["N labeled", "init", "MRE (mm)"] + [f"SDR {k} mm (%)" for k in keys]
        lines = [[str(n), init, _cell([s["mre_mm"] for s in runs])]
                 + [_cell([s["sdr"][k] for s in runs], 100.0) for k in keys] for (_, n, init), runs in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(line) + " |" for line in lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", default=[], help="pretraining run folder (repeatable)")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2)
    parser.add_argument("--subjects", type=int, default=24, help="demo subjects (default 24)")
    parser.add_argument("--data-seed", type=int, default=1, help="demo population seed (default 1)")
    parser.add_argument("--test", type=int, default=6, help="test subjects (default 6)")
    parser.add_argument("--val", type=int, default=3, help="validation subjects (default 3)")
    parser.add_argument("--labeled", default="1,3,all", help="numbers of labeled images (default 1,3,all)")
    parser.add_argument("--seeds", default="0,1", help="seeds (default 0,1)")
    parser.add_argument("--tasks", default="seg,landmarks", help="tasks (default seg,landmarks)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.steps=300")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from medssl.data.demo import write_demo_dataset

    root = args.out / "data"
    if not (root / "datalist.json").is_file():
        write_demo_dataset(root, spatial_dims=args.dim, n_subjects=args.subjects, seed=args.data_seed)
    datalist = split_dataset(root, args.test, args.val)
    counts = [None if n == "all" else int(n) for n in args.labeled.split(",")]
    inits = [str(Path(c).resolve()) for c in args.checkpoint] + ["none"]
    results: dict[tuple, list[dict]] = {}
    for task in args.tasks.split(","):
        for n in counts:
            for init in inits:
                name = "none" if init == "none" else Path(init).name
                for seed in (int(s) for s in args.seeds.split(",")):
                    started = time.perf_counter()
                    out = args.out / "runs" / f"{task}_{name}_n{n or 'all'}_s{seed}"
                    scores = run_one(task, args.dim, init, n, seed, datalist, root / "landmarks.csv", out,
                                     args.overrides)
                    results.setdefault((task, n or "all", name), []).append(scores)
                    score = scores["mean_dice"] if task == "seg" else scores["mre_mm"]
                    print(f"{task} N={n or 'all'} {name} seed {seed}: {score:.4g} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
    text = "\n\n".join(f"**{'Segmentation (test Dice, HD95)' if task == 'seg' else 'Landmarks (test MRE, SDR)'}, "
                       f"{args.dim}D**\n\n{table(results, task)}" for task in args.tasks.split(","))
    (args.out / "finetune_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
