"""Training memory: a rough estimate checked before step 1, and out-of-memory errors turned into a clear refusal.

Neither torch nor MONAI estimates the memory of a training step, so it is measured here: one small forward pass
counts the activations a U-Net keeps per voxel, which scale linearly with the patch volume and the batch.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from medssl.errors import TrainingError

log = logging.getLogger(__name__)

GIB = 1024**3
#: training keeps each activation and its gradient, plus allocator slack: bytes counted by the probe x this
ACTIVATION_FACTOR = 3.0
#: weights, gradients and two Adam moments, float32
PARAMETER_BYTES = 16
#: the estimate is 0.9-5.2x the measured peak of the shipped 2D and 3D pretraining configs (docs/contract.md): a run
#: is refused only when even the estimate / REFUSE_MARGIN does not fit, and warned about above WARN_FRACTION
REFUSE_MARGIN = 6.0
WARN_FRACTION = 0.7


class OutOfMemory(TrainingError):
    """A training step did not fit in memory (exit 2: the config asks for more than the machine has)."""


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes: the GPU's free memory, or the host's ``MemAvailable`` (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes_per_voxel(network: nn.Module, spatial_dims: int) -> float:
    """Bytes of the outputs of every leaf module per input voxel, for one image (a forward pass on a small probe)."""
    divisor = int(getattr(network, "min_size_divisor", 1))
    side = 2 * divisor  # the bottleneck keeps 2 voxels per axis (instance norm needs more than 1)
    device = next(network.parameters()).device
    probe = torch.zeros(1, int(getattr(network, "in_channels", 1)), *([side] * spatial_dims), device=device)
    counted = [0]

    def count(_module, _inputs, output) -> None:
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                counted[0] += tensor.numel() * tensor.element_size()

    leaves = [m for m in network.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    was_training = network.training
    try:
        network.eval()
        with torch.no_grad():
            network(probe)
    finally:
        network.train(was_training)
        for hook in hooks:
            hook.remove()
    return counted[0] / side**spatial_dims


def estimate_step_bytes(network: nn.Module, *, spatial_dims: int, patch_size: Sequence[int], batch_size: int,
                        images_per_sample: int) -> int:
    """A rough estimate (0.9-5.2x the measured peak of the shipped configs) of the memory one training step needs:
    activations of ``batch_size`` x ``images_per_sample`` patches (2 for a pair of views), and the parameters with
    their gradients and Adam state."""
    voxels = math.prod(int(p) for p in patch_size)
    activations = activation_bytes_per_voxel(network, spatial_dims) * voxels * batch_size * images_per_sample
    parameters = sum(p.numel() for p in network.parameters()) * PARAMETER_BYTES
    return int(activations * ACTIVATION_FACTOR + parameters)


def _size(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 1024**2:.1f} MiB"


def _what_to_lower(batch_size: int, patch_size: Sequence[int], device: torch.device) -> str:
    amp = " or set train.amp=bf16" if device.type == "cuda" else ""
    return f"lower train.batch_size (now {batch_size}) or data.patch_size (now {list(patch_size)}){amp}"


def check_memory(network: nn.Module, *, spatial_dims: int, patch_size: Sequence[int], batch_size: int,
                 images_per_sample: int, device: torch.device) -> int:
    """Refuse (``OutOfMemory``, before step 1) a step that cannot fit in the free memory of ``device`` even at
    ``1 / REFUSE_MARGIN`` of its estimate; warn when the estimate exceeds ``WARN_FRACTION`` of it. Returns the
    estimate in bytes."""
    need = estimate_step_bytes(network, spatial_dims=spatial_dims, patch_size=patch_size, batch_size=batch_size,
                               images_per_sample=images_per_sample)
    free = free_memory_bytes(device)
    if free is None:
        return need
    sizes = f"a training step needs up to {_size(need)}, {device} has {_size(free)} free"
    if need / REFUSE_MARGIN > free:
        raise OutOfMemory(f"{sizes} (at least ~{_size(need / REFUSE_MARGIN)}): "
                          f"{_what_to_lower(batch_size, patch_size, device)}")
    if need > WARN_FRACTION * free:
        log.warning("%s: the run may run out of memory; if it does, %s", sizes,
                    _what_to_lower(batch_size, patch_size, device))
    return need


def _is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA, the CPU allocator's, or Python's ``MemoryError``)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                                or "not enough memory" in text)


def raise_if_out_of_memory(error: BaseException, *, run: Path, batch_size: int, patch_size: Sequence[int],
                           device: torch.device, estimate_bytes: int, kept: str) -> None:
    """Raise ``OutOfMemory`` (exit 2) with the sizes, what to lower and ``kept`` (what survives) when ``error`` is an
    allocation failure; return otherwise (the caller re-raises)."""
    if not _is_out_of_memory(error):
        return
    if device.type == "cuda":
        torch.cuda.empty_cache()
    raise OutOfMemory(
        f"ran out of memory on {device} (batch {batch_size} of {list(patch_size)} patches, estimated "
        f"{_size(estimate_bytes)} per step); {kept}. To go on, {_what_to_lower(batch_size, patch_size, device)} "
        "and start a new run", path=run) from None
