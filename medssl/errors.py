"""The errors a user can act on; the CLI turns each into exit status 2 and one line on stderr (no traceback).

``InputError``: bad input (a file, argument or config value). ``TrainingError``: a run that read its inputs but
could not produce a result, e.g. ``TrainingDiverged`` (its loss became NaN or infinite).
"""

from __future__ import annotations

from pathlib import Path


class MedsslError(Exception):
    """An error that names the file (or argument) involved and says what is wrong and what to do.

    Example: ``InputError("cannot read image: unknown extension '.xyz'", path="scans/a.xyz")``
    renders as ``scans/a.xyz: cannot read image: unknown extension '.xyz'``.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.message = message
        super().__init__(f"{path}: {message}" if path is not None else message)


class InputError(MedsslError, ValueError):
    """Bad input from the user: a file, a command-line argument or a config value."""


class TrainingError(MedsslError, RuntimeError):
    """A training run failed for a reason its inputs did not show up front (what survives is in the message)."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite: training stops, the last good checkpoint stays in the run folder."""
