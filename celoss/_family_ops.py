"""torch.library custom ops of the loss family (binary CE with logits, sigmoid focal loss,
distillation), dispatching by backend name to ``celoss.backends.<engine>`` like :mod:`celoss._ops`
(contracts: ``binary_fused`` / ``distill_fused`` of :class:`celoss.backends.Backend`)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks, _dispatch
from ._dtypes import accum_dtype
from ._memory import fresh_like
from ._ops import custom_op, fake_grad, or_empty
from ._options import BinaryOptions, DistillOptions


# ----------------------------------------------------------------------------------------------
# binary cross-entropy with logits / sigmoid focal loss
# ----------------------------------------------------------------------------------------------

@custom_op("celoss::binary_forward", mutates_args=())
def binary_forward(x: Tensor, y: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
                   coef: Optional[Tensor], backend: str, per_element: bool, grad_input: bool,
                   grad_target: bool, focal_alpha: float,
                   focal_gamma: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, grad_x, grad_y): loss per element (x's dtype) if `per_element`, else the total (a
    0-dim float32/float64 tensor); the gradients (times `coef`) or empty tensors."""
    options = BinaryOptions(focal_alpha, focal_gamma)
    loss, gx, gy = _dispatch.module(backend).binary_fused(
        x, y, weight, pos_weight, coef, per_element=per_element, grad_input=grad_input,
        grad_target=grad_target, **options.kwargs())
    if not per_element:
        loss = loss.to(accum_dtype(x.dtype, y.dtype)).sum()
    return loss, or_empty(gx, x), or_empty(gy, y)


@binary_forward.register_fake
def _(x, y, weight, pos_weight, coef, backend, per_element, grad_input, grad_target, focal_alpha,
      focal_gamma):
    loss = torch.empty_like(x) if per_element else x.new_empty((), dtype=accum_dtype(x.dtype, y.dtype))
    return loss, fake_grad(grad_input, x), fake_grad(grad_target, y)


# ----------------------------------------------------------------------------------------------
# distillation
# ----------------------------------------------------------------------------------------------

@custom_op("celoss::distill_forward", mutates_args=())
def distill_forward(student: Tensor, teacher: Tensor, target: Optional[Tensor], coef: Optional[Tensor],
                    backend: str, kind: str, temperature: float, beta: float, alpha: float,
                    ignore_index: int, grad_student: bool,
                    grad_teacher: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(per-row loss, coef * dloss/dstudent or empty, coef * dloss/dteacher or empty)."""
    options = DistillOptions(kind, temperature, beta, alpha, ignore_index)
    if target is not None:
        _checks.target_indices(target, student.shape[1], ignore_index)
    gs = fresh_like(student) if grad_student else None
    gt = fresh_like(teacher) if grad_teacher else None
    if student.shape[1] == 0:  # no class: every sum is empty, D = 0 (and every target was ignored)
        loss = student.new_zeros(student.shape[0], dtype=accum_dtype(student.dtype, teacher.dtype))
    else:
        loss = _dispatch.module(backend).distill_fused(student, teacher, target, coef, gs, gt,
                                                       **options.kwargs())
    return loss, or_empty(gs, student), or_empty(gt, teacher)


@distill_forward.register_fake
def _(student, teacher, target, coef, backend, kind, temperature, beta, alpha, ignore_index,
      grad_student, grad_teacher):
    loss = student.new_empty(student.shape[0], dtype=accum_dtype(student.dtype, teacher.dtype))
    return loss, fake_grad(grad_student, student), fake_grad(grad_teacher, teacher)
