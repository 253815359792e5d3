"""The plan of a ``medssl demo`` run shared by the report's writers: its size, its split of the population, the
row labels and their file names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PRETRAINED, RANDOM_INIT, NCC = "pretrained", "random init", "NCC"


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: ``subjects`` in the population, of which the last ``test`` are the test set and the
    ``val`` before them validate fine-tuning (the others are the training pool); ``labeled`` pool subjects for
    segmentation transfer; config overrides for pretraining and for fine-tuning."""

    subjects: int
    test: int
    val: int
    labeled: int
    pretrain: tuple[str, ...] = ()
    finetune: tuple[str, ...] = ()


@dataclass(frozen=True)
class Split:
    """The demo population under ``root`` split by subject: datalist items (paths relative to ``root``)."""

    root: Path
    pool: list[dict[str, str]]
    validation: list[dict[str, str]]
    test: list[dict[str, str]]

    @property
    def template(self) -> Path:
        return self.root / self.pool[0]["image"]

    @property
    def test_images(self) -> list[Path]:
        return [self.root / item["image"] for item in self.test]


def slug(label: str) -> str:
    """A file name for a row label: ``pretrained (infoguided)`` -> ``pretrained_infoguided``."""
    return "_".join("".join(c if c.isalnum() else " " for c in label.lower()).split())
