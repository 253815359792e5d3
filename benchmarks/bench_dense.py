"""Equal-budget comparison of the pretraining objectives for one-shot landmarks (issue 13), 2D or 3D.

    python -m benchmarks.bench_dense --dim 2 --out docs/dense.md   # every objective + the composed config, 3 seeds
    python -m benchmarks.bench_dense --dim 3 --out docs/dense.md   # then: both dims' tables -> docs/dense.md
    python -m benchmarks.bench_dense --dim 3 --steps 500 --configs infoguided --work bench_shipped \
        --out docs/dense_shipped.md --title "..."           # one config at its shipped budget (its own doc)

Every config (``configs/<config>_<D>d.yaml``) pretrains with the same ``--steps`` and its shipped batch size, once
per seed (``seed=S``), on the realistic demo population (seed 0: 24 subjects in 2D, 10 in 3D; unlabeled images only).
One-shot matching: template ``subject_000``, every other subject a query, truth from ``landmarks.csv``; the matcher
uses the levels each run's ``model.pt`` records and each landmark's own best match (``--consistency none``:
this compares features; ``bench_matcher`` compares matchers) and the spacing factors its ``model.pt`` records
(``data.pyramid``). Rows: each config (mean ± SD over seeds of MRE, mean of the seeds' median RE and SDR), random
init (the network each seed's run of the first config started from, all levels, at that config's pyramid), NCC and
registration (once). Beside the errors, ``feature_margin`` says why a network matches well or badly: how alike its
features are at distant positions of one image and at the same landmark of two subjects. Runs and scores are kept
in ``--work``: a rerun reuses them, so it continues where it stopped. Writes ``--out`` (default ``WORK/dense.md``, so
that a partial or experimental run never overwrites a committed table) with the tables of every dimension scored so
far.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks import bench_oneshot, run_all
from benchmarks.common import ROOT, argument_parser, log_progress
from medssl.data.inputs import resolve_images
from medssl.data.landmarks import read_landmarks
from medssl.data.readers import image_key
from medssl.report.markdown import markdown_table

MODULE = "benchmarks.bench_dense"
CONFIGS = ("infoguided", "pgssl", "lewel", "msf", "infoguided+lewel")
SUBJECTS = {2: 24, 3: 10}
SDR_RADII = ("2", "4")
log = logging.getLogger(MODULE)


def population(work: Path, dims: int, subjects: int) -> Path:
    """The seed-0 realistic demo population of ``subjects`` subjects (written once)."""
    from medssl.data.demo import write_demo_dataset

    data = work / f"data_{dims}d_{subjects}s_realistic"
    if not (data / "datalist.json").is_file():
        write_demo_dataset(data, spatial_dims=dims, n_subjects=subjects, seed=0, variability="realistic")
    return data


def random_init(config_name: str, dims: int, seed: int, overrides: Sequence[str], work: Path) -> Path:
    """``model.pt`` of the network a run of ``config_name`` with ``seed`` starts from (every level matched, at the
    config's ``data.pyramid``)."""
    from medssl.engine.pretrain import save_initial_model
    from medssl.engine.pretrain_config import read_pretrain_config

    path = work / "random_init" / f"{dims}d_seed{seed}" / "model.pt"
    if not path.is_file():
        save_initial_model(read_pretrain_config(ROOT / "configs" / f"{config_name}_{dims}d.yaml",
                                                [*overrides, f"seed={seed}"]), path)
    return path.parent


def score(label: str, data: Path, checkpoint: str | None, method: str, work: Path, scores: dict) -> dict:
    """One-shot scores of one checkpoint/method, cached in ``scores`` under ``label``."""
    if label not in scores:
        with tempfile.TemporaryDirectory() as tmp:
            row = bench_oneshot.score_row(label, data, checkpoint, method, Path(tmp), arch="small",
                                          consistency="none")  # features compared, not matchers
        scores[label] = {key: row[key] for key in ("mre_mm", "std_mm", "median_mm", "sdr", "seconds")}
        log.info("%s: MRE %.2f mm, median %.2f, %.2f s/image", label, row["mre_mm"], row["median_mm"],
                 row["seconds"])
    return scores[label]


def feature_margin(checkpoint: str, data: Path, dims: int, queries: int = 3) -> dict:
    """How the features of ``checkpoint`` tell positions apart, per matched level (a one-shot matcher lives on the
    gap): ``far``, the mean cosine between the template's features at its support points (a grid over its
    foreground, ~16 mm apart in 3D and ~6 mm in 2D; 1 = every position looks alike, a collapse of what an arg-max
    needs), and ``same``, the mean cosine of each template landmark's features with the features at the same
    landmark (truth) of the first ``queries`` query subjects (1 = perfectly invariant across subjects). Template
    ``subject_000`` (the first image), levels and pyramid as the matcher uses them."""
    from medssl.matching.oneshot import support_points
    from medssl.matching.run import image_preparer, method_matcher, template_rows

    images = resolve_images(data / "images")
    truth = read_landmarks(data / "landmarks.csv")
    matcher, preprocessing = method_matcher("embedding", checkpoint, dims, device="cpu")
    prepare = image_preparer(preprocessing, images[0], dims, network=matcher.network)
    template = prepare(images[0])
    embedding = matcher.embed(template)
    rows = template_rows(images[0], data / "landmarks.csv")
    names = sorted(rows)
    landmarks = matcher.template_vectors(embedding, np.stack([rows[n] for n in names]))
    grid = matcher.template_vectors(embedding, embedding.to_world(support_points(template, matcher.support)))
    far = [float((v @ v.T).fill_diagonal_(0.0).sum() / (len(v) * (len(v) - 1))) for v in grid]
    same = np.zeros(len(landmarks))
    for query_path in images[1:1 + queries]:
        query = matcher.embed(prepare(query_path))
        at = matcher.template_vectors(query, np.stack([truth[image_key(query_path)][n] for n in names]))
        same += [float((a * t).sum(dim=1).mean()) for a, t in zip(at, landmarks)]
    same /= min(queries, len(images) - 1)
    return {"far": far, "same": same.tolist(), "margin": float(np.mean(same) - np.mean(far))}


def margins(label: str, data: Path, checkpoint: str, dims: int, scores: dict) -> None:
    """``feature_margin`` of one checkpoint, cached in ``scores[label]`` (added to rows scored before it existed)."""
    if "margin" not in scores[label]:
        scores[label]["margin"] = feature_margin(checkpoint, data, dims)
        found = scores[label]["margin"]
        log.info("%s: features at distant positions cos %.2f, at one landmark across subjects %.2f", label,
                 np.mean(found["far"]), np.mean(found["same"]))


def run(dims: int, configs: Sequence[str], seeds: Sequence[int], steps: int, work: Path, skip: Sequence[str] = (),
        subjects: int | None = None, extra: Sequence[str] = (), command: str | None = None) -> dict:
    """Pretrain and score everything missing; returns the results of ``dims`` (also saved in ``work``, with the
    ``command`` line that regenerates them). ``extra``: config overrides for every run (e.g. a toy network)."""
    subjects = subjects or SUBJECTS[dims]
    results_path = work / f"results_{dims}d.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results.get("steps") != steps:  # scores of another budget are not comparable: start the table again
        results = {"scores": {}, "runs": {}}
    data = population(work, dims, subjects)
    overrides = [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                 f"train.checkpoint_every={max(1, steps // 2)}", f"train.log_every={max(1, steps // 10)}",
                 f"data.cache_dir={(work / 'cache').resolve()}", *extra]  # cache: scans + information maps, read once

    def save() -> None:
        results.update(dims=dims, steps=steps, subjects=subjects, seeds=list(seeds),
                       command=command or f"python -m {MODULE} --dim {dims}")
        results_path.write_text(json.dumps(results, indent=1))

    for seed in seeds:
        for name in configs:
            label = f"{name} seed {seed}"
            pre = run_all.pretrain_run(name, dims, data / "images", work, [*overrides, f"seed={seed}"], "auto")
            results["runs"][label] = {key: pre[key] for key in ("seconds", "loss", "batch", "patch", "steps")}
            score(label, data, str(pre["run"]), "embedding", work, results["scores"])
            margins(label, data, str(pre["run"]), dims, results["scores"])
            save()
        init = random_init(configs[0], dims, seed, overrides, work)
        score(f"random init seed {seed}", data, str(init), "embedding", work, results["scores"])
        margins(f"random init seed {seed}", data, str(init), dims, results["scores"])
        save()
    for label, method in (("NCC", "ncc"), ("registration", "registration")):
        if method not in skip:
            score(label, data, None, method, work, results["scores"])
            save()
    return results


def summary_rows(results: dict) -> list[dict]:
    """Rows per config over seeds: mean/SD of MRE, mean median and SDR, ratio to random init's mean MRE."""
    groups: dict[str, list[dict]] = {}
    for label, row in results["scores"].items():
        groups.setdefault(label.split(" seed ")[0], []).append(row)
    baseline = float(np.mean([r["mre_mm"] for r in groups.get("random init", [])] or [np.nan]))
    rows = []
    for name, members in groups.items():
        mre = np.array([r["mre_mm"] for r in members])
        seconds = [results["runs"][label]["seconds"] for label in results["runs"] if label.split(" seed ")[0] == name]
        rows.append({
            "config": name, "seeds": len(members), "mre": mre.mean(), "sd": mre.std(ddof=1) if len(mre) > 1 else 0.0,
            "per_seed": mre.tolist(), "median": float(np.mean([r["median_mm"] for r in members])),
            "sdr": {k: float(np.mean([r["sdr"][k] for r in members])) for k in SDR_RADII},
            "ratio": mre.mean() / baseline, "pretrain_s": float(np.mean(seconds)) if seconds else None,
            "match_s": float(np.mean([r["seconds"] for r in members])),
            "far": _mean_over(members, "far"), "same": _mean_over(members, "same"),
        })
    return sorted(rows, key=lambda r: r["mre"])


def _mean_over(members: list[dict], key: str) -> float | None:
    """The mean over seeds of the level-mean ``feature_margin`` value ``key`` (None when a row has no margins)."""
    if not members or any("margin" not in r for r in members):
        return None
    return float(np.mean([np.mean(r["margin"][key]) for r in members]))


def table(results: dict) -> str:
    header = ["config", "seeds", "MRE mean ± SD over seeds (mm)", "per seed", "median RE (mm)", "SDR 2 mm", "SDR 4 mm",
              "× random init", "cos distant", "cos same landmark", "pretrain s", "s / image"]
    return "\n".join(markdown_table(header, [
        [r["config"], str(r["seeds"]), f"{r['mre']:.2f} ± {r['sd']:.2f}", ", ".join(f"{v:.2f}" for v in r["per_seed"]),
         f"{r['median']:.2f}", f"{100 * r['sdr']['2']:.1f} %", f"{100 * r['sdr']['4']:.1f} %", f"{r['ratio']:.2f}",
         *[f"{r[key]:.2f}" if r[key] is not None else "-" for key in ("far", "same")],
         f"{r['pretrain_s']:.0f}" if r["pretrain_s"] is not None else "-", f"{r['match_s']:.2f}"]
        for r in summary_rows(results)]))


TITLE = "Equal-budget comparison of the objectives (one-shot landmarks)"


def render(work: Path, out: Path, title: str = TITLE) -> Path:
    """``out`` with the table of every dimension whose results are in ``work``, under ``title``."""
    parts = [f"# {title}", "",
             f"Generated by `python -m {MODULE}`, one command per dimension as each section says (see the module "
             "docstring for what each row is); do not edit by hand.", "", f"Machine: {run_all.machine()}", ""]
    for dims in (2, 3):
        path = work / f"results_{dims}d.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        batches = sorted({f"batch {r['batch']} of {r['patch']}" for r in results["runs"].values()})
        parts += [f"## {dims}D: {results['steps']} steps each, {', '.join(batches)}, seeds "
                  f"{', '.join(map(str, results['seeds']))}", "",
                  f"`{results.get('command', f'python -m {MODULE} --dim {dims}')}`", "",
                  f"Realistic demo population, {results['subjects']} subjects (seed 0): template subject_000, "
                  f"{results['subjects'] - 1} queries. Random init: the network each seed's runs start from, "
                  "matched on all levels at the first config's pyramid; pretrained runs match on the levels their "
                  "objectives trained, at the spacing factors of their `data.pyramid`. Every run is "
                  "matched with each landmark's own best match (`--consistency none`): the tables compare "
                  "features, not matchers. cos distant / cos same landmark (`feature_margin`, mean over the "
                  "matched levels and seeds): how alike the features are at distant positions of the template, "
                  "and at one landmark of the template and of 3 queries; an arg-max matcher needs the second well "
                  "above the first.", "",
                  table(results), ""]
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def command(argv: Sequence[str]) -> str:
    """The command line that regenerates a section (recorded with its results), arguments quoted for a shell."""
    return shlex.join(["python", "-m", MODULE, *argv])


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argument_parser(MODULE, __doc__)
    parser.add_argument("--dim", type=int, choices=(2, 3), required=True)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="configs/<name>_<D>d.yaml stems")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=100, help="pretraining steps of every config (default 100: "
                                                                "the 3-seed table fits the 2-core CPU)")
    parser.add_argument("--work", type=Path, default=Path("bench_dense"))
    parser.add_argument("--out", type=Path, default=None,
                        help="the markdown tables (default WORK/dense.md; the committed ones: docs/dense.md)")
    parser.add_argument("--title", default=TITLE, help="the heading of --out")
    parser.add_argument("--skip", nargs="*", default=[], choices=("ncc", "registration"))
    parser.add_argument("--subjects", type=int, default=None, help="population size (default 24 in 2D, 10 in 3D)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable), e.g. a smaller network for a smoke test")
    args = parser.parse_args(argv)
    log_progress()
    steps = args.steps
    started = time.perf_counter()
    run(args.dim, args.configs, [int(s) for s in args.seeds.split(",")], steps, args.work, args.skip, args.subjects,
        args.override, command(argv if argv is not None else sys.argv[1:]))
    log.info("done in %.0f s", time.perf_counter() - started)
    return render(args.work, args.out or args.work / "dense.md", args.title)


if __name__ == "__main__":
    print(main())
