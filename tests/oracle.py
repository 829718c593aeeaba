"""PyTorch compositions of every public celoss loss, and the comparison with them.

Each function takes celoss's arguments (without ``backend``) and computes the documented definition
with PyTorch ops in the dtype of its inputs: on float64 copies it is the oracle, on the original
float32 / fp16 / bf16 tensors it is "PyTorch's own result in that dtype", the bar a low-precision
result must clear. Where PyTorch has the loss itself (``F.cross_entropy``,
``F.binary_cross_entropy_with_logits``) it is called, so its NaN/inf pattern is PyTorch's; celoss's
extras are applied as their docstrings say: ``logit_scale`` then ``softcap`` transform the logits
and ``z_loss`` adds ``z_loss * w_y * lse**2`` per counted row (``w_y`` = 1 for probability targets).
"""
import math

import torch
import torch.nn.functional as F


def transform(x, logit_scale=1.0, softcap=None):
    """celoss's logit transform: scale, then ``softcap * tanh(z / softcap)``."""
    z = x * logit_scale if logit_scale != 1.0 else x
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _reduce(rows, reduction, denom):
    return {"none": lambda: rows, "sum": rows.sum, "mean": lambda: rows.sum() / denom}[reduction]()


def target_weight(target, weight, ignore_index, like):
    """Per-position weight of the target class, 0 where ignored (the weighted-mean terms)."""
    counted = target != ignore_index
    safe = torch.where(counted, target, torch.zeros_like(target)).long()
    w_y = torch.ones_like(safe, dtype=like.dtype) if weight is None else weight.to(like.dtype)[safe]
    return torch.where(counted, w_y, torch.zeros_like(w_y))


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                  logit_scale=1.0, softcap=None, z_loss=0.0):
    """``F.cross_entropy`` of the transformed logits (class dim 1), plus the z-loss term."""
    z = transform(input, logit_scale, softcap)
    if weight is not None:
        weight = weight.to(z.dtype)
    loss = F.cross_entropy(z, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if not z_loss:
        return loss
    lse = torch.logsumexp(z, dim=1 if z.dim() > 1 else 0)
    if target.dtype.is_floating_point:
        rows, denom = z_loss * lse * lse, lse.numel()
    else:
        w_y = target_weight(target, weight, ignore_index, lse)
        rows = torch.where(target != ignore_index, z_loss * w_y * lse * lse, torch.zeros_like(lse))
        denom = w_y.sum()
    return loss + _reduce(rows, reduction, denom).to(loss.dtype)


def ce_rows(x, target, soft, weight, coef, *, ignore_index, label_smoothing, logit_scale, softcap, z_loss,
            focal_gamma):
    """The CE row kernels' contract (tests/kernels, tests/cpu): per-row loss, lse and ``coef * dloss/dx``
    (``coef``: one value or one per row) of the (N, C) logits ``x``, index ``target`` or probability
    ``soft`` targets, in float64. The focal loss (``focal_gamma``) is ``-w_y (1 - p_y)**gamma log p_y``
    with the gradient's exact limit 0 where ``1 - p_y`` is 0 (a single class, gamma < 1; ``_decay``)."""
    x64 = x.detach().double().requires_grad_()
    z = transform(x64, logit_scale, softcap)
    lse = torch.logsumexp(z, 1)
    w = None if weight is None else weight.double()
    if soft is not None:
        loss = F.cross_entropy(z, soft.double(), weight=w, label_smoothing=label_smoothing,
                               reduction="none") + z_loss * lse * lse
    else:
        counted = target != ignore_index
        w_y = target_weight(target, w, ignore_index, lse)
        if focal_gamma is None:
            loss = F.cross_entropy(z, target, weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                   reduction="none")
            loss = loss + torch.where(counted, z_loss * w_y * lse * lse, torch.zeros_like(lse))
        else:
            safe = torch.where(counted, target, torch.zeros_like(target))
            lp = torch.log_softmax(z, 1).gather(1, safe[:, None])[:, 0]
            loss = torch.where(counted, -w_y * _decay(-torch.expm1(lp), focal_gamma) * lp, torch.zeros_like(lp))
    c = coef.double().expand(len(loss)) if coef.numel() == 1 else coef.double()
    (grad,) = torch.autograd.grad((loss * c).sum(), x64)
    return loss.detach(), lse.detach(), grad


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0,
                         shift=False):
    """``cross_entropy(F.linear(input, W, b), target)`` over input ``(..., D)`` / target ``(...)``."""
    if shift:
        input, target = input[..., :-1, :], target[..., 1:]
    logits = F.linear(input, linear_weight, linear_bias)
    flat = cross_entropy(logits.reshape(-1, linear_weight.shape[0]), target.reshape(-1), weight, ignore_index,
                         reduction, label_smoothing, logit_scale=logit_scale, softcap=softcap, z_loss=z_loss)
    return flat.reshape(target.shape) if reduction == "none" else flat


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None):
    """``F.binary_cross_entropy_with_logits`` in ``promote_types(input, target)``: celoss's documented
    result dtype (its docstring), where PyTorch returns the target's dtype (a float64 input with a
    float32 target gives float32)."""
    dtype = torch.promote_types(input.dtype, target.dtype)
    return F.binary_cross_entropy_with_logits(input.to(dtype), target.to(dtype), weight, reduction=reduction,
                                              pos_weight=pos_weight)


