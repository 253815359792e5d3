"""Loss maths as small pure functions (no state, no hyperparameter defaults beyond the methods' own)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medssl.correspondence import flat_index, offset_cube


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL normalised MSE per row: ``2 - 2 cos(p, z)``; ``p``, ``z``: ``(N, C)`` -> ``(N,)``."""
    return 2.0 - 2.0 * F.cosine_similarity(p, z, dim=-1, eps=1e-8)


def info_nce_map(
    feat: torch.Tensor,
    queries: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    window: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """CC2D pixel InfoNCE: every query against the positions of its own sample's map, one positive position.

    ``feat`` ``(B, C, *S)`` candidate features; ``queries`` ``(B, K, C)``; ``targets`` ``(B, K, D)`` integer cell of
    the positive in ``feat`` (inside the map); ``valid`` ``(B, K)`` bool, or non-negative per-query weights. Logits
    ``clamp(cos, 0, 1) / temperature``; candidates are the cells of the map within ``window`` cells of the target along
    every axis (a cube of side ``2 window + 1`` cut at the map border; ``None``: the whole map). Returns the
    ``valid``-weighted mean ``-log softmax`` at the targets (0 when no query is valid). A window much smaller than
    the map is gathered (memory ``B K (2w+1)^D C``); one of an eighth of the map or more is scored as the
    whole map with the cells outside it masked (one matrix product, memory ``B K N``: 3D windows of 19^3 cells on
    32^3 maps gather more values than the map holds).
    """
    batch, channels, dims = feat.shape[0], feat.shape[1], feat.ndim - 2
    sizes = torch.tensor(feat.shape[2:], device=feat.device)
    flat_feat = feat.flatten(2)  # (B, C, N)
    queries = F.normalize(queries, dim=-1)
    if window is None or _DENSE * (2 * window + 1) ** dims >= flat_feat.shape[2]:
        cos = torch.einsum("bkc,bcn->bkn", queries, F.normalize(flat_feat, dim=1))  # (B, K, N)
        positive = flat_index(targets, sizes)  # (B, K)
        if window is None:
            inside = torch.ones(cos.shape, dtype=torch.bool, device=feat.device)
        else:
            inside = torch.ones((), dtype=torch.bool, device=feat.device)
            for axis, size in enumerate(feat.shape[2:]):  # the window is a product of one interval per axis
                near = (torch.arange(size, device=feat.device) - targets[..., axis, None]).abs() <= window  # (B, K, n)
                inside = inside[..., None] & near.reshape(*near.shape[:2], *[1] * axis, size)
            inside = inside.reshape(cos.shape)  # (B, K, N)
    else:
        span = torch.arange(-window, window + 1, device=feat.device)
        offsets = offset_cube(span, dims)  # (W, D)
        cells = targets[:, :, None, :] + offsets  # (B, K, W, D)
        inside = ((cells >= 0) & (cells < sizes)).all(-1)  # (B, K, W)
        flat = flat_index(torch.minimum(cells.clamp_min(0), sizes - 1), sizes).reshape(batch, 1, -1)  # (B, 1, K*W)
        candidates = flat_feat.gather(2, flat.expand(batch, channels, flat.shape[-1]))  # (B, C, K*W)
        candidates = F.normalize(candidates.reshape(batch, channels, *cells.shape[1:3]), dim=1)  # (B, C, K, W)
        cos = torch.einsum("bkc,bckw->bkw", queries, candidates)  # (B, K, W)
        positive = torch.full(targets.shape[:2], offsets.shape[0] // 2, device=feat.device)  # the zero offset
    logits = (cos.clamp(0.0, 1.0) / temperature).masked_fill(~inside, float("-inf"))
    log_prob = logits.log_softmax(dim=-1).gather(-1, positive[..., None])[..., 0]  # (B, K)
    weight = valid.to(log_prob.dtype)
    return -(log_prob * weight).sum() / weight.sum().clamp_min(1e-12)


#: a window of W cells is scored on the whole map of N cells when _DENSE * W >= N (measured: 3D 19^3 windows on
#: 32^3 maps 2x faster masked; 2D 19^2 on 128^2 4x faster gathered)
_DENSE = 8


def mc_statistics(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MC-dropout samples ``(T, N, C)`` -> the mean ``(N, C)`` of the L2-normalised samples and the uncertainty ``u``
    ``(N,)``: the channel mean of their variance over the T samples (both keep their gradients).

    Unit vectors have ``E|x|^2 = 1``, so ``u = (1 - |mean|^2) / C`` exactly: no second pass over the samples.
    """
    mean = F.normalize(samples, dim=-1).mean(dim=0)  # (N, C)
    return mean, (1.0 - mean.pow(2).sum(dim=-1)).clamp_min(0.0) / samples.shape[-1]


def uncertainty_weights(uncertainty: torch.Tensor, tau: float | None = None) -> torch.Tensor:
    """Detached weights ``(N,)`` ``exp(-u / tau)`` of the uncertainties ``u`` ``(N,)``, ``tau`` = median of ``u`` by
    default, renormalised to mean 1."""
    u = uncertainty.detach()
    scale = u.quantile(0.5).clamp_min(1e-12) if tau is None else torch.as_tensor(tau, dtype=u.dtype)
    weights = torch.exp(-u / scale)
    return weights / weights.mean().clamp_min(1e-12)


def hard_uncertainty_weights(uncertainty: torch.Tensor, drop_fraction: float) -> torch.Tensor:
    """Detached weights ``(N,)``: 0 for the ``drop_fraction`` most uncertain rows, the rest equal, mean 1."""
    u = uncertainty.detach()
    keep = (u <= torch.quantile(u.float(), 1.0 - drop_fraction).to(u.dtype)).to(u.dtype)
    return keep / keep.mean().clamp_min(1e-12)


def heteroscedastic_loss(loss: torch.Tensor, variance: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-row ``loss / (2 s) + log(s) / 2`` with ``s = variance + eps`` (``(N,)`` each, gradients through both)."""
    s = variance + eps
    return loss / (2.0 * s) + 0.5 * torch.log(s)
