"""Triton backend: :class:`celoss.backends.Backend` and the fused linear cross-entropy kernels
(:class:`celoss.backends.LinearCEKernels`) on the kernels of ``celoss.kernels``.

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
from celoss.kernels import scale as _ks

from . import reference as _reference


LINEAR_CE_KERNELS = True


def _use_reference(*tensors) -> bool:
    """float64 (which the kernels don't take) runs on the reference backend."""
    return any(t.dtype not in _k.SUPPORTED_DTYPES for t in tensors)


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


def scale_(grad, scale) -> bool:
    """grad *= scale in place on the device (``celoss.kernels.scale``: no host read of the scale, a
    launch only when it is 1); False, with nothing done, for a dtype or layout the kernel doesn't
    take (celoss._ops.scale_ then multiplies)."""
    if not _ks.supports(grad, scale):
        return False
    _ks.scale_(grad, scale)
    return True


# ------------------------------------------------------------------------------------------------
# Linear cross-entropy kernels (celoss.backends.LinearCEKernels): thin adapters over
# celoss.kernels.linear_cross_entropy.
# ------------------------------------------------------------------------------------------------

def lce_stats(x, linear_weight, b, src, tgt, weight, *, logit_scale, softcap, need_wz):
    return _lce.stats(x, linear_weight, b, src, tgt, weight, logit_scale=logit_scale, softcap=softcap,
                      need_wz=need_wz)


def lce_backward(x, linear_weight, b, src, tgt, weight, lse, row_coefs, thresholds, dx, dw, db, *,
                 logit_scale, softcap, has_d, unit=None):
    _lce.backward(x, linear_weight, b, src, tgt, weight, lse, row_coefs, thresholds, dx, dw, db,
                  logit_scale=logit_scale, softcap=softcap, has_d=has_d, unit=unit)


# ==============================================================================================
# Loss family: binary CE with logits, sigmoid focal loss, distillation (celoss/_family_ops.py),
# on celoss.kernels.binary / celoss.kernels.distillation. float64 inputs and a teacher gradient
# (rare) run on the reference backend.
# ==============================================================================================

def binary_fused(x, y, weight, pos_weight, coef, *, per_element, grad_input, grad_target,
                 focal_alpha, focal_gamma):
    if _use_reference(x, y):
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
    if grad_teacher is not None or _use_reference(student, teacher):
        return _reference.distill_fused(student, teacher, target, coef, grad_out, grad_teacher,
                                        kind=kind, temperature=temperature, beta=beta, alpha=alpha,
                                        ignore_index=ignore_index)
    return _kd.distill(student, teacher, target, coef, grad_out, kind=kind, temperature=temperature,
                       beta=beta, alpha=alpha, ignore_index=ignore_index)
