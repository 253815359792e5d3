"""LEWEL: alignment maps, grouped aligned embeddings, loss composition, EMA target, input checks (2D and 3D)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medssl.data.batch import PairBatch, ViewBatch
from medssl.errors import InputError
from medssl.networks.unet import UNet
from medssl.objectives.lewel import LEWEL, ObjectNeck

SIZE = {2: 16, 3: 8}  # tiny inputs; the 2-level U-Net below needs multiples of 4


def tiny_unet(spatial_dims: int) -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims, channels=(4, 8, 8, 4))  # bottleneck 8 channels at stride 4


def random_pair(spatial_dims: int, batch: int = 2, seed: int = 0) -> PairBatch:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 1) + (SIZE[spatial_dims],) * spatial_dims

    def view() -> ViewBatch:
        image = torch.randn(shape, generator=generator)
        coords = torch.zeros((batch, spatial_dims) + shape[2:])
        return ViewBatch(image, coords, torch.ones(shape, dtype=torch.bool))

    return PairBatch(view(), view())


def small_lewel(network: UNet, **kwargs) -> LEWEL:
    return LEWEL(network, proj_dim=16, hidden_dim=32, **kwargs)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_alignment_maps_sum_to_one_over_space(spatial_dims):
    network = tiny_unet(spatial_dims)
    objective = small_lewel(network, decoder_levels=[-1], temperature=1.0)  # the paper's temperature
    image = random_pair(spatial_dims).a.image
    bottleneck = objective.alignment_maps(network, image)
    assert bottleneck.shape == (2, 16) + (SIZE[spatial_dims] // 4,) * spatial_dims
    finest = objective.alignment_maps(network, image, level=-1)
    assert finest.shape == (2, 16) + (SIZE[spatial_dims],) * spatial_dims
    for maps in (bottleneck, finest):
        assert (maps >= 0).all()
        torch.testing.assert_close(maps.flatten(2).sum(-1), torch.ones(2, 16))
        # L2-normalised logits / tau = 1 lie in [-1, 1]: every weight ratio within a map is at most e^2
        ratio = maps.flatten(2).amax(-1) / maps.flatten(2).amin(-1)
        assert (ratio <= torch.e**2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_grouped_aligned_embeddings_match_a_per_group_loop(spatial_dims):
    channels, proj_dim, groups = 8, 12, 4
    neck = ObjectNeck(channels, hidden_dim=16, proj_dim=proj_dim, groups=groups, temperature=0.5)
    neck.proj_obj = nn.Identity()  # expose the aligned backbone features themselves
    features = torch.randn((3, channels) + (4,) * spatial_dims)
    global_embedding, aligned, maps = neck(features)
    k = proj_dim // groups
    assert neck.num_aligned == k
    assert global_embedding.shape == (3, proj_dim)
    assert maps.shape == (3, proj_dim, 4**spatial_dims)
    assert aligned.shape == (3, channels, k)
    tokens = features.flatten(2)  # (B, C, N)
    width = channels // groups
    for g in range(groups):
        for j in range(k):
            weights = maps[:, g * k + j]  # (B, N): map j of group g
            expected = (tokens[:, g * width : (g + 1) * width] * weights[:, None]).sum(-1)  # (B, C/G)
            torch.testing.assert_close(aligned[:, g * width : (g + 1) * width, j], expected)


def test_maps_are_a_softmax_of_normalised_projected_pixel_tokens():
    neck = ObjectNeck(8, hidden_dim=16, proj_dim=8, groups=2, temperature=0.2).eval()
    features = torch.randn(2, 8, 3, 5)
    global_embedding, _, maps = neck(features)
    tokens = features.flatten(2)
    pooled = neck.proj(tokens.mean(-1, keepdim=True))[:, :, 0]  # the pooled token alone (eval-mode BN)
    torch.testing.assert_close(global_embedding, pooled)
    logits = F.normalize(neck.proj(tokens), dim=1) / 0.2
    torch.testing.assert_close(maps, torch.softmax(logits, dim=-1))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_loss_is_weighted_sum_of_parts_and_trains_online_side_only(spatial_dims):
    network = tiny_unet(spatial_dims)
    objective = small_lewel(network, alpha=0.3, decoder_levels=[1], decoder_weight=0.5)
    out = objective(network, random_pair(spatial_dims))
    level = 0.3 * out["loss_global"] + 0.7 * out["loss_aligned"]
    decoder = 0.3 * out["loss_global_stride2"] + 0.7 * out["loss_aligned_stride2"]
    torch.testing.assert_close(out["loss"].detach(), level + 0.5 * decoder)
    for name in ("loss_global", "loss_aligned"):  # two directions of 2 - 2cos, each in [0, 4]
        assert 0.0 <= out[name].item() <= 8.0
    out["loss"].backward()
    assert all(p.grad is not None for p in objective.online.parameters())
    assert network.down_2.convs.conv_0.conv.weight.grad is not None
    assert all(p.grad is None for p in objective.target_network.parameters())
    assert all(p.grad is None for p in objective.target_necks.parameters())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_loss_matches_a_symmetric_byol_reference(spatial_dims):
    network = tiny_unet(spatial_dims)
    objective = small_lewel(network, alpha=0.25, decoder_levels=[]).train()  # the bottleneck only (the paper)
    pair = random_pair(spatial_dims)
    out = objective(network, pair)
    heads, target_neck = objective.online[0], objective.target_necks[0]
    expected_global = expected_aligned = 0.0
    with torch.no_grad():
        for source, other in ((pair.a, pair.b), (pair.b, pair.a)):
            g, y, _ = heads.neck(network.forward_features(source.image)[0])
            t_g, t_y, _ = target_neck(objective.target_network.forward_features(other.image)[0])
            expected_global += (2 - 2 * F.cosine_similarity(heads.predictor(g), t_g, dim=1)).mean()
            expected_aligned += (2 - 2 * F.cosine_similarity(heads.predictor_obj(y), t_y, dim=1)).mean()  # (B, K)
    torch.testing.assert_close(out["loss_global"], expected_global)
    torch.testing.assert_close(out["loss_aligned"], expected_aligned)
    torch.testing.assert_close(out["loss"].detach(), 0.25 * expected_global + 0.75 * expected_aligned)


def test_target_follows_momentum_schedule_and_stays_in_eval_mode():
    network = tiny_unet(2)
    objective = small_lewel(network, base_momentum=0.0)
    objective.train()
    assert not objective.target_network.training and not objective.target_necks.training
    with torch.no_grad():
        for p in network.parameters():
            p.add_(1.0)
        for p in objective.online.parameters():
            p.mul_(2.0)
    frozen = [p.clone() for p in objective.target_network.parameters()]
    objective.on_step_end(network, progress=1.0)  # momentum 1 at the end: target unchanged
    assert all(torch.equal(a, b) for a, b in zip(frozen, objective.target_network.parameters()))
    objective.on_step_end(network, progress=0.0)  # momentum = base_momentum = 0: target := online
    for target, online in ((objective.target_network, network), (objective.target_necks[0], objective.online[0].neck)):
        for t, s in zip(target.state_dict().values(), online.state_dict().values()):
            assert torch.equal(t, s)


def test_bad_hyperparameters_raise_input_error():
    network = tiny_unet(2)
    with pytest.raises(InputError, match="groups"):
        LEWEL(network, groups=3, proj_dim=12)  # 3 does not divide the 8 bottleneck channels
    with pytest.raises(InputError, match="divisible by .groups."):
        LEWEL(network, groups=4, proj_dim=10)
    for levels in ([0], [len(network.feature_info)], 2):
        with pytest.raises(InputError, match="decoder_levels"):
            LEWEL(network, decoder_levels=levels)
    with pytest.raises(InputError, match="max_tokens"):
        LEWEL(network, max_tokens=0)
    with pytest.raises(InputError, match="alpha"):
        LEWEL(network, alpha=1.5)


def _entropy_ratio(maps: torch.Tensor) -> float:
    """Mean entropy of maps ``(B, P, *S)`` over space as a fraction of the uniform map's ``log N``."""
    flat = maps.flatten(2)  # (B, P, N)
    entropy = -(flat * flat.clamp_min(1e-30).log()).sum(-1)  # (B, P)
    return float(entropy.mean() / math.log(flat.shape[-1]))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_default_maps_are_not_uniform_at_init_and_the_papers_temperature_keeps_them_so(spatial_dims):
    torch.manual_seed(0)
    network = UNet(spatial_dims, channels=(4, 8, 8, 16, 8))  # strides 8 (bottleneck), 4, 2, 1
    size = 32 if spatial_dims == 2 else 16
    image = torch.randn((4, 1) + (size,) * spatial_dims)
    default, paper = (small_lewel(network, temperature=t) for t in (0.1, 1.0))
    assert default.levels == [0, 1, 3] and default.trained_levels == [0, 1, 3]  # bottleneck, strides 4 and 1
    for level in default.levels:
        assert _entropy_ratio(default.alignment_maps(network, image, level)) < 0.97
        assert _entropy_ratio(paper.alignment_maps(network, image, level)) > 0.98


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradients_reach_the_decoder_levels_and_only_with_them(spatial_dims):
    pair = random_pair(spatial_dims)
    network = tiny_unet(spatial_dims)  # strides 4 (bottleneck), 2, 1: the default decoder level is stride 1 only
    objective = small_lewel(network)
    assert objective.trained_levels == [0, 2]
    objective(network, pair)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.upcat_1.parameters())
    network = tiny_unet(spatial_dims)
    small_lewel(network, decoder_levels=[])(network, pair)["loss"].backward()
    assert all(p.grad is None for p in network.upcat_1.parameters())  # the paper trains the encoder only


def test_max_tokens_subsamples_the_maps_but_pools_every_position():
    neck = ObjectNeck(8, hidden_dim=16, proj_dim=8, groups=2, temperature=0.1).eval()
    features = torch.randn(2, 8, 6, 5)
    full_global, _, full_maps = neck(features)
    global_embedding, aligned, maps = neck(features, max_tokens=7)
    assert full_maps.shape == (2, 8, 30) and maps.shape == (2, 8, 7) and aligned.shape == (2, 8, 4)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 8))
    torch.testing.assert_close(global_embedding, full_global)
