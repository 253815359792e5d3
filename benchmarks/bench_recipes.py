"""Which fine-tuning recipe lets a pretrained start pay off with few labels (segmentation, issue 17).

    python -m benchmarks.bench_recipes --checkpoint RUN --dim 2 --out bench/recipes_2d
    python -m benchmarks.bench_recipes --checkpoint RUN --dim 3 --subjects 10 --test 3 --val 2 --out bench/recipes_3d

For every recipe (``RECIPES``: changes to ``BASE``, both overrides of the shipped ``finetune_seg_2d.yaml``; in 3D
``RECIPES_3D`` and ``BASE_3D``, of ``finetune_seg_3d.yaml``), N labeled images (``--labeled``, default 1,3) and seed
(``--seeds``, default 0,1,2; the seed also picks the labeled images): segmentation fine-tuning from the first
``--checkpoint`` and, for the recipes that also apply to a random start (``RANDOM_TOO``), from random init with the
first checkpoint's architecture (``random_start_overrides``); each further ``--checkpoint`` (other pretraining
objectives or budgets) with the first recipe. Every run predicts and scores the held-out test images of a fresh demo population (as
``bench_finetune``: seed 1, 24 subjects, 15 training / 3 validation / 6 test). The table gives the test mean Dice
(mean ± SD over seeds) and the gain over random init under the closest recipe that also applies to it (the same
one, else e.g. ``300 steps`` for ``fresh decoder, 300 steps``). Finished runs
are kept in ``--out`` (``scores.json``): a rerun continues where it stopped. Extra overrides at the end apply to
every run (a toy budget: ``train.steps=2 train.val_every=2 train.warmup_steps=0``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from benchmarks.bench_finetune import population, random_start_overrides, run_one
from benchmarks.common import argument_parser, emit
from medssl.report.markdown import markdown_table

MODULE = "benchmarks.bench_recipes"
#: every key a recipe varies, at the shipped values from before the study: each run starts from these overrides, so
#: the study means the same whatever the shipped config now says (finished runs are reused by their overrides)
BASE = ["train.steps=150", "train.encoder_lr_scale=1.0", "train.freeze_encoder_steps=0",
        "train.decoder_init=pretrained", "data.rotate_deg=10.0", "data.scale_range=0.1"]
#: recipe name -> its changes to ``BASE``
RECIPES = {
    "150 steps": [],
    "encoder lr x0.1": ["train.encoder_lr_scale=0.1"],
    "encoder frozen 50 steps": ["train.freeze_encoder_steps=50"],
    "fresh decoder": ["train.decoder_init=random"],
    "strong augmentation": ["data.rotate_deg=20", "data.scale_range=0.2"],
    "300 steps": ["train.steps=300"],
    "fresh decoder, 300 steps": ["train.steps=300", "train.decoder_init=random"],
}
#: the recipes that change a random start too (the others only concern pretrained weights)
RANDOM_TOO = ("150 steps", "strong augmentation", "300 steps")
#: the 3D study: the keys of ``BASE`` at the 3D config's values (1000 steps; one 3D run with its prediction and
#: scoring took 286-292 s on the 2-core CPU)
BASE_3D = ["train.steps=1000", *BASE[1:]]
RECIPES_3D = {
    "1000 steps": [],
    "fresh decoder": ["train.decoder_init=random"],
    "encoder frozen 100 steps": ["train.freeze_encoder_steps=100"],
}
RANDOM_TOO_3D = ("1000 steps",)
#: per spatial dims: (base overrides, recipes, the recipes that change a random start too)
STUDIES = {2: (BASE, RECIPES, RANDOM_TOO), 3: (BASE_3D, RECIPES_3D, RANDOM_TOO_3D)}


def slug(text: str) -> str:
    """A folder-name form of a recipe or checkpoint name."""
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def named(checkpoint: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after its folder) -> ``(name, resolved path)``."""
    name, _, path = checkpoint.rpartition("=")
    return name or Path(path).name, str(Path(path).resolve())


