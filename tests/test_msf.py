"""MSF: k = 1 is asymmetric BYOL, neighbours chosen by the target (itself first), FIFO bank, dense extension (on by
default, one bank per decoder level)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from medssl.data.batch import PairBatch, ViewBatch
from medssl.errors import InputError
from medssl.networks.unet import UNet
from medssl.objectives.msf import MSF, MemoryBank, mean_shift_loss

SIZE = {2: 16, 3: 8}  # the 2-level U-Net below needs multiples of 4


def tiny_unet(spatial_dims: int) -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims, channels=(4, 8, 8, 4))


def shifted_crops(spatial_dims: int, batch: int = 2, shift: int = 4, seed: int = 0) -> PairBatch:
    """Two crops of one random volume, view b shifted by ``shift`` voxels per axis (1 mm voxels, world = index)."""
    generator = torch.Generator().manual_seed(seed)
    size = SIZE[spatial_dims]
    source = torch.randn((batch, 1) + (size + shift,) * spatial_dims, generator=generator)
    axes = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * spatial_dims, indexing="ij")

    def crop(offset: int) -> ViewBatch:
        image = source[(slice(None), slice(None)) + (slice(offset, offset + size),) * spatial_dims]
        coords = (torch.stack(axes) + offset).expand(batch, spatial_dims, *axes[0].shape)  # (B, D, *S)
        view_to_world = torch.eye(spatial_dims + 1)
        view_to_world[:spatial_dims, spatial_dims] = offset
        valid = torch.ones((batch, 1) + (size,) * spatial_dims, dtype=torch.bool)
        return ViewBatch(image.contiguous(), coords.contiguous(), valid,
                         view_to_world=view_to_world.expand(batch, -1, -1).contiguous())

    return PairBatch(crop(0), crop(shift))


def small_msf(network: UNet, **kwargs) -> MSF:
    options = {"proj_dim": 8, "hidden_dim": 16, "bank_size": 16, "dense": False, **kwargs}
    return MSF(network, **options)


def online_and_target(objective: MSF, network: UNet, pair: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The query (strong view b, online) and target (weak view a, EMA) embeddings, computed step by step."""
    with torch.no_grad():
        pooled = network.forward_features(pair.b.image)[0].mean(dim=tuple(range(2, pair.b.image.ndim)))
        query = F.normalize(objective.predictor(objective.projector(pooled)), dim=1)
        features = objective.target_network.forward_features(pair.a.image)[0]
        target = F.normalize(objective.target_heads[0](features.mean(dim=tuple(range(2, features.ndim)))), dim=1)
    return query, target


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_k1_equals_asymmetric_byol_and_own_target_is_first_neighbour(spatial_dims):
    network = tiny_unet(spatial_dims)
    objective = small_msf(network, k=1)
    pair = shifted_crops(spatial_dims)
    out = objective(network, pair)
    query, target = online_and_target(objective, network, pair)
    byol = (2 - 2 * (query * target).sum(dim=1)).mean()
    torch.testing.assert_close(out["loss"].detach(), byol)
    torch.testing.assert_close(objective.bank.embeddings[:2], target)  # enqueued before the search
    _, neighbours = mean_shift_loss(query, target, objective.bank.embeddings, k=5)
    assert neighbours[:, 0].tolist() == [0, 1]
    assert out["bank_fill"].item() == pytest.approx(2 / 16)


def test_mean_shift_loss_matches_a_brute_force_reference():
    generator = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(20, 6, generator=generator), dim=1)
    target = bank[[4, 11, 17]]
    query = F.normalize(torch.randn(3, 6, generator=generator), dim=1)
    loss, neighbours = mean_shift_loss(query, target, bank, k=3)
    for row in range(3):
        distances_t = [2 - 2 * float(target[row] @ bank[j]) for j in range(20)]
        nearest = sorted(range(20), key=distances_t.__getitem__)[:3]
        assert neighbours[row].tolist() == nearest
        expected = sum(2 - 2 * float(query[row] @ bank[j]) for j in nearest) / 3
        assert loss[row].item() == pytest.approx(expected, abs=1e-5)
    assert neighbours[:, 0].tolist() == [4, 11, 17]


