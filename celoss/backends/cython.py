"""Cython backend: :class:`celoss.backends.Backend` on the OpenMP CPU kernels
of ``celoss.cpu._kernels`` (math in ``cpu/ce_rows.h``). CPU tensors only.

Importing this module raises ImportError when the compiled extension is missing; the dispatcher
falls back to another backend then.
"""
from __future__ import annotations

import warnings

import torch

from .. import _memory
from .._dtypes import DTYPE_CODE, accum_dtype
from ..cpu import _kernels as _K
from . import reference

try:
    from ..cpu import _family as _F
except ImportError as exc:  # a build without cpu/_family.pyx: keep the cross-entropy kernels usable
    _F, _FAMILY_ERROR = None, f"{type(exc).__name__}: {exc}"

LINEAR_CE_KERNELS = False


def _unit_rows(x: torch.Tensor) -> bool:
    return x.stride(1) == 1 or x.shape[1] <= 1


def _rows(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (in ``dtype``) with unit-stride rows; any row stride is fine."""
    x = x if dtype is None else x.to(dtype)
    return x if _unit_rows(x) else x.contiguous()


def _vec(x: torch.Tensor | None, dtype: torch.dtype):
    return None if x is None else x.to(dtype).contiguous()


def _ptr(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _grad_target(logits: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor | None):
    """Where the kernel writes the gradient: grad_out itself when it is usable (logits included:
    in place), else x when x is already a private copy, else a new buffer."""
    if grad_out is None or (grad_out.dtype == x.dtype and _unit_rows(grad_out)):
        return grad_out
    return x if x is not logits else torch.empty_like(x)


def ce_fused(logits, target, soft_target, weight, coef, grad_out, *, ignore_index, label_smoothing,
             logit_scale, softcap, z_loss, focal_gamma):
    n, c = logits.shape
    acc = accum_dtype(logits.dtype)
    x = _rows(logits)
    w = _vec(weight, acc)
    t = None if soft_target is None else _rows(soft_target, x.dtype)
    y = None if soft_target is not None else _vec(target, torch.int64)
    cf = None if grad_out is None else _vec(coef, acc)
    g = _grad_target(logits, x, grad_out)
    loss = torch.empty(n, dtype=acc)
    lse = torch.empty(n, dtype=acc)
    if n:
        _K.fused(DTYPE_CODE[x.dtype], n, c, x.data_ptr(), x.stride(0), _ptr(g),
                 0 if g is None else g.stride(0), _ptr(t), 0 if t is None else t.stride(0), _ptr(y),
                 _ptr(w), _ptr(cf), 0 if cf is None or cf.numel() == 1 else 1, loss.data_ptr(),
                 lse.data_ptr(), ignore_index=ignore_index, label_smoothing=float(label_smoothing),
                 logit_scale=float(logit_scale), softcap=softcap, z_loss=float(z_loss),
                 focal_gamma=focal_gamma,
                 wsum=float(c) if w is None else float(weight.double().sum()),
                 num_threads=torch.get_num_threads())
    if g is not grad_out:
        grad_out.copy_(g)
    return loss, lse


def ce_stats(logits, target, weight, *, class_start, ignore_index, logit_scale, softcap):
    n, c = logits.shape
    acc = accum_dtype(logits.dtype)
    x = _rows(logits)
    y = _vec(target, torch.int64) if target is not None else torch.full((n,), ignore_index)
    w = _vec(weight, acc)
    out = torch.empty(n, 4, dtype=acc)
    if n:
        _K.stats(DTYPE_CODE[x.dtype], n, c, x.data_ptr(), x.stride(0), y.data_ptr(), _ptr(w),
                 out.data_ptr(), class_start=class_start, ignore_index=ignore_index,
                 logit_scale=float(logit_scale), softcap=softcap,
                 num_threads=torch.get_num_threads())
    return out


def ce_grad(logits, target, weight, lse, row_coefs, grad_out, *, class_start, logit_scale, softcap):
    n, c = logits.shape
    acc = accum_dtype(logits.dtype)
    x = _rows(logits)
    y = _vec(target, torch.int64)
    w = _vec(weight, acc)
    lse_c = _vec(lse, acc)
    row_coefs = _vec(row_coefs, acc)
    g = _grad_target(logits, x, grad_out)
    if n:
        _K.grad(DTYPE_CODE[x.dtype], n, c, x.data_ptr(), x.stride(0), g.data_ptr(), g.stride(0),
                y.data_ptr(), _ptr(w), lse_c.data_ptr(), row_coefs.data_ptr(), class_start=class_start,
                logit_scale=float(logit_scale), softcap=softcap,
                num_threads=torch.get_num_threads())
    if g is not grad_out:
        grad_out.copy_(g)


# ==============================================================================================
# Loss family: binary CE with logits, sigmoid focal loss, distillation (celoss/_family_ops.py),
# on the OpenMP kernels of celoss.cpu._family (cpu/_family.pyx). A teacher gradient (rare) runs
# on the reference backend.
# ==============================================================================================
def _family_missing(name):
    """True (after a one-time warning) when the loss-family extension is missing."""
    if _F is not None:
        return False
    if not getattr(_family_missing, "warned", False):
        _family_missing.warned = True
        warnings.warn(f"celoss: celoss.cpu._family is unavailable ({_FAMILY_ERROR}); {name} runs on the "
                      f"torch reference backend", RuntimeWarning, stacklevel=3)
    return True


def _threads(work: int) -> int:
    """One thread for small problems (an OpenMP team costs more than it saves there)."""
    return 1 if work < (1 << 15) else torch.get_num_threads()


def binary_fused(x, y, weight, pos_weight, coef, *, per_element, grad_input, grad_target,
                 focal_alpha, focal_gamma):
    if _family_missing("binary_fused"):
        return reference.binary_fused(x, y, weight, pos_weight, coef, per_element=per_element,
                                           grad_input=grad_input, grad_target=grad_target,
                                           focal_alpha=focal_alpha, focal_gamma=focal_gamma)
    r, c = x.shape
    x = x.contiguous()
    y = y.contiguous()
    use_double = torch.float64 in (x.dtype, y.dtype)
    acc = torch.float64 if use_double else torch.float32
    weight = None if weight is None else weight.to(acc)
    pos_weight = None if pos_weight is None else pos_weight.to(acc)
    weighted = weight is not None or pos_weight is not None
    partials = torch.empty(_F.binary_segments(r, c, weighted), dtype=acc)
    loss = _memory.fresh_like(x) if per_element else None
    gx = _memory.fresh_like(x) if grad_input else None
    gy = _memory.fresh_like(y) if grad_target else None
    up = None
    coef_value = 1.0
    if grad_input or grad_target:
        if coef.numel() == 1:
            coef_value = float(coef.reshape(()))
        else:
            up = coef.contiguous()
    if x.numel():
        _F.binary(r, c, x.data_ptr(), DTYPE_CODE[x.dtype], y.data_ptr(), DTYPE_CODE[y.dtype],
                    _ptr(weight), weight.stride(0) if weight is not None else 0,
                    weight.stride(1) if weight is not None else 0, _ptr(pos_weight),
                    pos_weight.stride(0) if pos_weight is not None else 0,
                    pos_weight.stride(1) if pos_weight is not None else 0,
                    _ptr(up), DTYPE_CODE[up.dtype] if up is not None else 0, coef_value,
                    _ptr(loss), _ptr(gx), DTYPE_CODE[x.dtype], _ptr(gy),
                    DTYPE_CODE[y.dtype], partials.data_ptr(), focal=focal_gamma is not None,
                    alpha=float(focal_alpha), gamma=float(focal_gamma or 0.0),
                    use_double=use_double, num_threads=_threads(x.numel()))
    return (loss if per_element else partials), gx, gy


def distill_fused(student, teacher, target, coef, grad_out, grad_teacher, *, kind, temperature,
                  beta, alpha, ignore_index):
    if grad_teacher is not None or _family_missing("distill_fused"):
        return reference.distill_fused(student, teacher, target, coef, grad_out, grad_teacher,
                                            kind=kind, temperature=temperature, beta=beta,
                                            alpha=alpha, ignore_index=ignore_index)
    n, v = student.shape
    s = student if student.stride(1) == 1 or v <= 1 else student.contiguous()
    t = teacher if teacher.stride(1) == 1 or v <= 1 else teacher.contiguous()
    use_double = torch.float64 in (s.dtype, t.dtype)
    loss = torch.empty(n, dtype=torch.float64 if use_double else torch.float32)
    g = grad_out
    if g is not None and (g.dtype != s.dtype or (v > 1 and g.stride(1) != 1)):
        g = torch.empty(s.shape, dtype=s.dtype)
    y = None if target is None else target.to(torch.int64).contiguous()
    cf = None if g is None else coef.to(torch.float64).contiguous()  # read as double by the kernel
    has_target = y is not None
    T = float(temperature)
    if n:
        _F.distill(n, v, s.data_ptr(), DTYPE_CODE[s.dtype], s.stride(0), t.data_ptr(),
                     DTYPE_CODE[t.dtype], t.stride(0), _ptr(y), int(ignore_index), _ptr(cf),
                     0 if cf is None or cf.numel() == 1 else 1, _ptr(g),
                     DTYPE_CODE[g.dtype] if g is not None else 0, g.stride(0) if g is not None else 0,
                     loss.data_ptr(), kind=_F.KINDS[kind], t_is_one=T == 1.0, inv_T=1.0 / T,
                     ws=T * T * (float(alpha) if has_target else 1.0),
                     wh=(1.0 - float(alpha)) if has_target else 0.0, beta=float(beta),
                     use_double=use_double, num_threads=_threads(n * v))
    if g is not grad_out:
        grad_out.copy_(g)
    return loss
