"""The pretraining loop: a plain, guarded PyTorch loop that reads top to bottom.

config -> network + objectives + view sampler -> for each step: sample a pair of views, weighted objective loss
(AMP on CUDA), NaN/inf guard, backward, gradient clipping, optimizer + LR schedule step, objectives' EMA hook,
metrics (and, with a ``validation`` section, one-shot landmark MRE/SDR every few steps), periodic atomic checkpoint
-> ``model.pt``. Under ``torchrun`` the network and the objectives' heads are trained with DistributedDataParallel;
rank 0 writes the run folder and validates.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl import dist
from medssl.config import build_section, check_kwargs, save_config, to_dict
from medssl.data.inputs import resolve_images
from medssl.data.readers import check_image_shape
from medssl.engine.memory import check_memory, raise_if_out_of_memory
from medssl.engine.monitor import Monitor
from medssl.engine.pretrain_config import PretrainConfig, pretrain_config_from_dict, read_pretrain_config
from medssl.engine.runner import (CHECKPOINT, OptimizerStep, check_finite, log_cpu_threads, new_run, resumed_run,
                                  save_checkpoint, seed_run)
from medssl.engine.schedule import build_optimizer, build_scheduler
from medssl.engine.validation import LandmarkValidator
from medssl.errors import InputError
from medssl.networks import UNet, build_network
from medssl.networks.model_file import save_model
from medssl.objectives import OBJECTIVES
from medssl.outputs import check_output, undone_on_failure
from medssl.rng import capture_rng, restore_rng, seeded
from medssl.transforms.pair_loader import LOADER_KEYS, check_loader_options, default_workers, pair_batches
from medssl.transforms.sampler import ViewPairSampler
from medssl.transforms.views import check_pyramid

log = logging.getLogger(__name__)

#: config keys (or sections) that may differ between a run and its resumption (they do not change the trained weights)
RESUME_MAY_CHANGE = ("data.path", "data.cache_dir", "data.cache_mb", "data.prepare_workers", "data.workers",
                     "data.prefetch", "train.device", "train.log_every", "train.checkpoint_every", "validation")
#: where a run prepares its scans when ``data.cache_dir`` is not set (set it to share one cache between runs)
PREPARED_FOLDER = "prepared"
#: sampler arguments the engine fills itself (from ``spatial_dims``, ``seed`` and the objectives)
SAMPLER_RESERVED = ("images", "spatial_dims", "preset", "info_guided", "device", "seed")


class TrainStep(nn.Module):
    """The network and its objectives as one module (what DDP wraps): ``forward(batch)`` -> weighted loss + parts."""

    def __init__(self, network: nn.Module, objectives: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.network = network
        self.objectives = nn.ModuleDict(objectives)
        self.weights = dict(weights)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        total: torch.Tensor | float = 0.0
        parts: dict[str, torch.Tensor] = {}
        prefix = len(self.objectives) > 1
        for name, objective in self.objectives.items():
            out = objective(self.network, batch)
            total = total + self.weights[name] * out["loss"]
            for key, value in out.items():
                if key != "loss" or prefix:
                    parts[f"{name}/{key}" if prefix else key] = value.detach()
        return {"loss": total, **parts}


def network_from_config(config: PretrainConfig) -> nn.Module:
    """The U-Net from the ``network`` section (keys = ``medssl.networks.UNet`` arguments)."""
    check_kwargs(UNet, config.network, "network", reserved=("spatial_dims",))
    return build_network(spatial_dims=config.spatial_dims, **config.network)


def save_initial_model(config: PretrainConfig, path: str | Path) -> Path:
    """Write the ``model.pt`` of the network a run of ``config`` starts from (the random-init baseline of that run;
    the loop seeds with ``config.seed`` right before building it), matched on every level like ``--checkpoint none``
    and at the run's ``data.pyramid`` (so both are embedded alike)."""
    with seeded(config.seed):
        network = network_from_config(config)
    pyramid = check_pyramid(config.data.get("pyramid", [1]), "data.pyramid")
    return save_model(network, path, spatial_dims=config.spatial_dims, preprocessing=preprocessing_options(config),
                      matching={"levels": list(range(len(network.feature_info))), "pyramid": list(pyramid)})


def build_objectives(config: PretrainConfig, network: nn.Module) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """One objective per method, ``cls(network, **objective.<method>)``; ``weight`` (default 1) scales its loss."""
    objectives, weights = {}, {}
    for name in config.methods:
        cls = OBJECTIVES.get(name)
        kwargs = dict(config.objective.get(name) or {})
        weight = kwargs.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise InputError(f"config key 'objective.{name}.weight' must be a number, got {weight!r}")
        check_kwargs(cls, kwargs, f"objective.{name}", reserved=("network",))
        objectives[name] = build_section(f"objective.{name}", lambda: cls(network, **kwargs))
        weights[name] = float(weight)
    return objectives, weights


