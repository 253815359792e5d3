"""No representation collapse: every registered objective, trained a few steps by the real engine on the demo
population (2D and 3D), keeps the per-pixel embeddings of a held-out scan spread out, and collapsed networks (a
zeroed last norm scale, or the same engine run with a deliberately collapsing loss) fall below the floor.

Spread (SimSiam's collapse monitor, Chen & He 2021): L2-normalise the dense features per pixel, take each channel's
std across pixels, average over channels and multiply by sqrt(C): about 1 for directions spread over the sphere,
0 when every pixel maps to the same vector. Measured (CPU, seed 0): random init 0.83-0.87; trained 2D 0.77-0.85,
3D 0.76-0.84; the collapsing loss 0.13 (2D and 3D); zeroed scale 0.00. Hence FLOOR = 0.5.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medssl.data.demo import write_demo_dataset
from medssl.networks import load_network
from medssl.engine.pretrain import pretrain
from medssl.engine.pretrain_config import pretrain_config_from_dict
from medssl.networks import UNet
from medssl.objectives import OBJECTIVES, Objective
from medssl.transforms.preprocess import Preprocessing

FLOOR = 0.5
LR = 1e-2  # 10x the configs' rate: an objective prone to collapse shows it within a few steps
COLLAPSE_LR = 0.3  # the collapsing loss reaches ~0.1 within the same steps
#: small heads (the defaults are sized for real runs); InfoGuided's 3D candidate cube shrinks with ``window``
HEADS = {
    "pgssl": {"global_hidden": 64, "global_dim": 32, "pixel_hidden": 32, "pixel_dim": 16, "stabilizer_hidden": 32,
              "max_pixels": 1024, "mc_samples": 4},
    "lewel": {"proj_dim": 32, "hidden_dim": 64},
    "msf": {"proj_dim": 32, "hidden_dim": 64, "bank_size": 64, "k": 2},
}


@dataclass(frozen=True)
class Setup:
    network: dict
    patch: int
    spacing_mm: float  # 2D demo PNGs are 1 mm: resampled to keep the scan (and InfoGuided's whole-scan view) small
    steps: int
    heads: dict


SETUPS = {
    2: Setup({"size": "small"}, patch=32, spacing_mm=2.0, steps=12, heads=HEADS),
    3: Setup({"channels": [4, 8, 8, 16, 8]}, patch=16, spacing_mm=4.0, steps=10,
             heads={**HEADS, "infoguided": {"window": 2}}),
}


def embedding_spread(network: nn.Module, image: torch.Tensor) -> float:
    """sqrt(C) x mean over channels of the std across pixels of the unit-length features of ``image`` (1, 1, *S)."""
    with torch.no_grad():
        features = network.eval()(image)[0].flatten(1)  # (C, N)
    unit = F.normalize(features, dim=0)  # (C, N): one unit vector per pixel
    return float(unit.std(dim=1).mean() * math.sqrt(unit.shape[0]))


class Collapse(Objective):
    """A deliberately collapsing loss: pull every pixel's features towards the image's mean direction."""

    def __init__(self, network: nn.Module):  # the engine builds every objective as ``cls(network, **options)``
        super().__init__()

    def forward(self, network, batch):
        unit = F.normalize(network(batch.a.image).flatten(2), dim=1)  # (B, C, N)
        loss = 1 - (unit * F.normalize(unit.mean(2, keepdim=True), dim=1)).sum(1).mean()
        return {"loss": loss}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def demo(request, tmp_path_factory):
    """Three demo subjects: ``(dims, datalist of the first two, the third preprocessed (1, 1, *S))``."""
    dims, setup = request.param, SETUPS[request.param]
    root = write_demo_dataset(tmp_path_factory.mktemp(f"demo{dims}d"), spatial_dims=dims, n_subjects=3,
                              spacing_mm=setup.spacing_mm if dims == 3 else None)
    ext = ".png" if dims == 2 else ".nii.gz"
    datalist = root / "train.json"
    datalist.write_text(json.dumps({"training": [f"images/subject_00{i}{ext}" for i in (0, 1)]}))
    image, _ = Preprocessing(spacing_mm=setup.spacing_mm).read(root / "images" / f"subject_002{ext}", dims)
    return dims, datalist, image.as_tensor()[None]  # (1, 1, *S)


def crop(image: torch.Tensor, network: UNet) -> torch.Tensor:
    """``image`` (1, 1, *S) cropped to sizes the network accepts."""
    divisor = network.min_size_divisor
    return image[(..., *[slice(0, s // divisor * divisor) for s in image.shape[2:]])]


def train(method: str, dims: int, datalist, out, lr: float = LR) -> UNet:
    """Pretrain with ``medssl.engine.pretrain`` and return the saved network."""
    setup = SETUPS[dims]
    config = {
        "method": method, "spatial_dims": dims, "seed": 0,
        "data": {"path": str(datalist), "patch_size": [setup.patch] * dims, "spacing_mm": setup.spacing_mm},
        "network": setup.network,
        "objective": {method: setup.heads.get(method, {})},
        "train": {"steps": setup.steps, "batch_size": 2, "lr": lr, "device": "cpu", "log_every": setup.steps,
                  "checkpoint_every": setup.steps},
    }
    return load_network(pretrain(pretrain_config_from_dict(config), out=out)).network


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_trained_embeddings_stay_spread(name, demo, tmp_path):
    dims, datalist, image = demo
    network = train(name, dims, datalist, tmp_path / "run")
    assert embedding_spread(network, crop(image, network)) > FLOOR


def test_collapsed_networks_fall_below_the_floor(demo, tmp_path, monkeypatch):
    dims, datalist, image = demo
    torch.manual_seed(0)
    network = UNet(dims, **SETUPS[dims].network)
    image = crop(image, network)
    assert embedding_spread(network, image) > FLOOR  # random init is spread
    with torch.no_grad():
        network.upcat_1.convs.conv_1.adn.N.weight.zero_()  # the last InstanceNorm's scale: every pixel = act(bias)
    assert embedding_spread(network, image) < 1e-6
    monkeypatch.setitem(OBJECTIVES._items, "collapse", Collapse)  # the same engine and steps, a collapsing loss
    collapsed = train("collapse", dims, datalist, tmp_path / "run", lr=COLLAPSE_LR)
    assert embedding_spread(collapsed, image) < FLOOR
