"""The prepared-data cache of pretraining: every scan preprocessed once (``Preprocessing``, plus its information map)
and stored on disk as a memory-mappable ``.npy`` (channels, then the map) with a ``.json`` record (source file,
its size and time, the spec, shape, affine, a histogram of the map). ``PreparedScans`` opens a cache lazily: scans
used again are kept whole in memory up to ``cache_mb``, the rest are read box by box from the memory map, so the
memory a run holds does not grow with the number of scans.

Written here rather than with MONAI's ``PersistentDataset``: that pickles whole transformed items with
``torch.save`` and loads each one whole, while view rendering needs a few boxes of a scan at a time.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medssl.data.geometry import spacing_mm as affine_spacing_mm
from medssl.data.readers import image_key
from medssl.errors import InputError
from medssl.outputs import atomic_writer, write_atomic
from medssl.transforms.infomap import information_map
from medssl.transforms.preprocess import Preprocessing

log = logging.getLogger(__name__)

FORMAT = 1  # of the .json records; another value is prepared again
HISTOGRAM_BINS = 2048  # of each information map over [0, log2(info_bins)] bits: dataset percentiles and shares
DEFAULT_CACHE_MB = 2048  # whole scans kept in memory per run (split between DataLoader workers)
_POOL_WORTH_SECONDS = 20.0  # a worker pool (seconds to start) only when the rest would take longer than this here
_PROGRESS_SECONDS = 10.0


@dataclass(frozen=True)
class PrepareSpec:
    """What a prepared scan depends on besides its file: the preprocessing, the dimensionality and the
    information map's window (``info_radius_mm`` None: no map) and quantisation."""

    preprocessing: Preprocessing
    spatial_dims: int
    info_radius_mm: float | None = None
    info_bins: int = 256

    def to_dict(self) -> dict[str, Any]:
        return {"preprocessing": self.preprocessing.to_dict(), "spatial_dims": self.spatial_dims,
                "info_radius_mm": self.info_radius_mm, "info_bins": self.info_bins}

    @property
    def max_bits(self) -> float:
        return math.log2(self.info_bins)


@dataclass(frozen=True)
class Scan:
    """One preprocessed scan: ``image (C, *S)`` in [0, 1], ``affine (D+1, D+1)`` float64 voxel -> world mm,
    ``info (1, *S)`` its information map in bits (or None)."""

    image: torch.Tensor
    affine: torch.Tensor
    subject: str
    info: torch.Tensor | None = None

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        return affine_spacing_mm(self.affine)


def entry_stem(path: str | Path, spec: PrepareSpec) -> str:
    """The cache file stem of ``path`` under ``spec``: the image's name and a hash of its absolute path and the spec."""
    text = json.dumps([str(Path(path).absolute()), spec.to_dict()], sort_keys=True)
    return f"{image_key(path)}-{hashlib.sha1(text.encode()).hexdigest()[:16]}"


def _source_stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _entry_state(path: Path, spec: PrepareSpec, folder: Path) -> tuple[str, dict[str, Any] | None]:
    """``("ok", record)``, ``("missing", None)``, ``("stale", None)`` (the file changed) or ``("corrupt", None)``."""
    stem = entry_stem(path, spec)
    record_path, array_path = folder / f"{stem}.json", folder / f"{stem}.npy"
    if not record_path.is_file():
        return "missing", None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT or record.get("spec") != spec.to_dict():
            return "stale", None
        array = np.load(array_path, mmap_mode="r")
        stored = (tuple(array.shape), str(array.dtype))
        del array
        if stored != (tuple(record["shape"]), "float32"):
            return "corrupt", None
    except (OSError, ValueError, KeyError, TypeError):
        return "corrupt", None
    if record.get("source_stamp") != _source_stamp(path):
        return "stale", None
    return "ok", record


