"""What the benchmark modules share: the repository root, the command-line preamble and output, device timing."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def argument_parser(module: str, doc: str, *, full: bool = False) -> argparse.ArgumentParser:
    """The parser of ``python -m <module>`` (its usage line names that command); the description is the first line
    of the module docstring ``doc``, or with ``full`` all of it as written."""
    if full:
        return argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])


def log_progress() -> None:
    """Log INFO and above to stderr with the time and the logger's name (a benchmark's progress)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def emit(text: str, out: Path | None) -> None:
    """Print ``text`` (a benchmark's Markdown result) and, when ``out`` is given, also write it there."""
    print(text)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")


def synchronise(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
