"""Atomic saves, ``model.pt`` round trips with the real U-Net, clear errors for what is not a model."""

from __future__ import annotations

import pytest
import torch

from medssl.errors import InputError
from medssl.matching.run import matching_network
from medssl.networks import build_network, load_network, read_model_file, save_model
from medssl.networks.model_file import MODEL_FORMAT
from medssl.networks.task import TaskHead, TaskUNet
from medssl.outputs import save_atomic


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


def test_save_atomic_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "deep" / "state.pt"
    save_atomic({"x": torch.arange(3)}, path)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_atomic({"x": torch.zeros(3), "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["x"], torch.arange(3))  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]  # no temporary left behind


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_model_file_rebuilds_the_network_and_its_output(tmp_path, spatial_dims):
    torch.manual_seed(0)
    network = build_network(spatial_dims=spatial_dims, channels=[4, 8, 4], dropout=0.1).eval()
    x = torch.randn(2, 1, *[8] * spatial_dims)
    expected = network(x)
    run = tmp_path / "run"
    run.mkdir()
    preprocessing = {"modality": "ct", "patch_size": [8] * spatial_dims}
    save_model(network, run, spatial_dims=spatial_dims, preprocessing=preprocessing)
    payload = read_model_file(run / "model.pt")
    assert payload["format"] == MODEL_FORMAT and payload["preprocessing"] == preprocessing
    assert payload["network"] == network.get_config() and payload["spatial_dims"] == spatial_dims
    for source in (run, run / "model.pt"):
        loaded = load_network(source).network
        assert not loaded.training
        assert torch.equal(loaded(x), expected)
    stock = build_network(**payload["network"])  # the network's own keys: strict loading, no prefix surgery
    stock.load_state_dict(payload["state_dict"], strict=True)


def test_load_network_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no model found"):
        load_network(tmp_path)
    (tmp_path / "noise.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="noise.pt: cannot read model file"):
        load_network(tmp_path / "noise.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="other.pt: not a medssl model file"):
        load_network(tmp_path / "other.pt")
    save_model(TaskUNet(2, 3, channels=[4, 8, 4]), tmp_path / "finetuned.pt", spatial_dims=2, preprocessing={},
               task={"kind": "seg", "classes": [0, 1, 2]})
    with pytest.raises(InputError, match="other.pt: the checkpoint is 2D but the images are 3D"):
        save_model(build_network(spatial_dims=2, channels=[4, 8, 4]), tmp_path / "other.pt", spatial_dims=2,
                   preprocessing={})
        load_network(tmp_path / "other.pt", 3)
    with pytest.raises(InputError, match="finetuned.pt: this is a fine-tuned model"):
        matching_network(tmp_path / "finetuned.pt", 2)


def test_load_network_gives_every_start(tmp_path):
    """One loader: a fine-tuned model whole, a pretrained backbone under a new head, and seeded random inits."""
    backbone = build_network(spatial_dims=2, channels=[4, 8, 4]).eval()
    save_model(backbone, tmp_path / "pre.pt", spatial_dims=2, preprocessing={"modality": "ct"})
    start = load_network(tmp_path / "pre.pt", 2, head_channels=3, seed=1)
    assert isinstance(start.network, TaskUNet) and start.preprocessing == {"modality": "ct"} and start.task is None
    assert torch.equal(start.network.conv_0.conv_0.conv.weight, backbone.conv_0.conv_0.conv.weight)
    tuned = TaskUNet(2, 3, channels=[4, 8, 4]).eval()
    save_model(tuned, tmp_path / "tuned.pt", spatial_dims=2, preprocessing={}, task={"kind": "seg", "classes": [0, 1, 2]})
    whole = load_network(tmp_path / "tuned.pt")
    x = torch.randn(1, 1, 8, 8)
    assert whole.task == TaskHead("seg", classes=(0, 1, 2)) and torch.equal(whole.network(x), tuned(x))
    first, second = (load_network("none", 2, architecture={"channels": [4, 8, 4]}, seed=5).network for _ in "ab")
    other = load_network("NONE", 2, architecture={"channels": [4, 8, 4]}, seed=6).network
    assert torch.equal(first(x), second(x)) and not torch.equal(first(x), other(x))
