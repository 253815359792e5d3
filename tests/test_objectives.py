"""Every registered objective, 2D and 3D, on tiny views with known geometry; then method-specific checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest_views import make_pair_batch
from torch import nn

from medssl.errors import InputError
from medssl.networks import UNet
from medssl.objectives import OBJECTIVES, VIEW_PRESETS
from medssl.objectives.infoguided import InfoGuided
from medssl.objectives.pgssl import PGSSL, ContextStabilizer

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
    assert all(p.grad is not None for p in network.parameters())  # by default every method trains the decoder too
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
    assert set(out) == {"loss", "loss_global", "loss_pixel", "loss_contrast", *spread}
    assert torch.isclose(out["loss"], out["loss_global"] + out["loss_pixel"] + out["loss_contrast"])
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


class FeatureStub(nn.Module):
    """A network double with ``reference``'s feature contract whose level-``l`` features are ``encode(x)``
    average-pooled to the level's stride, its channels cycled to the level's width."""

    def __init__(self, reference: UNet, encode):
        super().__init__()
        self.spatial_dims, self.feature_info, self.encode = reference.spatial_dims, reference.feature_info, encode
        self.scale = nn.Parameter(torch.ones(()))

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        code, pool = self.encode(x), (F.avg_pool2d, F.avg_pool3d)[x.ndim - 4]
        out = []
        for info in self.feature_info:
            level = code if info.stride == 1 else pool(code, info.stride)  # (B, E, *S / stride)
            out.append(self.scale * level[:, torch.arange(info.channels) % level.shape[1]])
        return out


def _fourier(coords: torch.Tensor) -> torch.Tensor:
    """``(B, D, *S)`` world mm -> ``(B, 6 D, *S)`` sines and cosines at 8, 16 and 32 mm periods."""
    return torch.cat([f(coords * 2 * math.pi / period) for period in (8, 16, 32) for f in (torch.sin, torch.cos)], 1)


@pytest.mark.parametrize("dims", [2, 3])
def test_pgssl_contrast_scores_a_constant_map_at_log_candidates_and_distinct_features_lower(dims):
    network, _, batch = _setup("pgssl", dims)
    constant = FeatureStub(network, lambda x: torch.ones_like(x[:, :1]))
    coarsest = PGSSL(constant, max_pixels=256, contrast_levels=[1])  # the whole stride-8 map competes
    cells = (batch.a.image.shape[-1] // network.feature_info[1].stride) ** dims
    out = _loss(coarsest, constant, batch)
    torch.testing.assert_close(out["loss_contrast"], torch.tensor(2 * math.log(cells)))  # both directions
    anatomy = dataclasses.replace(batch, a=dataclasses.replace(batch.a, image=_fourier(batch.a.coords)),
                                  b=dataclasses.replace(batch.b, image=_fourier(batch.b.coords)))
    distinct = FeatureStub(network, lambda x: x)  # the same features where the anatomy is the same, else different
    for levels in ([1], None):  # the coarsest alone, then every decoder level (windows at the finer ones)
        torch.manual_seed(0)
        objective = PGSSL(constant, max_pixels=256, contrast_levels=levels)
        flat, informative = _loss(objective, constant, batch), _loss(objective, distinct, anatomy)
        assert float(informative["loss_contrast"]) < float(flat["loss_contrast"]) - 0.5
    assert float(flat["loss_contrast"]) > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_pgssl_contrast_gradients_reach_every_contrast_level(dims):
    network, objective, batch = _setup("pgssl", dims, pixel_weight=0.0)  # gradients into the decoder: contrast only
    depth = len(network.feature_info) - 1
    assert objective.contrast_levels == list(range(1, depth + 1)) and objective.trained_levels == [1, 2, 3]
    _loss(objective, network, batch)["loss"].backward()
    for head, level in zip(objective.contrast_heads, objective.contrast_levels):
        assert head.weight.grad.abs().sum() > 0
        decoder = getattr(network, f"upcat_{depth + 1 - level}")  # the module that outputs this level
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
    off = PGSSL(network, max_pixels=64, contrast_levels=[])  # the regression alone (the old behaviour)
    assert off.trained_levels == [depth] and float(_loss(off, network, batch)["loss_contrast"]) == 0.0
    assert PGSSL(network, contrast_levels=[-1, 2]).trained_levels == [2, 3]
    with pytest.raises(InputError, match="contrast_levels"):
        PGSSL(network, contrast_levels=[0])


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


def test_stabilizer_passes_are_sub_networks_with_explicit_dropout_masks():
    """Each MC pass equals the stabiliser with one dropout mask per hidden layer applied to every row (the masks
    folded into the weights give the same numbers as masking the activations)."""
    torch.manual_seed(0)
    stabilizer = ContextStabilizer(6, 10, dropout=0.3)
    x = torch.randn(7, 6)
    torch.manual_seed(1)
    samples = stabilizer(x, 4)  # (T, N, C)
    torch.manual_seed(1)
    masks = torch.bernoulli(torch.full((2, 4, 1, 10), 0.7)) / 0.7  # the same draw
    first = torch.relu(stabilizer.norms[0](stabilizer.hidden[0](x)))
    for t in range(4):
        h = torch.relu(stabilizer.norms[1](stabilizer.hidden[1](first * masks[0, t])))
        assert torch.allclose(samples[t], stabilizer.out(h * masks[1, t]), atol=1e-5)
    assert not torch.allclose(samples[0], samples[1])  # the passes differ
    samples.sum().backward()
    assert all(parameter.grad is not None for parameter in stabilizer.parameters())
