"""The fine-tuning loop (``medssl finetune seg|landmarks``): a plain, guarded PyTorch loop that reads top to bottom.

config + checkpoint (a pretraining run, or ``none`` = random init of the same architecture) -> ``TaskUNet`` (the
U-Net, encoder and decoder, + a 1x1 head) -> labeled / validation split -> for each step: random patches, loss
(``DiceCELoss`` or masked heatmap loss; AMP on CUDA), NaN guard, backward, gradient clipping, AdamW + warm-up/cosine
step -> every ``val_every`` steps: sliding-window validation, ``model.pt`` when the score is the best so far, and an
atomic checkpoint for ``--resume``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
from monai.losses import DiceCELoss
from torch import nn

from medssl.config import save_config, to_dict
from medssl.dist import pick_device
from medssl.engine.finetune_config import (FinetuneConfig, FinetuneTrainConfig, finetune_config_from_dict,
                                          read_finetune_config)
from medssl.engine.finetune_data import PatchSampler, prepare_data
from medssl.engine.memory import check_memory, raise_if_out_of_memory
from medssl.engine.monitor import VALIDATION_PREFIX, Monitor
from medssl.engine.predict import Predictor, score_cases
from medssl.engine.runner import (CHECKPOINT, OptimizerStep, check_finite, log_cpu_threads, new_run, resumed_run,
                                  save_checkpoint, seed_run)
from medssl.engine.schedule import build_optimizer, build_scheduler, parameter_groups
from medssl.errors import InputError, TrainingError
from medssl.networks import UNet
from medssl.networks.heatmaps import adaptive_wing_loss, foreground_weights, gaussian_heatmaps, masked_mean
from medssl.networks.model_file import NO_CHECKPOINT, is_random_init, load_network, save_model
from medssl.networks.task import PARTS, TaskUNet
from medssl.outputs import undone_on_failure, write_atomic
from medssl.rng import capture_rng, global_state_kept, restore_rng

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
#: config keys that may differ between a run and its resumption (they do not change the trained weights)
RESUME_MAY_CHANGE = ("train.device", "train.log_every")
#: the validation score that picks the best model, and whether higher is better, per task
SELECTION = {"seg": ("mean_dice", True), "landmarks": ("mre_mm", False)}


def finetune(config: FinetuneConfig | str | Path, *, checkpoint: str | Path | None = None,
             data: str | Path | None = None, out: str | Path | None = None, labeled: int | None = None,
             landmarks: str | Path | None = None, pseudo: str | Path | None = None,
             resume: str | Path | None = None) -> Path:
    """Fine-tune a task head on a pretrained (or ``"none"``: randomly initialised) U-Net; returns the run folder
    (``config.yaml``, ``model.pt`` = best validation score, ``split.json``, ``metrics.csv``, TensorBoard events,
    ``checkpoints/last.pt``).

    The arguments set the config's ``checkpoint``, ``data.path``, ``data.labeled``, ``data.landmarks`` and
    ``data.pseudo`` (pseudo-labels of the unlabeled pool: a landmark CSV, or for ``seg`` a folder of label maps named
    after the images); ``out`` is the run folder (default ``runs/finetune_<task>_<D>d_<time>``); ``resume``
    continues the run in that folder from its last checkpoint (same config except ``RESUME_MAY_CHANGE``).
    The run is deterministic from ``config.seed``: it seeds the global generators (``monai.utils.set_determinism``)
    and sets torch's determinism flags, and puts both back as they were when it returns or fails.
    """
    if not isinstance(config, FinetuneConfig):
        config = read_finetune_config(config)
    section = to_dict(config.data)
    section.update({key: str(Path(value).resolve()) for key, value in
                    {"path": data, "landmarks": landmarks, "pseudo": pseudo}.items() if value is not None})
    if labeled is not None:
        section["labeled"] = labeled
    if checkpoint is not None:
        checkpoint = NO_CHECKPOINT if is_random_init(checkpoint) else str(Path(checkpoint).resolve())
    config = finetune_config_from_dict({**to_dict(config), "data": section,
                                        "checkpoint": checkpoint if checkpoint is not None else config.checkpoint})
    if config.checkpoint is None:
        raise InputError("no checkpoint: pass --checkpoint RUN (a pretraining run or its model.pt) or 'none'")
    if config.data.path is None:
        raise InputError("no training data: pass --data DATALIST (a MONAI datalist JSON)")
    if config.task == "landmarks" and config.data.landmarks is None:
        raise InputError("landmark fine-tuning needs the true landmarks: pass --landmarks CSV")
    run, resume_state = _run_folder(config, out, resume)
    with undone_on_failure(run, run / CHECKPOINT, enabled=resume_state is None), global_state_kept():
        return _train(config, run, resume_state)


# -------------------------------------------------------------------------------------------------- network
def build_task_network(config: FinetuneConfig, head_channels: int) -> tuple[TaskUNet, dict[str, Any]]:
    """The ``TaskUNet`` with the checkpoint's weights (or random ones for ``none``: the ``network`` section's
    architecture) and the checkpoint's preprocessing (empty for ``none``). The initialisation depends only on
    ``config.seed`` (the caller's RNG untouched)."""
    random_init = is_random_init(config.checkpoint)
    loaded = load_network(config.checkpoint, config.spatial_dims, head_channels=head_channels, seed=config.seed,
                          architecture=config.network if random_init else None, dims_of="the config is")
    if not random_init:
        architecture = {k: v for k, v in loaded.payload["network"].items() if k != "head_channels"}
        if UNet(config.spatial_dims, **config.network).get_config() != architecture:
            log.warning("config section 'network' ignored: the architecture comes from %s (%s)", config.checkpoint,
                        architecture)
        if config.train.decoder_init == "random":  # the pretrained encoder under a decoder as random init has it
            fresh = load_network(NO_CHECKPOINT, config.spatial_dims, head_channels=head_channels, seed=config.seed,
                                 architecture={k: v for k, v in architecture.items() if k != "spatial_dims"}).network
            for mine, new in zip(loaded.network.parts()["decoder"], fresh.parts()["decoder"]):
                mine.load_state_dict(new.state_dict())
            log.info("decoder initialised at random (train.decoder_init=random); encoder from %s", config.checkpoint)
    return loaded.network.train(), loaded.preprocessing


def _check_preprocessing(config: FinetuneConfig, pretrained: dict[str, Any]) -> None:
    for key in ("modality", "spacing_mm", "intensity_window"):
        if key in pretrained and pretrained[key] != getattr(config.data, key):
            log.warning("data.%s=%r differs from the pretraining run's %r; set data.%s=%r to prepare images alike",
                        key, getattr(config.data, key), pretrained[key], key, pretrained[key])


def layerwise_optimizer(network: TaskUNet, train: FinetuneTrainConfig) -> tuple[torch.optim.Optimizer, list[nn.Module]]:
    """AdamW with layer-wise learning rates (``lr * encoder_lr_scale``, ``lr * decoder_lr_scale``, ``lr`` for the
    head); a part with scale 0 is frozen and returned (its modules stay in eval mode)."""
    scales = {"encoder": train.encoder_lr_scale, "decoder": train.decoder_lr_scale, "head": 1.0}
    groups, frozen = [], []
    for part in PARTS:
        modules = network.parts()[part]
        if scales[part] == 0:
            for module in modules:
                module.requires_grad_(False)
            frozen += modules
            continue
        for group in parameter_groups(modules, train.weight_decay):
            if group["params"]:
                groups.append({**group, "lr": train.lr * scales[part]})
    return build_optimizer(groups, name="adamw", lr=train.lr), frozen


def _set_frozen(modules: list[nn.Module], frozen: bool, step: int) -> None:
    """Freeze (no gradients, so AdamW skips them) or release ``modules`` for the encoder warm-up
    (``train.freeze_encoder_steps``); logs the change at ``step``."""
    for module in modules:
        module.requires_grad_(not frozen)
    log.info("step %d: encoder %s", step + 1, "frozen for the warm-up" if frozen else "trains from here")


def task_loss(config: FinetuneConfig) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """``loss(outputs, batch)``: ``DiceCELoss`` on logits and label maps, or the adaptive wing / MSE heatmap loss
    averaged over the landmarks present in each image."""
    if config.task == "seg":
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, **config.seg.loss)
        return lambda outputs, batch: dice_ce(outputs.float(), batch.label)
    heads = config.landmarks
    pointwise = adaptive_wing_loss if heads.loss == "awing" else lambda p, t: (p - t) ** 2

    def heatmap_loss(outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        targets = gaussian_heatmaps(batch.coords, batch.points_mm, heads.sigma_mm)  # (B, L, *P)
        weights = foreground_weights(targets, heads.foreground_weight)
        return masked_mean(weights * pointwise(outputs.float(), targets), batch.present)

    return heatmap_loss


# ----------------------------------------------------------------------------------------------------- loop
def _train(config: FinetuneConfig, run: Path, resume_state: dict[str, Any] | None) -> Path:
    train, device = config.train, pick_device(config.train.device, option="train.device")
    seed_run(config.seed, train.deterministic, device)
    log_cpu_threads(device)
    data, record = prepare_data(config)
    network, pretrained = build_task_network(config, data.head_channels)
    _check_preprocessing(config, pretrained)
    if any(p % network.min_size_divisor for p in config.data.patch_size):
        raise InputError(f"data.patch_size {config.data.patch_size} must be a multiple of "
                         f"{network.min_size_divisor} for this U-Net (depth {network.depth})")
    memory = dict(patch_size=config.data.patch_size, batch_size=train.batch_size, device=device)
    estimate = check_memory(network, spatial_dims=config.spatial_dims, images_per_sample=1, **memory)
    if resume_state is None:  # only now: a run refused above leaves no folder behind
        (run / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
        save_config(config, run / "config.yaml")
    write_atomic(run / SPLIT_FILE, json.dumps(record, indent=2) + "\n")
    network = network.to(device)
    optimizer, frozen = layerwise_optimizer(network, train)
    scheduler = build_scheduler(optimizer, steps=train.steps, warmup_steps=train.warmup_steps,
                                min_lr_ratio=train.min_lr_ratio)
    updater = OptimizerStep(optimizer, scheduler, parameters=network.parameters(), grad_clip=train.grad_clip,
                            amp=train.amp, device=device, cpu_amp=train.cpu_amp)
    metric, higher_is_better = SELECTION[config.task]
    state: dict[str, Any] = {"step": 0, "best": None, "best_step": 0, "last": math.nan}
    if resume_state is not None:
        state = _load_checkpoint(resume_state, network, updater)
    options = config.data
    sampler = PatchSampler(data.train, patch_size=options.patch_size, num_classes=data.num_classes,
                           augment=options.augment, rotate_deg=options.rotate_deg, scale_range=options.scale_range,
                           seed=config.seed, anchors=data.anchors)
    predictor = Predictor(network, patch_size=options.patch_size, task=data.task, device=device, amp=train.amp)
    loss_fn = task_loss(config)
    preprocessing = {**config.preprocessing.to_dict(), "patch_size": list(options.patch_size)}
    monitor = Monitor(run, steps=train.steps, start_step=state["step"], log_every=train.log_every, prefix="finetune")
    log.info("fine-tuning %s from %s for %d steps on %s -> %s", config.name, config.checkpoint, train.steps, device,
             run)
    try:
        for step in range(state["step"], train.steps):
            warming = step < train.freeze_encoder_steps  # the encoder frozen while the decoder and head adapt
            if train.freeze_encoder_steps and train.encoder_lr_scale > 0 and step in (state["step"],
                                                                                       train.freeze_encoder_steps):
                _set_frozen(network.parts()["encoder"], warming, step)
            network.train()
            for module in frozen + (network.parts()["encoder"] if warming else []):
                module.eval()
            batch = sampler.sample(step, train.batch_size).to(device)
            with updater.autocast():
                loss = loss_fn(network(batch.image), batch)
            value = float(loss.detach())
            kept = (f"model.pt from step {state['best_step']} is kept" if state["best_step"]
                    else "no model had been written yet")
            check_finite(value, step + 1, kept=kept, run=run,
                         advice="Lower train.lr, set train.grad_clip, or check the data and labels")
            lr = updater.step(loss, lr_group=-1)  # the head's
            validated: dict[str, float] = {}
            if (step + 1) % train.val_every == 0 or step + 1 == train.steps:
                scores = score_cases(predictor, data.validation)
                state["last"] = float(scores[metric])
                if _better(state["last"], state["best"], higher_is_better):
                    state.update(best=state["last"], best_step=step + 1)
                    save_model(network, run / "model.pt", spatial_dims=config.spatial_dims,
                               preprocessing=preprocessing, task=data.task.to_dict(),
                               validation={"step": step + 1, **scores})
                    log.debug("step %d: best validation %s so far (%.4g): model.pt written", step + 1, metric,
                              state["best"])
                state["step"] = step + 1
                validated[f"{VALIDATION_PREFIX}{metric}"] = state["last"]
                save_checkpoint(run, {"config": to_dict(config), "state": dict(state),
                                      "network": network.state_dict(), **updater.state_dict(), "rng": capture_rng()})
            monitor.step(step + 1, {"loss": value, "lr": lr, **validated}, force=bool(validated))
    except (RuntimeError, MemoryError) as error:
        kept = (f"the best model so far (step {state['best_step']}) is kept in {run / 'model.pt'}" if state["best_step"]
                else "no model had been written yet")
        raise_if_out_of_memory(error, run=run, estimate_bytes=estimate, kept=kept, **memory)
        raise
    finally:
        monitor.close()
    if state["best"] is None:
        raise TrainingError(f"validation {metric} was never finite; no model.pt was written", path=run)
    log.info("finished: %s (best validation %s %.4g at step %d)", run / "model.pt", metric, state["best"],
             state["best_step"])
    return run


def _better(value: float, best: float | None, higher_is_better: bool) -> bool:
    """Whether a finite validation ``value`` beats ``best`` (None: nothing yet)."""
    if not math.isfinite(value):
        return False
    return best is None or (value > best if higher_is_better else value < best)


# ----------------------------------------------------------------------------------------------------- runs
def _run_folder(config: FinetuneConfig, out: str | Path | None,
                resume: str | Path | None) -> tuple[Path, dict[str, Any] | None]:
    """The run folder (checked; ``_train`` creates it once the data is read) and, with ``resume``, its checkpoint's
    state (read before any other work, so that a bad one is refused at once)."""
    inputs = [config.data.path, config.data.landmarks, config.data.pseudo,
              None if is_random_init(config.checkpoint) else config.checkpoint]
    if resume is not None:
        return resumed_run(resume, kind="fine-tuning", inputs=inputs, config=config, read_config=read_finetune_config,
                           may_change=RESUME_MAY_CHANGE,
                           command=f"medssl finetune {config.task} {Path(resume) / 'config.yaml'} --resume {resume}")
    return new_run(out, config.name, inputs), None


def _load_checkpoint(saved: dict[str, Any], network: TaskUNet, updater: OptimizerStep) -> dict[str, Any]:
    network.load_state_dict(saved["network"])
    updater.load_state_dict(saved)
    restore_rng(saved["rng"])
    log.info("resuming from step %d", saved["state"]["step"])
    return dict(saved["state"])
