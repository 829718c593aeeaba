"""Per-row online-softmax statistics and the loss/gradient coefficients derived from them.

The statistics of a row (or of any block of its classes) are ``(max, sumexp, target_z,
weighted_z)`` -- see :mod:`celoss.backends`. They merge exactly across class blocks, chunks and
ranks, so every path in celoss (fused kernels, chunked linear cross-entropy, vocab-parallel) reduces
to: compute block statistics, :func:`merge_all` them, turn them into a loss and gradient coefficients
with :func:`coefficients`.

Math (z = transformed logits, p = softmax(z), lse = log sum exp z, w = class weights or 1,
W = sum_c w_c, eps = label smoothing, lam = z-loss, C = number of classes, y = target):

cross-entropy, index targets (counted rows; ignored rows have loss 0 and gradient 0)::

    loss = w_y (1 - eps) (lse - z_y) + eps / C (W lse - sum_c w_c z_c) + lam w_y lse^2
    dloss/dz_j = A p_j - B [j == y] - D w_j,
    A = w_y (1 - eps) + eps W / C + 2 lam w_y lse,   B = w_y (1 - eps),   D = eps / C

The z-loss term of a row is weighted by its target's class weight, like the main term, so a
weighted mean stays a weighted average of per-row losses.

focal loss (alpha_y plays the role of w_y; no smoothing, no z-loss), with lp = z_y - lse::

    loss = -alpha_y (1 - p_y)^gamma lp
    dloss/dz_j = g (p_j - [j == y]),  g = alpha_y (1 - p_y)^gamma (1 - gamma p_y lp / (1 - p_y))

``lp / (1 - p_y)`` is evaluated as ``lp / -expm1(lp)`` (-> -1 as p_y -> 1), so g stays finite for
gamma < 1 and p_y -> 1.
"""
from __future__ import annotations

import torch

NUM_STATS = 4  # max, sumexp, target_z, weighted_z


def merge_all(stats: torch.Tensor) -> torch.Tensor:
    """Merge (K, N, 4) statistics of K disjoint class blocks (or ranks) of the same rows into (N, 4).

    The sums rescale to the common max; a row whose max is +-inf or NaN shifts by 0 instead (the
    "safe shift" every kernel uses too), so exp never sees inf - inf."""
    m = stats[..., 0].amax(dim=0)
    safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = (stats[..., 1] * torch.exp(stats[..., 0] - safe_m)).sum(dim=0)
    return torch.stack([m, s, stats[..., 2].sum(0), stats[..., 3].sum(0)], dim=-1)


def lse_of(stats: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp of merged statistics."""
    return stats[..., 0] + torch.log(stats[..., 1])


def focal_factor(lp: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For lp = log p_y: returns ((1 - p)^gamma, 1 - gamma p lp / (1 - p)), stable as p -> 1."""
    one_minus_p = -torch.expm1(lp)
    ratio = torch.where(one_minus_p > 0, lp / one_minus_p.clamp_min(torch.finfo(lp.dtype).tiny),
                        torch.full_like(lp, -1.0))
    p = torch.exp(lp)
    p_ratio = torch.where(p > 0, p * ratio, 0.0)  # p -> 0 (lp -> -inf): 0, not 0 * -inf
    return one_minus_p.pow(gamma), 1.0 - gamma * p_ratio


def coefficients(stats: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, *,
                 num_classes: int, ignore_index: int, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, focal_gamma: float | None = None):
    """Per-row (loss, lse, row_coefs (N, 3) = (A, B, D)) from merged full-row statistics."""
    lse = lse_of(stats)
    counted = target != ignore_index
    safe_t = torch.where(counted, target, torch.zeros_like(target))
    if weight is None:
        w_y = counted.to(lse.dtype)
        w_sum = float(num_classes)
    else:
        w_y = torch.where(counted, weight.to(lse.dtype)[safe_t], torch.zeros_like(lse))
        w_sum = weight.to(lse.dtype).sum()
    z_y = stats[..., 2]
    # -log p_y from the unrounded shift: lse - z_y loses everything once |z| ~ 1 / float eps
    nll = (stats[..., 0] - z_y) + torch.log(stats[..., 1])
    # a NaN / +inf logit, or only -inf ones: PyTorch's log_softmax (hence the loss) is NaN
    nll = torch.where(torch.isfinite(lse), nll, torch.nan)
    if focal_gamma is not None:
        lp = -nll
        decay, slope = focal_factor(lp, focal_gamma)
        loss = torch.where(counted, -w_y * decay * lp, torch.zeros_like(lse))
        g = torch.where(counted, w_y * decay * slope, torch.zeros_like(lse))
        return loss, lse, torch.stack([g, g, torch.zeros_like(g)], dim=-1)
    eps = label_smoothing
    c = counted.to(lse.dtype)
    smooth = eps / num_classes * (w_sum * lse - stats[..., 3]) if eps else 0.0
    loss = w_y * (1 - eps) * nll + smooth + z_loss * w_y * lse * lse
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    a = w_y * (1 - eps) + eps * w_sum / num_classes * c + 2 * z_loss * w_y * lse
    b = w_y * (1 - eps)
    d = eps / num_classes * c
    return loss, lse, torch.stack([a, b, d], dim=-1)
