"""Random-number-generator states of a process (python, numpy, torch CPU and CUDA), captured for exact resume, and
kept from the caller: library code seeds only inside ``seeded`` or ``global_state_kept``.

The states are tensors and plain numbers only, so a checkpoint holding them loads with ``torch.load(...,
weights_only=True)``: resuming never unpickles code.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """Every global generator's state as tensors and plain numbers (CPU)."""
    version, python_state, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what ``capture_rng`` returned (CUDA states only where the same GPUs are visible)."""
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside: torch's CPU generator seeded with ``seed`` (e.g. to initialise weights that depend on ``seed`` only);
    on exit the caller's generator state is back."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def global_state_kept() -> Iterator[None]:
    """Inside, a training run may seed every global generator and set torch's determinism flags; on exit they are
    as the caller left them (generators: python, numpy, torch CPU and CUDA; flags: deterministic algorithms and
    cuDNN's deterministic/benchmark)."""
    rng = capture_rng()
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        restore_rng(rng)
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2], flags[3]
