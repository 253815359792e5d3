"""The schema of a fine-tuning config (``configs/finetune_*.yaml``): YAML -> these frozen dataclasses.

``task`` picks the head: ``seg`` (segmentation transfer, section ``seg``) or ``landmarks`` (Gaussian heatmaps,
section ``landmarks``). The ``network`` section holds ``medssl.networks.UNet`` options for ``checkpoint: none``
(a pretrained checkpoint brings its own architecture); ``seg.loss`` holds ``monai.losses.DiceCELoss`` options.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

from monai.losses import DiceCELoss

from medssl.config import build_section, check_kwargs, from_dict, load_config, to_dict
from medssl.engine.runner import TrainConfig, check_train_config
from medssl.errors import InputError
from medssl.networks import UNet
from medssl.transforms.preprocess import Preprocessing

TASKS = ("seg", "landmarks")


@dataclass(frozen=True)
class FinetuneTrainConfig(TrainConfig):
    """The optimisation loop (AdamW, linear warm-up then cosine). The loop counts steps, not epochs, so runs with 1
    or 20 labeled images get the same number of updates; validation runs every ``val_every`` steps."""

    weight_decay: float = 1e-4
    encoder_lr_scale: float = 1.0  # layer-wise learning rate: encoder lr = lr * scale; 0 freezes the encoder
    decoder_lr_scale: float = 1.0  # the same for the decoder (the head always trains at lr)
    freeze_encoder_steps: int = 0  # warm-up with the encoder frozen (eval mode) for this many steps, then train it
    decoder_init: Literal["pretrained", "random"] = "pretrained"  # the checkpoint's decoder, or a fresh one (seed)
    val_every: int = 50  # validate, keep model.pt if best so far, write checkpoints/last.pt


@dataclass(frozen=True)
class FinetuneDataConfig:
    """Images, labels, splits, preprocessing and augmentation. Preprocessing should match the pretraining run's."""

    patch_size: list[int]
    path: str | None = None  # datalist JSON (or, for landmarks, any image PATH); --data sets it
    labeled: int | None = None  # train on this many labeled images (seeded choice); null: all of them
    landmarks: str | None = None  # landmark CSV (task landmarks); --landmarks sets it
    pseudo: str | None = None  # pseudo-labels of the unlabeled pool: a landmark CSV or a label-map folder (seg)
    val_fraction: float = 0.2  # held out from the training entries when the datalist has no validation entries
    split_seed: int = 0  # seed of the held-out and labeled choices (independent of the training seed)
    modality: str = "mr"
    spacing_mm: float | list[float] | None = None  # resample to this grid (null keeps each file's)
    intensity_window: list[float] | None = None
    file_spacing_mm: float | list[float] | None = None  # pixel size of 2D files without geometry (default 1 mm)
    augment: bool = True  # random rotation/scaling of the patch and intensity scale/shift
    rotate_deg: float = 10.0
    scale_range: float = 0.1


@dataclass(frozen=True)
class SegConfig:
    """Segmentation head: ``num_classes`` outputs (background included) trained with ``DiceCELoss(**loss)``."""

    num_classes: int | None = None  # null: 1 + the largest label in the training and validation label maps
    loss: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LandmarkConfig:
    """Heatmap head: one Gaussian map per landmark (``sigma_mm``), trained with ``mse`` or ``awing``, the pixels
    near a landmark weighted ``1 + foreground_weight``."""

    sigma_mm: float = 6.0
    loss: Literal["mse", "awing"] = "mse"
    foreground_weight: float = 10.0


@dataclass(frozen=True)
class FinetuneConfig:
    """A whole fine-tuning config."""

    task: Literal["seg", "landmarks"]
    spatial_dims: Literal[2, 3]
    train: FinetuneTrainConfig
    data: FinetuneDataConfig
    seed: int = 0
    checkpoint: str | None = None  # pretraining run folder / model.pt, or "none"; --checkpoint sets it
    network: dict[str, Any] = field(default_factory=dict)
    seg: SegConfig | None = None
    landmarks: LandmarkConfig | None = None

    @property
    def name(self) -> str:
        """``finetune_seg_2d``: the stem of default run folder names."""
        return f"finetune_{self.task}_{self.spatial_dims}d"

    @property
    def preprocessing(self) -> Preprocessing:
        """The ``data`` section's preprocessing (what ``model.pt`` records for prediction)."""
        return Preprocessing.from_options(to_dict(self.data))


def read_finetune_config(path: str | Path, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Load a fine-tuning YAML with ``key=value`` overrides; checks name the file."""
    return load_config(path, FinetuneConfig, overrides, check=validate)


def finetune_config_from_dict(data: dict[str, Any]) -> FinetuneConfig:
    """Build and validate a ``FinetuneConfig`` from plain data (the inverse of ``medssl.config.to_dict``)."""
    return validate(from_dict(FinetuneConfig, data))


def validate(config: FinetuneConfig) -> FinetuneConfig:
    """Cross-field checks; returns the config with the task's section filled with its defaults."""
    train, data = config.train, config.data
    check_train_config(train, positive=("val_every",))
    for key in ("encoder_lr_scale", "decoder_lr_scale"):
        if getattr(train, key) < 0:
            raise InputError(f"config key 'train.{key}' must be >= 0 (0 freezes), got {getattr(train, key)}")
    if not 0 <= train.freeze_encoder_steps < train.steps:
        raise InputError(f"config key 'train.freeze_encoder_steps' must be in [0, train.steps), got "
                         f"{train.freeze_encoder_steps}")
    if len(data.patch_size) != config.spatial_dims or min(data.patch_size) < 1:
        raise InputError(f"config key 'data.patch_size' must list {config.spatial_dims} positive integers "
                         f"(spatial_dims={config.spatial_dims}), got {data.patch_size!r}")
    if data.labeled is not None and data.labeled < 1:
        raise InputError(f"--labeled (data.labeled) must be at least 1, got {data.labeled}")
    build_section("data", lambda: config.preprocessing)  # checks modality, spacing and window
    if not 0 < data.val_fraction < 1:
        raise InputError(f"config key 'data.val_fraction' must be in (0, 1), got {data.val_fraction}")
    check_kwargs(UNet, config.network, "network", reserved=("spatial_dims",))
    other = "landmarks" if config.task == "seg" else "seg"
    if getattr(config, other) is not None:
        raise InputError(f"config section '{other}' does not belong to a '{config.task}' config; remove it")
    if config.task == "seg":
        seg = config.seg or SegConfig()
        check_kwargs(DiceCELoss, seg.loss, "seg.loss", reserved=("to_onehot_y", "softmax", "sigmoid"))
        if seg.num_classes is not None and seg.num_classes < 2:
            raise InputError(f"config key 'seg.num_classes' must be >= 2 (background + 1), got {seg.num_classes}")
        if data.landmarks is not None:
            raise InputError("data.landmarks (--landmarks) is for 'finetune landmarks'")
        return replace(config, seg=seg)
    heads = config.landmarks or LandmarkConfig()
    if heads.sigma_mm <= 0:
        raise InputError(f"config key 'landmarks.sigma_mm' must be > 0, got {heads.sigma_mm}")
    if heads.foreground_weight < 0:
        raise InputError(f"config key 'landmarks.foreground_weight' must be >= 0, got {heads.foreground_weight}")
    return replace(config, landmarks=heads)
