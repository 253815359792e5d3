"""What a run reports: ``metrics.csv`` (one row per logged step), TensorBoard events, and progress.

Progress is a tqdm bar (step, loss, rate, time left) on a terminal; elsewhere it is one log line every
``log_every`` steps. Only rank 0 builds a ``Monitor``.
"""

from __future__ import annotations

import csv
import logging
import sys
import time
from pathlib import Path

from medssl.config import write_text_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the rows of ``metrics.csv`` up to ``last_step`` (a resumed run rewrites the steps after it)."""
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    kept = [rows[0]] + [row for row in rows[1:] if row and int(row[0]) <= last_step]
    write_text_atomic(path, "".join(",".join(row) + "\n" for row in kept))


class Monitor:
    """Writes metrics of logged steps to CSV and TensorBoard and shows progress from ``start_step`` to ``steps``."""

    def __init__(self, run: Path, *, steps: int, start_step: int, log_every: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run / METRICS_FILE
        self.steps, self.start_step, self.log_every = steps, start_step, log_every
        truncate_metrics(self.path, start_step)
        self.columns: list[str] | None = None
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                self.columns = next(csv.reader(handle), None)
        self.writer = SummaryWriter(log_dir=str(run), purge_step=start_step + 1 if start_step else None)
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start_step, unit="step", dynamic_ncols=True, leave=True)
        self.started = time.perf_counter()

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` of 1-based ``step`` (every step advances the bar; every ``log_every``-th is written)."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4g}", refresh=False)
        if step % self.log_every and step != self.steps:
            return
        elapsed = time.perf_counter() - self.started
        rate = (step - self.start_step) / max(elapsed, 1e-9)
        row = {"step": step, **metrics, "seconds": round(elapsed, 3)}
        self._append(row)
        for key, value in metrics.items():
            self.writer.add_scalar(f"pretrain/{key}", value, step)
        if self.bar is None:
            eta_s = (self.steps - step) / max(rate, 1e-9)
            log.info(
                "step %d/%d  loss %.4g  %.2f steps/s  eta %s", step, self.steps, metrics["loss"], rate, _clock(eta_s)
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()

    def _append(self, row: dict[str, float]) -> None:
        if self.columns is None:
            self.columns = list(row)
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(self.columns)
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([_format(row.get(column, "")) for column in self.columns])


def _format(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"
