"""Data for fine-tuning: the labeled / validation / pseudo-labeled split, and
random training patches that depend only on ``(seed, step)`` (so a resumed run draws exactly the batches of an
uninterrupted one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    ClassesToIndicesd, Compose, RandAffined, RandCropByLabelClassesd, RandScaleIntensityd, RandShiftIntensityd,
    RandSpatialCropd, SpatialPadd,
)

from medssl.data import keys
from medssl.data.geometry import coordinate_grid
from medssl.data.inputs import read_datalist, resolve_images, resolve_items
from medssl.data.landmarks import check_landmarks_in_image, read_landmarks
from medssl.data.readers import image_key, load_label
from medssl.engine.finetune_config import FinetuneConfig
from medssl.errors import InputError
from medssl.networks.task import TaskHead
from medssl.transforms.preprocess import Preprocessing

log = logging.getLogger(__name__)

Item = dict[str, Path]
_INDICES = f"{keys.LABEL}_cls_indices"  # ClassesToIndicesd's output key for the label


@dataclass
class Case:
    """One preprocessed image on the working grid: ``image`` ``(C, *S)``, ``label`` ``(1, *S)`` int64 or None,
    ``points_mm`` ``(L, D)`` world landmarks (NaN = absent) or None; ``truth`` False for pseudo-labels."""

    key: str
    image: MetaTensor
    label: MetaTensor | None = None
    points_mm: np.ndarray | None = None
    truth: bool = True


def load_case(path: Path, label_path: Path | None = None, *, spatial_dims: int, preprocessing: Preprocessing,
              landmarks: dict[str, np.ndarray] | None = None, names: Sequence[str] = (),
              csv_path: Path | None = None, truth: bool = True) -> Case:
    """Read, check and prepare one image (and its label map); ``landmarks`` (name -> mm, checked to lie inside the
    image) become ``points_mm`` in the order of ``names``."""
    raw = preprocessing.load(path, spatial_dims)
    label = load_label(label_path, like=raw) if label_path is not None else None
    points = None
    if landmarks is not None:
        check_landmarks_in_image(landmarks, raw, csv_path, path)
        points = np.array([landmarks.get(name, np.full(spatial_dims, np.nan)) for name in names], dtype=float)
    image, label = preprocessing(raw, label)
    return Case(image_key(path), image, label, points, truth)


def split_items(training: Sequence[Item], validation: Sequence[Item], is_labeled: Callable[[Item], bool], *,
                labeled: int | None, val_fraction: float, seed: int,
                source: Path) -> tuple[list[Item], list[Item], list[Item]]:
    """``(labeled, validation, unlabeled)`` items. Validation: the datalist's labeled ``validation`` entries, else a
    ``val_fraction`` of the labeled training entries held out first; labeled: the first ``labeled`` (None: all) of
    the rest in a ``seed``-ed shuffle (so the choice of 1 is inside the choice of 3); unlabeled: the others."""
    shared = {item[keys.IMAGE] for item in training} & {item[keys.IMAGE] for item in validation}
    if shared:
        raise InputError(f"{len(shared)} image(s) are listed under both training and validation (e.g. "
                         f"{sorted(shared)[0]}); validation must never overlap training", path=source)
    candidates = [item for item in training if is_labeled(item)]
    unlabeled = [item for item in training if not is_labeled(item)]
    shuffled = [candidates[i] for i in np.random.default_rng(seed).permutation(len(candidates))]
    held = [item for item in validation if is_labeled(item)]
    if not held:
        n_val = max(1, int(round(val_fraction * len(candidates))))
        if len(candidates) - n_val < 1:
            raise InputError(f"{len(candidates)} labeled image(s) cannot give both a training and a validation set; "
                             "add images or list validation entries in the datalist", path=source)
        held, shuffled = shuffled[:n_val], shuffled[n_val:]
    count = len(shuffled) if labeled is None else labeled
    if count > len(shuffled):
        raise InputError(f"--labeled {labeled} exceeds the {len(shuffled)} labeled training image(s) left after "
                         f"holding out {len(held)} for validation", path=source)
    return shuffled[:count], held, unlabeled + shuffled[count:]


@dataclass
class FinetuneBatch:
    """A batch of training patches: ``image`` ``(B, C, *P)``; ``label`` ``(B, 1, *P)`` int64 (segmentation);
    ``coords`` ``(B, D, *P)`` world mm of every pixel, ``points_mm`` ``(B, L, D)`` (NaN = absent) and ``present``
    ``(B, L)`` bool (landmarks)."""

    image: torch.Tensor
    label: torch.Tensor | None = None
    coords: torch.Tensor | None = None
    points_mm: torch.Tensor | None = None
    present: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "FinetuneBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})


class PatchSampler:
    """Random training patches of ``cases``: class-balanced crops of label maps (segmentation, ``num_classes``) or
    uniform crops carrying a coordinate map (landmarks), optionally augmented (rotation, scaling, intensity).

    Batches depend only on ``(seed, step)``. With ``anchors`` (indices into ``cases``), the first patch of every batch
    comes from them in turn (CC2D stage 2: the true template in every batch of pseudo-labeled images).
    """

    def __init__(self, cases: Sequence[Case], *, patch_size: Sequence[int], num_classes: int | None = None,
                 augment: bool = True, rotate_deg: float = 10.0, scale_range: float = 0.1, seed: int = 0,
                 anchors: Sequence[int] = ()):
        if not cases:
            raise InputError("no training images")
        self.cases, self.seed, self.anchors = list(cases), int(seed), list(anchors)
        self.segmentation = cases[0].label is not None
        patch = [int(p) for p in patch_size]
        dims = len(patch)
        spatial = [keys.IMAGE, keys.LABEL if self.segmentation else keys.COORDS]
        self.padded = [self._pad(case, patch, num_classes) for case in self.cases]
        if self.segmentation:
            crop = RandCropByLabelClassesd(keys=spatial, label_key=keys.LABEL, spatial_size=patch,
                                           num_classes=num_classes, indices_key=_INDICES, warn=False)
        else:
            crop = RandSpatialCropd(keys=spatial, roi_size=patch, random_size=False)
        steps: list[Any] = [crop]
        if augment:
            angle = np.radians(rotate_deg)
            steps += [
                RandAffined(keys=spatial, prob=0.8, rotate_range=[angle] * (1 if dims == 2 else 3),
                            scale_range=[scale_range] * dims, mode=["bilinear", "nearest" if self.segmentation else
                                                                    "bilinear"],
                            padding_mode=["zeros", "zeros" if self.segmentation else "border"]),
                RandScaleIntensityd(keys=keys.IMAGE, factors=0.1, prob=0.5),
                RandShiftIntensityd(keys=keys.IMAGE, offsets=0.1, prob=0.5),
            ]
        self.transform = Compose(steps)

    @staticmethod
    def _pad(case: Case, patch: list[int], num_classes: int | None) -> dict[str, Any]:
        """The case padded to at least the patch size, as plain tensors (+ class indices, or a coordinate map
        computed after padding so that padded pixels keep exact world positions)."""
        names = [keys.IMAGE] + ([keys.LABEL] if case.label is not None else [])
        padded = SpatialPadd(keys=names, spatial_size=patch)({keys.IMAGE: case.image, keys.LABEL: case.label})
        data: dict[str, Any] = {keys.IMAGE: padded[keys.IMAGE].as_tensor().float()}
        if case.label is not None:
            data[keys.LABEL] = padded[keys.LABEL].as_tensor()
            data = ClassesToIndicesd(keys=keys.LABEL, num_classes=num_classes)(data)
        else:
            data[keys.COORDS] = coordinate_grid(padded[keys.IMAGE].affine, padded[keys.IMAGE].shape[1:])
        return data

    def sample(self, step: int, batch_size: int) -> FinetuneBatch:
        """The batch of training step ``step`` (0-based)."""
        rng = np.random.default_rng([self.seed, step])
        picks = [int(i) for i in rng.integers(len(self.cases), size=batch_size)]
        if self.anchors:
            picks[0] = self.anchors[step % len(self.anchors)]
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        patches = []
        for index in picks:
            out = self.transform(dict(self.padded[index]))
            patches.append(out[0] if isinstance(out, list) else out)
        image = torch.stack([torch.as_tensor(p[keys.IMAGE]).float() for p in patches])  # (B, C, *P)
        if self.segmentation:
            label = torch.stack([torch.as_tensor(p[keys.LABEL]).round().long() for p in patches])  # (B, 1, *P)
            return FinetuneBatch(image, label=label)
        coords = torch.stack([torch.as_tensor(p[keys.COORDS]).float() for p in patches])  # (B, D, *P)
        points = torch.as_tensor(np.stack([self.cases[i].points_mm for i in picks]), dtype=torch.float32)  # (B, L, D)
        present = torch.isfinite(points).all(dim=-1)  # (B, L)
        return FinetuneBatch(image, coords=coords, points_mm=points, present=present)


@dataclass
class TaskData:
    """Prepared training and validation cases, and what the head predicts."""

    train: list[Case]
    validation: list[Case]
    task: TaskHead
    anchors: list[int] = field(default_factory=list)  # indices of true-labeled cases among pseudo-labeled ones

    @property
    def num_classes(self) -> int | None:
        return len(self.task.classes) if self.task.kind == "seg" else None

    @property
    def head_channels(self) -> int:
        return self.task.channels


def _sections(path: Path) -> dict[str, list[Item]]:
    """The sections of a datalist JSON (``training``, ``validation``, ``test``); any other PATH: its images, all
    ``training``."""
    if path.suffix.lower() == ".json":
        return read_datalist(path)
    return {"training": resolve_items(path)}


def prepare_data(config: FinetuneConfig) -> tuple[TaskData, dict[str, Any]]:
    """Split, read and prepare the images; returns the data and the split record (``split.json``)."""
    data = config.data
    source = Path(data.path)
    sections = _sections(source)
    training, validation = sections.get("training", []), sections.get("validation", [])
    load = dict(spatial_dims=config.spatial_dims, preprocessing=config.preprocessing)
    if config.task == "seg":
        is_labeled: Callable[[dict], bool] = lambda item: keys.LABEL in item  # noqa: E731
        if not any(is_labeled(item) for item in training):
            raise InputError("no training entry has a 'label'; segmentation needs a datalist with label maps",
                             path=source)
    else:
        table = read_landmarks(data.landmarks)
        names = sorted({name for by_name in table.values() for name in by_name})
        is_labeled = lambda item: _key(item) in table  # noqa: E731
        load.update(names=names, csv_path=Path(data.landmarks))
        if not any(is_labeled(item) for item in training):
            raise InputError(f"no training image of {source} has rows in this CSV (rows match images by file name)",
                             path=data.landmarks)
        not_found = _check_landmark_rows(table, sections, Path(data.landmarks), source)
    chosen, held, unlabeled = split_items(training, validation, is_labeled, labeled=data.labeled,
                                          val_fraction=data.val_fraction, seed=data.split_seed, source=source)
    if config.task == "seg":
        train = [load_case(item[keys.IMAGE], item[keys.LABEL], **load) for item in chosen]
        val = [load_case(item[keys.IMAGE], item[keys.LABEL], **load) for item in held]
        classes = config.seg.num_classes or 1 + max(int(c.label.max()) for c in train + val)
        for item, case in zip(chosen + held, train + val):
            if int(case.label.max()) >= classes:
                raise InputError(f"label {int(case.label.max())} found but seg.num_classes={classes} (labels must be "
                                 f"0 .. {classes - 1})", path=item[keys.LABEL])
        task = TaskHead("seg", classes=tuple(range(classes)))
        record: dict[str, Any] = {}
    else:
        train = [load_case(item[keys.IMAGE], landmarks=table[_key(item)], **load) for item in chosen]
        val = [load_case(item[keys.IMAGE], landmarks=table[_key(item)], **load) for item in held]
        task = TaskHead("landmarks", names=tuple(names), sigma_mm=config.landmarks.sigma_mm)
        record = {"missing_landmarks": _missing(train, names), "csv_images_not_found": not_found}
    anchors: list[int] = []
    if data.pseudo is not None:
        pseudo = (_pseudo_label_maps(Path(data.pseudo), unlabeled, load, len(task.classes)) if config.task == "seg"
                  else _pseudo_cases(Path(data.pseudo), unlabeled, load))
        anchors, train = list(range(len(train))), train + pseudo
        record["pseudo"] = [case.key for case in pseudo]
    record = {"labeled": [c.key for c in train if c.truth], "validation": [c.key for c in val],
              "unlabeled": [_key(item) for item in training if not is_labeled(item)], **record}
    log.info("%s: %d labeled training image(s) (split_seed %d): %s; %d validation image(s); %d without labels%s",
             config.name, len(record["labeled"]), data.split_seed, ", ".join(record["labeled"]), len(val),
             len(record["unlabeled"]), f"; {len(record['pseudo'])} pseudo-labeled" if "pseudo" in record else "")
    return TaskData(train, val, task, anchors), record


def _key(item: dict) -> str:
    return image_key(item[keys.IMAGE])


def _check_landmark_rows(table: dict[str, Any], sections: dict[str, list[Item]], csv_path: Path,
                         source: Path) -> list[str]:
    """Refuse a datalist ``validation`` image without rows in the CSV; returns the CSV's images that are none of the
    data's images (their rows are not used; a warning)."""
    unlabeled = [_key(item) for item in sections.get("validation", []) if _key(item) not in table]
    if unlabeled:
        raise InputError(f"validation image(s) {', '.join(unlabeled[:5])} of {source} have no rows in this CSV; add "
                         "their landmarks or move them out of the datalist's validation list", path=csv_path)
    not_found = sorted(table.keys() - {_key(item) for items in sections.values() for item in items})
    if not_found:
        log.warning("%s: %d image(s) with landmark rows are not among the images of %s and are not used: %s%s "
                    "(rows match images by file name without extension)", csv_path, len(not_found), source,
                    ", ".join(not_found[:5]), " ..." if len(not_found) > 5 else "")
    return not_found


