"""One-shot matcher ablation (issue 19): the same pretrained checkpoints, matched five ways, against registration.

    python -m benchmarks.bench_matcher --dim 2 --runs bench/dense/pretrain/infoguided_2d_*  --out docs/matcher_2d.md
    python -m benchmarks.bench_matcher --dim 3 --runs bench/dense/pretrain/pgssl_3d_38fc5bdb --out docs/matcher_3d.md

Data: the realistic demo population ``bench_dense`` pretrains on (``--data``). Template ``subject_000``; the
ensemble adds the two images ``select-template`` ranks best among the others (with the first run's features);
those two are left out of the queries of *every* row, so all rows score the same queries. Rows: ``argmax`` (each
landmark's own best match, the matcher before issue 19), ``coarse-to-fine`` search, ``+ thin-plate``, ``+ outliers``
and ``+ dense`` consistency (global search), ``+ ensemble of 3 templates`` (the dimension's default consistency);
then NCC and registration on the same queries. Per row: mean +- SD over the runs of MRE, the runs' mean median RE
and SDR, the Spearman correlation of the ``score`` and of ``residual_mm`` with the error (negative / positive =
predictive), and seconds per query (matching only, the embedding excluded). ``--errors`` keeps every landmark's
error, score and residual (to see which landmarks make a row's tail).
"""

from __future__ import annotations

import csv
import logging
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.stats import spearmanr

from benchmarks.common import argument_parser, emit, log_progress
from medssl.data.inputs import resolve_images
from medssl.data.landmarks import read_landmarks
from medssl.data.readers import image_key
from medssl.matching.oneshot import DEFAULT_CONSISTENCY, OneShotMatcher
from medssl.matching.run import detect_landmarks_files, image_preparer, load_templates, matching_network
from medssl.matching.selection import rank_templates
from medssl.outputs import atomic_writer
from medssl.report.markdown import markdown_table

MODULE = "benchmarks.bench_matcher"
log = logging.getLogger(MODULE)
VARIANTS = (("argmax", "global", "none", 1), ("coarse-to-fine", "coarse-to-fine", "none", 1),
            ("+ thin-plate", "global", "thin-plate", 1), ("+ outliers", "global", "outliers", 1),
            ("+ dense", "global", "dense", 1),
            ("+ ensemble of 3 templates", "global", None, 3))  # label, search, consistency, templates


def _errors(found, truth: dict, names: list[str], key: str) -> np.ndarray:
    return np.linalg.norm(found.points_mm - np.stack([truth[key][name] for name in names]), axis=1)


def score_run(run: Path, data: Path, dims: int, templates: list[str] | None = None,
              records: list[dict] | None = None) -> tuple[dict[str, dict], list[list[str]]]:
    """Every variant on one checkpoint; returns label -> scores and [templates, queries]. ``templates``: the three
    template names (default: ranked with this checkpoint, see the module docstring). ``records``: if given, one
    dict per matched landmark is appended (``_record``)."""
    paths = {image_key(path): path for path in resolve_images(data / "images")}
    unknown = [name for name in templates or () if name not in paths]
    if unknown:
        raise SystemExit(f"--templates {', '.join(unknown)}: no such image in {data / 'images'} "
                         f"(its images: {', '.join(sorted(paths))})")
    truth = read_landmarks(data / "landmarks.csv")
    network, preprocessing, levels, pyramid = matching_network(run, dims)
    prepare = image_preparer(preprocessing, next(iter(paths.values())), dims, network=network)
    prepared = {key: prepare(path) for key, path in paths.items()}
    matcher = OneShotMatcher(network, levels=levels, pyramid=pyramid)
    keys = list(prepared)
    if templates is None:
        ranking = rank_templates(matcher, [prepared[key] for key in keys])
        templates = [keys[0], *[keys[i] for i in np.argsort(-ranking, kind="stable") if keys[i] != keys[0]][:2]]
    loaded = load_templates([paths[key] for key in templates], [data / "landmarks.csv"],
                            lambda path: prepared[image_key(path)])  # each image read and prepared once
    queries = [key for key in keys if key not in templates]
    embedded = {key: matcher.embed(prepared[key]) for key in queries}
    template_embeddings = [matcher.embed(image) for image in loaded.images]
    rows = {}
    for label, search, consistency, count in VARIANTS:
        matcher.search, matcher.consistency = search, consistency
        references = [matcher.reference(embedding, image, points) for embedding, image, points in
                      zip(template_embeddings[:count], loaded.images[:count], loaded.points_mm[:count])]
        errors, scores, residuals, seconds = [], [], [], 0.0
        for key in queries:
            started = time.perf_counter()
            found = matcher.match(references, embedded[key])
            seconds += time.perf_counter() - started
            errors.append(_errors(found, truth, loaded.names, key))
            scores.append(found.scores)
            residuals.append(found.residual_mm)
            if records is not None:
                records += _record(run.name, label, key, loaded.names, errors[-1], scores[-1], residuals[-1])
        errors, scores, residuals = np.concatenate(errors), np.concatenate(scores), np.concatenate(residuals)
        rows[label] = summary(errors, seconds / len(queries), scores, residuals)
        log.info("%s %s: MRE %.2f mm, median %.2f", run.name, label, rows[label]["mre"], rows[label]["median"])
    return rows, [list(templates), queries]


