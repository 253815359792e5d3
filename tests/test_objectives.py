"""Every registered objective, 2D and 3D, on tiny views with known geometry; then method-specific checks."""

from __future__ import annotations

import pytest
import torch
from conftest_views import make_pair_batch

from medssl.errors import InputError
from medssl.networks import UNet
from medssl.objectives import OBJECTIVES, VIEW_PRESETS
from medssl.objectives.infoguided import InfoGuided
from medssl.objectives.pgssl import PGSSL

CHANNELS = (4, 8, 8, 16, 8)  # depth 3: sizes divisible by 8
ENCODER = ("conv_0.", "down_")
#: keeps the CPU tests fast: PGSSL's MC stabilizer costs ~T x max_pixels x hidden per step (defaults elsewhere)
TEST_KWARGS = {"pgssl": {"max_pixels": 1024}}


def _setup(name: str, dims: int, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    network = UNet(dims, channels=CHANNELS)
    objective = OBJECTIVES.get(name)(network, **{**TEST_KWARGS.get(name, {}), **kwargs})
    preset = "symmetric" if objective.views == "weak_strong" else objective.views
    batch = make_pair_batch(dims, batch=2, view_size=32 if dims == 2 else 16, preset=preset, seed=seed)
    return network, objective, batch


def _loss(objective, network, batch, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the same anchors, pixel subsets and dropout masks for every evaluation
    return objective(network, batch)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_loss_is_finite_and_reaches_every_parameter(name, dims):
    network, objective, batch = _setup(name, dims)
    assert objective.views in VIEW_PRESETS
    out = _loss(objective, network, batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert all(not value.requires_grad and torch.isfinite(value).all() for key, value in out.items() if key != "loss")
    out["loss"].backward()
    missing = [n for n, p in objective.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"objective parameters without gradient: {missing}"
    encoder = [n for n, p in network.named_parameters() if n.startswith(ENCODER) and p.grad is None]
    assert not encoder, f"encoder parameters without gradient: {encoder}"
    if name in ("pgssl", "infoguided"):  # the dense methods train the whole decoder too
        assert all(p.grad is not None for p in network.parameters())
    teacher_grads = [n for n, p in objective.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not teacher_grads


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(name, dims):
    network, objective, batch = _setup(name, dims, seed=2)
    optimizer = torch.optim.Adam(list(network.parameters()) + list(objective.parameters()), lr=3e-3)
    before = float(_loss(objective, network, batch)["loss"].detach())
    for step in range(4):
        optimizer.zero_grad()
        _loss(objective, network, batch)["loss"].backward()
        optimizer.step()
        objective.on_step_end(network, (step + 1) / 4)
    after = float(_loss(objective, network, batch)["loss"].detach())
    assert after < before


@pytest.mark.parametrize("uncertainty", ["exp", "heteroscedastic", "hard", "none"])
def test_pgssl_uncertainty_modes_and_logged_parts(uncertainty):
    network, objective, batch = _setup("pgssl", 2, uncertainty=uncertainty, max_pixels=64, mc_samples=4)
    out = _loss(objective, network, batch)
    spread = {f"uncertainty_{stat}" for stat in ("mean", "std", "min", "max")}
    assert set(out) == {"loss", "loss_global", "loss_pixel", *spread}
    assert torch.isclose(out["loss"], out["loss_global"] + out["loss_pixel"])
    assert all(out[key].ndim == 0 and not out[key].requires_grad for key in spread)
    assert 0 < float(out["uncertainty_min"]) < float(out["uncertainty_mean"]) < float(out["uncertainty_max"])
    assert float(out["uncertainty_std"]) > 0
    out["loss"].backward()
    assert objective.stabilizer.out.weight.grad is not None
    with pytest.raises(InputError, match="uncertainty"):
        PGSSL(network, uncertainty="soft")


def test_pgssl_ema_update_follows_the_cosine_momentum():
    network, objective, _ = _setup("pgssl", 2, base_momentum=0.9)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(1.0)
    teacher_before = [p.clone() for p in objective.teacher_network.parameters()]
    objective.on_step_end(network, 1.0)  # momentum 1 at the end: the teacher does not move
    assert all(torch.equal(t, b) for t, b in zip(objective.teacher_network.parameters(), teacher_before))
    objective.on_step_end(network, 0.0)  # momentum = base at the start
    for t, b, s in zip(objective.teacher_network.parameters(), teacher_before, network.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
    assert all(not p.requires_grad for p in objective.teacher_network.parameters())


@pytest.mark.parametrize("dims", [2, 3])
def test_infoguided_levels_anchors_and_uniform_baseline(dims):
    network, objective, batch = _setup("infoguided", dims, include_stride1=False, window=2)
    assert objective.needs_info and objective.strides == [8, 4, 2]
    out = _loss(objective, network, batch)
    assert {"loss_stride8", "loss_stride4", "loss_stride2"} <= set(out)
    assert float(out["anchors_valid"]) == 1.0  # the raw view is the whole scan: every patch anchor lies in it
    baseline = InfoGuided(network, info_guided=False)
    assert not baseline.needs_info and baseline.strides == [8, 4, 2, 1]
    batch.b.info = None
    assert torch.isfinite(_loss(baseline, network, batch)["loss"])
    with pytest.raises(InputError, match="information maps"):
        objective(network, batch)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_trains_on_the_view_sampler_with_elastic_views(name, tmp_path):
    """With the package's own sampler (elastic views: no affine, so correspondence uses the coordinate maps)."""
    import nibabel as nib
    import numpy as np

    from medssl.transforms.sampler import ViewPairSampler

    axes = np.meshgrid(*[np.linspace(0, 3, 32, dtype=np.float32)] * 3, indexing="ij")
    volume = (np.sin(axes[0]) * np.cos(2 * axes[1]) + axes[2] / 3) ** 2  # smooth structure in every direction
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.2, 1.5, 1.0])), tmp_path / "scan.nii.gz")
    torch.manual_seed(0)
    network = UNet(3, channels=CHANNELS)
    objective = OBJECTIVES.get(name)(network, **TEST_KWARGS.get(name, {}))
    sampler = ViewPairSampler([tmp_path / "scan.nii.gz"], spatial_dims=3, patch_size=(16, 16, 16),
                              preset=objective.views, info_guided=objective.needs_info, elastic_mm=2.0)
    batch = sampler.sample(2)
    assert batch.b.view_to_world is None
    out = objective(network, batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for n, p in network.named_parameters() if n.startswith(ENCODER))