def trained_levels(objectives: dict[str, nn.Module]) -> list[int] | None:
    """The sorted union of the objectives' ``trained_levels`` (what one-shot matching compares); None when an
    objective names none (then every level is matched)."""
    try:
        return sorted({int(level) for objective in objectives.values() for level in objective.trained_levels})
    except NotImplementedError:
        return None


def build_sampler(config: PretrainConfig, objectives: dict[str, nn.Module], *, device: torch.device,
                  cache_dir: str | Path | None = None) -> ViewPairSampler:
    """The pair-of-views sampler over ``data.path`` (rendering on ``device``): preset from the first objective,
    information maps if any objective needs them, scans prepared into ``data.cache_dir`` or else ``cache_dir``
    (None: a temporary folder). Every rank draws from the same seed; ``sample(first=...)`` picks its slice."""
    options = {key: value for key, value in config.data.items() if key != "path" and key not in LOADER_KEYS}
    check_kwargs(ViewPairSampler, options, "data", reserved=SAMPLER_RESERVED)
    check_loader_options(config.data.get("workers"), config.data.get("prefetch", 2))
    if not config.data.get("path"):
        raise InputError("no training data: pass --data PATH (a folder, datalist JSON or image) or set data.path")
    if options.get("cache_dir") is None and cache_dir is not None:
        options["cache_dir"] = str(cache_dir)
    images = resolve_images(config.data["path"])
    if options.get("cache_dir") is not None:  # never beside the scans: refused if it holds one
        check_output(options["cache_dir"], kind="folder", inputs=images)
    first = next(iter(objectives.values()))
    return build_section("data", lambda: ViewPairSampler(
        images,
        spatial_dims=config.spatial_dims,
        preset=first.views,
        info_guided=any(getattr(o, "needs_info", False) for o in objectives.values()),
        device=str(device),
        seed=config.seed,
        **options,
    ))


def _check_channels(sampler: ViewPairSampler, network: nn.Module) -> None:
    """Every prepared scan must have the network's input channels (a 4D series is refused by name)."""
    channels = getattr(network, "in_channels", None)
    if channels is not None:
        scans = sampler.scans
        for path, count, shape in zip(scans.paths, scans.channels, scans.shapes):
            check_image_shape(torch.empty((count, *shape), device="meta"), path, channels=channels)


def preprocessing_options(config: PretrainConfig) -> dict[str, Any]:
    """What ``model.pt`` records to prepare new images like the training scans: the ``Preprocessing`` of the
    ``data`` section (defaults filled) plus ``patch_size``."""
    return {**config.preprocessing.to_dict(), "patch_size": config.data["patch_size"]}


def pretrain(
    config: PretrainConfig | str | Path,
    data: str | Path | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
) -> Path:
    """Train the configured objective(s) and return the run folder (``config.yaml``, ``model.pt``,
    ``metrics.csv``, TensorBoard events, ``checkpoints/last.pt``).

    ``config`` is a ``PretrainConfig`` or a YAML path; ``data`` replaces ``data.path``; ``out`` is the run folder
    (default ``runs/<method>_<D>d_<time>``); ``resume`` continues the run in that folder from its last checkpoint
    (the config must match the run's except for ``RESUME_MAY_CHANGE``) and ends with the same weights as an
    uninterrupted run. The run seeds the global generators (``monai.utils.set_determinism``) and sets torch's
    determinism flags; they stay so after it returns.
    """
    config = _with_data(config, data)
    context = dist.setup(config.train.device)
    try:
        run, resume_state = _run_folder(config, out, resume, context)
        with undone_on_failure(run, run / CHECKPOINT, enabled=resume_state is None and context.is_main):
            _train(config, run, resume_state, context)
    except BaseException:
        dist.teardown(context, finished=False)
        raise
    dist.teardown(context)
    return run


def prepare_data(config: PretrainConfig | str | Path, data: str | Path | None = None,
                 out: str | Path | None = None, workers: int | None = None) -> Path:
    """Prepare the scans of ``config`` (``data`` replaces ``data.path``) into the cache folder ``out`` (default
    ``data.cache_dir``) over ``workers`` processes, exactly as a pretraining run with that ``data.cache_dir`` would
    (preprocessing and, for information-guided objectives, the maps); returns the folder. Entries already up to date
    are kept; a run with ``data.cache_dir`` set to the folder then starts without preparing."""
    config = _with_data(config, data)
    folder = out if out is not None else config.data.get("cache_dir")
    if folder is None:
        raise InputError("say where to prepare the data: pass --out CACHE or set data.cache_dir")
    config = pretrain_config_from_dict({**to_dict(config), "data": {**config.data, "cache_dir": str(Path(folder)),
                                                                     "prepare_workers": workers}})
    objectives, _ = build_objectives(config, network_from_config(config))
    sampler = build_sampler(config, objectives, device=torch.device("cpu"))
    log.info("%d scan(s) prepared in %s; pretrain with data.cache_dir=%s to use them", len(sampler.scans),
             folder, folder)
    return Path(folder)


