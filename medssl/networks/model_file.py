"""``model.pt``, the file every run leaves (a clean network to rebuild with no config at hand), and the one loader.

``model.pt`` holds ``{"format": "medssl.model/1", "network": <get_config()>, "state_dict": <the network's own
state dict>, "preprocessing": {...}, "spatial_dims": D}``: the state dict loads into the network built from
``network`` with no key surgery. A pretraining run adds ``"matching": {"levels": [...], "methods": [...], "pyramid": [...]}``:
the feature levels its objectives trained and the working-spacing factors its views were cut at (what one-shot
matching compares and embeds at by default; older files lack them). A
fine-tuning run adds ``"task"`` (its head: ``{"kind": "seg", ...}`` or ``{"kind": "landmarks", ...}``) and
``"validation"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medssl.errors import InputError
from medssl.networks.task import TaskHead, TaskUNet
from medssl.networks.unet import UNet
from medssl.outputs import save_atomic
from medssl.rng import seeded

log = logging.getLogger(__name__)

MODEL_FORMAT = "medssl.model/1"
MODEL_FILE = "model.pt"
#: what ``load_network`` accepts instead of a checkpoint for a randomly initialised network
NO_CHECKPOINT = "none"


def model_payload(network: nn.Module, *, spatial_dims: int, preprocessing: Mapping[str, Any],
                  matching: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``model.pt`` dictionary for ``network`` (which must offer ``get_config()``), tensors on CPU; ``matching``
    (``{"levels": [...], "methods": [...], "pyramid": [...]}``, see ``matching_levels`` and ``matching_pyramid``) is
    recorded when given."""
    state = {key: value.detach().cpu().clone() for key, value in network.state_dict().items()}
    payload = {
        "format": MODEL_FORMAT,
        "network": network.get_config(),
        "state_dict": state,
        "preprocessing": dict(preprocessing),
        "spatial_dims": spatial_dims,
    }
    if matching is not None:
        payload["matching"] = {"levels": sorted({int(level) for level in matching["levels"]}),
                               "methods": [str(method) for method in matching.get("methods", [])]}
        if matching.get("pyramid") is not None:
            payload["matching"]["pyramid"] = [int(factor) for factor in matching["pyramid"]]
    return payload


def save_model(network: nn.Module, path: str | Path, *, spatial_dims: int, preprocessing: Mapping[str, Any],
               matching: Mapping[str, Any] | None = None, **extra: Any) -> Path:
    """Write ``model.pt`` atomically (``path`` may be a run folder or a file name); ``extra`` entries (a
    fine-tuned model's ``task`` and ``validation``) are added to the payload."""
    path = Path(path)
    target = path / MODEL_FILE if path.is_dir() else path
    payload = model_payload(network, spatial_dims=spatial_dims, preprocessing=preprocessing, matching=matching)
    return save_atomic({**payload, **extra}, target)


def matching_levels(payload: Mapping[str, Any]) -> tuple[list[int] | None, list[str]]:
    """The feature levels a ``model.pt`` payload records as trained (None: it records none, e.g. written by an older
    medssl) and the objectives that trained them."""
    matching = payload.get("matching")
    if not isinstance(matching, dict) or not matching.get("levels"):
        return None, []
    return [int(level) for level in matching["levels"]], [str(method) for method in matching.get("methods", [])]


def matching_pyramid(payload: Mapping[str, Any]) -> list[int] | None:
    """The working-spacing factors a ``model.pt`` payload records (``data.pyramid`` of its pretraining; None: it
    records none, e.g. random init or an older medssl)."""
    matching = payload.get("matching")
    pyramid = matching.get("pyramid") if isinstance(matching, dict) else None
    return None if not pyramid else [int(factor) for factor in pyramid]


