"""What a demo ran, on what (the report's "What ran" section), and the commands that rerun each stage."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

from medssl import __version__
from medssl.data.demo import population_variability
from medssl.data.landmarks import read_landmarks
from medssl.data.readers import image_key, load_image
from medssl.engine.finetune_config import read_finetune_config
from medssl.report.figures import read_metric
from medssl.report.markdown import Row
from medssl.report.plan import NCC, DemoSize, Split, slug

def describe(split: Split, config: Any, size: DemoSize, checkpoints: dict[str, Path], seg_rows: list[Row], device: str,
             seed: int) -> dict[str, dict[str, str]]:
    """The report's "What ran" items: machine, dataset, pretraining, one-shot landmarks, segmentation transfer."""
    if torch.device(device).type == "cuda":
        machine = f"CUDA GPU {torch.cuda.get_device_name(0)} (mixed precision: train.amp {config.train.amp})"
    else:
        machine = f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    first = load_image(split.template)
    spacing = np.linalg.norm(first.affine.numpy()[:-1, :-1], axis=0)
    names = read_landmarks(split.root / "landmarks.csv")[image_key(split.template)]
    variability = population_variability(split.root)
    steps, loss = read_metric(next(iter(checkpoints.values())) / "metrics.csv", "loss")
    seg = read_finetune_config(seg_rows[0].source / "config.yaml")
    chosen = json.loads((seg_rows[0].source / "split.json").read_text(encoding="utf-8"))["labeled"]
    return {
        "Machine": {"device": machine, "software": f"medssl {__version__}, torch {torch.__version__}, "
                    f"MONAI {monai.__version__}, Python {platform.python_version()} ({platform.system()})"},
        "Dataset": {
            "population": f"{size.subjects} {config.spatial_dims}D subjects warped from the MNI ICBM152 2009a "
                          f"template ({variability} variability, seed {seed}), images {tuple(first.shape[1:])} at "
                          f"{' x '.join(f'{s:g}' for s in spacing)} mm, {len(names)} landmarks, 3 tissue classes",
            "split": f"{len(split.pool)} training pool (unlabeled for pretraining), {len(split.validation)} "
                     f"validation (picks the fine-tuned model), {len(split.test)} test (every score)",
        },
        "Pretraining": {
            "method": f"{config.name} (shipped config"
                      f"{'; ' + '; '.join(size.pretrain) if size.pretrain else ''})",
            "training": f"{config.train.steps} steps, batch {config.train.batch_size}, patch "
                        f"{'x'.join(map(str, config.data['patch_size']))}, lr {config.train.lr:g}",
            "loss": f"{loss[0]:.4g} at step {steps[0]} -> {loss[-1]:.4g} at step {steps[-1]}" if len(loss) else "n/a",
            "random init": "the weights pretraining started from (same architecture, preprocessing and seed)",
        },
        "One-shot landmarks": {
            "template": f"{split.template.name} (its {len(names)} landmarks are the only labels used)",
            "matching": "multi-scale cosine similarity of the networks' dense features (product over the levels "
                        "the objective trained, all for random init; sub-pixel refinement); NCC: intensity template "
                        "matching",
        },
        "Segmentation transfer": {
            "labels": f"{size.labeled} labeled image(s): {', '.join(chosen)} (the same for every initialisation)",
            "training": f"{seg.train.steps} steps, batch {seg.train.batch_size}, patch "
                        f"{'x'.join(map(str, seg.data.patch_size))}, DiceCE, seed {seg.seed}; the best validation "
                        f"Dice is kept",
        },
    }


def commands(out: Path, split: Split, checkpoints: dict[str, Path], seg_rows: list[Row], spatial_dims: int,
             size: DemoSize, seed: int) -> list[str]:
    """Shell commands that rerun each stage from the demo's files."""
    truth, test = split.root / "landmarks.csv", split.root / "test.json"
    pretrained = next(iter(checkpoints.values()))
    lines = [f"medssl data demo --out {split.root} --dim {spatial_dims} --subjects {size.subjects} --seed {seed} "
             f"--variability {population_variability(split.root)}",
             f"# {split.root}/split.json, pool.json, test.json: the last {size.test} subjects test, the "
             f"{size.val} before them validate, the others are the training pool",
             f"medssl pretrain {pretrained}/config.yaml --out {out}/runs/pretrained_again"]
    lines += [f"medssl landmarks oneshot --checkpoint {checkpoint} --template {split.template} "
              f"--template-landmarks {truth} --images {test} --out {out}/landmarks/{slug(label)}.csv --truth {truth}"
              for label, checkpoint in checkpoints.items()]
    lines.append(f"medssl landmarks oneshot --method ncc --template {split.template} --template-landmarks {truth} "
                 f"--images {test} --out {out}/landmarks/{slug(NCC)}.csv --truth {truth}")
    for row in seg_rows:
        lines += [f"medssl finetune seg {row.source}/config.yaml --out {row.source}_again",
                  f"medssl predict seg --model {row.source} --images {test} --out {out}/segmentation/{slug(row.label)}",
                  f"medssl evaluate seg --pred {out}/segmentation/{slug(row.label)} --truth {split.root}/split.json"]
    return lines