def _with_data(config: PretrainConfig | str | Path, data: str | Path | None) -> PretrainConfig:
    """``config`` read (if a path) with ``data`` (if given) as ``data.path``."""
    if not isinstance(config, PretrainConfig):
        config = read_pretrain_config(config)
    if data is not None:
        config = pretrain_config_from_dict({**to_dict(config), "data": {**config.data, "path": str(Path(data).resolve())}})
    return config


def _train(config: PretrainConfig, run: Path, resume_state: dict[str, Any] | None, context: dist.Context) -> Path:
    train, device = config.train, context.device
    validator = _validator(config, device) if context.is_main else None  # before seeding: leaves RNGs alone
    seed_run(config.seed, train.deterministic, device)
    if context.is_main:
        log_cpu_threads(device)
    network = network_from_config(config).to(device)
    divisor = getattr(network, "min_size_divisor", 1)
    for key in ("patch_size", "context_size"):  # the sampler checks their form
        sizes = config.data.get(key)
        if isinstance(sizes, (list, tuple)) and any(isinstance(p, int) and p % divisor for p in sizes):
            raise InputError(f"config key 'data.{key}' {config.data[key]} must be a multiple of {divisor} "
                             f"for this U-Net (it halves the size {divisor.bit_length() - 1} times)")
    objectives, weights = build_objectives(config, network)
    levels = trained_levels(objectives)
    matching = None if levels is None else {"levels": levels, "methods": list(objectives)}
    if levels is None:
        log.warning("an objective of %s names no trained_levels: model.pt records none, so every feature level is "
                    "matched", "+".join(objectives))
    step_module = TrainStep(network, objectives, weights).to(device)
    workers = config.data.get("workers")
    workers = default_workers(device) if workers is None else workers
    sampler = build_sampler(config, objectives, device=torch.device("cpu") if workers else device,
                            cache_dir=run / PREPARED_FOLDER)
    if matching is not None:
        matching["pyramid"] = list(sampler.pyramid)
    _check_channels(sampler, network)
    memory = dict(patch_size=config.data["patch_size"], batch_size=train.batch_size, device=device)
    estimate = check_memory(network, spatial_dims=config.spatial_dims, images_per_sample=2, **memory)
    if resume_state is None and context.is_main:  # only now: a run refused above leaves no folder behind
        (run / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
        save_config(config, run / "config.yaml")
    optimizer = build_optimizer(
        [step_module], name=train.optimizer, lr=train.lr, weight_decay=train.weight_decay, momentum=train.momentum
    )
    scheduler = build_scheduler(
        optimizer, steps=train.steps, warmup_steps=train.warmup_steps, min_lr_ratio=train.min_lr_ratio
    )
    updater = OptimizerStep(optimizer, scheduler, parameters=step_module.parameters(), grad_clip=train.grad_clip,
                            amp=train.amp, device=device, cpu_amp=train.cpu_amp)
    start_step = 0
    if resume_state is not None:
        start_step = _load_checkpoint(resume_state, run / CHECKPOINT, step_module, updater, sampler, context)
    model = step_module
    if context.distributed:
        model = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True
        )
    monitor = Monitor(run, steps=train.steps, start_step=start_step, log_every=train.log_every) if context.is_main else None
    preprocessing = preprocessing_options(config)
    last_saved = start_step if resume_state is not None else None
    batches = None
    log.info("pretraining %s for %d steps on %s x%d -> %s", config.name, train.steps, device, context.world_size, run)
    if levels is not None:
        log.info("trained feature levels %s (one-shot matching and validation compare these)",
                 ",".join(map(str, levels)))
    try:
        step_module.train()
        batches = pair_batches(sampler, start=start_step, stop=train.steps, batch_size=train.batch_size,
                               first=context.rank * train.batch_size, workers=workers,
                               prefetch=config.data.get("prefetch", 2), pin_memory=device.type == "cuda")
        if workers:
            log.info("view pairs rendered by %d DataLoader worker process(es)", workers)
        for step, batch in zip(range(start_step, train.steps), batches):
            batch = batch.to(device, non_blocking=True)
            with updater.autocast():
                out = model(batch)
            names = list(out)
            values = dist.sum_across_ranks(torch.stack([out[k].float() for k in names]), context)
            values = (values / context.world_size).tolist()  # one sync per step: the guard needs the loss anyway
            kept, again = _kept(last_saved, run)
            check_finite(values[0], step + 1, kept=kept, run=run,
                         advice=f"Lower train.lr, set train.grad_clip, or check the data, then {again}")
            lr = updater.step(out["loss"])
            for objective in objectives.values():
                objective.on_step_end(network, (step + 1) / train.steps)
            metrics = {**dict(zip(names, values)), "lr": lr}
            validating = validator is not None and ((step + 1) % config.validation.every == 0
                                                    or step + 1 == train.steps)
            if validating:
                metrics.update(validator(network, levels, sampler.pyramid))
            if monitor is not None:
                monitor.step(step + 1, metrics, force=validating)
            if (step + 1) % train.checkpoint_every == 0 or step + 1 == train.steps:
                _save_checkpoint(run, step + 1, config, step_module, updater, sampler, context)
                if context.is_main:
                    save_model(network, run, spatial_dims=config.spatial_dims, preprocessing=preprocessing,
                               matching=matching)
                last_saved = step + 1
    except (RuntimeError, MemoryError) as error:
        raise_if_out_of_memory(error, run=run, estimate_bytes=estimate, kept=_kept(last_saved, run)[0], **memory)
        raise
    finally:
        if batches is not None:
            batches.close()  # stops DataLoader workers
        if monitor is not None:
            monitor.close()
    log.info("finished: %s", run / "model.pt")
    return run


