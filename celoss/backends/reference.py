"""Reference backend: :class:`celoss.backends.Backend` in plain PyTorch, a bounded chunk of rows at a time.

Runs on any device. Never holds more than a bounded chunk of N x C temporaries at once:
``CHUNK_ELEMENTS`` elements, ``CE_CHUNK_ELEMENTS`` for cross-entropy's fused pass.
"""
from __future__ import annotations

import math

import torch

from .. import stats as S
from .._dtypes import accum_dtype
from .._memory import fresh_empty

LINEAR_CE_KERNELS = False
CHUNK_ELEMENTS = 1 << 22  # 16 MB of float32 per chunk
# ce_fused's chunk: 64 MB of float32. Each PyTorch op is a pass over the chunk and a parallel region:
# bf16 fwd+bwd at 4096 x 32000 took 1.7-1.8x eager F.cross_entropy's time with 4M-element chunks,
# 0.7-0.8x with 16M-element ones (2 threads, loaded machine; with 1 thread the size made no difference)
CE_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(n: int, c: int):
    step = max(1, CHUNK_ELEMENTS // max(c, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def transform(x: torch.Tensor, logit_scale: float, softcap: float | None, out: torch.Tensor | None = None):
    """z = softcap * tanh(scale * x / softcap) and dz/dx (computed in the accumulation dtype). z is
    ``out`` when given (a buffer of x's shape to compute in), else ``x`` itself when that is all it
    is (no copy: callers must not write to it), else a new tensor."""
    z = out.copy_(x) if out is not None else x.to(accum_dtype(x.dtype))
    if logit_scale != 1:  # x * 1 is x, bit for bit
        z = z * logit_scale if z is x else z.mul_(logit_scale)
    if softcap is None:
        return z, logit_scale
    z = z.div_(softcap).tanh_().mul_(softcap) if z is not x else softcap * torch.tanh(z / softcap)
    return z, logit_scale * (1 - (z / softcap) ** 2)


def _weights(weight, c, like):
    return torch.ones(c, dtype=like.dtype, device=like.device) if weight is None else weight.to(like.dtype)


def ce_stats(logits, target, weight, *, class_start, ignore_index, logit_scale, softcap):
    n, c = logits.shape
    out = torch.empty(n, S.NUM_STATS, dtype=accum_dtype(logits.dtype), device=logits.device)
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
        # where, not -b * here: an infinite B (a 0 mean denominator) must not leak into class 0
        g.scatter_add_(1, torch.where(here, local, 0).unsqueeze(1), torch.where(here, -b, 0.0).unsqueeze(1))
        grad_out[rows] = (g * dz).to(grad_out.dtype)


def ce_target_grads(logits, soft_target, weight, lse, coef, *, grad_target, grad_weight,
                    label_smoothing, logit_scale, softcap):
    """d(sum_n coef_n loss_n)/dt_nj = coef_n (1 - eps) w_j (lse_n - z_nj) for probability targets t,
    and /dw_j = sum_n coef_n t'_nj (lse_n - z_nj) with t' = (1 - eps) t + eps / C."""
    n, c = logits.shape
    acc = accum_dtype(logits.dtype)
    gt = torch.empty_like(soft_target, memory_format=torch.contiguous_format) if grad_target else None
    gw = torch.zeros(c, dtype=acc, device=logits.device) if grad_weight else None
    for rows in _row_chunks(n, c):
        z, _ = transform(logits[rows], logit_scale, softcap)
        nlp = lse[rows].to(acc).unsqueeze(1) - z  # -log p
        k = (coef if coef.numel() == 1 else coef[rows].unsqueeze(1)).to(acc)
        if gt is not None:
            g = k * (1 - label_smoothing) * nlp
            gt[rows] = (g if weight is None else g * weight.to(acc)).to(gt.dtype)
        if gw is not None:
            t = soft_target[rows].to(acc) * (1 - label_smoothing) + label_smoothing / c
            gw += (k * t * nlp).sum(0)
    return gt, (None if gw is None else gw.to(weight.dtype))


def _row_values(v: torch.Tensor, rows: slice, dtype) -> torch.Tensor:
    """One value for every row (a one-element tensor) or one per row: those of ``rows``."""
    return (v.reshape(()) if v.numel() == 1 else v[rows]).to(dtype)


def ce_fused(logits, target, soft_target, weight, coef, grad_out, *, ignore_index, label_smoothing,
             logit_scale, softcap, z_loss, focal_gamma):
    """Few, large passes over the logits (each PyTorch op is one pass over memory and one parallel
    region): z in the accumulation dtype, e = exp(z - shift) in place (p = e / sumexp: exact where
    z - lse cancels at |z| ~ 1e30), then scaled in place into the gradient, with coef and a scalar
    dz/dx folded into one factor per row as the compiled kernels fold them. Where the gradient has
    the accumulation dtype (float32 / float64 logits), with index targets and no softcap derivative
    to keep, it holds z and e itself: all rows at once, no N x C temporary. Else one buffer of at
    most ``CE_CHUNK_ELEMENTS``, reused chunk after chunk (probability targets add a few that size)."""
    n, c = logits.shape
    acc = accum_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    in_grad = grad_out is not None and grad_out.dtype == acc and softcap is None and soft_target is None
    step = max(1, n if in_grad else CE_CHUNK_ELEMENTS // max(c, 1))
    # (a large CPU buffer from celoss's cache: its pages are faulted in once, not at every call)
    buf = None if in_grad else fresh_empty((min(n, step), c), acc, logits.device)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        x = logits[rows]
        if in_grad:  # grad_out may be the logits themselves (in place): z is read before e is written
            dest = grad_out[rows]
            z, dz = (x if logit_scale == 1 else torch.mul(x, logit_scale, out=dest)), logit_scale
        else:
            z, dz = transform(x, logit_scale, softcap, out=buf[:x.shape[0]])
            dest = z
        m = z.amax(dim=1)
        shift = torch.where(torch.isfinite(m), m, 0.0)
        # what the loss needs of z itself, before e takes its place
        if soft_target is None:
            t = target[rows]
            counted = t != ignore_index
            safe_t = torch.where(counted, t, torch.zeros_like(t)).unsqueeze(1)
            z_y = z.gather(1, safe_t).squeeze(1)
            # sum_c w_c z_c: read by the coefficients with label smoothing only
            zw = z @ _weights(weight, c, z) if label_smoothing else torch.zeros_like(m)
        else:
            wt = _weights(weight, c, z) * ((1 - label_smoothing) * soft_target[rows].to(acc) + label_smoothing / c)
            mass = wt.sum(dim=1)
            wz = (wt * z).sum(dim=1)
        e = torch.sub(z, shift.unsqueeze(1), out=dest).exp_()
        sumexp = e.sum(dim=1)
        lse[rows] = row_lse = shift + torch.log(sumexp)  # torch.logsumexp's formula, bit for bit
        if soft_target is None:
            st = torch.stack([m, sumexp, z_y, zw], dim=1)
            loss[rows], _, row_coefs = S.coefficients(st, t, weight, num_classes=c, ignore_index=ignore_index,
                                                      label_smoothing=label_smoothing, z_loss=z_loss,
                                                      focal_gamma=focal_gamma)
        else:
            loss[rows] = mass * row_lse - wz + z_loss * row_lse * row_lse
        if grad_out is None:
            continue
        k = _row_values(coef, rows, acc)
        if not isinstance(dz, torch.Tensor):
            k = k * dz
        if soft_target is None:
            # dloss/dz = A p - B [j == y] - D w. Ignored rows: PyTorch's 0 * softmax; a row whose
            # softmax is NaN (a NaN / +inf logit, or only -inf ones) is NaN for counted rows as in
            # PyTorch's log_softmax, and 0 * NaN for ignored ones
            a, b, d = row_coefs.unbind(1)
            k = torch.where(torch.isfinite(row_lse), torch.where(counted, k, 0.0), torch.nan)
            e.mul_((a / sumexp * k).unsqueeze(1))
            e.scatter_add_(1, safe_t, (-b * k).unsqueeze(1))
            if label_smoothing:
                dk = (d * k).unsqueeze(1)
                if weight is None:
                    e.sub_(dk)
                else:  # broadcast in place: no N x C outer product
                    e.addcmul_(dk, weight.to(acc).unsqueeze(0), value=-1)
        else:  # dloss/dz = (mass + 2 lam lse) p - wt
            e.mul_(((mass + 2 * z_loss * row_lse) / sumexp * k).unsqueeze(1))
            e.sub_(wt.mul_(k.unsqueeze(1) if k.dim() else k))
        if isinstance(dz, torch.Tensor):
            e.mul_(dz)
        if not in_grad:
            grad_out[rows] = e
    return loss, lse


# ==============================================================================================
# Loss family: binary CE with logits, sigmoid focal loss, distillation (celoss/_family_ops.py).
# Plain PyTorch, a bounded chunk of rows at a time (``_row_chunks``).
# ==============================================================================================
def _binary_math(x, y, w, pw, focal_alpha, focal_gamma):
    """(loss, dloss/dx, dloss/dy) elementwise, in x's (accumulation) dtype."""
    e = torch.exp(-x.abs())
    l1 = torch.log1p(e)
    spn = torch.clamp_min(-x, 0) + l1  # softplus(-x)
    sgn = torch.where(x >= 0, e, torch.ones_like(e)) / (1 + e)  # sigmoid(-x)
    if focal_gamma is None:
        lw = 1 + (pw - 1) * y if pw is not None else 1.0
        loss = (1 - y) * x + lw * spn
        dx = (1 - y) - lw * sgn
        # pw softplus(-x) - softplus(x), not (pw - 1) softplus(-x) - x: inf - inf at x = -inf
        dy = pw * spn - (torch.clamp_min(x, 0) + l1) if pw is not None else -x
        if w is not None:
            loss, dx, dy = w * loss, w * dx, w * dy
        return loss, dx, dy
    gamma = float(focal_gamma)
    p = torch.where(x >= 0, torch.ones_like(e), e) / (1 + e)
    ce = (1 - y) * x + spn
    q = p * (1 - y) + y * sgn
    pos = q > 0
    safe_q = torch.where(pos, q, torch.ones_like(q))
    mod = torch.where(pos, safe_q.pow(gamma), torch.full_like(q, 1.0 if gamma == 0 else 0.0))
    at = focal_alpha * y + (1 - focal_alpha) * (1 - y) if focal_alpha >= 0 else 1.0
    rr = (1 - 2 * y) * torch.where(pos, p * sgn / safe_q, torch.ones_like(q))
    loss = at * ce * mod
    # gamma = 0 is at * BCE: no gamma * ce * rr term (0 * inf = NaN at |x| = inf)
    dx = at * mod * ((p * (1 - y) - y * sgn) + (gamma * ce * rr if gamma else 0.0))
    return loss, dx, torch.zeros_like(dx)


def binary_fused(x, y, weight, pos_weight, coef, *, per_element, grad_input, grad_target,
                 focal_alpha, focal_gamma):
    r, c = x.shape
    acc = accum_dtype(x.dtype, y.dtype)
    loss_el = torch.empty_like(x) if per_element else None
    gx = torch.empty_like(x) if grad_input else None
    gy = torch.empty_like(y) if grad_target else None
    partials = []
    per_elem_coef = coef is not None and coef.numel() != 1
    for rows in _row_chunks(r, c):
        w = None if weight is None else weight[rows].to(acc)
        pw = None if pos_weight is None else pos_weight[rows].to(acc)
        loss, dx, dy = _binary_math(x[rows].to(acc), y[rows].to(acc), w, pw, focal_alpha,
                                        focal_gamma)
        partials.append(loss.sum().reshape(1))
        if loss_el is not None:
            loss_el[rows] = loss.to(loss_el.dtype)
        if gx is not None or gy is not None:
            up = coef[rows].to(acc) if per_elem_coef else coef.reshape(()).to(acc)
            if gx is not None:
                gx[rows] = (dx * up).to(gx.dtype)
            if gy is not None:
                gy[rows] = (dy * up).to(gy.dtype)
    partials = torch.cat(partials) if partials else torch.zeros(1, dtype=acc, device=x.device)
    return (loss_el if per_element else partials), gx, gy


def _distill_rows(s, t, kind, temperature, beta):
    """Per row D and (dD/da, dD/db) for a = s / T, b = t / T (float, no autograd)."""
    ls = torch.log_softmax(s / temperature, dim=1)
    lt = torch.log_softmax(t / temperature, dim=1)
    ps, pt = ls.exp(), lt.exp()
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if kind in ("kl", "ce"):
        if kind == "kl":
            d = torch.where(pt > 0, pt * (lt - ls), zero).sum(1)
            gt = torch.where(pt > 0, pt * ((lt - ls) - d.unsqueeze(1)), zero)
        else:
            d = -torch.where(pt > 0, pt * ls, zero).sum(1)
            gt = -torch.where(pt > 0, pt * (ls + d.unsqueeze(1)), zero)
        return d, ps - pt, gt
    if kind == "reverse_kl":
        d = torch.where(ps > 0, ps * (ls - lt), zero).sum(1)
        gs = torch.where(ps > 0, ps * ((ls - lt) - d.unsqueeze(1)), zero)
        return d, gs, pt - ps
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    kt = torch.where(pt > 0, pt * (lt - lm), zero).sum(1)
    ks = torch.where(ps > 0, ps * (ls - lm), zero).sum(1)
    gs = (1 - beta) * torch.where(ps > 0, ps * (ls - lm - ks.unsqueeze(1)), zero)
    gt = beta * torch.where(pt > 0, pt * (lt - lm - kt.unsqueeze(1)), zero)
    return beta * kt + (1 - beta) * ks, gs, gt


def distill_fused(student, teacher, target, coef, grad_out, grad_teacher, *, kind, temperature,
                  beta, alpha, ignore_index):
    n, v = student.shape
    acc = accum_dtype(student.dtype, teacher.dtype)
    loss = torch.empty(n, dtype=acc, device=student.device)
    T = float(temperature)
    has_target = target is not None
    ws = T * T * (float(alpha) if has_target else 1.0)
    wh = (1.0 - float(alpha)) if has_target else 0.0
    for rows in _row_chunks(n, v):
        s = student[rows].to(acc)
        t = teacher[rows].to(acc)
        d, gs, gt = _distill_rows(s, t, kind, T, beta)
        # A NaN, a +inf or only -inf in either row makes log_softmax NaN in PyTorch's composition:
        # NaN loss and gradients for the whole row (the 0 log 0 = 0 rule above would hide it).
        # amax propagates NaN.
        bad = ~(torch.isfinite((s / T).amax(1)) & torch.isfinite((t / T).amax(1))).unsqueeze(1)
        row_loss = ws * d
        keep = torch.ones_like(bad)
        if has_target:
            y = target[rows]
            keep = (y != ignore_index).unsqueeze(1)
            safe_y = torch.where(keep.squeeze(1), y, torch.zeros_like(y)).unsqueeze(1)
            if wh != 0.0:
                ls1 = torch.log_softmax(s, dim=1)
                row_loss = row_loss - wh * ls1.gather(1, safe_y).squeeze(1)
        row_loss = torch.where(bad.squeeze(1), torch.nan, row_loss)
        loss[rows] = torch.where(keep.squeeze(1), row_loss, 0.0)
        if grad_out is None and grad_teacher is None:
            continue
        c = (coef if coef.numel() == 1 else coef[rows].unsqueeze(1)).to(acc)

        def finish(g):  # ignored rows: 0 * gradient as in PyTorch (NaN in a poisoned row)
            return torch.where(bad, torch.nan, torch.where(keep, g * c, 0.0))

        if grad_out is not None:
            g = (ws / T) * gs
            if has_target and wh != 0.0:
                g = g + wh * torch.exp(ls1)
                g.scatter_add_(1, safe_y, torch.full_like(safe_y, -wh, dtype=acc))
            grad_out[rows] = finish(g).to(grad_out.dtype)
        if grad_teacher is not None:
            grad_teacher[rows] = finish((ws / T) * gt).to(grad_teacher.dtype)
    return loss
