"""Landmark CSV files: ``image,name,x,y[,z][,score]``, one row per image and landmark, coordinates in world mm;
further columns (such as one-shot matching's ``residual_mm``) may follow and are ignored when reading.

``image`` cells match images by ``image_key`` (file name without extension), so ``a.nii.gz`` and ``a`` are the
same image. Written here because the format is ours (no library reads it).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from monai.data import MetaTensor

from medssl.data.geometry import world_to_voxel
from medssl.data.readers import image_key
from medssl.errors import InputError
from medssl.outputs import write_atomic

AXES = ("x", "y", "z")
_REQUIRED = ("image", "name", "x", "y")
SCORE = "score"


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str], list[str]]]:
    """(line number, stripped row, header) for every non-blank data row; checks the header first. A file that is not
    UTF-8 text (or holds NUL bytes) is an ``InputError``."""
    if not path.is_file():
        raise InputError("no such landmark CSV; check the path", path=path)
    try:
        yield from _text_rows(path)
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"not a landmark CSV: not UTF-8 text without NUL bytes ({type(error).__name__}); expected a header "
                         "'image,name,x,y' or 'image,name,x,y,z'", path=path) from None


def _text_rows(path: Path) -> Iterator[tuple[int, dict[str, str], list[str]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next((row for row in reader if any(cell.strip() for cell in row)), None)
        if header is None:
            raise InputError("empty landmark CSV; expected a header 'image,name,x,y' or 'image,name,x,y,z'", path=path)
        header = [cell.strip().lower() for cell in header]
        missing = [column for column in _REQUIRED if column not in header]
        if missing:
            raise InputError(f"landmark CSV lacks column(s) {', '.join(missing)}; header must be "
                             f"'image,name,x,y' or 'image,name,x,y,z' (optional 'score'), got '{','.join(header)}'",
                             path=path)
        any_row = False
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise InputError(f"line {reader.line_num}: {len(row)} cells for {len(header)} columns", path=path)
            any_row = True
            yield reader.line_num, {column: cell.strip() for column, cell in zip(header, row)}, header
        if not any_row:
            raise InputError("landmark CSV has a header but no rows", path=path)


def _number(cell: str, column: str, line: int, path: Path) -> float:
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InputError(f"line {line}: column '{column}' must be a finite number, got '{cell}'", path=path)
    return value


def _read(path: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, float]]]:
    """Landmarks and scores (empty without a score column) of one CSV."""
    path = Path(path)
    landmarks: dict[str, dict[str, np.ndarray]] = {}
    scores: dict[str, dict[str, float]] = {}
    for line, row, header in _rows(path):
        axes = AXES if "z" in header else AXES[:2]
        key, name = image_key(row["image"]), row["name"]
        if not key or not name:
            raise InputError(f"line {line}: 'image' and 'name' must not be empty", path=path)
        if name in landmarks.get(key, {}):
            raise InputError(f"line {line}: duplicate row for image '{key}' landmark '{name}'", path=path)
        landmarks.setdefault(key, {})[name] = np.array([_number(row[a], a, line, path) for a in axes])
        if SCORE in header:
            scores.setdefault(key, {})[name] = _number(row[SCORE], SCORE, line, path)
    return landmarks, scores


def read_landmarks(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Image key -> landmark name -> world position in mm, float64 ``(D,)``."""
    return _read(path)[0]


def read_scores(path: str | Path) -> dict[str, dict[str, float]]:
    """Image key -> landmark name -> score, from the optional ``score`` column (empty dict without one)."""
    return _read(path)[1]


def write_landmarks(path: str | Path, landmarks: Mapping[str, Mapping[str, np.ndarray]],
                    scores: Mapping[str, Mapping[str, float]] | None = None,
                    spatial_dims: int | None = None,
                    columns: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None) -> Path:
    """Write landmarks (image key -> name -> world mm ``(D,)``) atomically, rows sorted by image then name.

    ``spatial_dims`` fixes the header when there are no landmarks and is checked against them otherwise.
    ``columns``: more numeric columns after ``score`` (column -> image key -> name -> value; a missing value is
    written as an empty cell); readers ignore them.
    """
    path = Path(path)
    found = sorted({int(np.asarray(p).shape[-1]) for by_name in landmarks.values() for p in by_name.values()})
    dims = spatial_dims if spatial_dims is not None else (found[0] if len(found) == 1 else None)
    if dims not in (2, 3) or any(size != dims for size in found):
        raise ValueError(f"cannot write {path}: landmarks need one dimension, 2 or 3 (spatial_dims={spatial_dims}, "
                         f"found {found or 'no landmarks'})")
    columns = dict(columns or {})
    header = ["image", "name", *AXES[:dims]] + ([SCORE] if scores is not None else []) + list(columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for key in sorted(landmarks):
        for name in sorted(landmarks[key]):
            row = [key, name, *(f"{float(v):.4f}" for v in np.asarray(landmarks[key][name], dtype=float))]
            if scores is not None:
                if name not in scores.get(key, {}):
                    raise ValueError(f"cannot write {path}: no score for image '{key}' landmark '{name}'")
                row.append(f"{float(scores[key][name]):.6g}")
            for table in columns.values():
                value = table.get(key, {}).get(name)
                row.append("" if value is None or not math.isfinite(value) else f"{float(value):.6g}")
            writer.writerow(row)
    write_atomic(path, buffer.getvalue())
    return path


def check_landmarks_in_image(landmarks: Mapping[str, np.ndarray], image: MetaTensor, csv_path: str | Path,
                             image_path: str | Path) -> None:
    """``InputError`` naming the CSV when a landmark (name -> world mm) lies outside ``image`` (voxel index
    outside ``[-0.5, n - 0.5]`` on some axis) or has a dimension other than the image's."""
    dims = image.ndim - 1
    shape = np.array(image.shape[1:], dtype=float)
    affine = torch.as_tensor(image.affine).detach().cpu().double().numpy()
    for name, position in sorted(landmarks.items()):
        position = np.asarray(position, dtype=float)
        if position.shape != (dims,):
            raise InputError(f"landmark '{name}' has {position.shape[-1]} coordinates but image {image_path} is "
                             f"{dims}D; use columns {','.join(AXES[:dims])}", path=csv_path)
        index = world_to_voxel(affine, position)
        if np.any(index < -0.5) or np.any(index > shape - 0.5):
            raise InputError(f"landmark '{name}' at {np.round(position, 4).tolist()} mm lies outside image "
                             f"{image_path} (voxel {np.round(index, 2).tolist()}, shape {shape.astype(int).tolist()}); "
                             "coordinates must be world mm in the image's frame", path=csv_path)