def read_model_file(run_or_model_pt: str | Path) -> dict[str, Any]:
    """Read and check a ``model.pt`` payload; ``run_or_model_pt`` is a run folder or the file itself."""
    path = Path(run_or_model_pt)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise InputError(
            "no model found: pass a pretraining/fine-tuning run folder (holding model.pt) or a model.pt file",
            path=path,
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        raise InputError(f"cannot read model file ({err.__class__.__name__}: {err})".splitlines()[0], path=path) from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise InputError(f"not a medssl model file (expected format '{MODEL_FORMAT}')", path=path)
    return payload


@dataclass(frozen=True)
class LoadedNetwork:
    """What ``load_network`` returns: the ``network`` (eval mode, on the device), the ``preprocessing`` new images
    need (empty for random init), the ``payload`` of ``model.pt`` (None for random init) and ``source`` (the
    checkpoint path, or ``"none"``)."""

    network: nn.Module
    preprocessing: dict[str, Any]
    payload: dict[str, Any] | None
    source: str

    @property
    def task(self) -> TaskHead | None:
        """The fine-tuned head of the file (None: a pretrained backbone or random init)."""
        return None if self.payload is None else TaskHead.from_dict(self.payload.get("task"))

    @property
    def levels(self) -> tuple[list[int] | None, list[str]]:
        """``matching_levels`` of the file (``(None, [])`` for random init)."""
        return (None, []) if self.payload is None else matching_levels(self.payload)

    @property
    def pyramid(self) -> list[int] | None:
        """``matching_pyramid`` of the file (None for random init)."""
        return None if self.payload is None else matching_pyramid(self.payload)


def is_random_init(checkpoint: str | Path | None) -> bool:
    """Whether ``checkpoint`` asks for a randomly initialised network (``"none"``, any case)."""
    return checkpoint is not None and str(checkpoint).lower() == NO_CHECKPOINT


def load_network(checkpoint: str | Path, spatial_dims: int | None = None, *, device: str | torch.device = "cpu",
                 head_channels: int | None = None, architecture: Mapping[str, Any] | None = None,
                 seed: int = 0, dims_of: str = "the images are") -> LoadedNetwork:
    """The network of a run folder / ``model.pt``, or a randomly initialised one for ``checkpoint="none"``.

    - ``"none"``: ``UNet(spatial_dims, **architecture)`` (default size ``small``), or with ``head_channels`` a
      ``TaskUNet``; weights depend only on ``seed`` (the caller's RNG untouched).
    - a file without ``head_channels``: the saved network with all its weights (a ``UNet``, or the ``TaskUNet`` of a
      fine-tuned model: see ``LoadedNetwork.task``).
    - a file with ``head_channels``: a ``TaskUNet`` of the saved architecture with a new head (initialised from
      ``seed``) and the saved backbone weights: the start of fine-tuning.

    ``spatial_dims`` (when given) must be the file's; an ``InputError`` naming the file says otherwise ("the
    checkpoint is 3D but {dims_of} 2D").
    """
    if is_random_init(checkpoint):
        if spatial_dims is None:
            raise ValueError("a randomly initialised network needs spatial_dims")
        options = dict(architecture) if architecture is not None else {"size": "small"}
        with seeded(seed):
            network = (UNet(spatial_dims, **options) if head_channels is None
                       else TaskUNet(spatial_dims, head_channels, **options))
        return LoadedNetwork(network.to(device).eval(), {}, None, NO_CHECKPOINT)
    payload = read_model_file(checkpoint)
    saved_dims = int(payload.get("spatial_dims", spatial_dims or 0))
    if spatial_dims is not None and saved_dims != spatial_dims:
        raise InputError(f"the checkpoint is {saved_dims}D but {dims_of} {spatial_dims}D; use a {spatial_dims}D run",
                         path=checkpoint)
    saved = dict(payload["network"])
    if head_channels is None:
        network = TaskUNet(**saved) if "head_channels" in saved else UNet(**saved)
        network.load_state_dict(payload["state_dict"])
    else:
        saved.pop("head_channels", None)
        with seeded(seed):
            network = TaskUNet(head_channels=head_channels, **saved)
        try:
            network.load_backbone(payload["state_dict"])
        except InputError as error:
            raise InputError(error.message, path=checkpoint) from None
    return LoadedNetwork(network.to(device).eval(), dict(payload.get("preprocessing") or {}), payload,
                         str(checkpoint))
