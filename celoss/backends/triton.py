"""Triton backend: the row-kernel contract of :mod:`celoss.backends` on the kernels in
``celoss.kernels.cross_entropy``.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before the kernels
were imported (Triton's interpreter, for tests). The kernels take fp32/fp16/bf16 logits and
accumulate in float32; float64 logits go to the reference backend (statistics in float64).
"""
from __future__ import annotations

import torch

from celoss.kernels import binary as _kb
from celoss.kernels import cross_entropy as _k
from celoss.kernels import distillation as _kd
from celoss.kernels import linear_cross_entropy as _lce

from . import reference as _reference


def _use_reference(logits) -> bool:
    return logits.dtype not in _k.SUPPORTED_DTYPES


def ce_fused(logits, target, soft_target, weight, coef, grad_out, *, ignore_index, label_smoothing,
             logit_scale, softcap, z_loss, focal_gamma):
    if _use_reference(logits):
        return _reference.ce_fused(logits, target, soft_target, weight, coef, grad_out,
                                   ignore_index=ignore_index, label_smoothing=label_smoothing,
                                   logit_scale=logit_scale, softcap=softcap, z_loss=z_loss,
                                   focal_gamma=focal_gamma)
    return _k.fused(logits, target, soft_target, weight, coef, grad_out, ignore_index=ignore_index,
                    label_smoothing=label_smoothing, logit_scale=logit_scale, softcap=softcap,
                    z_loss=z_loss, focal_gamma=focal_gamma)


def ce_stats(logits, target, weight, *, class_start, ignore_index, logit_scale, softcap):
    if _use_reference(logits):
        return _reference.ce_stats(logits, target, weight, class_start=class_start,
                                   ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap)
    return _k.stats(logits, target, weight, class_start=class_start, ignore_index=ignore_index,
                    logit_scale=logit_scale, softcap=softcap)


def ce_grad(logits, target, weight, lse, row_coefs, grad_out, *, class_start, logit_scale, softcap):
    if _use_reference(logits):
        _reference.ce_grad(logits, target, weight, lse, row_coefs, grad_out, class_start=class_start,
                           logit_scale=logit_scale, softcap=softcap)
        return
    _k.grad(logits, target, weight, lse, row_coefs, grad_out, class_start=class_start,
            logit_scale=logit_scale, softcap=softcap)


# ------------------------------------------------------------------------------------------------
# Fused linear cross-entropy (celoss.linear_cross_entropy): thin adapters over
# celoss.kernels.linear_cross_entropy; a backend exposing these gets the fused engine.
# ------------------------------------------------------------------------------------------------

def lce_stats(x, w, b, src, tgt, weight, *, logit_scale, softcap, need_wz):
    """(S, M, 4) partial row statistics of X[src] W^T + b over S vocabulary splits."""
    return _lce.stats(x, w, b, src, tgt, weight, logit_scale=logit_scale, softcap=softcap, need_wz=need_wz)


def lce_backward(x, w, b, src, tgt, weight, lse, coefs, thresholds, dx, dw, db, *, logit_scale, softcap,
                 has_d, unit=None):
    """Accumulates dX / dW / db (float32, in place) from the row coefficients (A, B, D)."""
    _lce.backward(x, w, b, src, tgt, weight, lse, coefs, thresholds, dx, dw, db, logit_scale=logit_scale,
                  softcap=softcap, has_d=has_d, unit=unit)


# ==============================================================================================
# Loss family: binary CE with logits, sigmoid focal loss, distillation (celoss/_family_ops.py),
# on celoss.kernels.binary / celoss.kernels.distillation. float64 inputs and a teacher gradient
# (rare) run on the reference backend.
# ==============================================================================================

def binary_fused(x, y, weight, pos_weight, coef, *, per_element, grad_input, grad_target,
                 focal_alpha, focal_gamma):
    if x.dtype not in _kb.SUPPORTED_DTYPES or y.dtype not in _kb.SUPPORTED_DTYPES:
        return _reference.binary_fused(x, y, weight, pos_weight, coef, per_element=per_element,
                                           grad_input=grad_input, grad_target=grad_target,
                                           focal_alpha=focal_alpha, focal_gamma=focal_gamma)
    weight = None if weight is None else weight.to(torch.float32)
    pos_weight = None if pos_weight is None else pos_weight.to(torch.float32)
    if coef is not None:
        coef = coef.contiguous()
    loss, partials, gx, gy = _kb.binary(
        x.contiguous(), y.contiguous(), weight, pos_weight, coef, per_element=per_element,
        grad_input=grad_input, grad_target=grad_target, focal_alpha=focal_alpha,
        focal_gamma=focal_gamma)
    return (loss if per_element else partials), gx, gy


def distill_fused(student, teacher, target, coef, grad_out, grad_teacher, *, kind, temperature,
                  beta, alpha, ignore_index):
    if (grad_teacher is not None or student.dtype not in _kd.SUPPORTED_DTYPES
            or teacher.dtype not in _kd.SUPPORTED_DTYPES):
        return _reference.distill_fused(student, teacher, target, coef, grad_out, grad_teacher,
                                            kind=kind, temperature=temperature, beta=beta,
                                            alpha=alpha, ignore_index=ignore_index)
    return _kd.distill(student, teacher, target, coef, grad_out, kind=kind,
                           temperature=temperature, beta=beta, alpha=alpha,
                           ignore_index=ignore_index)