def test_neighbours_are_chosen_by_the_target_not_the_query():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    target = torch.tensor([[1.0, 0.0]])
    query = torch.tensor([[0.0, 1.0]])  # the query's own nearest rows would be 1 then 2
    loss, neighbours = mean_shift_loss(query, target, bank, k=2)
    assert neighbours.tolist() == [[0, 2]]
    assert loss.item() == pytest.approx(((2 - 0) + (2 - 1.6)) / 2)


def test_bank_is_a_fifo_that_wraps_around():
    bank = MemoryBank(size=6, dim=2, setting="objective.msf.bank_size")
    initial = bank.embeddings.clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(6))
    blocks = [torch.full((2, 2), float(i)) for i in range(4)]
    bank.enqueue(blocks[0])
    assert bank.fill_fraction().item() == pytest.approx(2 / 6)
    torch.testing.assert_close(bank.embeddings[2:], initial[2:])  # the rest still holds the random rows
    for block in blocks[1:]:
        bank.enqueue(block)
    expected = torch.cat([blocks[3], blocks[1], blocks[2]])  # block 3 replaced the oldest rows (block 0)
    assert torch.equal(bank.embeddings, expected)
    assert int(bank.pointer) == 2 and bank.fill_fraction().item() == 1.0


def test_bank_size_must_be_a_multiple_of_the_batch():
    with pytest.raises(InputError, match=r"objective.msf.bank_size' \(5\) must be a multiple of the 2"):
        MemoryBank(size=5, dim=3, setting="objective.msf.bank_size").enqueue(torch.zeros(2, 3))
    network = tiny_unet(2)
    with pytest.raises(InputError, match="bank_size"):
        small_msf(network, bank_size=15)(network, shifted_crops(2))
    with pytest.raises(InputError, match=r"^k: must be in \[1, bank_size=16\], got 17"):  # its own parameter name
        small_msf(network, k=17)


def test_momentum_constant_or_cosine():
    network = tiny_unet(2)
    constant = small_msf(network, momentum=0.0)
    cosine = small_msf(network, momentum=0.0, momentum_schedule="cosine")
    with torch.no_grad():
        for p in network.parameters():
            p.add_(1.0)
    constant.on_step_end(network, progress=1.0)  # constant 0: the target becomes the online network
    cosine.on_step_end(network, progress=1.0)  # cosine ends at momentum 1: the target stays put
    online = list(network.parameters())
    assert all(torch.equal(t, s) for t, s in zip(constant.target_network.parameters(), online))
    assert not any(torch.equal(t, s) for t, s in zip(cosine.target_network.parameters(), online))
    constant.train()
    assert not constant.target_network.training and not constant.target_heads.training


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_dense_extension_is_on_by_default_and_trains_every_dense_level(spatial_dims):
    network = tiny_unet(spatial_dims)  # strides 4 (bottleneck), 2, 1
    objective = MSF(network, proj_dim=8, hidden_dim=16, bank_size=16, dense_pairs=8, dense_bank_size=32)
    assert objective.dense and objective.dense_levels == [1, 2] and objective.trained_levels == [1, 2]
    out = objective(network, shifted_crops(spatial_dims))
    assert torch.isfinite(out["loss"])
    levels = [out["loss_dense_stride2"], out["loss_dense_stride1"]]
    torch.testing.assert_close(out["loss_dense"], sum(levels) / 2)
    torch.testing.assert_close(out["loss"].detach(), out["loss_global"] + out["loss_dense"])
    assert out["dense_bank_fill"].item() == pytest.approx(8 / 32)
    assert all(int(bank.filled) == 8 for bank in objective.dense_banks)
    out["loss"].backward()
    for module in (network.upcat_2, network.upcat_1):  # the modules that output strides 2 and 1: dense terms only
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    for head in (*objective.dense_projectors, *objective.dense_predictors):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(p.grad is None for p in objective.target_heads.parameters())
    assert small_msf(network).trained_levels == [0]  # image-level MSF: the pooled bottleneck
    assert small_msf(network, dense=True, dense_levels=[-1]).dense_levels == [2]
    with pytest.raises(InputError, match="dense_levels"):
        small_msf(network, dense=True, dense_levels=[0])


