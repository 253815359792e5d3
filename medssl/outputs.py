"""Output paths checked before any work: the right kind (file or folder), writable, and never one of the inputs.

Every command calls ``check_output`` for each path it will write, with the paths it reads, so that a mistaken
``--out`` is refused at once (exit 2, naming the path) instead of failing after training or overwriting an input.
``undone_on_failure`` removes what a new run wrote when it fails before its first checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Literal

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
