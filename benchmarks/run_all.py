"""Every benchmark in one run, written to ``docs/benchmarks.md`` with PNG plots in ``docs/benchmarks/``.

Quality suite: each objective pretrains on the demo population with its shipped ``configs/<method>_<D>d.yaml``;
then one-shot landmarks (``bench_oneshot``: each run, random init, NCC, registration; MRE, SDR, s/image) and
fine-tuning transfer (``bench_finetune``: segmentation Dice/HD95 and landmark MRE/SDR, N labeled x {the objective
with the best one-shot MRE, or ``--finetune-methods``} or ``none`` x seeds, and stage 2 on one-shot pseudo-labels:
landmark predictions, propagated label maps).
Speed suite: seconds per step and its ratio to the bare network's forward+backward, and peak memory, per objective
(``bench_objectives``) and where a step's time goes (``torch.profiler``); view pairs per second (``bench_views``);
one-shot seconds per image against registration (the quality suite's timings; with the speed suite alone, its own
on 5 queries, ``bench_oneshot.timing_rows``); a pointer to the scale measurements (``bench_scale``, run on its own). From the repository root, as every benchmark:

    python -m benchmarks.run_all --dim 2                                   # full size: ~40 min on a 2-core CPU
    python -m benchmarks.run_all --dim 2 --quick --out /tmp/bench.md --work /tmp/bench_work   # toy size, minutes

Runs live in ``--work``: a pretraining run is ``pretrain/<method>_<D>d_<hash of its config>``, reused when it is
finished (``model.pt``, last checkpoint at ``train.steps``, same config) and resumed when it was interrupted;
fine-tuning runs keep their scores (``bench_finetune.run_one``). So a rerun continues where the last one stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from benchmarks import bench_finetune, bench_objectives, bench_oneshot, bench_views
from benchmarks.common import ROOT, argument_parser
from medssl.engine.monitor import clock
from medssl.report.demo import StageClock
from medssl.report.markdown import markdown_table

MODULE = "benchmarks.run_all"
SUITES = ("quality", "speed")
log = logging.getLogger(MODULE)


@dataclass(frozen=True)
class Budget:
    """How big a run is. ``subjects``: the pretraining and one-shot population (seed 0; template ``subject_000``,
    the others are queries); ``ft_*``: the fine-tuning population (seed 1) and its test / validation subjects;
    ``labeled``/``seeds`` as ``bench_finetune``; config overrides for pretraining, fine-tuning and the cost-per-step
    measurement; ``views``: ``bench_views`` cases (None: its own); ``skip``: one-shot baselines left out."""

    subjects: int
    ft_subjects: int
    ft_test: int
    ft_val: int
    labeled: str = "1,3,all"
    seeds: str = "0,1"
    pretrain: tuple[str, ...] = ()
    finetune: tuple[str, ...] = ()
    step_cost: tuple[str, ...] = ()
    step_rounds: int = 3
    views: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] | None = None
    view_repeats: int = 3
    skip: tuple[str, ...] = ()


def _toy(spatial_dims: int) -> Budget:
    """The ``--quick`` budget: a few subjects, a tiny network and patches, 2 steps (3D: registration skipped, it
    takes minutes per volume)."""
    patch, spacing = ("[32,32]", 2.0) if spatial_dims == 2 else ("[16,16,16]", 6.0)
    tiny = ("network.channels=[4,8,8]", "train.batch_size=2", f"data.patch_size={patch}")
    train = (*tiny, f"data.spacing_mm={spacing}", "train.steps=2", "train.warmup_steps=0")
    views = {2: ((48, 40), (32, 32)), 3: ((40, 36, 32), (32, 32, 32))}  # 32: the "small" U-Net needs 2^4
    return Budget(subjects=4 if spatial_dims == 2 else 3, ft_subjects=5 if spatial_dims == 2 else 4, ft_test=1,
                  ft_val=1, labeled="1", seeds="0", pretrain=(*train, "train.log_every=1"),
                  finetune=(*train, "train.val_every=2"), step_cost=tiny, step_rounds=1,
                  views={spatial_dims: views[spatial_dims]}, view_repeats=1,
                  skip=("registration",) if spatial_dims == 3 else ())


#: (spatial_dims, quick) -> budget; the full budgets run the shipped configs unchanged (the docs' populations)
BUDGETS: dict[tuple[int, bool], Budget] = {
    (2, False): Budget(subjects=24, ft_subjects=24, ft_test=6, ft_val=3),
    (3, False): Budget(subjects=10, ft_subjects=10, ft_test=3, ft_val=2),
    (2, True): _toy(2),
    (3, True): _toy(3),
}


@dataclass
class Results:
    """What the document shows; filled suite by suite."""

    pretraining: list[dict] = field(default_factory=list)
    oneshot: list[dict] = field(default_factory=list)
    oneshot_seconds: list[dict] = field(default_factory=list)
    finetune: dict[tuple, list[dict]] = field(default_factory=dict)
    step_cost: list[dict] = field(default_factory=list)
    views: list[dict] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- pretraining


def _config_key(config: Any) -> dict[str, Any]:
    """The flattened config without the keys a resumed run may change (device, logging, validation)."""
    from medssl.config import flat_config
    from medssl.engine.pretrain import RESUME_MAY_CHANGE

    return flat_config(config, ignore=[key for key in RESUME_MAY_CHANGE if key != "data.path"])


def pretrain_run(method: str, spatial_dims: int, data: Path, work: Path, overrides: Sequence[str],
                 device: str) -> dict:
    """Pretrain ``configs/<method>_<D>d.yaml`` (+ ``overrides``) on ``data``, or reuse / resume the run of the same
    config in ``work/pretrain``; returns ``{method, run, status, steps, batch, patch, seconds, loss, arch}``."""
    from medssl.config import shipped_config
    from medssl.engine.pretrain import pretrain
    from medssl.engine.pretrain_config import read_pretrain_config
    from medssl.engine.runner import CHECKPOINT, read_resume_state
    from medssl.networks.model_file import MODEL_FILE
    from medssl.report.figures import read_metric

    config = read_pretrain_config(shipped_config(f"{method}_{spatial_dims}d"),
                                  [f"data.path={data.resolve()}", f"train.device={device}", *overrides])
    key = _config_key(config)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    run = work / "pretrain" / f"{method}_{spatial_dims}d_{digest}"
    step = read_resume_state(run / CHECKPOINT)["step"] if (run / CHECKPOINT).is_file() else 0
    if step and _config_key(read_pretrain_config(run / "config.yaml")) != key:
        log.warning("%s holds a run of another config: starting it again", run)
        shutil.rmtree(run)
        step = 0
    if step == config.train.steps and (run / MODEL_FILE).is_file():
        status = "reused"
    elif step:
        log.info("resuming %s from step %d of %d", run, step, config.train.steps)
        pretrain(config, resume=run)
        status = f"resumed at step {step}"
    else:
        shutil.rmtree(run, ignore_errors=True)  # started but stopped before its first checkpoint
        pretrain(config, out=run)
        status = "trained"
    _, seconds = read_metric(run / "metrics.csv", "seconds")
    _, loss = read_metric(run / "metrics.csv", "loss")
    ends = np.append(seconds[1:] < seconds[:-1], True)  # 'seconds' restarts at 0 when a run is resumed
    return {"method": method, "run": run, "status": status, "steps": config.train.steps,
            "batch": config.train.batch_size, "patch": "x".join(map(str, config.data["patch_size"])),
            "seconds": float(seconds[ends].sum()), "loss": float(loss[-1]), "arch": config.network.get("size", "small")}


# ---------------------------------------------------------------------------------------------------- suites


def quality_suite(args: argparse.Namespace, budget: Budget, device: str, results: Results,
                  stage: StageClock) -> None:
    from medssl.data.demo import write_demo_dataset

    dims, work = args.dim, args.work
    data = work / f"data_{dims}d_{budget.subjects}s_{args.variability}"
    with stage("dataset", f"{budget.subjects} {dims}D {args.variability} demo subjects (seed 0) in {data}"):
        if not (data / "datalist.json").is_file():
            write_demo_dataset(data, spatial_dims=dims, n_subjects=budget.subjects, seed=0,
                               variability=args.variability)
    overrides = [*budget.pretrain, *args.pretrain_override]
    for method in args.methods:
        with stage(f"pretraining {method}", f"configs/{method}_{dims}d.yaml {' '.join(overrides)}".strip()):
            results.pretraining.append(  # the unlabeled images only, not the label maps beside them
                pretrain_run(method, dims, data / "images", work, overrides, device))
            log.info("pretraining %s: %s (%s)", method, results.pretraining[-1]["status"],
                     results.pretraining[-1]["run"])
    runs = {row["method"]: row["run"] for row in results.pretraining}
    with stage("one-shot landmarks", f"template subject_000, {budget.subjects - 1} queries, "
                                     f"{len(runs)} runs + baselines (skipped: {', '.join(args.skip) or 'none'})"):
        (work / "oneshot").mkdir(parents=True, exist_ok=True)
        arch = results.pretraining[0]["arch"] if results.pretraining else "small"
        results.oneshot = bench_oneshot.oneshot_rows(
            data, runs, work / "oneshot", arch, args.skip, device,
            progress=lambda row: log.info("one-shot %s: MRE %.2f mm, %.2f s/image", row["label"], row["mre_mm"],
                                          row["seconds"]))
    counts = bench_finetune.parse_counts(args.labeled)
    seeds = [int(s) for s in args.seeds.split(",")]
    inits = {method: str(run) for method, run in runs.items() if method in _finetuned(args, results)}
    inits |= {"none": "none"}
    with stage("fine-tuning", f"{'+'.join(args.tasks)} x N {args.labeled} x {len(inits)} inits x seeds {args.seeds}: "
                              f"{len(args.tasks) * len(counts) * len(inits) * len(seeds)} runs"):
        results.finetune = bench_finetune.run_grid(
            inits, dims, work / f"finetune_{dims}d_{budget.ft_subjects}s_{args.variability}",
            subjects=budget.ft_subjects,
            test=budget.ft_test, val=budget.ft_val, counts=counts, seeds=seeds, tasks=args.tasks,
            overrides=[f"train.device={device}", *budget.finetune, *args.finetune_override],
            stage2=True, variability=args.variability,
            progress=lambda line: log.info("fine-tuning %s", line))


def _finetuned(args: argparse.Namespace, results: Results) -> list[str]:
    """The objectives whose runs are fine-tuned: ``--finetune-methods``, or ``best``: the one with the lowest
    one-shot MRE (all of them when there is no one-shot table)."""
    if args.finetune_methods != ["best"]:
        return args.finetune_methods
    scored = [row for row in results.oneshot if row["label"] in args.methods]
    return [min(scored, key=lambda row: row["mre_mm"])["label"]] if scored else list(args.methods)


def speed_suite(args: argparse.Namespace, budget: Budget, device: str, results: Results,
                stage: StageClock) -> None:
    with stage("cost per step", f"{', '.join(args.methods)} at the shipped {args.dim}D config sizes"):
        results.step_cost = bench_objectives.measure_all(
            [args.dim], device, budget.step_rounds, methods=args.methods, overrides=budget.step_cost,
            isolate=not args.quick, profile=True)  # --quick: in this process (the peak memory is the process's)
    with stage("view generation", f"{args.dim}D view pairs per second"):
        results.views = bench_views.measure([args.dim], device, 2 if args.quick else 4, budget.view_repeats,
                                            budget.views or bench_views.CASES)
    if not results.oneshot:  # no quality suite: time one-shot matching on a few queries of its own
        queries = _speed_queries(args)
        with stage("one-shot seconds", f"{queries} {args.dim}D queries: embedding (the infoguided_{args.dim}d "
                                       f"network), NCC, registration (skipped: {', '.join(args.skip) or 'none'})"):
            results.oneshot_seconds = bench_oneshot.timing_rows(args.work / "oneshot_seconds", args.dim, queries,
                                                                device, args.skip, args.variability)


def _speed_queries(args: argparse.Namespace) -> int:
    """Query images the speed suite times one-shot matching on when the quality suite does not run."""
    return 2 if args.quick else 5


# ---------------------------------------------------------------------------------------------------- the document


def machine() -> str:
    """CPU count and model, torch and its threads, GPU, versions, load average."""
    import monai
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    cpu = names[0] if names else platform.processor() or platform.machine()
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{os.cpu_count()} CPU cores ({cpu}), {gpu}; torch {torch.__version__} with {torch.get_num_threads()} "
            f"thread(s), MONAI {monai.__version__}, Python {platform.python_version()}, {platform.system()} "
            f"{platform.release()}; load average (1/5/15 min) at the end: {load}")


def _save(figure: Any, path: Path) -> Path:
    """``figure`` laid out tight and written as a 100-dpi PNG (``medssl.outputs.save_figure``: atomically)."""
    from medssl.outputs import save_figure

    figure.tight_layout()
    return save_figure(figure, path, dpi=100)


def oneshot_figure(rows: list[dict], path: Path) -> Path:
    """MRE bar per pretrained run, a horizontal line per baseline."""
    from matplotlib.figure import Figure

    baselines = {label for label, *_ in bench_oneshot.BASELINES}
    bars = [row for row in rows if row["label"] not in baselines]
    figure = Figure(figsize=(6.0, 3.6))
    axes = figure.subplots()
    axes.bar([row["label"] for row in bars], [row["mre_mm"] for row in bars], color="#3b8bff")
    for row, style in zip([row for row in rows if row["label"] in baselines], ("--", ":", "-.")):
        axes.axhline(row["mre_mm"], color="#333333", linestyle=style, label=f"{row['label']} {row['mre_mm']:.2f} mm")
    axes.set(title="one-shot landmarks", ylabel="MRE (mm)")
    if len(bars) < len(rows):
        axes.legend(fontsize=8)
    return _save(figure, path)


def finetune_figure(results: dict[tuple, list[dict]], tasks: Sequence[str], path: Path) -> Path:
    """Per task: test mean Dice (segmentation) or MRE (landmarks) against N labeled, mean ± SD over seeds, a line
    per initialisation."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0 * len(tasks), 3.6))
    panels = figure.subplots(1, len(tasks), squeeze=False)
    for axes, task in zip(panels[0], tasks):
        key, label = ("mean_dice", "test mean Dice") if task == "seg" else ("mre_mm", "test MRE (mm)")
        counts = list(dict.fromkeys(n for t, n, _ in results if t == task))
        for init in dict.fromkeys(name for t, _, name in results if t == task):
            values = [[s[key] for s in results[(task, n, init)] if s[key] is not None] for n in counts]
            axes.errorbar([str(n) for n in counts], [np.mean(v) if v else np.nan for v in values],
                          yerr=[np.std(v) if v else 0.0 for v in values], marker="o", capsize=3, label=init,
                          linestyle="--" if init == "none" else "-")
        axes.set(title="segmentation" if task == "seg" else "landmark heatmaps", xlabel="N labeled", ylabel=label)
        axes.legend(fontsize=8)
    return _save(figure, path)


