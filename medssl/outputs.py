"""Output files: paths checked before any work, and every file written atomically.

Every command calls ``check_output`` for each path it will write, with the paths it reads, so that a mistaken
``--out`` is refused at once (exit 2, naming the path) instead of failing after training or overwriting an input.
``undone_on_failure`` removes what a new run wrote when it fails before its first checkpoint.

Every output file is written through ``atomic_writer`` (or ``write_atomic``, ``staged_file``, ``save_figure`` built
on it): into a temporary file beside the target, renamed over it only once complete, so a reader or a killed process
never sees a truncated file and an error leaves the old file as it was. Files get mode ``0o666 & ~umask`` (0644
under the usual umask 022), as ``open(path, "w")`` would give.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Literal

from medssl.errors import InputError

log = logging.getLogger(__name__)


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest existing ancestor."""
    return next(p for p in (path, *path.parents) if p.exists())


def _same(a: Path, b: Path) -> bool:
    """Whether two resolved paths name one file or folder (hard links included)."""
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: str | Path, *, kind: Literal["file", "folder"],
                 inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse (``InputError`` naming ``path``) an output that is the wrong kind, cannot be written, or would
    overwrite an input: a ``file`` output equal to an input; a ``folder`` output equal to an input or holding one
    (anywhere below it). ``None`` inputs are skipped. Returns ``path`` unchanged."""
    target = _resolved(path)
    if kind == "file" and target.is_dir():
        raise InputError("is a folder, but this output is a file; give a file name", path=path)
    if kind == "folder" and target.exists() and not target.is_dir():
        raise InputError("is a file, but this output is a folder; give a folder name", path=path)
    for given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if _same(source, target):
            raise InputError(f"this output is also an input ({given}); writing it would overwrite the input. "
                             "Choose another output path", path=path)
        if kind == "folder" and target in source.parents:
            raise InputError(f"this output folder holds an input ({given}); writing into it could overwrite "
                             "inputs. Choose a folder that holds no inputs", path=path)
    existing = _nearest_existing(target if kind == "folder" else target.parent)
    if not existing.is_dir():
        raise InputError(f"cannot create this output: {existing} is a file, not a folder", path=path)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write this output: the folder {existing} is not writable (read-only?); choose "
                         "another output path", path=path)
    return Path(path)


@contextlib.contextmanager
def undone_on_failure(run: Path, checkpoint: Path, *, enabled: bool = True) -> Iterator[None]:
    """On an error before ``checkpoint`` (a path inside ``run``) exists, remove ``run`` if it did not exist on entry,
    else only the entries added to it since (logged as a warning); then re-raise. Does nothing when not ``enabled``
    (a resumed run, or a rank other than 0); an interrupt (Ctrl-C) keeps what the run wrote."""
    existed = run.is_dir()
    before = set(run.iterdir()) if existed else set()
    try:
        yield
    except Exception:
        if enabled and not checkpoint.exists() and run.is_dir():
            added = [run] if not existed else sorted(set(run.iterdir()) - before)
            for path in added:
                with contextlib.suppress(OSError):  # the run's own error is the one to report
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            if added:
                log.warning("the run failed before its first checkpoint: removed %s", run if not existed else
                            ", ".join(str(path) for path in added))
        raise


# --------------------------------------------------------------------------------------------- atomic writes
def temporaries(path: str | Path) -> list[Path]:
    """The temporary files ``atomic_writer`` leaves beside ``path`` when the process is killed mid-write."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file ``.<name>.<random>.tmp`` beside ``path``, opened for writing; created like ``open(path, "w")``
    does (mode ``0o666`` less the umask), unlike ``tempfile.mkstemp`` (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        with contextlib.suppress(FileExistsError):
            return os.open(temporary, flags, 0o666), temporary


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: Literal["w", "wb"] = "wb") -> Iterator[IO[Any]]:
    """A file object (``"wb"``, or ``"w"``: UTF-8 text, newlines as written) whose content replaces ``path`` on a
    clean exit (flushed to disk, then renamed over it); on an error the temporary file is removed and ``path`` is
    left as it was. Parent folders are created."""
    path = Path(path)
    descriptor, temporary = _create_temporary(path)
    try:
        text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
        with os.fdopen(descriptor, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (``str``: as UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_writer(path, "w" if isinstance(data, str) else "wb") as handle:
        handle.write(data)
    return Path(path)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through ``atomic_writer`` (never a truncated file); returns ``path``."""
    import torch  # only the writers of checkpoints need it

    with atomic_writer(path) as handle:
        torch.save(obj, handle)
    return Path(path)


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """For writers that need a file name and may add sidecar files (an ``.mhd`` header's ``.raw``): a path with
    ``path``'s name in a private folder beside it; on a clean exit every file written there is moved next to
    ``path``, sidecars first and ``path`` last; the folder is always removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging / path.name
        for written in sorted(staging.iterdir(), key=lambda f: f.name == path.name):
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_figure(figure: Any, path: str | Path, **savefig: Any) -> Path:
    """Write a ``matplotlib.figure.Figure`` as PNG to ``path`` atomically (``savefig`` options, e.g. ``dpi``);
    no pyplot and no backend switch needed."""
    with atomic_writer(path) as handle:
        figure.savefig(handle, format="png", **savefig)
    return Path(path)