def run_study(checkpoints: Sequence[str], dims: int, out: Path, *, counts: Sequence[int], seeds: Sequence[int],
              overrides: Sequence[str] = (), recipes: dict[str, list[str]] | None = None, subjects: int = 24,
              test: int = 6, val: int = 3, progress: Callable[[str], None] = print) -> list[dict]:
    """Every (recipe, init, N, seed) run of the study on the demo population of ``subjects`` (``test`` and ``val``
    held out); rows ``{recipe, init, n, dice: [per seed]}``."""
    base, shipped, random_too = STUDIES[dims]
    recipes = shipped if recipes is None else recipes
    datalist = population(out, dims, subjects=subjects, test=test, val=val)
    names = {path: name for name, path in map(named, checkpoints)}
    first = next(iter(names))
    random_start = random_start_overrides(first)  # random init gets the first checkpoint's architecture
    cases = [(recipe, first) for recipe in recipes]
    cases += [(recipe, "none") for recipe in recipes if recipe in random_too]
    cases += [(next(iter(recipes)), other) for other in list(names)[1:]]
    rows = []
    for recipe, init in cases:
        name = names.get(init, "none")
        for n in counts:
            dice = []
            for seed in seeds:
                started = time.perf_counter()
                scores = run_one("seg", dims, init, n, seed, datalist, datalist.parent / "landmarks.csv",
                                 out / "runs" / f"{slug(recipe)}_{slug(name)}_n{n}_s{seed}",
                                 [*base, *recipes[recipe], *overrides, *(random_start if init == "none" else [])])
                dice.append(float(scores["mean_dice"]))
                progress(f"{recipe} / {name} N={n} seed {seed}: mean Dice {dice[-1]:.3f} "
                         f"({time.perf_counter() - started:.0f} s)")
            rows.append({"recipe": recipe, "init": name, "n": n, "dice": dice, "overrides": recipes[recipe]})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: a row per (recipe, init), a column pair per N (mean Dice ± SD over seeds, per seed; gain over
    random init under the random-init recipe closest to it: the one whose changes are the largest part of its)."""
    counts = sorted({r["n"] for r in rows})
    random = {(r["recipe"], r["n"]): np.mean(r["dice"]) for r in rows if r["init"] == "none"}
    overrides = {r["recipe"]: set(r["overrides"]) for r in rows}

    def baseline(recipe: str, n: int) -> float | None:
        fits = [other for (other, count) in random if count == n and overrides[other] <= overrides[recipe]]
        return random[(max(fits, key=lambda other: len(overrides[other])), n)] if fits else None

    header = ["recipe", "init"]
    for n in counts:
        header += [f"N = {n}: mean Dice", "per seed", "gain over random init"]
    lines: dict[tuple, list[str]] = {}
    for r in rows:
        line = lines.setdefault((r["recipe"], r["init"]), [r["recipe"], r["init"]])
        mean = float(np.mean(r["dice"]))
        base = baseline(r["recipe"], r["n"])
        gain = "-" if r["init"] == "none" or base is None else f"{mean - base:+.3f}"
        line += [f"{mean:.3f} ± {np.std(r['dice'], ddof=1) if len(r['dice']) > 1 else 0.0:.3f}",
                 ", ".join(f"{d:.3f}" for d in r["dice"]), gain]
    return "\n".join(markdown_table(header, list(lines.values())))


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argument_parser(MODULE, __doc__, full=True)
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="pretraining run folder, or NAME=FOLDER to name it in the table; the first gets every "
                             "recipe, the others the first recipe")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2, help="2 (default) or 3: each has its recipes")
    parser.add_argument("--labeled", default="1,3", help="numbers of labeled images (default 1,3)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--subjects", type=int, default=24, help="demo subjects (default 24)")
    parser.add_argument("--test", type=int, default=6, help="test subjects (default 6)")
    parser.add_argument("--val", type=int, default=3, help="validation subjects (default 3)")
    parser.add_argument("--recipes", nargs="+", choices=sorted({*RECIPES, *RECIPES_3D}), default=None,
                        help="a subset of the dimension's recipes (default all; gains need one that also runs from "
                             "random init)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args(argv)
    recipes = STUDIES[args.dim][1]
    unknown = [name for name in args.recipes or () if name not in recipes]
    if unknown:
        parser.error(f"--recipes {', '.join(unknown)}: not a {args.dim}D recipe (those are: {', '.join(recipes)})")
    rows = run_study(args.checkpoint, args.dim, args.out, counts=[int(n) for n in args.labeled.split(",")],
                     seeds=[int(s) for s in args.seeds.split(",")], overrides=args.overrides,
                     recipes={name: recipes[name] for name in args.recipes or recipes}, subjects=args.subjects,
                     test=args.test, val=args.val,
                     progress=lambda line: print(line, flush=True))
    path = args.out / "recipes_table.md"
    emit(table(rows), path)
    return path


if __name__ == "__main__":
    main()