def _decay(u, gamma):
    """``u**gamma`` with gradient 0 at ``u == 0``: there autograd's ``gamma u**(gamma - 1)`` is inf for
    gamma < 1, while the losses' limits (``u**gamma`` times a factor that vanishes with ``u``) have
    gradient 0. NaN ``u`` stays NaN (the test is ``u == 0``, not ``u > 0``)."""
    zero = u == 0
    safe = torch.where(zero, torch.full_like(u, 0.5), u)
    return torch.where(zero, torch.full_like(u, 0.0 if gamma else 1.0), safe.pow(gamma))


def focal_loss(input, target, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean"):
    """``-alpha_y (1 - p_y)**gamma log p_y`` per counted position; "mean" over counted positions."""
    dim = 1 if input.dim() > 1 else 0
    counted = target != ignore_index
    safe = torch.where(counted, target, torch.zeros_like(target)).long()
    lp = F.log_softmax(input, dim).gather(dim, safe.unsqueeze(dim)).squeeze(dim)
    if alpha is None:
        a = torch.ones_like(lp)
    elif torch.is_tensor(alpha) and alpha.dim() == 1:
        a = alpha.to(lp.dtype)[safe]
    else:
        a = torch.full_like(lp, float(alpha))
    rows = -a * _decay(-torch.expm1(lp), gamma) * lp  # 1 - p_y = -expm1(log p_y), exact near p_y = 1
    rows = torch.where(counted, rows, torch.zeros_like(rows))
    return _reduce(rows, reduction, counted.sum())


def _sigmoid_focal(inputs, targets, decay, alpha, reduction):
    """torchvision's ``ce * decay`` times the alpha factor, reduced."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none") * decay
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return {"none": lambda: loss, "mean": loss.mean, "sum": loss.sum}[reduction]()


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision's formula, ``ce * (1 - p_t)**gamma`` times the alpha factor, with ``1 - p_t`` formed
    as ``p (1 - t) + sigmoid(-x) t`` (the docstring's stable form, so the oracle is the function itself
    rather than its float64 rounding at |x| > 37). Its docstring's decisions: for finite logits where
    ``1 - p_t`` is 0, the exact limit 0 of the gradient (torchvision's autograd gives NaN); NaN and
    +-inf logits give torchvision's NaN / inf, so there ``(1 - p_t)**gamma`` is differentiated as is."""
    u = torch.sigmoid(inputs) * (1 - targets) + torch.sigmoid(-inputs) * targets
    finite = torch.isfinite(inputs)
    as_is = torch.where(finite, torch.full_like(u, 0.5), u) ** gamma  # 0.5: no 0 * inf in the unused lanes
    return _sigmoid_focal(inputs, targets, torch.where(finite, _decay(u, gamma), as_is), alpha, reduction)


def torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """``torchvision.ops.sigmoid_focal_loss`` verbatim (``1 - p_t`` as written), for the tests of its
    NaN/inf pattern: where its ``1 - p_t`` cancels to 0 (|x| > 37 in float64) autograd of
    ``(1 - p_t)**gamma`` is NaN for gamma < 1, unlike ``sigmoid_focal_loss`` above."""
    p = torch.sigmoid(inputs)
    p_t = p * targets + (1 - p) * (1 - targets)
    return _sigmoid_focal(inputs, targets, (1 - p_t) ** gamma, alpha, reduction)


def _kl(log_p, log_q):
    """KL(p || q) over the last dim, a zero-probability term counting 0 (-inf logits allowed); NaN
    stays NaN (``p == 0`` is the test). The masked difference keeps gradients finite there."""
    p = log_p.exp()
    diff = torch.where(p == 0, torch.zeros_like(log_p), log_p - log_q)
    return (p * diff).sum(-1)


def distillation_loss(student_logits, teacher_logits, target=None, *, temperature=1.0, kind="kl", beta=0.5,
                      alpha=1.0, ignore_index=-100, reduction="batchmean"):
    """The documented definition: ``T**2 * D(p_T, p_S)`` per row, mixed with the temperature-1
    cross-entropy of the target when given; batchmean / mean divide by the counted rows (times V)."""
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    T, v = temperature, s.shape[-1]
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "kl" if beta == 0.0 else "reverse_kl"
    if kind == "kl":
        d = _kl(lt, ls)
    elif kind == "reverse_kl":
        d = _kl(ls, lt)
    elif kind == "ce":
        p = lt.exp()
        d = -(p * torch.where(p == 0, torch.zeros_like(ls), ls)).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log1p(-beta)]), 0)
        d = beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)
    rows = T * T * d
    counted = torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    if target is not None:
        counted = target != ignore_index
        ce = F.cross_entropy(s.reshape(target.numel(), v), target.reshape(-1), ignore_index=ignore_index,
                             reduction="none").reshape(rows.shape)
        rows = torch.where(counted, alpha * rows + (1 - alpha) * ce, torch.zeros_like(rows))
    n = counted.sum()
    rows = rows.to(student_logits.dtype)
    return {"none": lambda: rows, "sum": rows.sum, "batchmean": lambda: rows.sum() / n,
            "mean": lambda: rows.sum() / (n * v)}[reduction]()


