"""Reference backend: the row-kernel contract in plain PyTorch, a bounded chunk of rows at a time.

Runs on any device. Never holds more than ``CHUNK_ELEMENTS`` float32 probabilities at once.
"""
from __future__ import annotations

import torch

from .. import stats as S

CHUNK_ELEMENTS = 1 << 22  # 16 MB of float32 per chunk


def _row_chunks(n: int, c: int):
    step = max(1, CHUNK_ELEMENTS // max(c, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def transform(x: torch.Tensor, logit_scale: float, softcap: float | None):
    """z = softcap * tanh(scale * x / softcap) and dz/dx (computed in the accumulation dtype)."""
    z = x.to(_acc_dtype(x)) * logit_scale
    if softcap is None:
        return z, logit_scale
    z = softcap * torch.tanh(z / softcap)
    return z, logit_scale * (1 - (z / softcap) ** 2)


def _weights(weight, c, like):
    return torch.ones(c, dtype=like.dtype, device=like.device) if weight is None else weight.to(like.dtype)


def ce_stats(logits, target, weight, *, class_start, ignore_index, logit_scale, softcap):
    n, c = logits.shape
    out = torch.empty(n, S.NUM_STATS, dtype=_acc_dtype(logits), device=logits.device)
    for rows in _row_chunks(n, c):
        z, _ = transform(logits[rows], logit_scale, softcap)
        m = z.amax(dim=1) if c else torch.full((z.shape[0],), -float("inf"), dtype=z.dtype, device=z.device)
        safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        local = target[rows] - class_start
        here = (local >= 0) & (local < c) & (target[rows] != ignore_index)
        z_y = z.gather(1, torch.where(here, local, 0).unsqueeze(1)).squeeze(1) if c else torch.zeros_like(m)
        out[rows, 0] = m
        out[rows, 1] = torch.exp(z - safe_m.unsqueeze(1)).sum(dim=1)
        out[rows, 2] = torch.where(here, z_y, torch.zeros_like(z_y))
        out[rows, 3] = z @ _weights(weight, c, z)
    return out


def ce_grad(logits, target, weight, lse, row_coefs, grad_out, *, class_start, logit_scale, softcap):
    n, c = logits.shape
    for rows in _row_chunks(n, c):
        z, dz = transform(logits[rows], logit_scale, softcap)
        a, b, d = row_coefs[rows].to(z.dtype).unbind(1)
        g = a.unsqueeze(1) * torch.exp(z - lse[rows].to(z.dtype).unsqueeze(1))
        g -= d.unsqueeze(1) * _weights(weight, c, z)
        local = target[rows] - class_start
        here = (local >= 0) & (local < c)
        g.scatter_add_(1, torch.where(here, local, 0).unsqueeze(1), -(b * here).unsqueeze(1))
        grad_out[rows] = (g * dz).to(grad_out.dtype)


def _soft_target_rows(z, lse, t, weight, label_smoothing, z_loss):
    """Loss and dloss/dz for probability targets (t already in z's dtype)."""
    c = z.shape[1]
    w = _weights(weight, c, z)
    wt = w * ((1 - label_smoothing) * t + label_smoothing / c)
    mass = wt.sum(dim=1)
    loss = mass * lse - (wt * z).sum(dim=1) + z_loss * lse * lse
    a = mass + 2 * z_loss * lse
    grad = a.unsqueeze(1) * torch.exp(z - lse.unsqueeze(1)) - wt
    return loss, grad


def ce_fused(logits, target, soft_target, weight, coef, grad_out, *, ignore_index, label_smoothing,
             logit_scale, softcap, z_loss, focal_gamma):
    n, c = logits.shape
    acc = _acc_dtype(logits)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    for rows in _row_chunks(n, c):
        z, dz = transform(logits[rows], logit_scale, softcap)
        lse[rows] = row_lse = torch.logsumexp(z, dim=1)
        if soft_target is not None:
            loss[rows], g = _soft_target_rows(z, row_lse, soft_target[rows].to(acc), weight,
                                              label_smoothing, z_loss)
        else:
            t = target[rows]
            counted = t != ignore_index
            safe_t = torch.where(counted, t, torch.zeros_like(t))
            st = torch.stack([row_lse, torch.ones_like(row_lse), z.gather(1, safe_t.unsqueeze(1)).squeeze(1),
                              z @ _weights(weight, c, z)], dim=1)
            loss[rows], _, rc = S.coefficients(st, t, weight, num_classes=c, ignore_index=ignore_index,
                                               label_smoothing=label_smoothing, z_loss=z_loss,
                                               focal_gamma=focal_gamma)
            if grad_out is None:
                continue
            a, b, d = rc.unbind(1)
            g = a.unsqueeze(1) * torch.exp(z - row_lse.unsqueeze(1)) - d.unsqueeze(1) * _weights(weight, c, z)
            g.scatter_add_(1, safe_t.unsqueeze(1), -b.unsqueeze(1))
        if grad_out is not None:
            row_coef = coef if coef.numel() == 1 else coef[rows].unsqueeze(1)
            grad_out[rows] = (g * dz * row_coef.to(acc)).to(grad_out.dtype)
    return loss, lse