def _validator(config: PretrainConfig, device: torch.device) -> LandmarkValidator | None:
    """The one-shot landmark validator of the ``validation`` section (None without one)."""
    if config.validation is None:
        return None
    options = {key: value for key, value in to_dict(config.validation).items() if key != "every"}
    return LandmarkValidator(**options, spatial_dims=config.spatial_dims, preprocessing=preprocessing_options(config),
                             device=device)


def _kept(last_saved: int | None, run: Path) -> tuple[str, str]:
    """What survives a failed step (for the message) and how to go on."""
    if last_saved:
        return (f"the last good checkpoint (step {last_saved}) is kept in {run / CHECKPOINT} and {run / 'model.pt'}",
                f"start again (or continue with --resume {run})")
    return "no checkpoint had been written yet", "start again"


def _run_folder(config: PretrainConfig, out: str | Path | None, resume: str | Path | None,
                context: dist.Context) -> tuple[Path, dict[str, Any] | None]:
    """Choose and check the run folder on rank 0 (every rank gets the same path, or raises the same ``InputError``;
    ``_train`` creates it once the data is read) and, with ``resume``, read its checkpoint."""
    inputs = [config.data.get("path")]
    if resume is not None:
        return resumed_run(resume, kind="pretraining", inputs=inputs, config=config, read_config=read_pretrain_config,
                           may_change=RESUME_MAY_CHANGE,
                           command=f"medssl pretrain {Path(resume) / 'config.yaml'} --resume {resume}")
    return dist.on_main(lambda: new_run(out, config.name, inputs), context), None


def _save_checkpoint(run: Path, step: int, config: PretrainConfig, step_module: TrainStep, updater: OptimizerStep,
                     sampler: Any, context: dist.Context) -> None:
    """Everything needed to continue exactly: weights, objectives (teachers, banks), optimizer, schedule, scaler,
    and every rank's sampler and RNG states."""
    rank_states = dist.gather_objects({"sampler": sampler.state_dict(), "rng": capture_rng()}, context)
    if context.is_main:
        save_checkpoint(run, {"step": step, "config": to_dict(config), "network": step_module.network.state_dict(),
                              "objectives": step_module.objectives.state_dict(), **updater.state_dict(),
                              "ranks": rank_states})


def _load_checkpoint(state: dict[str, Any], path: Path, step_module: TrainStep, updater: OptimizerStep,
                     sampler: Any, context: dist.Context) -> int:
    step_module.network.load_state_dict(state["network"])
    step_module.objectives.load_state_dict(state["objectives"])
    updater.load_state_dict(state)
    ranks = state["ranks"]
    if len(ranks) != context.world_size:
        raise InputError(
            f"the checkpoint was written by {len(ranks)} process(es); resume with the same number "
            f"(torchrun --nproc_per_node {len(ranks)})",
            path=path,
        )
    sampler.load_state_dict(ranks[context.rank]["sampler"])
    restore_rng(ranks[context.rank]["rng"])
    log.info("resuming from step %d", state["step"])
    return int(state["step"])