def test_dense_k_sets_the_pixel_neighbours_only(monkeypatch):
    """``dense_k`` (default ``k``) is the number of bank neighbours of the dense terms; the image-level term keeps
    ``k``; with 1 each pixel regresses only its own match's target."""
    from medssl.objectives import msf

    used = []

    def spy(query, target, bank, k):
        used.append(k)
        return mean_shift_loss(query, target, bank, k)

    monkeypatch.setattr(msf, "mean_shift_loss", spy)
    network = tiny_unet(2)
    options = {"dense": True, "dense_pairs": 8, "dense_bank_size": 32, "k": 3}
    small_msf(network, **options)(network, shifted_crops(2))
    assert used == [3, 3, 3]  # global, then the two dense levels
    used.clear()
    small_msf(network, **options, dense_k=1)(network, shifted_crops(2))
    assert used == [3, 1, 1]
    with pytest.raises(InputError, match="dense_k"):
        small_msf(network, **options, dense_k=33)


def test_dense_pairs_are_a_fixed_count_and_views_must_overlap():
    network = tiny_unet(2)
    objective = small_msf(network, dense=True, dense_pairs=512, dense_bank_size=1024)
    out = objective(network, shifted_crops(2))  # only 2 x 12 x 12 = 288 matched pixels: resampled up to 512
    assert all(bank.fill_fraction().item() == pytest.approx(0.5) for bank in objective.dense_banks)
    with pytest.raises(InputError, match="overlapping views"):
        objective(network, shifted_crops(2, shift=16))


def test_bank_and_ema_are_identical_across_two_processes(tmp_path):
    script = tmp_path / "msf_ddp.py"
    script.write_text(textwrap.dedent("""
        import torch
        from medssl import dist
        from medssl.networks.unet import UNet
        from medssl.objectives.msf import MSF
        from test_msf import shifted_crops
        context = dist.setup("cpu")
        torch.manual_seed(0)
        network = UNet(2, channels=(4, 8, 8, 4))
        objective = MSF(network, proj_dim=8, hidden_dim=16, bank_size=8, dense_pairs=4, dense_bank_size=16)
        out = objective(network, shifted_crops(2, seed=context.rank))  # each rank sees other images
        out["loss"].backward()
        for p in network.parameters():  # a stand-in for DDP's gradient averaging + optimizer step
            if p.grad is None:
                continue
            torch.distributed.all_reduce(p.grad)
            p.data.sub_(0.1 * p.grad)
        objective.on_step_end(network, 0.5)
        state = {k: v for k, v in objective.state_dict().items()
                 if k.startswith(("bank", "dense_banks", "target_network"))}
        torch.save(state, f"rank{context.rank}.pt")
        dist.teardown(context)
    """))
    tests = os.path.dirname(os.path.abspath(__file__))  # test_msf itself, and the medssl of this checkout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    embeddings = rank0["bank.embeddings"]
    assert int(rank0["bank.filled"]) == 4 and not torch.equal(embeddings[:2], embeddings[2:4])  # both ranks' rows
    dense = rank0["dense_banks.1.embeddings"]  # a fixed 4 pixels per rank and level: 8 rows, both ranks'
    assert int(rank0["dense_banks.1.filled"]) == 8 and not torch.equal(dense[:4], dense[4:8])
