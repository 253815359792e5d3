"""The ``medssl`` command line: parse arguments, call the library, map errors to exit codes.

Heavy imports (torch, MONAI, ...) happen inside the handlers so that ``medssl --help`` starts instantly.
Exit status: 0 success; 2 bad input or usage (one line on stderr naming the file); 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from medssl import __version__

log = logging.getLogger("medssl")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 2,2.5,3,4, got '{text}'") from None


# ----------------------------------------------------------------------------------------------- handlers
def _data_demo(args: argparse.Namespace) -> None:
    from medssl.data.demo import write_demo_dataset

    write_demo_dataset(args.out, spatial_dims=args.dim, n_subjects=args.subjects, seed=args.seed, plane=args.plane)


def _pretrain(args: argparse.Namespace) -> None:
    from medssl.engine.pretrain import pretrain
    from medssl.engine.pretrain_config import read_pretrain_config

    config = read_pretrain_config(args.config, args.overrides)
    run = pretrain(config, data=args.data, out=args.out, resume=args.resume)
    log.info("run folder: %s", run)


def _evaluate_landmarks(args: argparse.Namespace) -> None:
    from medssl.metrics.report import evaluate_landmarks_files

    evaluate_landmarks_files(args.pred, args.truth, sdr_radii_mm=args.sdr, json_path=args.json)


def _evaluate_seg(args: argparse.Namespace) -> None:
    from medssl.metrics.report import evaluate_segmentation_files

    evaluate_segmentation_files(args.pred, args.truth, json_path=args.json)


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render the docs)."""
    parser = argparse.ArgumentParser(
        prog="medssl",
        description="Dense self-supervised pretraining for 2D and 3D medical images.",
        epilog="Run 'medssl COMMAND --help' for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"medssl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(sub, name: str, help: str, example: str, handler: Callable) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help, description=help, epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    # medssl data ...
    data = commands.add_parser("data", help="make datasets", description="Make datasets.")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    p = command(
        data_sub, "demo", "write the demo population (MNI ICBM152 anatomy, known deformations, labels, landmarks)",
        "medssl data demo --out demo2d --dim 2 --subjects 24 --seed 0", _data_demo,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--dim", type=int, choices=(2, 3), default=3, help="2D slices or 3D volumes (default 3)")
    p.add_argument("--subjects", type=int, default=8, help="number of subjects (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--plane", choices=("axial", "coronal", "sagittal"), default="axial",
                   help="template plane for --dim 2 (default axial)")

    # medssl pretrain ...
    p = command(
        commands, "pretrain", "self-supervised pretraining (pgssl, infoguided, lewel, msf; torchrun for several processes)",
        "medssl pretrain configs/pgssl_2d.yaml --data demo2d --out runs/pgssl2d train.steps=200 "
        "data.patch_size=[96,96]\n  medssl pretrain runs/pgssl2d/config.yaml --resume runs/pgssl2d",
        _pretrain,
    )
    p.add_argument("config", type=Path, metavar="CONFIG", help="pretraining YAML (see configs/)")
    p.add_argument("--data", type=Path, default=None, help="images: a folder, a datalist JSON or one image (sets data.path)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<method>_<D>d_<time>)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN", help="continue the run in RUN from its last checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config entries, e.g. train.steps=200")

    # medssl evaluate ...
    evaluate = commands.add_parser("evaluate", help="score predictions against ground truth",
                                   description="Score predictions against ground truth.")
    ev_sub = evaluate.add_subparsers(dest="evaluate_command", metavar="COMMAND", required=True)
    p = command(
        ev_sub, "landmarks", "mean radial error (mm) and success detection rates",
        "medssl evaluate landmarks --pred pred.csv --truth demo2d/landmarks.csv --sdr 2,2.5,3,4 --json scores.json",
        _evaluate_landmarks,
    )
    p.add_argument("--pred", type=Path, required=True, help="predicted landmarks CSV")
    p.add_argument("--truth", type=Path, required=True, help="ground-truth landmarks CSV")
    p.add_argument("--sdr", type=_floats, default=[2.0, 2.5, 3.0, 4.0], help="SDR radii in mm (default 2,2.5,3,4)")
    p.add_argument("--json", type=Path, default=None, help="also write the scores as JSON here")
    p = command(
        ev_sub, "seg", "Dice and HD95 (mm) per class",
        "medssl evaluate seg --pred predictions/ --truth demo3d/datalist.json --json seg.json", _evaluate_seg,
    )
    p.add_argument("--pred", type=Path, required=True, help="folder of predicted label maps")
    p.add_argument("--truth", type=Path, required=True, help="folder of true label maps, or a datalist JSON")
    p.add_argument("--json", type=Path, default=None, help="also write the scores as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medssl`` script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow the options: `pretrain CONFIG --out RUN train.steps=5`
        if getattr(args, "overrides", None) is None or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    from medssl.errors import InputError

    try:
        args.handler(args)
    except InputError as err:
        print(f"medssl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medssl: interrupted", file=sys.stderr)
        return 130
    return 0
