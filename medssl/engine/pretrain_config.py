"""The schema of a pretraining config (``configs/*_2d.yaml`` ...): YAML -> these frozen dataclasses.

Only the training loop's own knobs are declared here (``TrainConfig``; ``ValidationConfig`` for the optional
one-shot validation). The ``data``, ``network`` and ``objective`` sections are passed on as keyword arguments and
checked against the signatures of the view sampler, the network factory and each objective class
(``medssl.config.check_kwargs``), so their defaults live in those signatures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from medssl.config import from_dict, load_config
from medssl.errors import InputError


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop. ``batch_size`` is per process (``torchrun`` multiplies it by the world size)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-5
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9  # SGD only
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0  # max global gradient norm; null disables clipping
    amp: Literal["off", "bf16", "fp16"] = "bf16"  # mixed precision on CUDA; CPU always runs float32
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True  # deterministic kernels (CPU runs are bit-exact given the seed)
    log_every: int = 10
    checkpoint_every: int = 100


@dataclass(frozen=True)
class ValidationConfig:
    """One-shot landmark validation during pretraining (``medssl.engine.validation``): every ``every`` steps (and
    at the last), match the landmarks of ``template`` (rows in ``template_landmarks``) into ``images`` and score
    them against ``truth`` (MRE, SDR at ``sdr_radii_mm``). Paths as for ``data.path``."""

    template: str
    template_landmarks: str
    images: str
    truth: str
    every: int = 50
    sdr_radii_mm: tuple[float, ...] = (2.0, 4.0)


@dataclass(frozen=True)
class PretrainConfig:
    """A whole pretraining config. ``method`` is one objective name or a list composed as a weighted sum."""

    method: str | list[str]
    spatial_dims: Literal[2, 3]
    train: TrainConfig
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    network: dict[str, Any] = field(default_factory=dict)
    objective: dict[str, dict[str, Any]] = field(default_factory=dict)
    validation: ValidationConfig | None = None

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    @property
    def name(self) -> str:
        """``pgssl_2d``, ``pgssl+msf_3d``: the stem of default run folder names."""
        return f"{'+'.join(self.methods)}_{self.spatial_dims}d"


def read_pretrain_config(path: str | Path, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Load a pretraining YAML with ``key=value`` overrides and check the parts the schema alone cannot."""
    return load_config(path, PretrainConfig, overrides, check=validate)


def pretrain_config_from_dict(data: dict[str, Any]) -> PretrainConfig:
    """Build and validate a ``PretrainConfig`` from plain data (the inverse of ``medssl.config.to_dict``)."""
    config = from_dict(PretrainConfig, data)
    validate(config)
    return config


def validate(config: PretrainConfig) -> None:
    """Cross-field checks: positive sizes, a patch size per spatial dimension, objective sections per method."""
    if not config.methods:
        raise InputError("config key 'method' must name at least one method (pgssl, infoguided, lewel, msf)")
    import medssl.objectives  # noqa: F401  (fills the registry)
    from medssl.objectives.base import OBJECTIVES
    from medssl.transforms.preprocess import check_modality

    for name in config.methods:
        if name not in OBJECTIVES:
            OBJECTIVES.get(name)  # the "unknown method ... did you mean" error
    check_modality(config.data.get("modality", "mr"))
    train = config.train
    for key in ("steps", "batch_size", "log_every", "checkpoint_every"):
        if getattr(train, key) < 1:
            raise InputError(f"config key 'train.{key}' must be >= 1, got {getattr(train, key)}")
    if train.lr <= 0:
        raise InputError(f"config key 'train.lr' must be > 0, got {train.lr}")
    if not 0 <= train.warmup_steps < train.steps:
        raise InputError(f"config key 'train.warmup_steps' must be in [0, train.steps), got {train.warmup_steps}")
    patch = config.data.get("patch_size")
    if patch is None:
        raise InputError("config key 'data.patch_size' is required, e.g. data.patch_size=[128,128]")
    if not (isinstance(patch, (list, tuple)) and len(patch) == config.spatial_dims
            and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)):
        raise InputError(
            f"config key 'data.patch_size' must list {config.spatial_dims} positive integers "
            f"(spatial_dims={config.spatial_dims}), got {patch!r}"
        )
    for name, section in config.objective.items():
        if name not in config.methods:
            raise InputError(
                f"config section 'objective.{name}' is for a method not in 'method' ({', '.join(config.methods)})"
            )
        if not isinstance(section, dict):
            raise InputError(f"config section 'objective.{name}' must be a mapping of hyperparameters")
    if config.validation is not None:
        from medssl.engine.validation import check_validation

        check_validation(config.validation)
