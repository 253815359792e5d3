"""Atomic saves, ``model.pt`` round trips with the real U-Net, clear errors for what is not a model."""

from __future__ import annotations

import pytest
import torch

from medssl.engine.checkpoint import MODEL_FORMAT, load_model, read_model_file, save_atomic, save_model
from medssl.errors import InputError
from medssl.networks import build_network


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
        loaded = load_model(source)
        assert not loaded.training
        assert torch.equal(loaded(x), expected)
    stock = build_network(**payload["network"])  # the network's own keys: strict loading, no prefix surgery
    stock.load_state_dict(payload["state_dict"], strict=True)


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no model found"):
        load_model(tmp_path)
    (tmp_path / "noise.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="noise.pt: cannot read model file"):
        load_model(tmp_path / "noise.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="other.pt: not a medssl model file"):
        load_model(tmp_path / "other.pt")
    torch.save({"format": MODEL_FORMAT, "task": {"kind": "seg"}, "network": {}, "state_dict": {}},
               tmp_path / "finetuned.pt")
    with pytest.raises(InputError, match="finetuned.pt: this is a fine-tuned model"):
        load_model(tmp_path / "finetuned.pt")
