"""``report.md`` of ``medssl demo``: the results tables, the figures, what ran on what, and how long each stage took.

The numbers come in as the score dictionaries of ``medssl.metrics`` (``landmark_scores``, ``segmentation_scores``),
so the report shows exactly what ``medssl evaluate landmarks|seg`` would print for the same files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medssl.outputs import write_atomic


@dataclass(frozen=True)
class Row:
    """One line of a results table: a model's ``label``, its ``scores`` dictionary, and the files behind it
    (``source``: prediction CSV or run folder). ``seconds_per_image``: one-shot rows only."""

    label: str
    scores: dict[str, Any]
    source: Path
    seconds_per_image: float | None = None


@dataclass
class DemoResults:
    """Everything ``report.md`` shows. ``setup``: section -> ordered ``{item: text}``; ``figures``: caption -> PNG
    path relative to the report; ``stages``: stage -> seconds; ``commands``: how to rerun each stage."""

    title: str
    landmarks: list[Row]
    segmentation: list[Row]
    class_names: dict[int, str]
    setup: dict[str, dict[str, str]]
    figures: dict[str, str] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table: ``header``, the rule, one line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def landmark_table(rows: list[Row]) -> list[str]:
    """Markdown lines: MRE ± SD (mm), SDR per radius (%), seconds per image, one line per row."""
    radii = list(rows[0].scores["sdr"])
    header = ["method", "MRE ± SD (mm)"] + [f"SDR {r} mm" for r in radii] + ["s / image"]
    lines = [[row.label, f"{_number(row.scores['mre_mm'])} ± {_number(row.scores['std_mm'])}"]
             + [f"{100 * row.scores['sdr'][r]:.1f} %" for r in radii] + [_number(row.seconds_per_image)]
             for row in rows]
    return markdown_table(header, lines)


def segmentation_table(rows: list[Row], class_names: dict[int, str]) -> list[str]:
    """Markdown lines: mean Dice, Dice and HD95 (mm) per class, one line per row."""
    classes = sorted({c for row in rows for c in row.scores["dice"]}, key=int)
    names = [class_names.get(int(c), f"class {c}") for c in classes]
    header = ["init", "mean Dice"] + [f"Dice {n}" for n in names] + [f"HD95 {n} (mm)" for n in names]
    lines = [[row.label, _number(row.scores["mean_dice"], 3)]
             + [_number(row.scores["dice"].get(c), 3) for c in classes]
             + [_number(row.scores["hd95_mm"].get(c)) for c in classes] for row in rows]
    return markdown_table(header, lines)


def summary(results: DemoResults) -> list[str]:
    """One sentence per task comparing the first row (pretrained) with the others, from the numbers alone."""
    first, *others = results.landmarks
    compared = "; ".join(f"{row.label} {_number(row.scores['mre_mm'])} mm" for row in others)
    lines = [f"- One-shot landmarks: {first.label} finds the template's landmarks with a mean radial error of "
             f"{_number(first.scores['mre_mm'])} mm ({compared})."]
    first, *others = results.segmentation
    compared = "; ".join(f"{row.label} {_number(row.scores['mean_dice'], 3)}" for row in others)
    lines.append(f"- Segmentation transfer: {first.label} reaches a mean test Dice of "
                 f"{_number(first.scores['mean_dice'], 3)} ({compared}).")
    return lines


def render(results: DemoResults) -> str:
    """The whole ``report.md`` text."""
    total = sum(results.stages.values())
    lines = [f"# {results.title}", ""]
    lines += [f"> {note}" for note in results.notes] + ([""] if results.notes else [])
    lines += ["## Results", ""] + summary(results) + [""]
    lines += ["### One-shot landmarks (test images)", ""] + landmark_table(results.landmarks) + [""]
    lines += ["### Segmentation transfer (test images)", ""]
    lines += segmentation_table(results.segmentation, results.class_names) + [""]
    lines += ["## Figures", ""]
    for caption, path in results.figures.items():
        lines += [f"**{caption}**", "", f"![{caption}]({path})", ""]
    lines += ["## What ran", ""]
    for section, items in results.setup.items():
        lines += [f"**{section}**", ""] + [f"- {key}: {value}" for key, value in items.items()] + [""]
    lines += ["## Time per stage", ""]
    lines += markdown_table(["stage", "seconds"], [[name, f"{seconds:.1f}"] for name, seconds in results.stages.items()]
                    + [["total", f"{total:.1f}"]]) + [""]
    lines += ["## Rerun a stage", "", "Each run folder holds its fully resolved `config.yaml`.", "", "```bash"]
    lines += results.commands + ["```", ""]
    return "\n".join(lines)


def write_report(path: str | Path, results: DemoResults) -> Path:
    """Write ``render(results)`` to ``path`` atomically; returns the path."""
    path = Path(path)
    write_atomic(path, render(results))
    return path
