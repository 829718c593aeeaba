"""celoss.distillation_loss: temperature-scaled knowledge distillation on online-softmax kernels."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _checks, _dispatch, _family_ops
from ._autograd import loss_backward, loss_forward, once_differentiable
from ._dtypes import accum_dtype
from ._options import DistillOptions

KINDS = ("kl", "reverse_kl", "ce", "jsd")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


class _Distill(torch.autograd.Function):
    """Row losses reduced in forward. With a scalar reduction the gradients are formed in the same
    kernel call as the loss (``grad_in_forward``, coefficient 1/denominator) and only rescaled by
    grad_output in backward; with reduction "none" they are computed in backward with the per-row
    upstream gradient (one more read of both logits)."""

    @staticmethod
    def forward(ctx, student, teacher, target, denom, reduction, backend, options: DistillOptions):
        ctx.set_materialize_grads(False)
        need_s, need_t = ctx.needs_input_grad[:2]
        acc = accum_dtype(student.dtype, teacher.dtype)  # float64 inputs: an exact 1 / denominator
        one = torch.ones((), dtype=acc, device=student.device)
        coef = torch.where(denom > 0, one / denom.to(acc), 0.0) if reduction in ("mean", "batchmean") else one

        def run(coef):
            grads = coef is not None
            return _family_ops.distill_forward(student, teacher, target, coef, backend, *options.op_args(),
                                               grads and need_s, grads and need_t)

        loss_rows = loss_forward(ctx, (need_s or need_t) and reduction != "none", run,
                                 coef.reshape(1), (student, teacher, target))
        ctx.backend, ctx.options = backend, options
        if reduction == "none":
            return loss_rows
        total = loss_rows.sum()
        return total if reduction == "sum" else total / denom

    @staticmethod
    @once_differentiable("celoss.distillation_loss")
    def backward(ctx, grad):
        def recompute(student, teacher, target, grad):
            coef = grad.to(accum_dtype(student.dtype, teacher.dtype)).reshape(-1).contiguous()
            return _family_ops.distill_forward(student, teacher, target, coef,
                                               ctx.backend, *ctx.options.op_args(), *ctx.needs_input_grad[:2])[1:]
        return loss_backward(ctx, grad, recompute)


def _rows(x: Tensor, v: int) -> Tensor:
    rows = x.reshape(math.prod(x.shape[:-1]), v)  # not -1: V may be 0
    return rows if rows.stride(1) == 1 or v <= 1 else rows.contiguous()


def distill_options(kind: str, temperature, beta, alpha, ignore_index: int, reduction: str,
                    target: Optional[Tensor], rows_shape: tuple, like: Tensor, like_name: str) -> DistillOptions:
    """The checked options of a distillation loss (``"jsd"`` at beta 0 / 1 is the KL it tends to),
    after checking ``target``: None (then alpha must be 1) or int64 of ``rows_shape`` on ``like``'s
    device."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _checks.reduction(reduction, REDUCTIONS)
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    beta = _checks.probability("beta", beta)
    alpha = _checks.probability("alpha", alpha)
    if target is not None:
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
        if target.dtype != torch.int64:
            raise TypeError(f"target must hold int64 (torch.long) class indices, got {target.dtype}")
        if tuple(target.shape) != rows_shape:
            raise ValueError(f"expected target of shape {rows_shape} for {like_name} of shape "
                             f"{tuple(like.shape)}, got {tuple(target.shape)}")
        if target.device != like.device:
            raise ValueError(f"target is on {target.device} but {like_name} is on {like.device}")
    elif alpha != 1.0:
        raise ValueError("alpha != 1 mixes in the cross-entropy with a target: pass target (or alpha=1)")
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "kl" if beta == 0.0 else "reverse_kl"
    return DistillOptions(kind, temperature, beta, alpha, ignore_index)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
                      temperature: float = 1.0, kind: str = "kl", beta: float = 0.5, alpha: float = 1.0,
                      ignore_index: int = -100, reduction: str = "batchmean",
                      backend: Optional[str] = None) -> Tensor:
    """Knowledge-distillation loss between student and teacher logits of shape ``(..., V)``.

    Both softmaxes are taken at temperature ``T`` over the **last** dimension (the vocabulary of
    LLM logits): ``p_S = softmax(student / T)``, ``p_T = softmax(teacher / T)``. Per row (one
    position of ``...``) the divergence ``D`` is chosen by ``kind`` (see Args).

    Terms with a zero probability count 0 (``0 log 0 = 0``), so ``-inf`` logits (masked classes)
    are allowed. The soft term is ``T**2 * D`` (Hinton et al.: gradients keep their scale as T
    changes). Without ``target`` the row loss is ``T**2 * D`` (``alpha`` must stay 1). With
    ``target``: ``alpha * T**2 * D + (1 - alpha) * CE`` where ``CE =
    -log softmax(student)[target]`` is the ordinary cross-entropy at temperature 1; rows whose
    target is ``ignore_index`` are excluded from both terms (loss 0, zero gradient, not counted).

    Non-finite values propagate as in the PyTorch composition: a counted row whose student
    or teacher logits (divided by T) contain a NaN or a +inf, or are all -inf, has a NaN loss and
    a NaN gradient everywhere in that row (other rows are unaffected, the reduced loss is NaN).
    Individual -inf logits follow the masked-class rule above (where ``F.kl_div`` would give
    0 * -inf = NaN); a student -inf where the teacher has mass gives +inf (kl / ce), as in PyTorch.
    A row whose target is ``ignore_index`` has loss 0 and gradient 0 times its gradient, as in
    PyTorch (and ``celoss.cross_entropy``): zeros, or NaN over the row when it holds such values.

    Gradients: always for the student (formed by the forward kernel call for scalar reductions). The
    teacher is normally detached (``teacher_logits.detach()`` or produced under ``no_grad``); if it
    requires grad its gradient is computed too, on the reference (PyTorch, row-chunked) path of
    every backend -- correct but slower.

    Args:
        student_logits (Tensor): ``(..., V)``, float32/float16/bfloat16/float64.
        teacher_logits (Tensor): the student's shape. Student and teacher may have different dtypes
            (fp32, fp16, bf16; fp64 on the cython and torch backends, fp64 on triton runs the torch
            backend).
        target (Tensor, optional): int64 class indices of shape ``...`` for the hard-label term;
            None: no hard-label term. Default: None
        temperature (float, keyword-only): ``T``, finite and > 0. Default: 1.0
        kind (str, keyword-only): the divergence ``D``:

            * ``"kl"``: forward KL, ``KL(p_T || p_S) = sum_j p_T (log p_T - log p_S)`` (what
              ``F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True)`` computes);
            * ``"reverse_kl"``: ``KL(p_S || p_T)``;
            * ``"ce"``: soft-target cross-entropy ``H(p_T, p_S) = -sum_j p_T log p_S`` (= kl + the
              teacher's entropy: same gradient as "kl");
            * ``"jsd"``: generalized Jensen-Shannon divergence with mixture
              ``M = beta p_T + (1 - beta) p_S``: ``beta KL(p_T || M) + (1 - beta) KL(p_S || M)``
              for ``0 < beta < 1`` (``beta = 0.5``: the usual JSD); ``beta = 0`` is defined as
              ``KL(p_T || p_S)`` (= "kl") and ``beta = 1`` as ``KL(p_S || p_T)`` (= "reverse_kl"),
              as in TRL's ``generalized_jsd_loss`` and Liger's ``LigerJSD`` (the mixture formula
              itself tends to 0 at both ends).

            Default: ``"kl"``
        beta (float, keyword-only): the JSD mixture weight, in [0, 1] (``kind="jsd"`` only).
            Default: 0.5
        alpha (float, keyword-only): weight of the soft term, in [0, 1]; ``1 - alpha`` weighs the
            hard-label cross-entropy (needs ``target`` unless 1). Default: 1.0
        ignore_index (int, keyword-only): target value whose rows are excluded. Default: -100
        reduction (str, keyword-only): ``"batchmean"`` = sum of row losses / number of counted rows
            (all rows without a target; for 2-D inputs without ignored rows this equals
            ``F.kl_div(..., reduction="batchmean")``, for more dims it is a per-position mean, not a
            mean over dim 0); ``"mean"`` = sum / (counted rows * V) (``F.kl_div``'s elementwise
            mean); ``"sum"``; ``"none"`` = per-row losses. With no counted row, batchmean/mean give
            NaN (0/0, as ``celoss.cross_entropy``) and zero gradients. ``V = 0``: every row loss is
            0 (empty sums), so batchmean gives 0 and mean 0/0 = NaN, as the PyTorch composition.
            Default: ``"batchmean"``
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None
            (automatic, like ``celoss.cross_entropy``). Default: None

    Shape:
        - Student_logits, teacher_logits: ``(..., V)`` (at least 1 dimension).
        - Target: ``(...)``.
        - Output: ``()``; with ``reduction="none"``, ``(...)``.

    Returns:
        Tensor: the loss, in the student's dtype.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> student = torch.randn(4, 100, requires_grad=True)
        >>> teacher = torch.randn(4, 100)
        >>> loss = celoss.distillation_loss(student, teacher, temperature=2.0)
        >>> ref = 4.0 * F.kl_div((student / 2).log_softmax(-1), (teacher / 2).log_softmax(-1),
        ...                      reduction="batchmean", log_target=True)
        >>> torch.allclose(loss, ref)
        True
        >>> labels = torch.tensor([3, 7, -100, 1])
        >>> celoss.distillation_loss(student, teacher, labels, kind="jsd", alpha=0.5,
        ...                          reduction="none").shape
        torch.Size([4])
    """
    _checks.floating("student_logits", student_logits)
    _checks.floating("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if student_logits.dim() == 0:
        raise ValueError("logits must have at least 1 dimension (the classes, last)")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_logits is on "
                         f"{student_logits.device}")
    out_shape = tuple(student_logits.shape[:-1])
    options = distill_options(kind, temperature, beta, alpha, int(ignore_index), reduction, target, out_shape,
                              student_logits, "student_logits")
    v = student_logits.shape[-1]
    name = _dispatch.resolve(student_logits.device, backend)
    s = _rows(student_logits, v)
    t = _rows(teacher_logits, v)
    y = None if target is None else target.reshape(-1).contiguous()
    n = s.shape[0]
    if y is None:
        counted = torch.tensor(float(n), device=s.device)
    else:
        counted = (y != options.ignore_index).sum().to(torch.float32)
    denom = counted * v if reduction == "mean" else counted
    loss = _Distill.apply(s, t, y, denom, reduction, name, options)
    if reduction == "none":
        loss = loss.reshape(out_shape)
    return loss.to(student_logits.dtype)
