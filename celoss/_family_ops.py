"""torch.library custom ops of the loss family (binary CE with logits, sigmoid focal loss,
distillation), dispatching by backend name to ``celoss.backends.<engine>`` like :mod:`celoss._ops`.

Backend contract (every backend module implements both; no autograd, arguments already checked)
----------------------------------------------------------------------------------------------
``binary_fused(x, y, weight, pos_weight, coef, *, per_element, grad_input, grad_target,
focal_alpha, focal_gamma) -> (loss, grad_x, grad_y)``
    Elementwise binary cross-entropy with logits (``focal_gamma`` None) or the sigmoid focal loss
    (torchvision's; ``focal_alpha`` < 0 disables the alpha term; no weights then). ``x`` and ``y``
    are contiguous ``(R, C)`` (C = the input's last dimension) in any float dtypes. ``weight`` /
    ``pos_weight`` are None or ``(R, C)`` broadcast views (any strides, 0 included) of a float
    tensor. ``coef`` is the upstream gradient: a float32 tensor of one element, or an ``(R, C)``
    tensor (any float dtype); None when no gradient is asked for. Returns the loss per element
    (``(R, C)``, x's dtype) when ``per_element``, else a 1-D tensor of partial sums (float32, or
    float64 with a float64 input or target) whose sum is the total; and ``coef * dloss/dx`` (x's
    dtype) / ``coef * dloss/dy`` (y's dtype) when ``grad_input`` / ``grad_target``, else None.

``distill_fused(student, teacher, target, coef, grad_out, grad_teacher, *, kind, temperature,
beta, alpha, ignore_index) -> loss``
    ``student``, ``teacher``: ``(N, V)`` logits with unit class stride, dtypes fp32/fp16/bf16 in
    any mix (fp64 too: then float64 accumulation). ``target``: ``(N,)`` int64 or None. ``kind``:
    "kl", "reverse_kl", "ce" or "jsd" (then 0 < beta < 1; the callers map beta 0 / 1 to the KLs).
    Per-row loss (float32, float64 with a float64 input) ``alpha T^2 D + (1 - alpha) CE`` with a
    target (``T^2 D`` without; D: see :mod:`celoss.distillation`), 0 for rows whose target is
    ``ignore_index``. ``grad_out`` / ``grad_teacher`` (``(N, V)``, the student's / teacher's
    dtype, or None): written with ``coef_n * dloss_n/dstudent`` / ``dteacher``; ``coef`` float32 of
    shape (1,) or (N,). A row whose student or teacher (at temperature T) holds a NaN, a +inf or
    only -inf gets a NaN loss (0 if ignored) and NaN gradients (PyTorch's log_softmax composition
    does); other ignored rows get loss 0 and zero gradients. Both softmaxes are computed online
    (no N x V probability tensor; the reference backend holds a bounded chunk of rows). V = 0 is
    handled here (zero losses) and never reaches a backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks, _dispatch
from ._memory import fresh_like


def _acc(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def scaled(grad: Tensor, scale: Tensor) -> Tensor:
    """grad * scale (one-element scale) without a pass over grad when the scale is 1 (the usual
    ``loss.backward()``); the saved gradient is never modified, so backward can run twice."""
    if not torch.compiler.is_compiling() and float(scale) == 1.0:
        return grad
    return grad * scale.to(grad.dtype)


def saved_or_recomputed(ctx, grad: Tensor, recompute):
    """The input gradients of a loss whose forward either formed them (``ctx.fused``: saved, scaled
    here by ``grad``) or saved its inputs (``recompute(*saved, grad)`` forms them now)."""
    if ctx.fused:
        return tuple(None if g is None else scaled(g, grad) for g in ctx.saved_tensors)
    return recompute(*ctx.saved_tensors, grad)


# ----------------------------------------------------------------------------------------------
# binary cross-entropy with logits / sigmoid focal loss
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("celoss::binary_forward", mutates_args=())
def binary_forward(x: Tensor, y: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
                   coef: Optional[Tensor], backend: str, per_element: bool, grad_input: bool,
                   grad_target: bool, focal_alpha: float,
                   focal_gamma: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, grad_x, grad_y): loss per element (x's dtype) if `per_element`, else the total (a
    0-dim float32/float64 tensor); the gradients (times `coef`) or empty tensors."""
    loss, gx, gy = _dispatch.module(backend).binary_fused(
        x, y, weight, pos_weight, coef, per_element=per_element, grad_input=grad_input,
        grad_target=grad_target, focal_alpha=focal_alpha, focal_gamma=focal_gamma)
    if not per_element:
        loss = loss.to(_acc(x, y)).sum()
    return loss, (gx if gx is not None else _empty(x)), (gy if gy is not None else _empty(y))


@binary_forward.register_fake
def _(x, y, weight, pos_weight, coef, backend, per_element, grad_input, grad_target, focal_alpha,
      focal_gamma):
    loss = torch.empty_like(x) if per_element else x.new_empty((), dtype=_acc(x, y))
    return (loss, torch.empty_like(x) if grad_input else _empty(x),
            torch.empty_like(y) if grad_target else _empty(y))


# ----------------------------------------------------------------------------------------------
# distillation
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("celoss::distill_forward", mutates_args=())
def distill_forward(student: Tensor, teacher: Tensor, target: Optional[Tensor], coef: Optional[Tensor],
                    backend: str, kind: str, temperature: float, beta: float, alpha: float,
                    ignore_index: int, grad_student: bool,
                    grad_teacher: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(per-row loss, coef * dloss/dstudent or empty, coef * dloss/dteacher or empty)."""
    if target is not None:
        _checks.target_indices(target, student.shape[1], ignore_index)
    gs = fresh_like(student) if grad_student else None
    gt = fresh_like(teacher) if grad_teacher else None
    if student.shape[1] == 0:  # no class: every sum is empty, D = 0 (and every target was ignored)
        return student.new_zeros(student.shape[0], dtype=_acc(student, teacher)), \
            (gs if gs is not None else _empty(student)), (gt if gt is not None else _empty(teacher))
    loss = _dispatch.module(backend).distill_fused(
        student, teacher, target, coef, gs, gt, kind=kind, temperature=temperature, beta=beta,
        alpha=alpha, ignore_index=ignore_index)
    return loss, (gs if gs is not None else _empty(student)), (gt if gt is not None else _empty(teacher))


@distill_forward.register_fake
def _(student, teacher, target, coef, backend, kind, temperature, beta, alpha, ignore_index,
      grad_student, grad_teacher):
    n = student.shape[0]
    gs = torch.empty_like(student, memory_format=torch.contiguous_format) if grad_student else _empty(student)
    gt = torch.empty_like(teacher, memory_format=torch.contiguous_format) if grad_teacher else _empty(teacher)
    return student.new_empty(n, dtype=_acc(student, teacher)), gs, gt
