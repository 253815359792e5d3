"""Pure loss functions against references written independently here (numpy / explicit loops)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from medssl.objectives.losses import (
    hard_uncertainty_weights,
    heteroscedastic_loss,
    info_nce_map,
    regression_loss,
    mc_statistics,
    uncertainty_weights,
)


def test_regression_loss_matches_numpy():
    rng = np.random.default_rng(0)
    p, z = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    expected = [2 - 2 * a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(p, z)]
    got = regression_loss(torch.from_numpy(p), torch.from_numpy(z))
    assert got.shape == (7,)
    assert np.allclose(got.numpy(), expected)
    same = regression_loss(torch.from_numpy(p), 3 * torch.from_numpy(p))
    assert torch.allclose(same, torch.zeros(7, dtype=torch.float64))


def _reference_info_nce(feat, queries, targets, valid, window, temperature):
    """One anchor at a time: explicit candidate list, numpy softmax."""
    feat, queries = feat.numpy(), queries.numpy()
    sizes = feat.shape[2:]
    losses = []
    for b, k in itertools.product(range(queries.shape[0]), range(queries.shape[1])):
        if not valid[b, k]:
            continue
        target = tuple(int(t) for t in targets[b, k])
        logits, positive = [], None
        for cell in itertools.product(*[range(s) for s in sizes]):
            if window is not None and max(abs(c - t) for c, t in zip(cell, target)) > window:
                continue
            vector = feat[(b, slice(None), *cell)]
            q = queries[b, k]
            cos = vector @ q / (np.linalg.norm(vector) * np.linalg.norm(q))
            if cell == target:
                positive = len(logits)
            logits.append(min(max(cos, 0.0), 1.0) / temperature)
        logits = np.array(logits)
        losses.append(-(logits[positive] - np.log(np.exp(logits).sum())))
    return float(np.mean(losses))


#: windows of an eighth of the map or more are scored on the masked whole map, smaller ones are gathered
@pytest.mark.parametrize("sizes, window", [((7, 6), None), ((7, 6), 2), ((12, 11), 1), ((5, 4, 3), None),
                                           ((5, 4, 3), 1), ((9, 8, 7), 1)])
def test_info_nce_map_matches_reference(sizes, window):
    dims = len(sizes)
    generator = torch.Generator().manual_seed(dims)
    feat = torch.randn(2, 4, *sizes, generator=generator, dtype=torch.float64)
    queries = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    targets = torch.stack([torch.randint(0, s, (2, 3), generator=generator) for s in sizes], dim=-1)
    targets[0, 0] = 0  # a window cut by the border
    valid = torch.tensor([[True, True, False], [True, True, True]])
    got = info_nce_map(feat, queries, targets, valid, window=window, temperature=0.5)
    assert math.isclose(float(got), _reference_info_nce(feat, queries, targets, valid, window, 0.5), rel_tol=1e-9)


@pytest.mark.parametrize("window", [None, 3])
def test_info_nce_map_is_minimal_when_matched_features_are_identical(window):
    generator = torch.Generator().manual_seed(1)
    feat = torch.randn(1, 8, 10, 10, generator=generator)
    targets = torch.tensor([[[2, 3], [7, 7], [5, 0]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    exact = feat[0, :, targets[0, :, 0], targets[0, :, 1]].T[None]  # (1, K, C): the features at the positives
    best = info_nce_map(feat, exact, targets, valid, window=window)
    noisy = exact + 0.8 * torch.randn(exact.shape, generator=generator)
    for other in (noisy, torch.randn(exact.shape, generator=generator), feat[0, :, [3, 1, 9], [3, 2, 9]].T[None]):
        assert info_nce_map(feat, other, targets, valid, window=window) > best
    assert float(info_nce_map(feat, exact, targets, torch.zeros(1, 3, dtype=torch.bool))) == 0.0


def test_uncertainty_weights_are_detached_exponential_and_average_to_one():
    generator = torch.Generator().manual_seed(2)
    spread = torch.linspace(0.1, 2, 50, dtype=torch.float64)[None, :, None]  # sample n has spread n
    samples = torch.randn(6, 50, 4, generator=generator, dtype=torch.float64) * spread
    samples = (samples + 3.0).requires_grad_(True)
    mean, u = mc_statistics(samples)
    weights = uncertainty_weights(u)
    normed = samples.detach().numpy() / np.linalg.norm(samples.detach().numpy(), axis=-1, keepdims=True)
    u_ref = normed.var(axis=0).mean(axis=-1)
    w_ref = np.exp(-u_ref / np.median(u_ref))
    assert np.allclose(u.detach().numpy(), u_ref)  # the identity (1 - |mean|^2) / C equals the variance
    assert np.allclose(mean.detach().numpy(), normed.mean(axis=0))
    assert np.allclose(weights.numpy(), w_ref / w_ref.mean())
    assert not weights.requires_grad and u.requires_grad
    assert math.isclose(float(weights.mean()), 1.0, rel_tol=1e-9)
    assert weights[0] > weights[-1]  # the least spread sample weighs most
    fixed = uncertainty_weights(u, tau=0.5)
    assert np.allclose(fixed.numpy(), np.exp(-u_ref / 0.5) / np.exp(-u_ref / 0.5).mean())


def test_hard_uncertainty_weights_drop_the_most_uncertain():
    u = torch.arange(10, dtype=torch.float64).requires_grad_(True)
    weights = hard_uncertainty_weights(u, 0.2)
    assert weights.tolist() == [1.25] * 8 + [0.0, 0.0]
    assert not weights.requires_grad


def test_heteroscedastic_loss_formula_and_minimum():
    loss = torch.tensor([0.5, 2.0], dtype=torch.float64)
    variance = torch.tensor([0.25, 1.0], dtype=torch.float64, requires_grad=True)
    got = heteroscedastic_loss(loss, variance, eps=0.0)
    assert torch.allclose(got, torch.tensor([0.5 / 0.5 + 0.5 * math.log(0.25), 2.0 / 2.0 + 0.0], dtype=torch.float64))
    grid = torch.linspace(0.1, 5, 491, dtype=torch.float64)
    best = grid[heteroscedastic_loss(torch.full_like(grid, 1.3), grid, eps=0.0).argmin()]
    assert abs(float(best) - 1.3) < 0.011  # d/ds (l / 2s + log(s) / 2) = 0 at s = l
