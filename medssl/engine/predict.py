"""Inference with fine-tuned models (``medssl predict seg|landmarks``) and the validation scores of fine-tuning.

Images are prepared as in training (``model.pt``'s ``Preprocessing``), run through ``monai.inferers.SlidingWindowInferer``
with windows of the training patch size, and turned into label maps (resampled back onto the input's own grid, so
prediction and input share shape and affine) or landmarks (heatmap peaks, sub-pixel, in world mm).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer

from medssl.data.geometry import voxel_to_world
from medssl.data.inputs import resolve_images
from medssl.data.landmarks import write_landmarks
from medssl.data.readers import check_image_shape, image_key, label_file_name, save_label_map
from medssl.dist import pick_device
from medssl.engine.finetune_data import Case
from medssl.engine.runner import AMP_DTYPES
from medssl.errors import InputError
from medssl.metrics.landmarks import landmark_scores
from medssl.metrics.segmentation import segmentation_scores
from medssl.networks.heatmaps import decode_heatmaps
from medssl.networks.model_file import load_network
from medssl.networks.task import TaskHead, TaskUNet
from medssl.outputs import check_output
from medssl.transforms.preprocess import Preprocessing

log = logging.getLogger(__name__)



class Predictor:
    """A task network with what it needs to predict: windows of ``patch_size``, the ``task`` its head predicts
    (``TaskHead``: segmentation classes or landmark names), and mixed
    precision ``amp`` (``bf16``/``fp16``, CUDA only)."""

    def __init__(self, network: TaskUNet, *, patch_size: Sequence[int], task: TaskHead,
                 device: str | torch.device = "cpu", amp: str = "off"):
        self.network, self.task, self.device = network, task, torch.device(device)
        self.inferer = SlidingWindowInferer(roi_size=[int(p) for p in patch_size], sw_batch_size=4, overlap=0.25,
                                            mode="gaussian")
        self.amp_dtype = AMP_DTYPES.get(amp) if self.device.type == "cuda" else None

    @torch.no_grad()
    def outputs(self, image: MetaTensor) -> torch.Tensor:
        """Raw head outputs ``(K, *S)`` (float32, CPU) of a prepared image ``(C, *S)``."""
        was_training = self.network.training
        self.network.eval()
        try:
            autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None \
                else contextlib.nullcontext()
            with autocast:
                out = self.inferer(image.as_tensor()[None].float().to(self.device), self.network)  # (1, K, *S)
        finally:
            self.network.train(was_training)
        return out[0].float().cpu()

    def probabilities(self, image: MetaTensor) -> MetaTensor:
        """Class probabilities ``(K, *S)`` of a prepared image, on its grid (same affine)."""
        return MetaTensor(torch.softmax(self.outputs(image), dim=0), affine=image.affine)

    def landmarks(self, image: MetaTensor) -> tuple[np.ndarray, np.ndarray]:
        """World positions ``(L, D)`` mm and peak heat ``(L,)`` of every landmark in a prepared image."""
        voxels, scores = decode_heatmaps(self.outputs(image))
        affine = torch.as_tensor(image.affine, dtype=torch.float64).numpy()
        return voxel_to_world(affine, voxels), scores


def score_cases(predictor: Predictor, cases: Sequence[Case]) -> dict:
    """Validation scores of prepared ``cases`` (on the working grid): ``segmentation_scores`` (Dice, HD95) or
    ``landmark_scores`` (MRE, SDR) against the cases' true labels / landmarks."""
    if predictor.task.kind == "seg":
        pairs = []
        for case in cases:
            labels = predictor.probabilities(case.image).argmax(dim=0, keepdim=True)  # (1, *S)
            pairs.append((MetaTensor(labels.as_tensor(), affine=case.image.affine), case.label))
        return segmentation_scores(pairs)
    names = predictor.task.names
    predicted, truth = {}, {}
    for case in cases:
        points, _ = predictor.landmarks(case.image)
        predicted[case.key] = dict(zip(names, points))
        truth[case.key] = {name: p for name, p in zip(names, case.points_mm) if np.all(np.isfinite(p))}
    return landmark_scores(predicted, truth)


def load_predictor(model: str | Path, device: str = "auto") -> tuple[Predictor, dict[str, Any]]:
    """The ``Predictor`` of a fine-tuning run folder (or its ``model.pt``) and the model's preprocessing options."""
    torch_device = pick_device(device)
    loaded = load_network(model, device=torch_device)
    task = loaded.task
    if task is None:
        raise InputError("not a fine-tuned model (it has no task head); pass a run folder of 'medssl finetune'",
                         path=model)
    predictor = Predictor(loaded.network, patch_size=loaded.preprocessing["patch_size"], task=task,
                          device=torch_device)
    return predictor, loaded.preprocessing


def _inputs(images: Sequence[str | Path]) -> list[Path]:
    paths = [path for entry in images for path in resolve_images(entry)]
    if not paths:
        raise InputError("no images to predict; pass --images PATH")
    seen: dict[str, Path] = {}
    for path in paths:
        if image_key(path) in seen:
            raise InputError(f"two images are named '{image_key(path)}' ({seen[image_key(path)]}); outputs are "
                             "matched by name", path=path)
        seen[image_key(path)] = path
    return paths


def _read(path: Path, preprocessing: dict[str, Any], network: TaskUNet) -> tuple[MetaTensor, MetaTensor]:
    """The input as read (its own grid; refused when it does not fit ``network``) and prepared as in training."""
    spec = Preprocessing.from_options(preprocessing)
    raw = spec.load(path, network.spatial_dims)
    check_image_shape(raw, path, min_size=network.min_size_divisor, channels=network.in_channels)
    return raw, spec(raw)[0]


def predict_seg_files(model: str | Path, images: Sequence[str | Path], out_dir: str | Path,
                      device: str = "auto") -> list[Path]:
    """Write one label map per input image into ``out_dir`` (``<name><ext>``: the input's format where writable,
    else ``.nii.gz``) with the input's shape and affine; returns the written paths."""
    paths = _inputs(images)
    check_output(out_dir, kind="folder", inputs=[model, *images, *paths])
    predictor, preprocessing = load_predictor(model, device)
    if predictor.task.kind != "seg":
        raise InputError("this is a landmark model; use 'medssl predict landmarks'", path=model)
    written = []
    for path in paths:
        raw, image = _read(path, preprocessing, predictor.network)
        written.append(save_label_map(predictor.probabilities(image), raw, Path(out_dir) / label_file_name(path)))
    log.info("%d label map(s) -> %s", len(written), out_dir)
    return written


def predict_landmarks_files(model: str | Path, images: Sequence[str | Path], out_csv: str | Path,
                            device: str = "auto") -> Path:
    """Write the landmarks of every input image (world mm, ``score`` = peak heat) to ``out_csv``."""
    paths = _inputs(images)
    check_output(out_csv, kind="file", inputs=[model, *images, *paths])
    predictor, preprocessing = load_predictor(model, device)
    if predictor.task.kind != "landmarks":
        raise InputError("this is a segmentation model; use 'medssl predict seg'", path=model)
    dims = predictor.network.spatial_dims
    names = list(predictor.task.names)
    predictions, scores = {}, {}
    for path in paths:
        points, peaks = predictor.landmarks(_read(path, preprocessing, predictor.network)[1])
        predictions[image_key(path)] = dict(zip(names, points))
        scores[image_key(path)] = {name: float(value) for name, value in zip(names, peaks)}
    log.info("landmarks of %d image(s) -> %s", len(predictions), out_csv)
    return write_landmarks(out_csv, predictions, scores=scores, spatial_dims=dims)
