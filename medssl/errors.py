"""The one exception type for bad user input: the CLI turns it into exit status 2 and one line on stderr."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input from the user: names the file (or argument) and says what is wrong and what to do.

    Example: ``InputError("cannot read image: unknown extension '.xyz'", path="scans/a.xyz")``
    renders as ``scans/a.xyz: cannot read image: unknown extension '.xyz'``.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.message = message
        super().__init__(f"{path}: {message}" if path is not None else message)