def step_cost_figure(rows: list[dict], path: Path) -> Path:
    """Step / floor ratio per objective, the floor at 1."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 3.6))
    axes = figure.subplots()
    axes.bar([r["method"] for r in rows], [r["step_s"] / r["floor_s"] for r in rows], color="#ff9f1c")
    axes.axhline(1.0, color="#333333", linestyle="--", label="floor: the network's forward + backward")
    axes.set(title="cost of a pretraining step", ylabel="s/step ÷ floor s/step")
    axes.legend(fontsize=8)
    return _save(figure, path)


#: issue 18's speed targets: step at most this many times its teacher floor; one-shot embedding this many times
#: faster than registration per image, per spatial dims
STEP_TARGET, ONESHOT_TARGET = 1.15, {2: 30.0, 3: 100.0}


def targets(results: Results, dims: int) -> list[str]:
    """Lines saying which speed targets the tables meet, and what bounds the rest (measured, not assumed)."""
    lines = ["**Targets**", ""]
    for row in results.step_cost:
        ratio = row["step_s"] / row.get("teacher_floor_s", row["floor_s"])
        lines.append(f"- {row['method']}: step {ratio:.3f}x its teacher floor (target <= {STEP_TARGET}): "
                     + ("met." if ratio <= STEP_TARGET else "not met; where the rest goes: *Where the time goes*."))
    rows = {row["label"]: row["seconds"] for row in results.oneshot or results.oneshot_seconds}
    embedding = rows.get("embedding", min((s for label, s in rows.items() if label not in
                                           ("NCC", "registration", "random init", bench_oneshot.FORWARD_ONLY)),
                                          default=None))
    if "registration" in rows and embedding:
        speedup = rows["registration"] / embedding
        line = (f"- One-shot embedding matching: {speedup:.1f}x faster than registration per {dims}D image (target "
                f">= {ONESHOT_TARGET[dims]:.0f}x): " + ("met." if speedup >= ONESHOT_TARGET[dims] else "not met."))
        if bench_oneshot.FORWARD_ONLY in rows:
            bound = rows["registration"] / rows[bench_oneshot.FORWARD_ONLY]
            line += (f" The network's forward pass alone takes {rows[bench_oneshot.FORWARD_ONLY]:.2f} s per image: "
                     f"no matcher on this network and device can be more than {bound:.0f}x faster than registration; "
                     "the rest of the embedding time is preparing the image and matching (the consistency check's "
                     "support points most of it, docs/oneshot.md).")
        lines.append(line)
    return lines + [""]


def render(args: argparse.Namespace, budget: Budget, results: Results, command: str, figures: Path) -> str:
    """The whole document; writes its figures into ``figures``."""
    def image(caption: str, png: Path) -> list[str]:
        return [f"![{caption}]({png.relative_to(args.out.parent).as_posix()})", ""]

    dims, total = args.dim, sum(results.stages.values())
    arch = results.pretraining[0]["arch"] if results.pretraining else "small"
    lines = [f"# Benchmarks ({dims}D)", ""]
    if args.quick:
        lines += ["> **Toy run (`--quick`)**: tiny populations, networks, patches and 2 training steps. These numbers "
                  "only show that every stage runs; they say nothing about the methods. "
                  + ("Registration was skipped (minutes per volume). " if "registration" in args.skip else "")
                  + "The cost-per-step cases ran in one process, so their peak memory is the process's.", ""]
    lines += [f"Made by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} in {clock(total)} (this invocation; runs "
              "reused from the work folder are not timed again).", "",
              f"Machine: {machine()}.", "",
              "Every number comes from this one machine and one run; times depend on its load (other jobs may have "
              "shared the cores), and quality numbers on the small demo populations and the budgets below.", ""]
    n_train = budget.ft_subjects - budget.ft_test - budget.ft_val
    stage2 = 1 in bench_finetune.parse_counts(args.labeled)  # run_grid runs stage 2 when N = 1 is fine-tuned
    quality = [
        ["pretraining and one-shot population", f"{budget.subjects} {dims}D demo subjects (`medssl data demo --seed "
                                                f"0 --variability {args.variability}`); template `subject_000`, "
                                                f"{budget.subjects - 1} queries"],
        ["pretraining", f"`configs/<method>_{dims}d.yaml` for {', '.join(args.methods)}; overrides: "
                        f"`{' '.join([*budget.pretrain, *args.pretrain_override]) or 'none'}`"],
        ["one-shot baselines", f"random init (`--checkpoint none`), NCC, registration; skipped: "
                               f"{', '.join(args.skip) or 'none'}"],
        ["fine-tuning population", f"{budget.ft_subjects} subjects (seed 1): {n_train} training / {budget.ft_val} "
                                   f"validation / {budget.ft_test} test"],
        ["fine-tuning", f"`configs/finetune_<task>_{dims}d.yaml` from {', '.join(_finetuned(args, results))} and "
                        f"`none`, tasks {', '.join(args.tasks)}, N labeled {args.labeled}, seeds {args.seeds}"
                        f"{' (+ stage 2 on one-shot pseudo-labels)' if stage2 else ''}; overrides: "
                        f"`{' '.join([*budget.finetune, *args.finetune_override]) or 'none'}`"],
    ]
    speed = [
        ["cost per step", f"{', '.join(args.methods)} at the shipped config sizes"
                          f"{' + `' + ' '.join(budget.step_cost) + '`' if budget.step_cost else ''}, fastest of "
                          f"{budget.step_rounds} timed round(s) after a warm-up"],
        ["view generation", f"synthetic scans, {budget.view_repeats} repeat(s)"],
    ]
    if results.oneshot_seconds:
        speed.append(["one-shot seconds", f"{_speed_queries(args)} {dims}D demo queries (seed 0), template "
                                          f"`subject_000`; skipped: {', '.join(args.skip) or 'none'}"])
    lines += ["## Budget", ""] + markdown_table(["what", "setting"], [
        *(quality if "quality" in args.suites else []), *(speed if "speed" in args.suites else [])]) + [""]
    if results.pretraining or results.oneshot or results.finetune:
        lines += ["## Quality", "", "### Pretraining runs", ""]
        lines += markdown_table(["method", "steps", "batch", "patch", "training s", "s/step", "last loss", "run"], [
            [r["method"], str(r["steps"]), str(r["batch"]), r["patch"], f"{r['seconds']:.1f}",
             f"{r['seconds'] / r['steps']:.2f}", f"{r['loss']:.4g}", f"`{r['run'].name}` ({r['status']})"]
            for r in results.pretraining]) + [""]
        if results.oneshot:
            lines += ["### One-shot landmarks", "", f"Template `subject_000`, the {budget.subjects - 1} other subjects "
                      "as queries, truth = their `landmarks.csv` rows (`bench_oneshot`). Random init is "
                      f"`--checkpoint none --arch {arch}`, prepared on the template's own grid (the pretrained "
                      "networks use their config's `data.spacing_mm` when it is set). s / image: preparing and "
                      "matching, model loading included.", "", bench_oneshot.format_rows(results.oneshot), ""]
            lines += image("One-shot MRE per pretrained network; lines: baselines",
                           oneshot_figure(results.oneshot, figures / "oneshot_mre.png"))
        if results.finetune:
            lines += ["### Fine-tuning transfer", "", "Test scores, mean ± SD over seeds (`bench_finetune`); `none` "
                      "is the randomly initialised network of the same architecture.", "",
                      bench_finetune.tables(results.finetune, dims, args.tasks), ""]
            lines += image("Fine-tuning: test score against N labeled, mean ± SD over seeds",
                           finetune_figure(results.finetune, args.tasks, figures / "finetune.png"))
    if results.step_cost or results.views:
        lines += ["## Speed", ""]
        if results.step_cost:
            lines += ["### Cost per pretraining step", "", "Objective forward + backward + optimizer step against the "
                      "floor (the bare network's forward + backward on the same two views) and the teacher floor (the floor "
                      "plus the EMA teachers' forward on both views, what a teacher method cannot avoid); one reused "
                      "batch, so view generation is not counted (`bench_objectives`).", "",
                      bench_objectives.format_rows(results.step_cost), ""]
            lines += image("Step / floor ratio per objective", step_cost_figure(results.step_cost, figures /
                                                                                "step_ratio.png"))
            if any("profile" in row for row in results.step_cost):
                lines += ["### Where the time goes", "", "One step of each objective under `torch.profiler`: share of "
                          "the step per phase, and the operators with the most self time (their input shapes say "
                          "which tensor: the network's convolutions, a head, a loss).", "",
                          bench_objectives.format_profile(results.step_cost), ""]
        if results.views:
            lines += ["### View generation", "", "View pairs per second against one training step of the default "
                      "network (`bench_views`).", "", bench_views.format_rows(results.views), ""]
        scale = [Path(os.path.relpath(ROOT / "docs" / "benchmarks" / f"scale_{d}d.md", args.out.parent)).as_posix()
                 for d in (2, 3)]
        lines += ["### Scale", "", "Peak memory of a fixed-length pretraining run on 24, 200 and 1000 demo scans, "
                  "view pairs per second with 0, 1 and 2 DataLoader workers, and the time to prepare the cache: "
                  f"recorded in [{scale[0]}]({scale[0]}) and [{scale[1]}]({scale[1]}) by "
                  "`python -m benchmarks.bench_scale --dim D` (tens of minutes: not rerun here).", ""]
        lines += ["### One-shot seconds per image", ""]
        if results.oneshot:
            lines += ["From the one-shot runs above (preparing and matching, model loading included).", "",
                      bench_oneshot.format_seconds(results.oneshot), ""]
        else:
            lines += [f"{args.dim}D demo queries (`bench_oneshot.timing_rows`: template `subject_000`, preparing "
                      "and matching, model loading included); the embedding "
                      f"matcher runs the `infoguided_{args.dim}d` network at random init with the default matcher "
                      "(the time does not depend on the weights); `network forward only`: embedding each prepared "
                      "image, nothing else.", "",
                      bench_oneshot.format_seconds(results.oneshot_seconds), ""]
        lines += targets(results, dims)
    lines += ["## Time per stage", ""]
    lines += markdown_table(["stage", "seconds"], [[name, f"{seconds:.1f}"] for name, seconds in results.stages.items()]
                    + [["total", f"{total:.1f}"]]) + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> Path:
    from medssl.objectives import OBJECTIVES

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argument_parser(MODULE, __doc__, full=True)
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="the Markdown document (default docs/benchmarks.md); PNGs go to <out without .md>/")
    parser.add_argument("--work", type=Path, default=Path("bench_work"), help="run folders (default bench_work/)")
    parser.add_argument("--quick", action="store_true", help="toy budget: a smoke test, its numbers mean nothing")
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--methods", nargs="+", choices=OBJECTIVES.names(), default=OBJECTIVES.names())
    parser.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE",
                        help="pretraining config override, repeatable (e.g. train.steps=100)")
    parser.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE",
                        help="fine-tuning config override, repeatable (e.g. train.steps=300)")
    parser.add_argument("--finetune-methods", nargs="+", default=["best"],
                        help="objectives whose runs are fine-tuned (default best: the lowest one-shot MRE)")
    parser.add_argument("--labeled", default=None, help="numbers of labeled images (default 1,3,all)")
    parser.add_argument("--seeds", default=None, help="fine-tuning seeds (default 0,1)")
    parser.add_argument("--tasks", nargs="+", choices=("seg", "landmarks"), default=["seg", "landmarks"])
    parser.add_argument("--skip", nargs="*", default=None, choices=("none", "ncc", "registration"),
                        help="one-shot baselines to leave out (default: none; registration with --quick)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--variability", choices=("realistic", "low"), default="realistic",
                        help="demo population variability (default realistic; low: the former population)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    with _quiet("medssl.metrics", "matplotlib"):  # per-run score tables (the document has them), plot chatter
        return _run(args, argv)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raise these loggers to WARNING for the block, then restore them (``main`` may run inside another program)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _run(args: argparse.Namespace, argv: list[str]) -> Path:
    from medssl.dist import pick_device

    budget = BUDGETS[(args.dim, args.quick)]
    args.labeled, args.seeds = args.labeled or budget.labeled, args.seeds or budget.seeds
    args.skip = list(budget.skip) if args.skip is None else args.skip
    device, results = pick_device(args.device), Results()
    stage = StageClock(prefix="bench")
    results.stages = stage.seconds
    log.info("bench: %s suite(s), %dD%s, work %s, device %s", " + ".join(args.suites), args.dim,
             " (--quick)" if args.quick else "", args.work, device)
    if "quality" in args.suites:
        quality_suite(args, budget, device, results, stage)
    if "speed" in args.suites:
        speed_suite(args, budget, device, results, stage)
    command = f"python -m {MODULE} " + shlex.join(argv)
    figures = args.out.parent / args.out.stem
    from medssl.outputs import write_atomic

    write_atomic(args.out, render(args, budget, results, command.strip(), figures))
    log.info("bench finished in %s: %s", clock(time.perf_counter() - stage.started), args.out)
    return args.out


if __name__ == "__main__":
    main()