def token_logprobs(logits, tokens, temperature=1.0, ignore_index=-100):
    """(log p_y, entropy) by log_softmax in the input's dtype, ignored rows masked out before the
    softmax (0 outputs, 0 gradient); 0 log 0 = 0 in the entropy."""
    ignored = tokens == ignore_index
    z = logits.masked_fill(ignored.unsqueeze(-1), 0) / temperature
    lp = torch.log_softmax(z, -1)
    ent = -(lp.exp() * lp.masked_fill(torch.isneginf(lp), 0)).sum(-1)
    tok = lp.gather(-1, torch.where(ignored, 0, tokens).unsqueeze(-1)).squeeze(-1)
    return torch.where(ignored, 0, tok), torch.where(ignored, 0, ent)


def _kind(t):
    """0 finite, 1 NaN, 2 +inf, 3 -inf, elementwise."""
    k = torch.zeros(t.shape, dtype=torch.int8)
    k[t.isnan()] = 1
    k[t == math.inf] = 2
    k[t == -math.inf] = 3
    return k


def compare(ours, same_dtype, oracle, margin, elementwise=True, what=""):
    """Failures ``(kind, message)`` of ``ours`` against the float64 ``oracle`` (none: []).

    * where the oracle is NaN / +inf / -inf, ours is exactly that (PyTorch's pattern);
    * where it is finite, ours is finite too, unless PyTorch's own result in ours' dtype
      (``same_dtype``) overflowed there: then ours may be that same non-finite value;
    * where all three are finite, ours is no farther from the oracle than PyTorch's own result in
      that dtype plus ``margin * (1 + |oracle|)``: entry by entry, or (``elementwise=False``, for
      fp16/bf16, whose rounded sums differ entry by entry whichever is better overall) for the
      worst entries of the tensor, as ``conftest.lowp_error_bound``.
    """
    if ours.shape != oracle.shape or ours.dtype != same_dtype.dtype:
        return [("shape/dtype", f"{what}: {tuple(ours.shape)} {ours.dtype}, PyTorch {tuple(oracle.shape)} "
                                f"{same_dtype.dtype}")]
    a, s, o = (t.detach().cpu().double() for t in (ours, same_dtype, oracle))
    ka, ks, ko = _kind(a), _kind(s), _kind(o)
    both = (ko == 0) & (ka == 0) & (ks == 0)
    zero = torch.zeros_like(a)
    err, ref = torch.where(both, (a - o).abs(), zero), torch.where(both, (s - o).abs(), zero)
    if elementwise:
        allowed = ref + margin * (1 + o.abs())
    else:
        big = torch.where(both, o.abs(), zero).max() if a.numel() else 0.0
        allowed = torch.full_like(a, float(ref.max() if a.numel() else 0.0) + margin * (1 + float(big)))
    checks = [("NaN/inf pattern", (ko != 0) & (ka != ko), torch.ones_like(a)),
              ("non-finite where PyTorch is finite", (ko == 0) & (ka != 0) & (ka != ks), torch.ones_like(a)),
              ("values", both & (err > allowed), err - allowed)]
    fails = []
    for kind, bad, excess in checks:
        if bad.any():
            i = torch.where(bad, excess, torch.full_like(excess, -math.inf)).flatten().argmax()
            i = tuple(int(j) for j in torch.unravel_index(i, a.shape))
            fails.append((kind, f"{what}: {kind} at {int(bad.sum())}/{a.numel()} entries, e.g. {list(i)}: "
                                f"celoss {a[i].item():.9g}, float64 PyTorch {o[i].item():.9g}, {same_dtype.dtype} "
                                f"PyTorch {s[i].item():.9g} (allowed error {allowed[i].item():.3g})"))
    return fails
