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

from medssl.outputs import atomic_writer, write_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
SECONDS = "seconds"  # the column of training time, continued across resumptions
#: metrics named ``val/...`` (``medssl.engine.validation``) appear in every log line and keep their TensorBoard name
VALIDATION_PREFIX = "val/"


def truncate_metrics(path: Path, last_step: int) -> list[list[str]]:
    """Keep only the rows of ``metrics.csv`` up to ``last_step`` (a resumed run rewrites the steps after it) and drop
    a row cut short (rows are appended, so a run killed mid-write can leave a partial last line); returns the header
    and the kept rows (empty without a file)."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return []
    whole = [row for row in rows[1:] if len(row) == len(rows[0]) and row[0].isdigit()]
    kept = [rows[0]] + [row for row in whole if int(row[0]) <= last_step]
    write_atomic(path, "".join(",".join(row) + "\n" for row in kept))
    return kept


class Monitor:
    """Writes metrics of logged steps to CSV and TensorBoard (tags ``<prefix>/<name>``) and shows progress from
    ``start_step`` to ``steps``."""

    def __init__(self, run: Path, *, steps: int, start_step: int, log_every: int, prefix: str = "pretrain"):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run / METRICS_FILE
        self.steps, self.start_step, self.log_every, self.prefix = steps, start_step, log_every, prefix
        kept = truncate_metrics(self.path, start_step)
        self.columns: list[str] | None = kept[0] if kept else None
        #: ``seconds`` of the last kept row: a resumed run's clock continues from it
        self.seconds_before = _last_seconds(kept)
        self.writer = SummaryWriter(log_dir=str(run), purge_step=start_step + 1 if start_step else None)
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start_step, unit="step", dynamic_ncols=True, leave=True)
        self.started = time.perf_counter()

    def step(self, step: int, metrics: dict[str, float], force: bool = False) -> None:
        """Record ``metrics`` of 1-based ``step`` (every step advances the bar; every ``log_every``-th, the last and
        any ``force``-d one are written)."""
        shown = {key: value for key, value in metrics.items() if key.startswith(VALIDATION_PREFIX)}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4g}", **{k: f"{v:.4g}" for k, v in shown.items()},
                                 refresh=False)
        if step % self.log_every and step != self.steps and not force:
            return
        elapsed = time.perf_counter() - self.started
        rate = (step - self.start_step) / max(elapsed, 1e-9)
        row = {"step": step, **metrics, SECONDS: round(self.seconds_before + elapsed, 3)}
        self._append(row)
        for key, value in metrics.items():
            self.writer.add_scalar(key if key in shown else f"{self.prefix}/{key}", value, step)
        if self.bar is None:
            eta_s = (self.steps - step) / max(rate, 1e-9)
            log.info(
                "step %d/%d  loss %.4g%s  %.2f steps/s  eta %s", step, self.steps, metrics["loss"],
                "".join(f"  {key} {value:.4g}" for key, value in shown.items()), rate, clock(eta_s),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()

    def _append(self, row: dict[str, float]) -> None:
        if self.columns is None:
            self.columns = list(row)
            with atomic_writer(self.path, "w") as handle:
                csv.writer(handle, lineterminator="\n").writerow(self.columns)
        new = [column for column in row if column not in self.columns]
        if new:  # e.g. the first validation: widen the header, earlier rows get empty cells
            self.columns += new
            with self.path.open(newline="") as handle:
                rows = list(csv.reader(handle))[1:]
            lines = [self.columns] + [r + [""] * (len(self.columns) - len(r)) for r in rows]
            write_atomic(self.path, "".join(",".join(line) + "\n" for line in lines))
        with self.path.open("a", newline="") as handle:
            cells = [_format(row.get(column, "")) for column in self.columns]
            csv.writer(handle, lineterminator="\n").writerow(cells)


def _last_seconds(rows: list[list[str]]) -> float:
    """The ``seconds`` cell of the last of ``rows`` (header first; 0 without one)."""
    if len(rows) < 2 or SECONDS not in rows[0]:
        return 0.0
    index = rows[0].index(SECONDS)
    return float(rows[-1][index]) if index < len(rows[-1]) and rows[-1][index] else 0.0


def _format(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60:d}:{minutes % 60:02d}:{secs:02d}"
