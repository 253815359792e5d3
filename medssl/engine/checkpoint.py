"""Atomic saving, ``model.pt`` (a clean network to rebuild with no config at hand) and ``load_model``.

``model.pt`` holds ``{"format": "medssl.model/1", "network": <get_config()>, "state_dict": <the network's own
state dict>, "preprocessing": {...}, "spatial_dims": D}``: the state dict loads into the network built from
``network`` with no key surgery.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.errors import InputError

MODEL_FORMAT = "medssl.model/1"
MODEL_FILE = "model.pt"


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path`` (never a truncated file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def model_payload(network: nn.Module, *, spatial_dims: int, preprocessing: dict[str, Any]) -> dict[str, Any]:
    """The ``model.pt`` dictionary for ``network`` (which must offer ``get_config()``), tensors on CPU."""
    state = {key: value.detach().cpu().clone() for key, value in network.state_dict().items()}
    return {
        "format": MODEL_FORMAT,
        "network": network.get_config(),
        "state_dict": state,
        "preprocessing": dict(preprocessing),
        "spatial_dims": spatial_dims,
    }


def save_model(network: nn.Module, path: str | Path, *, spatial_dims: int, preprocessing: dict[str, Any]) -> Path:
    """Write ``model.pt`` atomically (``path`` may be a run folder or a file name)."""
    path = Path(path)
    target = path / MODEL_FILE if path.is_dir() else path
    return save_atomic(model_payload(network, spatial_dims=spatial_dims, preprocessing=preprocessing), target)


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


def load_model(run_or_model_pt: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network saved in a run folder (or its ``model.pt``) with its weights, in eval mode."""
    from medssl.networks import build_network

    payload = read_model_file(run_or_model_pt)
    if "task" in payload:
        raise InputError("this is a fine-tuned model (its network ends in a task head); pass a pretraining run here, "
                         "or use it with 'medssl predict'", path=run_or_model_pt)
    network = build_network(**payload["network"])
    network.load_state_dict(payload["state_dict"])
    return network.to(device).eval()