def prepare_one(path: str | Path, spec: PrepareSpec, folder: str | Path) -> dict[str, Any]:
    """Preprocess ``path`` (and compute its information map), write its ``.npy`` and then its ``.json`` (the record
    is written last: its presence means the entry is complete) and return the record. ``InputError`` naming the file
    for an unreadable, non-finite, constant or wrong-dimensional image."""
    path, folder = Path(path), Path(folder)
    stamp = _source_stamp(path)
    image = spec.preprocessing.read(path, spec.spatial_dims)[0]
    affine = torch.as_tensor(image.affine, dtype=torch.float64)
    pixels = image.as_tensor().float()  # (C, *S)
    channels = int(pixels.shape[0])
    record: dict[str, Any] = {"format": FORMAT, "source": str(path.absolute()), "source_stamp": stamp,
                              "spec": spec.to_dict(), "subject": image_key(path), "channels": channels,
                              "affine": affine.tolist(), "info": spec.info_radius_mm is not None}
    if spec.info_radius_mm is not None:
        grey = pixels.mean(dim=0, keepdim=True)  # (1, *S)
        info = information_map(grey, affine_spacing_mm(affine), spec.info_radius_mm, spec.info_bins)
        counts = torch.histc(info.clamp(0, spec.max_bits), bins=HISTOGRAM_BINS, min=0, max=spec.max_bits)
        record.update(histogram=counts.long().tolist(), info_max=float(info.max()))
        pixels = torch.cat([pixels, info])
    record["shape"] = list(pixels.shape)
    stem = entry_stem(path, spec)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_writer(folder / f"{stem}.npy") as handle:
        np.save(handle, pixels.numpy().astype(np.float32, copy=False))
    write_atomic(folder / f"{stem}.json", json.dumps(record))
    return record


def _prepare_in_worker(path: str, spec: PrepareSpec, folder: str) -> tuple[str, dict[str, Any] | None, str | None]:
    """``prepare_one`` in a pool process: ``(path, record, None)`` or ``(path, None, error message)``."""
    torch.set_num_threads(1)  # the workers share the cores
    try:
        return path, prepare_one(path, spec, folder), None
    except InputError as error:
        return path, None, error.message
    except Exception as error:  # noqa: BLE001 - reported with its file, like the others
        return path, None, f"{type(error).__name__}: {error}"


def prepare_scans(images: Sequence[str | Path], spec: PrepareSpec, folder: str | Path,
                  workers: int | None = None) -> list[dict[str, Any]]:
    """Bring the cache in ``folder`` up to date for ``images`` and return their records (in order): entries that
    are missing, stale (the file or the spec changed) or corrupt (warned about) are prepared, over ``workers``
    processes (None: the CPU count, at most 8), with progress logged. Every file that cannot be prepared is named
    in one ``InputError``."""
    paths = [Path(p) for p in images]
    if not paths:
        raise InputError("no images to prepare; pass a folder, a datalist or image files")
    folder = Path(folder)
    for path in paths:
        if not path.is_file():
            raise InputError("image file not found; check the path or the datalist", path=path)
    records: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for index, path in enumerate(paths):
        state, record = _entry_state(path, spec, folder)
        if state == "ok":
            records[index] = record
            continue
        if state == "corrupt":
            log.warning("prepared-data cache entry of %s in %s is unreadable or incomplete: preparing it again",
                        path, folder)
        elif state == "stale":
            log.info("%s changed since it was prepared (or the preprocessing did): preparing it again", path)
        todo.append(index)
    if todo:
        workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
        if workers < 1:
            raise InputError(f"workers must be at least 1, got {workers}", path="workers")
        log.info("preparing %d of %d scan(s) into %s", len(todo), len(paths), folder)
        failures = _run_preparation([paths[i] for i in todo], spec, folder, workers, records, todo)
        if failures:
            listed = "; ".join(f"{path}: {message}" for path, message in failures[:10])
            more = f" (and {len(failures) - 10} more)" if len(failures) > 10 else ""
            raise InputError(f"{len(failures)} of {len(paths)} scan(s) cannot be used for pretraining: {listed}{more}."
                             f" Fix or remove them and run again (the {len(paths) - len(failures)} prepared ones are "
                             f"kept in {folder})")
    return [records[i] for i in range(len(paths))]


