"""Self-supervised objectives: importing this package registers every method in ``OBJECTIVES``."""

from medssl.objectives import infoguided, lewel, msf, pgssl  # noqa: F401  (registration side effects)
from medssl.objectives.base import OBJECTIVES, VIEW_PRESETS, Objective

__all__ = ["OBJECTIVES", "VIEW_PRESETS", "Objective"]