def _missing(cases: list[Case], names: list[str]) -> dict[str, list[str]]:
    """Image key -> names of the landmarks it lacks (masked in the loss); logged as a warning."""
    missing = {c.key: [n for n, p in zip(names, c.points_mm) if not np.all(np.isfinite(p))] for c in cases}
    missing = {key: lacked for key, lacked in missing.items() if lacked}
    if missing:
        count = sum(len(v) for v in missing.values())
        log.warning("%d landmark annotation(s) missing in %d training image(s), masked in the loss: %s", count,
                    len(missing), "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(missing.items())))
    never = [n for i, n in enumerate(names) if all(not np.all(np.isfinite(c.points_mm[i])) for c in cases)]
    if never:
        log.warning("landmark(s) %s have no annotation in any training image: their heatmaps are not trained",
                    ", ".join(never))
    return missing


def _pseudo_cases(csv_path: Path, pool: list[dict], load: dict[str, Any]) -> list[Case]:
    """Cases of the unlabeled training images with landmarks from a one-shot prediction CSV."""
    table = read_landmarks(csv_path)
    unknown = sorted({name for by_name in table.values() for name in by_name} - set(load["names"]))
    if unknown:
        raise InputError(f"pseudo-label landmark(s) {', '.join(unknown)} are not in the true landmark CSV",
                         path=csv_path)
    chosen = [item for item in pool if _key(item) in table]
    if not chosen:
        raise InputError("no unlabeled training image has rows in the pseudo-label CSV", path=csv_path)
    options = {**load, "csv_path": csv_path}
    return [load_case(item[keys.IMAGE], landmarks=table[_key(item)], truth=False, **options) for item in chosen]


def _pseudo_label_maps(folder: Path, pool: list[dict], load: dict[str, Any], classes: int) -> list[Case]:
    """Cases of the unlabeled training images with the label maps of the same name in ``folder`` (e.g. written by
    ``medssl segment oneshot``; on each image's grid)."""
    maps = {image_key(path): path for path in resolve_images(folder)}
    chosen = [item for item in pool if _key(item) in maps]
    if not chosen:
        raise InputError("no unlabeled training image has a label map of the same name in this folder", path=folder)
    cases = []
    for item in chosen:
        case = load_case(item[keys.IMAGE], maps[_key(item)], truth=False, **load)
        if int(case.label.max()) >= classes:
            raise InputError(f"pseudo-label {int(case.label.max())} found but the task has {classes} classes (labels "
                             f"0 .. {classes - 1})", path=maps[_key(item)])
        cases.append(case)
    return cases