def _run_preparation(paths: list[Path], spec: PrepareSpec, folder: Path, workers: int,
                     records: dict[int, dict[str, Any]], indices: list[int]) -> list[tuple[Path, str]]:
    """Prepare ``paths`` (``indices`` into the caller's list) into ``records``; returns ``(path, message)`` failures."""
    failures: list[tuple[Path, str]] = []
    started = last = time.monotonic()
    position = {str(p): i for p, i in zip(paths, indices)}

    def report(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if done == len(paths) or now - last >= _PROGRESS_SECONDS:
            last = now
            rate = (now - started) / max(done, 1)
            log.info("prepared %d/%d scan(s) (%.0f %%), %.2f s per scan, about %.0f s left", done, len(paths),
                     100.0 * done / len(paths), rate, rate * (len(paths) - done))

    def here(path: Path) -> None:
        try:
            records[position[str(path)]] = prepare_one(path, spec, folder)
        except InputError as error:
            failures.append((path, error.message))

    here(paths[0])  # timed: the pool pays off only for long work
    report(1)
    rest = paths[1:]
    each = time.monotonic() - started
    if workers == 1 or each * len(rest) < _POOL_WORTH_SECONDS:
        for done, path in enumerate(rest, start=2):
            here(path)
            report(done)
        return failures
    log.info("preparing the other %d scan(s) in %d processes (%.1f s for the first here)", len(rest),
             min(workers, len(rest)), each)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(rest)), mp_context=context) as pool:
        futures = [pool.submit(_prepare_in_worker, str(path), spec, str(folder)) for path in rest]
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=2):
            path, record, message = future.result()
            if record is not None:
                records[position[path]] = record
            else:
                failures.append((Path(path), message or "cannot be prepared"))
            report(done)
    return sorted(failures, key=lambda failure: position[str(failure[0])])  # in input order, not completion order


