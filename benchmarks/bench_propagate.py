"""What one-shot label propagation's settings cost and buy: mean Dice and seconds per image (issue 17).

    python -m benchmarks.bench_propagate --checkpoint RUN --data POP --dim 3 --images 5 --out bench/propagate_3d.md

For each variant (``VARIANTS``: keyword changes to ``propagate_labels`` and to the matcher's ``support``) the
template (the population's first image) is propagated onto the next ``--images`` images, prepared as the checkpoint
prepares them, and scored on that prepared grid (mean Dice over the label classes; ``segment oneshot --truth``
scores on the input's grid instead). Seconds per image are ``propagate_labels`` alone: the template's embedding and
dense features are computed once per variant (in its precision) and left out, as ``segment oneshot`` does. The phases columns split
them into the query's embedding, the support matching, the robust spline, and the vote with the rest.
``--checkpoint none`` scores random init; registration (``registration_labels``) on the same images unless
``--skip-registration``.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from monai.data import MetaTensor

from benchmarks.common import argument_parser, emit, log_progress
from medssl.data.inputs import resolve_images
from medssl.data.readers import image_key
from medssl.matching import propagate
from medssl.matching.oneshot import DEFAULT_SUPPORT_POINTS
from medssl.matching.run import image_preparer, method_matcher
from medssl.metrics.segmentation import segmentation_scores
from medssl.report.markdown import markdown_table
from medssl.transforms.preprocess import Preprocessing

MODULE = "benchmarks.bench_propagate"
#: variant name -> its changes to the defaults (``support``: the matcher's support points, ``amp``: its precision;
#: the rest are ``propagate_labels`` keywords)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "every level": {"vote_levels": 99},
    "finest level only": {"vote_levels": 1},
    "window 0 (the spline alone)": {"window": 0},
    "stride 4": {"stride": 4},
    "support search stride 2": {"support_stride": 2},
    "support search stride 4": {"support_stride": 4},
    "128 support points": {"support": 128},
    "128 support points, stride 4": {"support": 128, "stride": 4},
    "bf16": {"amp": "bf16"},
    "128 support points, stride 4, bf16": {"support": 128, "stride": 4, "amp": "bf16"},
}
PHASES = ("embed", "support", "spline")


def _timed(name: str, function: Callable, seconds: dict[str, float]) -> Callable:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
    return wrapper


def score_variants(checkpoint: str | Path, data: Path, dims: int, count: int, variants: dict[str, dict[str, Any]], *,
                   registration: bool = True) -> dict[str, dict[str, float]]:
    """Variant (and ``"registration"``) -> ``mean_dice``, ``seconds`` per image and the seconds of each of
    ``PHASES`` per image (module docstring)."""
    images = sorted(resolve_images(data / "images"), key=lambda path: path.name)
    labels = {image_key(path): path for path in resolve_images(data / "labels")}
    template, queries = images[0], images[1:1 + count]
    matcher, preprocessing = method_matcher("embedding", checkpoint, dims, device="cpu")
    spec = Preprocessing.from_options(image_preparer(preprocessing, template, dims, network=matcher.network).keywords)
    template_image, template_label = spec.read(template, dims, label_path=labels[image_key(template)])
    prepared = [spec.read(path, dims, label_path=labels[image_key(path)]) for path in queries]
    classes = int(template_label.max()) + 1
    seconds: dict[str, float] = {}
    patched = {"embed": matcher.embed, "match_points": matcher.match_points, "robust_spline": propagate.robust_spline}
    matcher.embed = _timed("embed", matcher.embed, seconds)
    matcher.match_points = _timed("support", matcher.match_points, seconds)
    propagate.robust_spline = _timed("spline", propagate.robust_spline, seconds)
    rows = {}
    try:
        for name, changes in variants.items():
            options = dict(changes)
            matcher.support = int(options.pop("support", DEFAULT_SUPPORT_POINTS))
            matcher.amp = options.pop("amp", "off")
            template_embedding = matcher.embed(template_image)  # in the variant's precision, left out of the time
            options["vote_levels"] = propagate.resolve_vote_levels(options.get("vote_levels"), dims)
            features = propagate.dense_features(template_embedding, options["vote_levels"])
            seconds.clear()
            pairs, total = [], 0.0
            for query, truth in prepared:
                started = time.perf_counter()
                found = propagate.propagate_labels(matcher, template_image, template_label, query, classes=classes,
                                                   template_embedding=template_embedding,
                                                   template_features=features, **options)
                total += time.perf_counter() - started
                pairs.append((found.labels, MetaTensor(truth.as_tensor().long(), affine=truth.affine)))
            rows[name] = {"mean_dice": segmentation_scores(pairs)["mean_dice"], "seconds": total / len(prepared),
                          **{phase: seconds.get(phase, 0.0) / len(prepared) for phase in PHASES}}
    finally:
        matcher.embed, matcher.match_points = patched["embed"], patched["match_points"]
        propagate.robust_spline = patched["robust_spline"]
    if registration:
        pairs, started = [], time.perf_counter()
        for query, truth in prepared:
            warped = propagate.registration_labels(template_image, template_label, query, classes=classes)
            pairs.append((MetaTensor(warped.as_tensor().argmax(0, keepdim=True), affine=query.affine),
                          MetaTensor(truth.as_tensor().long(), affine=truth.affine)))
        rows["registration"] = {"mean_dice": segmentation_scores(pairs)["mean_dice"],
                                "seconds": (time.perf_counter() - started) / len(prepared)}
    return rows


def table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown: one line per variant, registration last, with the speed-up over registration where it ran."""
    reference = rows.get("registration", {}).get("seconds")
    header = ["variant", "mean Dice", "s / image", "x faster than registration", "embed", "support", "spline",
              "vote + rest"]
    lines = []
    for name, row in rows.items():
        phases = [f"{row[phase]:.2f}" for phase in PHASES] if PHASES[0] in row else ["-"] * len(PHASES)
        rest = f"{row['seconds'] - sum(row[phase] for phase in PHASES):.2f}" if PHASES[0] in row else "-"
        faster = f"{reference / row['seconds']:.1f}" if reference else "-"
        lines.append([name, f"{row['mean_dice']:.3f}", f"{row['seconds']:.2f}", faster, *phases, rest])
    return "\n".join(markdown_table(header, lines))


def main(argv: Sequence[str] | None = None) -> str:
    parser = argument_parser(MODULE, __doc__)
    parser.add_argument("--checkpoint", required=True, help="pretraining run folder / model.pt, or 'none'")
    parser.add_argument("--data", type=Path, required=True, help="a demo population (images/, labels/)")
    parser.add_argument("--dim", type=int, choices=(2, 3), required=True)
    parser.add_argument("--images", type=int, default=5, help="images propagated onto (default 5)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--skip-registration", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    log_progress()
    rows = score_variants(args.checkpoint, args.data, args.dim, args.images,
                          {name: VARIANTS[name] for name in args.variants},
                          registration=not args.skip_registration)
    text = (f"{args.dim}D, checkpoint {Path(str(args.checkpoint)).name}, {args.data}: template the first image, "
            f"{args.images} images\n\n" + table(rows))
    emit(text, args.out)
    return text


if __name__ == "__main__":
    main()
