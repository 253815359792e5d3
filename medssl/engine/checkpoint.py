"""Atomic saving, resume checkpoints (read with ``weights_only=True``), ``model.pt`` (a clean network to rebuild with no config at hand) and ``load_model``.

``model.pt`` holds ``{"format": "medssl.model/1", "network": <get_config()>, "state_dict": <the network's own
state dict>, "preprocessing": {...}, "spatial_dims": D}``: the state dict loads into the network built from
``network`` with no key surgery. A pretraining run adds ``"matching": {"levels": [...], "methods": [...]}``: the
feature levels its objectives trained (what one-shot matching compares by default); older files lack it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from medssl.errors import InputError
from medssl.outputs import atomic_writer, temporaries

MODEL_FORMAT = "medssl.model/1"
MODEL_FILE = "model.pt"


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through ``medssl.outputs.atomic_writer`` (never a truncated file); returns ``path``."""
    with atomic_writer(path) as handle:
        torch.save(obj, handle)
    return Path(path)


def read_resume_state(path: str | Path) -> dict[str, Any]:
    """The training state in a run's ``checkpoints/last.pt``, loaded with ``weights_only=True`` (tensors and plain
    values only: a file holding anything else, e.g. code to run, is refused). Partial temporary files of an
    interrupted write beside it are removed first."""
    path = Path(path)
    for partial in temporaries(path):
        partial.unlink(missing_ok=True)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt, foreign or unsafe files
        reason = f"{err.__class__.__name__}: {err}".splitlines()[0][:200]
        raise InputError(f"cannot resume from this checkpoint ({reason}); it is corrupt, was written by an older "
                         "medssl, or holds more than tensors and numbers. Start the run again with a new --out",
                         path=path) from None
    if not isinstance(state, dict):
        raise InputError("not a medssl resume checkpoint; start the run again with a new --out", path=path)
    return state


def model_payload(network: nn.Module, *, spatial_dims: int, preprocessing: dict[str, Any],
                  matching: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``model.pt`` dictionary for ``network`` (which must offer ``get_config()``), tensors on CPU; ``matching``
    (``{"levels": [...], "methods": [...]}``, see ``matching_levels``) is recorded when given."""
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
    return payload


def save_model(network: nn.Module, path: str | Path, *, spatial_dims: int, preprocessing: dict[str, Any],
               matching: dict[str, Any] | None = None) -> Path:
    """Write ``model.pt`` atomically (``path`` may be a run folder or a file name)."""
    path = Path(path)
    target = path / MODEL_FILE if path.is_dir() else path
    payload = model_payload(network, spatial_dims=spatial_dims, preprocessing=preprocessing, matching=matching)
    return save_atomic(payload, target)


def matching_levels(payload: dict[str, Any]) -> tuple[list[int] | None, list[str]]:
    """The feature levels a ``model.pt`` payload records as trained (None: it records none, e.g. written by an older
    medssl) and the objectives that trained them."""
    matching = payload.get("matching")
    if not isinstance(matching, dict) or not matching.get("levels"):
        return None, []
    return [int(level) for level in matching["levels"]], [str(method) for method in matching.get("methods", [])]


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


def load_model(run_or_model_pt: str | Path, device: str | torch.device = "cpu",
               payload: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild the network saved in a run folder (or its ``model.pt``) with its weights, in eval mode; ``payload``:
    the file's content when the caller has already read it (``read_model_file``), so it is not read twice."""
    from medssl.networks import build_network

    payload = read_model_file(run_or_model_pt) if payload is None else payload
    if "task" in payload:
        raise InputError("this is a fine-tuned model (its network ends in a task head); pass a pretraining run here, "
                         "or use it with 'medssl predict'", path=run_or_model_pt)
    network = build_network(**payload["network"])
    network.load_state_dict(payload["state_dict"])
    return network.to(device).eval()