class PreparedScans:
    """The prepared scans of a run, by index: opened lazily from the cache in ``folder`` (built or brought up to
    date on construction by :func:`prepare_scans`; None: a temporary folder removed with this object). A scan used a
    second time is kept whole in memory while it fits in ``cache_mb``; the others are read box by box from their
    memory maps.

    ``info_radius_mm`` (None: no maps) adds each scan's information map, computed once at its resolution.
    """

    def __init__(self, images: Sequence[str | Path], *, spatial_dims: int,
                 preprocessing: Preprocessing | None = None, info_radius_mm: float | None = None,
                 info_bins: int = 256, folder: str | Path | None = None, cache_mb: float = DEFAULT_CACHE_MB,
                 workers: int | None = None):
        if not images:
            raise InputError("no images to sample views from; pass a folder, a datalist or image files")
        if not cache_mb >= 0:
            raise InputError(f"cache_mb must be a size in MB, 0 or more, got {cache_mb!r}", path="cache_mb")
        self.paths = [Path(p) for p in images]
        self.spec = PrepareSpec(preprocessing or Preprocessing(), spatial_dims, info_radius_mm, info_bins)
        self._temporary = tempfile.TemporaryDirectory(prefix="medssl-prepared-") if folder is None else None
        self.folder = Path(self._temporary.name if self._temporary is not None else folder)
        self.records = prepare_scans(self.paths, self.spec, self.folder, workers)
        self.affines = [torch.tensor(r["affine"], dtype=torch.float64) for r in self.records]
        self.shapes = [tuple(int(n) for n in r["shape"][1:]) for r in self.records]
        self.channels = [int(r["channels"]) for r in self.records]
        self.subjects = [str(r["subject"]) for r in self.records]
        self.cache_bytes = int(cache_mb * 2**20)
        self._held: dict[int, torch.Tensor] = {}
        self._held_bytes = 0
        self._uses: dict[int, int] = {}  # samples drawn from each scan (:meth:`use`): held whole from the second

    @property
    def spatial_dims(self) -> int:
        return self.spec.spatial_dims

    @property
    def has_info(self) -> bool:
        return self.spec.info_radius_mm is not None

    def __len__(self) -> int:
        return len(self.paths)

    def spacing_mm(self, index: int) -> tuple[float, ...]:
        return affine_spacing_mm(self.affines[index])

    def limit_cache(self, cache_mb: float) -> None:
        """Keep at most ``cache_mb`` of whole scans in memory from now on (a DataLoader worker's share)."""
        self.cache_bytes = int(cache_mb * 2**20)
        while self._held and self._held_bytes > self.cache_bytes:
            self._held_bytes -= self._held.pop(next(iter(self._held))).nbytes

    def use(self, index: int) -> None:
        """Count one use of scan ``index`` (a sample drawn from it, whatever boxes it reads): from the second use the
        scan is read whole and kept in memory while the budget allows."""
        self._uses[index] = self._uses.get(index, 0) + 1

    def _array_path(self, index: int) -> Path:
        return self.folder / f"{entry_stem(self.paths[index], self.spec)}.npy"

    def _whole(self, index: int) -> torch.Tensor | None:
        """The whole stored array ``(C[+1], *S)`` if it is held in memory, else None. A scan is read whole (and held)
        from its second use (:meth:`use`) while it fits in the budget: a scan drawn once costs only its boxes, and
        under uniform sampling an evicting cache would only thrash, so held scans stay."""
        held = self._held.get(index)
        if held is None:
            if self._uses.get(index, 0) < 2:
                return None
            size = 4 * math.prod(self.records[index]["shape"])
            if self._held_bytes + size > self.cache_bytes:
                return None
            held = torch.from_numpy(np.load(self._array_path(index)))
            self._held[index], self._held_bytes = held, self._held_bytes + size
        return held

    def region(self, index: int, low: Sequence[int], high: Sequence[int]) -> torch.Tensor:
        """The stored voxels ``low <= i < high`` per axis, ``(C[+1], *box)`` float32 (the map last), a copy."""
        box = (slice(None), *(slice(int(a), int(b)) for a, b in zip(low, high)))
        whole = self._whole(index)
        if whole is not None:
            return whole[box].clone()
        mapped = np.load(self._array_path(index), mmap_mode="r")  # opened per read: no resident pages pile up
        return torch.from_numpy(np.array(mapped[box], dtype=np.float32))  # a copy: the map closes when dropped

    def info_at(self, index: int, voxels: torch.Tensor) -> torch.Tensor:
        """The information map at voxel indices ``(N, D)`` -> ``(N,)`` float32."""
        if not self.has_info:
            raise ValueError("these scans were prepared without information maps (info_radius_mm=None)")
        where = tuple(voxels.long().cpu().T.numpy())
        whole = self._whole(index)
        if whole is not None:
            return whole[-1][where].clone()
        mapped = np.load(self._array_path(index), mmap_mode="r")
        return torch.from_numpy(np.asarray(mapped[-1][where], dtype=np.float32))

    def histogram(self, index: int) -> torch.Tensor:
        """Counts of scan ``index``'s information values in ``HISTOGRAM_BINS`` bins over [0, log2(info_bins)]."""
        return torch.tensor(self.records[index]["histogram"], dtype=torch.float64)

    def __getitem__(self, index: int) -> Scan:
        """Scan ``index`` whole (image, affine, subject and map), read from the cache."""
        stored = torch.from_numpy(np.load(self._array_path(index)))
        channels = self.channels[index]
        return Scan(stored[:channels], self.affines[index], self.subjects[index],
                    stored[channels:] if self.has_info else None)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers under spawn: no held scans, no temporary owner
        state = dict(self.__dict__)
        state.update(_held={}, _held_bytes=0, _uses={}, _temporary=None)
        return state
