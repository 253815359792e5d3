"""Scores in millimetres: landmark radial error / MRE / SDR (``landmarks``), Dice / HD95 per class
(``segmentation``, via ``monai.metrics``) and the file-level ``medssl evaluate`` reports (``report``)."""

from medssl.metrics.landmarks import landmark_scores, radial_errors_mm
from medssl.metrics.segmentation import segmentation_scores

__all__ = ["landmark_scores", "radial_errors_mm", "segmentation_scores"]
