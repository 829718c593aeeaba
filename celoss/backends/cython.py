"""Cython backend: the row-kernel contract (see :mod:`celoss.backends`) on the OpenMP CPU kernels
of ``celoss.cpu._kernels`` (math in ``cpu/fastmath.h``). CPU tensors only.

Importing this module raises ImportError when the compiled extension is missing; the dispatcher
falls back to another backend then.
"""
from __future__ import annotations

import torch

from ..cpu import _kernels as _K

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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
    acc = _acc_dtype(logits)
    x = _rows(logits)
    w = _vec(weight, acc)
    t = None if soft_target is None else _rows(soft_target, x.dtype)
    y = None if soft_target is not None else _vec(target, torch.int64)
    cf = None if grad_out is None else _vec(coef, torch.float32)
    g = _grad_target(logits, x, grad_out)
    loss = torch.empty(n, dtype=acc)
    lse = torch.empty(n, dtype=acc)
    if n:
        _K.fused(_DTYPE_CODE[x.dtype], n, c, x.data_ptr(), x.stride(0), _ptr(g),
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
    acc = _acc_dtype(logits)
    x = _rows(logits)
    y = _vec(target, torch.int64) if target is not None else torch.full((n,), ignore_index)
    w = _vec(weight, acc)
    out = torch.empty(n, 4, dtype=acc)
    if n:
        _K.stats(_DTYPE_CODE[x.dtype], n, c, x.data_ptr(), x.stride(0), y.data_ptr(), _ptr(w),
                 out.data_ptr(), class_start=class_start, ignore_index=ignore_index,
                 logit_scale=float(logit_scale), softcap=softcap,
                 num_threads=torch.get_num_threads())
    return out


def ce_grad(logits, target, weight, lse, row_coefs, grad_out, *, class_start, logit_scale, softcap):
    n, c = logits.shape
    acc = _acc_dtype(logits)
    x = _rows(logits)
    y = _vec(target, torch.int64)
    w = _vec(weight, acc)
    lse_c = _vec(lse, acc)
    abd = _vec(row_coefs, acc)
    g = _grad_target(logits, x, grad_out)
    if n:
        _K.grad(_DTYPE_CODE[x.dtype], n, c, x.data_ptr(), x.stride(0), g.data_ptr(), g.stride(0),
                y.data_ptr(), _ptr(w), lse_c.data_ptr(), abd.data_ptr(), class_start=class_start,
                logit_scale=float(logit_scale), softcap=softcap,
                num_threads=torch.get_num_threads())
    if g is not grad_out:
        grad_out.copy_(g)
