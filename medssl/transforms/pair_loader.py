"""The stream of view-pair batches a pretraining loop consumes, rendered in the training process or in DataLoader
worker processes with prefetching. Worker ``w`` of ``W`` renders the steps ``start + w, start + w + W, ...`` and the
DataLoader hands them over in step order; since every sample is seeded by ``(seed, step, index)`` the batches are the
same for any number of workers and after a resume.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medssl.data.batch import PairBatch
from medssl.errors import InputError
from medssl.transforms.sampler import ViewPairSampler

#: data-section keys of the loader (not of the sampler): worker processes and batches prefetched per worker
LOADER_KEYS = ("workers", "prefetch")


class PairBatches(IterableDataset):
    """Batches ``start .. stop - 1`` of ``sampler`` (``batch_size`` samples from index ``first`` of each global
    batch), this worker's share of them when iterated inside a DataLoader worker."""

    def __init__(self, sampler: ViewPairSampler, *, start: int, stop: int, batch_size: int, first: int = 0):
        self.sampler, self.start, self.stop = sampler, int(start), int(stop)
        self.batch_size, self.first = int(batch_size), int(first)

    def __iter__(self) -> Iterator[PairBatch]:
        worker = get_worker_info()
        index, count = (0, 1) if worker is None else (worker.id, worker.num_workers)
        if worker is not None:  # the memory budget for whole scans is shared by the workers
            self.sampler.scans.limit_cache(self.sampler.scans.cache_bytes / 2**20 / count)
        for step in range(self.start + index, self.stop, count):
            yield self.sampler.sample(self.batch_size, step=step, first=self.first)


def default_workers(device: torch.device) -> int:
    """Render in the training process on a CPU (the cores are busy training); on a GPU, half the cores, at most 8."""
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))


def check_loader_options(workers: object, prefetch: object) -> None:
    """``InputError`` naming ``data.workers`` / ``data.prefetch`` for values that are not counts."""
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise InputError(f"must be a number of worker processes (0 = render in the training process) or null, got "
                         f"{workers!r}", path="data.workers")
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
        raise InputError(f"must be a positive number of batches per worker, got {prefetch!r}", path="data.prefetch")


def pair_batches(sampler: ViewPairSampler, *, start: int, stop: int, batch_size: int, first: int = 0,
                 workers: int = 0, prefetch: int = 2, pin_memory: bool = False) -> Iterator[PairBatch]:
    """The batches of steps ``start .. stop - 1`` in order: rendered here (``workers`` 0) or by ``workers``
    DataLoader processes (the sampler must then render on the CPU) with ``prefetch`` batches in flight each.
    Closing the iterator (or dropping it) stops the workers. The global random generators are not touched."""
    check_loader_options(workers, prefetch)
    dataset = PairBatches(sampler, start=start, stop=stop, batch_size=batch_size, first=first)
    if workers == 0:
        yield from dataset
        return
    if sampler.device.type != "cpu":
        raise ValueError("DataLoader workers render on the CPU: build the sampler with device='cpu'")
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=prefetch,
                        pin_memory=pin_memory, generator=torch.Generator())  # its own seed draw: no global RNG use
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        del iterator  # shuts the workers down now, also on an error or an early stop
