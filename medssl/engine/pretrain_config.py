"""The schema of a pretraining config (``configs/*_2d.yaml`` ...): YAML -> these frozen dataclasses.

Only the training loop's own knobs are declared here (``PretrainTrainConfig``; ``ValidationConfig`` of
``medssl.engine.validation`` for the optional one-shot validation). The ``data``, ``network`` and ``objective`` sections are passed on as keyword arguments and
checked against the signatures of the view sampler, the network factory and each objective class
(``medssl.config.check_kwargs``), so their defaults live in those signatures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from medssl.config import build_section, from_dict, load_config
from medssl.engine.runner import TrainConfig, check_train_config
from medssl.engine.validation import ValidationConfig, check_validation
from medssl.errors import InputError
from medssl.objectives import OBJECTIVES
from medssl.transforms.preprocess import Preprocessing


@dataclass(frozen=True)
class PretrainTrainConfig(TrainConfig):
    """The optimisation loop. ``batch_size`` is per process (``torchrun`` multiplies it by the world size)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9  # SGD only
    checkpoint_every: int = 100


@dataclass(frozen=True)
class PretrainConfig:
    """A whole pretraining config. ``method`` is one objective name or a list composed as a weighted sum."""

    method: str | list[str]
    spatial_dims: Literal[2, 3]
    train: PretrainTrainConfig
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

    @property
    def preprocessing(self) -> Preprocessing:
        """The ``data`` section's preprocessing (what ``model.pt`` records for new images)."""
        return Preprocessing.from_options(self.data)


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
    for name in config.methods:
        if name not in OBJECTIVES:
            OBJECTIVES.get(name)  # the "unknown method ... did you mean" error
    build_section("data", lambda: config.preprocessing)  # checks modality, spacing and window
    check_train_config(config.train, positive=("checkpoint_every",))
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
        check_validation(config.validation)