def _record(run: str, matcher: str, query: str, names: Sequence[str], errors: np.ndarray,
            scores: np.ndarray | None = None, residuals: np.ndarray | None = None) -> list[dict]:
    """One row per landmark of one query for ``--errors``."""
    missing = np.full(len(names), np.nan)
    return [{"run": run, "matcher": matcher, "query": query, "landmark": name, "error_mm": float(error),
             "score": float(score), "residual_mm": float(residual)}
            for name, error, score, residual in zip(names, errors, missing if scores is None else scores,
                                                    missing if residuals is None else residuals)]


def summary(errors: np.ndarray, seconds: float, scores: np.ndarray | None = None,
            residuals: np.ndarray | None = None) -> dict:
    def rho(values):
        if values is None or not np.isfinite(values).all():
            return float("nan")
        return float(spearmanr(values, errors).statistic)

    return {"n": int(errors.size), "mre": float(errors.mean()), "median": float(np.median(errors)),
            "sdr2": float((errors < 2).mean()),
            "sdr4": float((errors < 4).mean()), "rho_score": rho(scores), "rho_residual": rho(residuals),
            "seconds": seconds}


def baselines(data: Path, templates: list[str], queries: list[str],
              records: list[dict] | None = None) -> dict[str, dict]:
    """NCC and registration from the first template on ``queries`` (``records`` as for ``score_run``)."""
    images = {image_key(path): path for path in resolve_images(data / "images")}
    truth = read_landmarks(data / "landmarks.csv")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, method in (("NCC", "ncc"), ("registration", "registration")):
            started = time.perf_counter()
            out = detect_landmarks_files(None, [images[templates[0]]], [data / "landmarks.csv"],
                                         [images[key] for key in queries], Path(tmp) / f"{method}.csv", method=method)
            seconds = (time.perf_counter() - started) / len(queries)
            predicted = read_landmarks(out)
            errors = []
            for key in queries:
                names = sorted(truth[key])
                errors.append(np.array([np.linalg.norm(predicted[key][name] - truth[key][name]) for name in names]))
                if records is not None:
                    records += _record(label, label, key, names, errors[-1])
            rows[label] = summary(np.concatenate(errors), seconds)
    return rows


def write_csv(path: Path, records: list[dict]) -> Path:
    """``records`` (``_record`` rows) as a CSV at ``path``, written atomically."""
    with atomic_writer(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    log.info("wrote %d landmark errors to %s", len(records), path)
    return path


def table(per_run: list[dict[str, dict]], reference: dict[str, dict]) -> str:
    def cell(value: float, percent: bool = False) -> str:
        return "—" if not np.isfinite(value) else (f"{100 * value:.1f} %" if percent else f"{value:+.2f}")

    header = ["matcher", "MRE (mm), mean ± SD over runs", "median (mm)", "SDR 2 mm", "SDR 4 mm", "ρ(score, error)",
              "ρ(residual, error)", "s / query"]
    lines = []
    for label in [*(v[0] for v in VARIANTS), *reference]:
        rows = [run[label] for run in per_run] if label not in reference else [reference[label]]
        mre = np.array([row["mre"] for row in rows])
        spread = f" ± {mre.std(ddof=1):.2f}" if len(rows) > 1 else ""
        mean = {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
        lines.append([label, f"{mre.mean():.2f}{spread}", f"{mean['median']:.2f}", cell(mean["sdr2"], True),
                      cell(mean["sdr4"], True), cell(mean["rho_score"]), cell(mean["rho_residual"]),
                      f"{mean['seconds']:.2f}"])
    return "\n".join(markdown_table(header, lines))


def main(argv: Sequence[str] | None = None) -> str:
    parser = argument_parser(MODULE, __doc__)
    parser.add_argument("--dim", type=int, choices=(2, 3), required=True)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="pretraining run folders (model.pt)")
    parser.add_argument("--data", type=Path, default=None,
                        help="demo population (default: bench/dense/data_2d_24s_realistic or data_3d_10s_realistic)")
    parser.add_argument("--templates", default=None,
                        help="the ensemble's three templates, comma-separated image names (default: subject_000 and "
                             "the two the first run ranks best), to compare runs matched in separate commands")
    parser.add_argument("--skip-baselines", action="store_true", help="leave out NCC and registration")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--errors", type=Path, default=None,
                        help="also write every landmark's error here (CSV: run, matcher, query, landmark, error_mm, "
                             "score, residual_mm; the baselines' run is their name)")
    args = parser.parse_args(argv)
    log_progress()
    data = args.data or Path("bench/dense") / ("data_2d_24s_realistic" if args.dim == 2 else "data_3d_10s_realistic")
    templates = None if args.templates is None else [name.strip() for name in args.templates.split(",")]
    if templates is not None and len(templates) != 3:
        raise SystemExit(f"--templates needs three image names, got {args.templates!r}")
    per_run, split, records = [], None, []
    for run in args.runs:
        rows, split = score_run(run, data, args.dim, templates if split is None else split[0], records)  # first ranks
        per_run.append(rows)
    reference = {} if args.skip_baselines else baselines(data, split[0], split[1], records)
    if args.errors is not None:
        write_csv(args.errors, records)
    text = (f"{args.dim}D, {len(args.runs)} run(s): {', '.join(run.name for run in args.runs)}; templates "
            f"{', '.join(split[0])}; {len(split[1])} queries (default consistency: "
            f"{DEFAULT_CONSISTENCY[args.dim]})\n\n" + table(per_run, reference))
    emit(text, args.out)
    return text


if __name__ == "__main__":
    main()
