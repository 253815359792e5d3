"""The ``medssl`` command line: parse arguments, call the library, map errors to exit codes.

Heavy imports (torch, MONAI, ...) happen inside the handlers so that ``medssl --help`` starts instantly.
Exit status: 0 success; 2 bad input or usage (one line on stderr naming the file); 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from medssl import __version__

log = logging.getLogger("medssl")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 2,2.5,3,4, got '{text}'") from None


def _seed(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got '{text}'")
    return int(text)


# ----------------------------------------------------------------------------------------------- handlers
def _data_demo(args: argparse.Namespace) -> None:
    from medssl.data.demo import write_demo_dataset

    write_demo_dataset(args.out, spatial_dims=args.dim, n_subjects=args.subjects, seed=args.seed, plane=args.plane,
                       variability=args.variability, figures=args.figures)


def _demo(args: argparse.Namespace) -> None:
    from medssl.report.demo import run_demo

    run_demo(args.out, spatial_dims=args.dim, quick=args.quick, variability=args.variability)


def _config_file(args: argparse.Namespace) -> Path:
    """The CONFIG file (a path, or the name of a shipped config); a new run folder must not hold it (writing the
    run's config.yaml would replace it)."""
    from medssl.config import find_config

    config = find_config(args.config)
    if args.out is not None and args.resume is None:
        from medssl.outputs import check_output

        check_output(args.out, kind="folder", inputs=[config])
    return config


def _pretrain(args: argparse.Namespace) -> None:
    from medssl.engine.pretrain import pretrain
    from medssl.engine.pretrain_config import read_pretrain_config

    config = read_pretrain_config(_config_file(args), args.overrides)
    run = pretrain(config, data=args.data, out=args.out, resume=args.resume)
    log.info("run folder: %s", run)


def _prepare(args: argparse.Namespace) -> None:
    from medssl.config import find_config
    from medssl.engine.pretrain import prepare_data
    from medssl.engine.pretrain_config import read_pretrain_config

    config = read_pretrain_config(find_config(args.config), args.overrides)
    prepare_data(config, data=args.data, out=args.out, workers=args.workers)


def _features(args: argparse.Namespace) -> dict[str, Any]:
    """``levels``, ``pyramid`` and ``amp`` keyword arguments from ``--levels``, ``--pyramid`` and ``--amp``."""
    from medssl.matching.run import parse_levels

    return {"levels": None if args.levels is None else parse_levels(args.levels),
            "pyramid": None if args.pyramid is None else parse_levels(args.pyramid, "--pyramid"), "amp": args.amp}


def _landmarks_oneshot(args: argparse.Namespace) -> None:
    from medssl.dist import pick_device
    from medssl.matching.run import detect_landmarks_files

    out = detect_landmarks_files(
        args.checkpoint, args.template, args.template_landmarks, args.images, args.out, method=args.method,
        arch=args.arch, spacing_mm=args.spacing, figure_dir=args.figures, device=pick_device(args.device),
        truth=args.truth, **_features(args), search=args.search, consistency=args.consistency,
        min_score=args.min_score,
    )
    if args.truth is not None:
        from medssl.metrics.report import evaluate_landmarks_files

        evaluate_landmarks_files(out, args.truth)


def _landmarks_select_template(args: argparse.Namespace) -> None:
    from medssl.dist import pick_device
    from medssl.matching.run import rank_templates_files

    rank_templates_files(args.checkpoint, args.images, args.out, arch=args.arch, spacing_mm=args.spacing,
                         n_points=args.points, device=pick_device(args.device), **_features(args))


def _evaluate_landmarks(args: argparse.Namespace) -> None:
    from medssl.metrics.report import evaluate_landmarks_files

    evaluate_landmarks_files(args.pred, args.truth, sdr_radii_mm=args.sdr, json_path=args.json)


def _segment_oneshot(args: argparse.Namespace) -> None:
    from medssl.matching.propagate import propagate_labels_files

    propagate_labels_files(args.checkpoint, args.template, args.template_label, args.images, args.out,
                           method=args.method, arch=args.arch, spacing_mm=args.spacing, device=args.device,
                           support=args.support_points, stride=args.stride, **_features(args))
    if args.truth is not None:
        from medssl.metrics.report import evaluate_segmentation_files

        evaluate_segmentation_files(args.out, args.truth)


def _evaluate_seg(args: argparse.Namespace) -> None:
    from medssl.metrics.report import evaluate_segmentation_files

    evaluate_segmentation_files(args.pred, args.truth, json_path=args.json)


def _labeled(text: str) -> int | None:
    if text.lower() == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of images or 'all', got '{text}'")
    return int(text)


def _finetune(args: argparse.Namespace) -> None:
    from medssl.engine.finetune import finetune
    from medssl.engine.finetune_config import read_finetune_config
    from medssl.errors import InputError

    config = read_finetune_config(_config_file(args), args.overrides)
    if config.task != args.task:
        raise InputError(f"this is a '{config.task}' config; run 'medssl finetune {config.task}' or use a "
                         f"finetune_{args.task}_*.yaml config", path=args.config)
    run = finetune(config, checkpoint=args.checkpoint, data=args.data, out=args.out, labeled=args.labeled,
                   landmarks=getattr(args, "landmarks", None), pseudo=getattr(args, "pseudo", None),
                   resume=args.resume)
    log.info("run folder: %s", run)


def _predict_seg(args: argparse.Namespace) -> None:
    from medssl.engine.predict import predict_seg_files

    predict_seg_files(args.model, args.images, args.out, device=args.device)


def _predict_landmarks(args: argparse.Namespace) -> None:
    from medssl.engine.predict import predict_landmarks_files

    predict_landmarks_files(args.model, args.images, args.out, device=args.device)


def _count(what: str) -> Callable[[str], int]:
    """An argparse type: a whole number >= 1 of ``what`` (anything else is a usage error naming it)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of {what}, got '{text}'") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected at least 1 of {what}, got {value}")
        return value
    return parse


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
    parser.add_argument("--threads", type=_count("threads"), default=None, metavar="N",
                        help="CPU threads of torch (default: torch's choice, one per core, or OMP_NUM_THREADS); use 1 "
                             "for each of several jobs sharing a small machine")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(commands)
    _add_data(commands)
    _add_prepare(commands)
    _add_pretrain(commands)
    _add_landmarks(commands)
    _add_segment(commands)
    _add_finetune(commands)
    _add_predict(commands)
    _add_evaluate(commands)
    return parser


_Subparsers = argparse._SubParsersAction  # what add_subparsers returns


def _command(sub: _Subparsers, name: str, help: str, example: str, handler: Callable) -> argparse.ArgumentParser:
    """A command that runs ``handler``: ``help`` is also its description, ``example`` its epilog."""
    p = sub.add_parser(
        name, help=help, description=help, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(handler=handler)
    return p


def _group(sub: _Subparsers, name: str, help: str) -> _Subparsers:
    """A command group (``medssl NAME COMMAND``); its description is ``help`` as a sentence."""
    group = sub.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}.")
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


# shared options: each written once, with the help text of the commands that take it
def _out_option(p: argparse.ArgumentParser, help: str, metavar: str | None = None, required: bool = False,
                default: Path | None = None) -> None:
    p.add_argument("--out", type=Path, required=required, default=default, metavar=metavar, help=help)


def _dim_option(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--dim", type=int, choices=(2, 3), default=default,
                   help=f"2D slices or 3D volumes (default {default})")


def _seed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=_seed, default=0, help="random seed >= 0 (default 0)")


def _variability_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variability", choices=("realistic", "low"), default="realistic",
                   help="realistic (default): pose, size, shape, tissue contrast, bias and noise vary as in real "
                        "scans; low: the former easy population (small warps), for fast tests")


def _config_argument(p: argparse.ArgumentParser, kind: str, names: str) -> None:
    p.add_argument("config", type=Path, metavar="CONFIG",
                   help=f"{kind} YAML, or the name of a shipped config ({names})")


def _resume_option(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--resume", type=Path, default=None, metavar="RUN",
                   help=f"continue the run in RUN from its last checkpoint{note}")


def _overrides_argument(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"override config entries, e.g. {example}")


def _checkpoint_option(p: argparse.ArgumentParser, init: str, note: str = "", required: bool = False) -> None:
    p.add_argument("--checkpoint", metavar="CKPT", required=required, default=None,
                   help=f"pretraining run folder, its model.pt, or 'none' (random init of {init}){note}")


def _images_option(p: argparse.ArgumentParser, purpose: str = "", note: str = "") -> None:
    p.add_argument("--images", type=Path, nargs="+", required=True, metavar="PATH",
                   help=f"{purpose}{': ' if purpose else ''}folders, datalist JSONs or image files{note}")


def _arch_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default=None, metavar="SIZE",
                   help="U-Net size when CKPT is 'none': small (default) or base")


def _spacing_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spacing", type=float, default=None, metavar="MM",
                   help="pixel size of 2D files without geometry (default: the model's, else 1.0 mm)")


def _device_option(p: argparse.ArgumentParser, help: str = "where the network runs (default auto)") -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=help)


def _feature_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--levels", default=None, metavar="L,L",
                   help="feature levels to match with, comma-separated: 0 = bottleneck, then the decoder "
                        "levels coarse to fine (default: those the pretraining objectives trained, as model.pt "
                        "records; all for --checkpoint none or a model.pt without the record)")
    p.add_argument("--pyramid", default=None, metavar="F,F",
                   help="also embed each image at these multiples of its working spacing (block means), "
                        "comma-separated, including 1: e.g. 1,2 doubles the context in mm (default: the "
                        "pretraining's data.pyramid, as model.pt records; 1 for --checkpoint none)")
    p.add_argument("--amp", choices=("off", "bf16"), default="off",
                   help="the network's precision when embedding: off (float32, default) or bf16 (autocast; faster on "
                        "CPUs with native bfloat16 such as AMX; emulated, untested for speed, on other CPUs)")


def _json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=None, help="also write the scores as JSON here")


# medssl demo
def _add_demo(commands: _Subparsers) -> None:
    p = _command(
        commands, "demo", "the whole pipeline on embedded data: demo dataset, pretraining, one-shot landmarks and "
        "segmentation transfer against a random-init baseline; writes DIR/report.md with tables and figures",
        "medssl demo --out medssl_demo            # 2D, about 15 minutes on a 2-core CPU\n"
        "  medssl demo --out demo_quick --quick     # smoke size, about 3 minutes\n"
        "  medssl demo --out demo3d --dim 3", _demo,
    )
    _out_option(p, "output folder (default medssl_demo); a previous demo in it is replaced, any other non-empty "
                   "folder is refused", metavar="DIR", default=Path("medssl_demo"))
    _dim_option(p, default=2)
    p.add_argument("--quick", action="store_true", help="smoke size: fewer subjects and steps (about 3 minutes)")
    _variability_option(p)


# medssl data ...
def _add_data(commands: _Subparsers) -> None:
    sub = _group(commands, "data", "make datasets")
    _add_data_demo(sub)


def _add_data_demo(sub: _Subparsers) -> None:
    p = _command(
        sub, "demo", "write the demo population (MNI ICBM152 anatomy, known deformations, labels, landmarks)",
        "medssl data demo --out demo2d --dim 2 --subjects 24 --seed 0 --figures\n"
        "  medssl data demo --out easy3d --dim 3 --variability low", _data_demo,
    )
    _out_option(p, "output folder", required=True)
    _dim_option(p, default=3)
    p.add_argument("--subjects", type=int, default=8, help="number of subjects (default 8)")
    _seed_option(p)
    p.add_argument("--plane", choices=("axial", "coronal", "sagittal"), default="axial",
                   help="template plane for --dim 2 (default axial)")
    _variability_option(p)
    p.add_argument("--figures", action="store_true",
                   help="also write a QC figure (template and first subjects, landmarks, labels) to OUT/figures/")


# medssl prepare ...
def _add_prepare(commands: _Subparsers) -> None:
    p = _command(
        commands, "prepare", "preprocess a pretraining set once into a cache folder (resampled scans and information "
        "maps as memory-mappable files), in parallel; pretraining with data.cache_dir=CACHE then starts at once",
        "medssl prepare ct_scans --config infoguided_3d --out cache/ct --workers 8\n"
        "  medssl pretrain infoguided_3d --data ct_scans data.cache_dir=cache/ct", _prepare,
    )
    p.add_argument("data", type=Path, metavar="DATA", help="images: a folder, a datalist JSON or one image")
    p.add_argument("--config", type=Path, required=True, metavar="CONFIG",
                   help="the pretraining YAML, or the name of a shipped config (its data section and objectives say "
                        "how to prepare)")
    _out_option(p, "cache folder (default: the config's data.cache_dir); up-to-date entries are kept", metavar="CACHE")
    p.add_argument("--workers", type=_count("threads"), default=None, metavar="N",
                   help="processes preparing scans in parallel (default: the CPU count, at most 8)")
    _overrides_argument(p, "data.spacing_mm=2.0")


# medssl pretrain ...
def _add_pretrain(commands: _Subparsers) -> None:
    p = _command(
        commands, "pretrain", "self-supervised pretraining (pgssl, infoguided, lewel, msf; torchrun for several processes)",
        "medssl pretrain configs/pgssl_2d.yaml --data demo2d --out runs/pgssl2d train.steps=200 "
        "data.patch_size=[96,96]\n  medssl pretrain infoguided_2d --data demo2d --out runs/infoguided2d\n"
        "  medssl pretrain runs/pgssl2d/config.yaml --resume runs/pgssl2d",
        _pretrain,
    )
    _config_argument(p, "pretraining", "<method>_<D>d, e.g. infoguided_2d")
    p.add_argument("--data", type=Path, default=None, help="images: a folder, a datalist JSON or one image (sets data.path)")
    _out_option(p, "run folder (default runs/<method>_<D>d_<time>)")
    _resume_option(p)
    _overrides_argument(p, "train.steps=200")


# medssl landmarks ...
def _add_landmarks(commands: _Subparsers) -> None:
    sub = _group(commands, "landmarks", "one-shot landmark detection from one labeled template")
    _add_landmarks_oneshot(sub)
    _add_landmarks_select_template(sub)


def _add_landmarks_oneshot(sub: _Subparsers) -> None:
    p = _command(
        sub, "oneshot", "find a labeled template's landmarks in new images (pretrained dense embedding, or the "
        "ncc / registration baselines)",
        "medssl landmarks oneshot --checkpoint runs/pgssl_2d --template demo2d/images/subject_000.png "
        "--template-landmarks demo2d/landmarks.csv --images demo2d/images --out pred.csv --truth demo2d/landmarks.csv"
        "\n  medssl landmarks oneshot --method ncc --template demo2d/images/subject_000.png --template "
        "demo2d/images/subject_001.png --template-landmarks demo2d/landmarks.csv --images demo2d/images --out ncc.csv",
        _landmarks_oneshot,
    )
    _checkpoint_option(p, "--arch", note="; needed by --method embedding")
    p.add_argument("--template", type=Path, action="append", required=True, metavar="IMG",
                   help="the labeled template image; repeat for an ensemble of templates")
    p.add_argument("--template-landmarks", type=Path, action="append", required=True, metavar="CSV",
                   help="the templates' landmarks (world mm): one CSV for all templates, or one per --template")
    _images_option(p, "images to find the landmarks in")
    _out_option(p, "predicted landmarks: image,name,x,y[,z],score (world mm)", metavar="PRED.csv", required=True)
    p.add_argument("--method", choices=("embedding", "ncc", "registration"), default="embedding",
                   help="embedding: cosine matching of the network's multi-scale features (default); ncc: intensity "
                        "template matching; registration: affine + B-spline registration of the template")
    _arch_option(p)
    _spacing_option(p)
    p.add_argument("--figures", type=Path, default=None, metavar="DIR",
                   help="write a PNG of each template and image with its predicted (and true) landmarks here")
    p.add_argument("--truth", type=Path, default=None, metavar="CSV",
                   help="true landmarks: drawn in the figures, and MRE/SDR are reported after predicting")
    _device_option(p)
    _feature_options(p)
    p.add_argument("--search", choices=("global", "coarse-to-fine"), default="global",
                   help="embedding: each landmark's own match is the best point of the whole image (global, "
                        "default) or found coarse level first, finer levels only near it (coarse-to-fine)")
    p.add_argument("--consistency", choices=("thin-plate", "outliers", "dense", "none"), default=None,
                   help="embedding: read each landmark off a robust thin-plate spline through the matches of the "
                        "landmarks and of a grid of template support points (thin-plate; stops jumps to look-alike "
                        "structures), only the landmarks whose own match the spline rejects (outliers), off that "
                        "spline refined by registering the features densely (dense), or keep "
                        "each landmark's own best match (none); default thin-plate in 2D, dense in 3D")
    p.add_argument("--min-score", type=float, default=None, metavar="S",
                   help="leave landmarks scoring below S out of the CSV (reported missing) instead of guessing")


def _add_landmarks_select_template(sub: _Subparsers) -> None:
    p = _command(
        sub, "select-template", "rank unlabeled images as one-shot templates (SCP-style: how well each image's "
        "salient points are found in all the others); label the first one",
        "medssl landmarks select-template --checkpoint runs/pgssl_2d --images demo2d/images --out ranking.csv",
        _landmarks_select_template,
    )
    _checkpoint_option(p, "--arch", required=True)
    _images_option(p, "candidate templates", note=" (at least two images)")
    _out_option(p, "ranking: rank,image,score (rank 1 = best)", metavar="RANKING.csv", required=True)
    p.add_argument("--points", type=int, default=16, help="salient points per image (default 16)")
    _arch_option(p)
    _spacing_option(p)
    _device_option(p)
    _feature_options(p)


# medssl finetune ...
def _add_finetune(commands: _Subparsers) -> None:
    sub = _group(commands, "finetune", "fine-tune a task head on a pretrained (or random) U-Net")
    _add_finetune_seg(sub)
    _add_finetune_landmarks(sub)


def _add_finetune_seg(sub: _Subparsers) -> None:
    _finetune_command(
        sub, "seg", "segmentation transfer: U-Net + segmentation head, DiceCE loss, best validation Dice kept",
        "medssl finetune seg configs/finetune_seg_2d.yaml --checkpoint runs/pgssl_2d --data demo2d/datalist.json "
        "--labeled 3 --out runs/seg2d_n3\n  medssl finetune seg configs/finetune_seg_2d.yaml --checkpoint none "
        "--data demo2d/datalist.json --labeled 3 --out runs/seg2d_n3_none train.steps=50\n  medssl finetune seg "
        "configs/finetune_seg_2d.yaml --checkpoint runs/pgssl_2d --data demo2d/datalist.json --labeled 1 --pseudo "
        "seg_oneshot/ --out runs/seg2d_tpl",
        task_options=_finetune_seg_options,
    )


def _finetune_seg_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pseudo", type=Path, default=None, metavar="DIR",
                   help="label maps of the unlabeled training images, e.g. from 'medssl segment oneshot' (stage 2)")


def _add_finetune_landmarks(sub: _Subparsers) -> None:
    _finetune_command(
        sub, "landmarks", "supervised landmarks: Gaussian heatmap head (sigma in mm), best validation MRE kept",
        "medssl finetune landmarks configs/finetune_landmarks_2d.yaml --checkpoint runs/pgssl_2d --data "
        "demo2d/datalist.json --landmarks demo2d/landmarks.csv --labeled 3 --out runs/lm2d_n3\n  "
        "medssl finetune landmarks configs/finetune_landmarks_2d.yaml --checkpoint runs/pgssl_2d --data "
        "demo2d/datalist.json --landmarks demo2d/landmarks.csv --labeled 1 --pseudo oneshot.csv --out runs/lm2d_tpl",
        task_options=_finetune_landmarks_options,
    )


def _finetune_landmarks_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--landmarks", type=Path, default=None, metavar="CSV", help="true landmarks (world mm)")
    p.add_argument("--pseudo", type=Path, default=None, metavar="PRED.csv",
                   help="one-shot predictions for the unlabeled training images (CC2D stage 2)")


def _finetune_command(sub: _Subparsers, task: str, help: str, example: str,
                      task_options: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """``medssl finetune TASK``: the options every task takes, with ``task_options`` after ``--data``."""
    p = _command(sub, task, help, example, _finetune)
    p.set_defaults(task=task)
    _config_argument(p, "fine-tuning", f"finetune_{task}_<D>d")
    _checkpoint_option(p, "the same architecture")
    p.add_argument("--data", type=Path, default=None, metavar="DATALIST",
                   help="MONAI datalist JSON (training entries; validation entries if any, else a held-out part)")
    if task_options is not None:
        task_options(p)
    p.add_argument("--labeled", type=_labeled, default=None, metavar="N",
                   help="train on N labeled images (seeded choice, logged in RUN/split.json; default all)")
    _out_option(p, "run folder", metavar="RUN")
    _resume_option(p, note=" (pass RUN/config.yaml as CONFIG)")
    _overrides_argument(p, "train.steps=50")


# medssl predict ...
def _add_predict(commands: _Subparsers) -> None:
    sub = _group(commands, "predict", "apply a fine-tuned model to images")
    _add_predict_seg(sub)
    _add_predict_landmarks(sub)


def _add_predict_seg(sub: _Subparsers) -> None:
    p = _command(sub, "seg", "write label maps with the same shape and geometry as the input images",
                 "medssl predict seg --model runs/seg2d_n3 --images demo2d/images --out predictions/", _predict_seg)
    _out_option(p, "folder for the label maps", metavar="DIR", required=True)
    _predict_inputs(p)


def _add_predict_landmarks(sub: _Subparsers) -> None:
    p = _command(sub, "landmarks", "write predicted landmarks (world mm) with a score column",
                 "medssl predict landmarks --model runs/lm2d_n3 --images demo2d/images --out pred.csv",
                 _predict_landmarks)
    _out_option(p, "landmark CSV to write", metavar="PRED.csv", required=True)
    _predict_inputs(p)


def _predict_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, metavar="RUN", help="fine-tuning run folder or model.pt")
    _images_option(p)
    _device_option(p, help="default auto")


# medssl evaluate ...
# medssl segment ...
def _add_segment(commands: _Subparsers) -> None:
    sub = _group(commands, "segment", "one-shot segmentation from one labeled template")
    _add_segment_oneshot(sub)


def _add_segment_oneshot(sub: _Subparsers) -> None:
    p = _command(
        sub, "oneshot", "carry a labeled template's label map to new images, no training (dense feature "
        "correspondence, or the registration baseline)",
        "medssl segment oneshot --checkpoint runs/infoguided_2d --template demo2d/images/subject_000.png "
        "--template-label demo2d/labels/subject_000.png --images demo2d/images --out seg/ --truth demo2d/datalist.json",
        _segment_oneshot,
    )
    _checkpoint_option(p, "--arch", note="; needed by --method embedding")
    p.add_argument("--template", type=Path, required=True, metavar="IMG", help="the labeled template image")
    p.add_argument("--template-label", type=Path, required=True, metavar="LBL",
                   help="the template's label map (integer labels on the template's grid)")
    _images_option(p, "images to segment")
    _out_option(p, "folder for the label maps (each input's name, format and geometry)", metavar="DIR",
                required=True)
    p.add_argument("--method", choices=("embedding", "registration"), default="embedding",
                   help="embedding: a robust spline through matched support points, each voxel's template position "
                        "then refined by a feature-similarity vote, labels read there (default); registration: "
                        "affine + B-spline registration, labels warped by nearest neighbour")
    _arch_option(p)
    _spacing_option(p)
    p.add_argument("--truth", type=Path, default=None, metavar="DATALIST",
                   help="true label maps (a folder or a datalist JSON): Dice and HD95 are reported after predicting")
    p.add_argument("--support-points", type=_count("support points"), default=None, metavar="N",
                   help="about N template points are matched for the spline (default 512; 128 is about 4x faster "
                        "to match, at some cost in Dice: docs/segmentation.md)")
    p.add_argument("--stride", type=_count("voxels"), default=None, metavar="S",
                   help="the vote's grid stride in voxels (default 2; 4 is faster at some cost in Dice)")
    _device_option(p)
    _feature_options(p)


def _add_evaluate(commands: _Subparsers) -> None:
    sub = _group(commands, "evaluate", "score predictions against ground truth")
    _add_evaluate_landmarks(sub)
    _add_evaluate_seg(sub)


def _add_evaluate_landmarks(sub: _Subparsers) -> None:
    p = _command(
        sub, "landmarks", "mean radial error (mm) and success detection rates",
        "medssl evaluate landmarks --pred pred.csv --truth demo2d/landmarks.csv --sdr 2,2.5,3,4 --json scores.json",
        _evaluate_landmarks,
    )
    p.add_argument("--pred", type=Path, required=True, help="predicted landmarks CSV")
    p.add_argument("--truth", type=Path, required=True, help="ground-truth landmarks CSV")
    p.add_argument("--sdr", type=_floats, default=[2.0, 2.5, 3.0, 4.0], help="SDR radii in mm (default 2,2.5,3,4)")
    _json_option(p)


def _add_evaluate_seg(sub: _Subparsers) -> None:
    p = _command(
        sub, "seg", "Dice and HD95 (mm) per class",
        "medssl evaluate seg --pred predictions/ --truth demo3d/datalist.json --json seg.json", _evaluate_seg,
    )
    p.add_argument("--pred", type=Path, required=True, help="folder of predicted label maps")
    p.add_argument("--truth", type=Path, required=True, help="folder of true label maps, or a datalist JSON")
    _json_option(p)


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
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)  # the command owns this process
    from medssl.errors import MedsslError

    try:
        args.handler(args)
    except MedsslError as err:  # bad input, or a run that diverged: one line, no traceback
        print(f"medssl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medssl: interrupted", file=sys.stderr)
        return 130
    return 0
