"""Devices and ``torchrun`` support: process group set-up (gloo on CPU, nccl on CUDA) and the few collectives the loop needs.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything degrades to a single process and the
collectives are identities, so the loop has one code path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from medssl.errors import InputError
from medssl.registry import look_up

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


DEVICES = ("auto", "cpu", "cuda")


def pick_device(preference: str | torch.device, *, option: str = "--device") -> torch.device:
    """``auto`` -> CUDA when a GPU is visible, else CPU; an unknown name, or ``cuda`` without a GPU, is an
    ``InputError`` naming ``option`` (the CLI flag or config key that chose it). A ``torch.device`` is returned
    as it is (a device already chosen)."""
    if isinstance(preference, torch.device):
        return preference
    look_up(preference, DEVICES, what="device", path=option)
    if preference == "cuda" and not torch.cuda.is_available():
        raise InputError("no CUDA GPU is visible; use auto or cpu", path=option)
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def setup(device_preference: str) -> Context:
    """Join the ``torchrun`` process group if there is one; returns this process's ``Context``."""
    device = pick_device(device_preference, option="train.device")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context(rank=0, world_size=1, device=device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    context = Context(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)
    log.debug("process %d of %d on %s", context.rank, context.world_size, device)
    return context


def teardown(context: Context, *, finished: bool = True) -> None:
    """Leave the process group (if this run joined one). After a finished run every rank first waits for the others
    (a barrier): a rank that closed its connections while a peer was still using them aborted gloo at exit
    ("terminate called without an active exception"). After an error there is no barrier (the peers may be gone)."""
    if context.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def sum_across_ranks(values: torch.Tensor, context: Context) -> torch.Tensor:
    """Element-wise sum of ``values`` over all processes (a copy; the input is untouched)."""
    total = values.detach().clone()
    if context.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather_objects(obj: Any, context: Context) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not context.distributed:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, context: Context) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not context.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def on_main(compute: Callable[[], T], context: Context) -> T:
    """``compute()`` run on rank 0 only, its result on every rank; an ``InputError`` it raises is raised on every
    rank (so that no rank waits for a result that will never come)."""
    result, error = None, None
    if context.is_main:
        try:
            result = compute()
        except InputError as raised:
            error = (raised.message, raised.path)
    result, error = broadcast_object((result, error), context)
    if error is not None:
        raise InputError(*error)
    return result


def concat_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``(N, ...)`` per process -> ``(world_size * N, ...)`` on every process (no gradient), e.g. to feed a memory
    bank with the whole global batch; the identity outside ``torchrun``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)  # (world_size * N, ...)
