"""celoss.cross_entropy: torch.nn.functional.cross_entropy semantics on online-softmax kernels."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _dispatch, _ops
from ._autograd import input_grads, once_differentiable, upstream_scaled
from ._options import SoftmaxOptions


class CrossEntropyOutput(NamedTuple):
    """Returned by :func:`cross_entropy` and :func:`linear_cross_entropy` when ``return_lse`` or
    ``return_z_loss`` is set; unset fields are None.

    Attributes:
        loss (Tensor): the loss, reduced as asked (what the call returns without those flags).
        lse (Tensor or None): per-row log-sum-exp of the (scaled, capped) logits, of the unreduced
            loss's shape, float32 (float64 for float64 input); differentiable. Set by ``return_lse``.
        z_loss (Tensor or None): the z-loss part included in ``loss`` (``z_loss * lse**2`` per counted
            row, reduced like the loss), for logging; not differentiable. Set by ``return_z_loss``.

    Example::

        >>> logits, target = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
        >>> out = celoss.cross_entropy(logits, target, return_lse=True)
        >>> out.loss.shape, out.lse.shape, out.z_loss
        (torch.Size([]), torch.Size([4]), None)
        >>> loss, lse, z = out  # a named tuple
    """
    loss: Tensor
    lse: Optional[Tensor]
    z_loss: Optional[Tensor]


class SoftmaxRows(NamedTuple):
    """Logits as (rows, C) with the matching targets, and how to map rows back to the input."""
    logits: Tensor
    target: Optional[Tensor]       # (rows,) int64 class indices
    soft_target: Optional[Tensor]  # (rows, C) class probabilities
    out_shape: tuple               # shape of the unreduced loss


INDEX_DTYPES = (torch.int64, torch.uint8)  # what torch.nn.functional.cross_entropy accepts


def as_rows(input: Tensor, target: Tensor, class_dim_last: bool = False) -> SoftmaxRows:
    """Flatten (C), (N, C) or (N, C, d1..dK) input (class dim 1, or last if `class_dim_last`)."""
    _checks.floating("input", input)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (the classes)")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    class_dim = input.dim() - 1 if class_dim_last or input.dim() == 1 else 1
    c = input.shape[class_dim]
    moved = input.movedim(class_dim, -1)
    out_shape = tuple(moved.shape[:-1])
    n = math.prod(out_shape)  # explicit: -1 is ambiguous when C = 0
    logits = moved.reshape(n, c)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if target.dtype.is_floating_point:
        if target.shape != input.shape:
            raise ValueError(f"probability targets must have the input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        # differentiable: .to / reshape carry the gradient back to the caller's target
        soft = target.movedim(class_dim, -1).reshape(n, c).to(input.dtype)
        return SoftmaxRows(logits, None, soft if soft.stride(-1) == 1 else soft.contiguous(), out_shape)
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"class-index targets must be int64 (torch.long) or uint8, got {target.dtype}")
    if tuple(target.shape) != out_shape:
        hint = ""
        if input.dim() == 3 and tuple(target.shape) == tuple(input.shape[:2]) and not class_dim_last:
            hint = (" (classes are dim 1, as in torch.nn.functional.cross_entropy: for (B, T, V) logits "
                    "use input.flatten(0, 1) with target.flatten(), or input.transpose(1, 2))")
        raise ValueError(f"expected target of shape {out_shape} for input of shape {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}{hint}")
    return SoftmaxRows(logits, target.reshape(-1).to(torch.int64).contiguous(), None, out_shape)


def counted_weight(target: Tensor, weight: Optional[Tensor], ignore_index: int) -> Tensor:
    """Per-row weight of the target class (0 for ignored rows): the weighted-mean denominator terms."""
    counted = target != ignore_index
    if weight is None:
        return counted.to(torch.float32)
    safe = torch.where(counted, target, torch.zeros_like(target)).clamp(0, weight.numel() - 1)
    return torch.where(counted, weight[safe], torch.zeros((), dtype=weight.dtype, device=weight.device))


def _reduction_coef(denom: Tensor, reduction: str) -> Tensor:
    """d(reduced loss)/d(row loss), float64 (one value). A zero mean denominator gives NaN, as
    PyTorch's 0/0: counted rows get NaN gradients, ignored rows still exact zeros (the kernels
    write them without the coefficient). A negative denominator is used as it is."""
    one = torch.ones((), dtype=torch.float64, device=denom.device)
    if reduction != "mean":
        return one.reshape(1)
    denom = denom.to(torch.float64)
    return torch.where(denom != 0, one / denom, torch.nan).reshape(1)


def reduce_rows(loss_rows: Tensor, denom: Tensor, reduction: str, label_smoothing: float) -> Tensor:
    """The reduced cross-entropy of per-row losses (``denom``: the mean's denominator)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    loss = loss_rows.sum() / denom
    if label_smoothing > 0:  # PyTorch sums two 0/0 terms: NaN, not the +-inf of one
        loss = torch.where(denom == 0, torch.nan, loss)
    return loss


def _no_inplace_hazard(input: Tensor, logits: Tensor) -> None:
    """Refuse in-place gradients where PyTorch refuses in-place ops: a leaf that requires grad (or a
    view of one) would be overwritten, and rows sharing memory would read each other's gradients."""
    base = input
    while base._base is not None:
        base = base._base
    if base.is_leaf and base.requires_grad:
        raise RuntimeError("celoss: inplace_backward=True would overwrite a leaf tensor that requires grad "
                           "(an nn.Parameter, a tensor created with requires_grad=True, or a view of one) "
                           "with its gradient; pass inplace_backward=False, or logits computed from it")
    n, c = logits.shape
    if n > 1 and logits.stride(0) < c:
        raise RuntimeError(f"celoss: inplace_backward=True needs logits whose rows don't share memory "
                           f"(got row stride {logits.stride(0)} for {c} classes, e.g. from expand or "
                           f"as_strided); pass inplace_backward=False or input.contiguous()")


class _SoftmaxLoss(torch.autograd.Function):
    """Row losses reduced in forward. With reduction mean/sum (or `inplace`), the gradient is formed in
    the same kernel call as the loss (``grad_in_forward``) and only rescaled by grad_output in
    backward; with reduction none it is recomputed in backward with the per-row upstream gradient
    (one read + one write). Gradients of probability targets (and of class weights with probability
    targets) take one more pass over the logits in backward."""

    @staticmethod
    def forward(ctx, logits, target, soft_target, weight, denom, reduction, inplace, lse_used, backend,
                options: SoftmaxOptions):
        ctx.set_materialize_grads(False)
        needs_x = ctx.needs_input_grad[0]
        ctx.needs_t = soft_target is not None and ctx.needs_input_grad[2]
        ctx.needs_w = weight is not None and ctx.needs_input_grad[3]
        keep_logits = lse_used or ctx.needs_t or ctx.needs_w
        # form the gradient in this call unless the upstream gradient is per row and the logits survive
        ctx.grad_in_forward = needs_x and (inplace or (reduction != "none" and not keep_logits))
        coef = _reduction_coef(denom, reduction)
        op_args = options.op_args()
        if ctx.grad_in_forward:
            if inplace:
                loss_rows, lse = _ops.ce_forward_inplace(logits, target, soft_target, weight, coef, backend,
                                                         *op_args)
                grad = logits
            else:
                loss_rows, lse, grad = _ops.ce_forward(logits, target, soft_target, weight, coef, backend,
                                                       *op_args)
            ctx.save_for_backward(grad, target, soft_target, weight, lse)
        else:
            loss_rows, lse, _ = _ops.ce_forward(logits, target, soft_target, weight, None, backend, *op_args)
            ctx.save_for_backward(logits, target, soft_target, weight, lse)
        ctx.coef, ctx.inplace, ctx.backend, ctx.options = coef, inplace, backend, options
        if inplace:  # the logits are overwritten: nothing can flow back through the lse
            ctx.mark_non_differentiable(lse)
        return reduce_rows(loss_rows, denom, reduction, options.label_smoothing), lse

    @staticmethod
    @once_differentiable("celoss.cross_entropy")
    def backward(ctx, grad_loss, grad_lse):
        saved, target, soft_target, weight, lse = ctx.saved_tensors
        opts = ctx.options
        needs_x = ctx.needs_input_grad[0]
        grad = grad_t = grad_w = None
        if grad_loss is not None and ctx.grad_in_forward:
            if ctx.inplace:
                grad = saved
                _ops.scale_(grad, grad_loss, ctx.backend)
            else:
                grad, = upstream_scaled((saved,), grad_loss, ctx.backend)
        elif grad_loss is not None:
            coef = (grad_loss.to(torch.float64) * ctx.coef).reshape(-1).contiguous()
            if needs_x:
                grad = _ops.ce_forward(saved, target, soft_target, weight, coef, ctx.backend, *opts.op_args())[2]
            if ctx.needs_t or ctx.needs_w:
                grad_t, grad_w = _ops.ce_target_grads(saved, soft_target, weight, lse, coef, ctx.needs_t,
                                                      ctx.needs_w, opts.label_smoothing, opts.logit_scale,
                                                      opts.softcap)
        if grad_lse is not None and needs_x and not ctx.inplace:
            zeros = torch.zeros_like(grad_lse, dtype=lse.dtype)
            row_coefs = torch.stack([grad_lse.to(lse.dtype), zeros, zeros], dim=1)
            extra = _ops.ce_grad(saved, target if target is not None else torch.zeros_like(lse, dtype=torch.int64),
                                 weight, lse, row_coefs, ctx.backend, 0, opts.logit_scale, opts.softcap)
            grad = extra if grad is None else grad + extra
        return input_grads(ctx, grad, None, grad_t, grad_w)


def _no_classes(input: Tensor, target: Tensor, rows: SoftmaxRows, weight, *, ignore_index, reduction,
                label_smoothing, z_loss, return_lse, return_z_loss):
    """C = 0: PyTorch's own result (an index target must then be ignored; probability-target means
    divide 0 by 0), and an lse of -inf."""
    loss = F.cross_entropy(input, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if not (return_lse or return_z_loss):
        return loss
    lse = torch.full(rows.out_shape, -torch.inf, dtype=loss.dtype, device=input.device)
    z_term = None
    if return_z_loss:
        per_row = (torch.ones_like(lse) if rows.target is None
                   else (rows.target != ignore_index).to(lse.dtype).reshape(rows.out_shape))
        z_rows = torch.where(per_row != 0, z_loss * lse * lse, 0.0)
        z_term = {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / per_row.sum()}[reduction]
    return CrossEntropyOutput(loss, lse if return_lse else None, z_term)


def softmax_loss(input: Tensor, target: Tensor, weight, *, ignore_index: int, reduction: str,
                 label_smoothing: float, logit_scale: float, softcap, z_loss: float, focal_gamma,
                 weighted_mean: bool, return_lse: bool, return_z_loss: bool, inplace_backward: bool,
                 backend, class_dim_last: bool = False):
    """Shared driver of cross_entropy and focal_loss: checks, rows, dispatch, reduction."""
    _checks.reduction(reduction)
    ignore_index = _checks.index_value("ignore_index", ignore_index)
    rows = as_rows(input, target, class_dim_last)
    n, c = rows.logits.shape
    soft = rows.soft_target is not None
    if soft and ignore_index != -100:
        raise RuntimeError(f"ignore_index is not supported for probability (floating point) targets "
                         f"(got ignore_index={ignore_index}), as in torch.nn.functional.cross_entropy")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled() and not soft:
        raise RuntimeError("celoss: the loss is not differentiable with respect to the class weight with "
                           "class-index targets (as torch.nn.functional.cross_entropy); pass weight.detach()")
    weight = _checks.class_weight(weight, c, input, differentiable=soft)
    if c == 0:
        return _no_classes(input, target, rows, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing, z_loss=z_loss, return_lse=return_lse,
                           return_z_loss=return_z_loss)
    name = _dispatch.resolve(input.device, backend)
    if rows.target is not None:
        per_row = counted_weight(rows.target, weight if weighted_mean else None, ignore_index)
    else:
        per_row = torch.ones(n, device=input.device)
    denom = per_row.sum()
    options = SoftmaxOptions(ignore_index, float(label_smoothing), float(logit_scale), softcap, float(z_loss),
                             focal_gamma)
    grad_on = torch.is_grad_enabled()
    inplace = inplace_backward and grad_on and input.requires_grad
    if inplace:
        if soft and (rows.soft_target.requires_grad or (weight is not None and weight.requires_grad)):
            raise ValueError("celoss: inplace_backward=True can't be combined with gradients of the targets "
                             "or class weight (they need the logits, which it overwrites)")
        _no_inplace_hazard(input, rows.logits)
    loss, lse = _SoftmaxLoss.apply(rows.logits, rows.target, rows.soft_target, weight, denom, reduction,
                                   inplace, return_lse, name, options)
    if reduction == "none":
        loss = loss.reshape(rows.out_shape)
    out_dtype = torch.promote_types(input.dtype, target.dtype) if soft else input.dtype
    loss = loss.to(out_dtype)
    if not (return_lse or return_z_loss):
        return loss
    z_term = None
    if return_z_loss:
        lse_d = lse.detach()
        z_rows = torch.where(per_row != 0, z_loss * per_row.to(lse_d.dtype) * lse_d * lse_d, 0.0)
        z_term = {"none": lambda: z_rows.reshape(rows.out_shape), "sum": z_rows.sum,
                  "mean": lambda: z_rows.sum() / denom}[reduction]().to(out_dtype)
    return CrossEntropyOutput(loss, lse.reshape(rows.out_shape) if return_lse else None, z_term)


def _uint8_like_pytorch(input: Tensor, weight, reduction: str, label_smoothing: float) -> None:
    """PyTorch takes uint8 class indices only for (C) / (N, C) input, and not with class weights,
    label smoothing and a mean together (its gather() needs int64 there): refuse what it refuses."""
    if isinstance(input, Tensor) and input.dim() > 2:
        raise RuntimeError("expected scalar type Long but found Byte: uint8 targets need (C) or (N, C) input, "
                           "as in torch.nn.functional.cross_entropy; pass target.long()")
    if weight is not None and label_smoothing > 0 and reduction == "mean":
        raise RuntimeError("uint8 targets with class weights, label smoothing and reduction='mean' are refused "
                           "as in torch.nn.functional.cross_entropy (gather() needs int64); pass target.long()")


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, logit_scale: float = 1.0,
                  softcap: Optional[float] = None, z_loss: float = 0.0, return_lse: bool = False,
                  return_z_loss: bool = False, inplace_backward: bool = False, backend: Optional[str] = None):
    """Drop-in for ``torch.nn.functional.cross_entropy`` (class dimension 1), on online-softmax kernels.

    The N x C probabilities are never stored: each row's statistics (max, sum of exps, target logit)
    are computed online, and the gradient is formed in the same pass as the loss.

    Edge cases follow PyTorch: every target ignored (or no rows) with ``"mean"`` gives NaN and zero
    gradients; a zero weighted-mean denominator gives NaN gradients on the counted rows (for
    target weights of mixed sign that cancel exactly, PyTorch's gradient mixes NaN and +-inf; celoss's
    is NaN); C = 0 returns what PyTorch returns. The loss is differentiable once (kernels form the
    first-order gradient directly): a second derivative raises.

    Args:
        input (Tensor): logits, float32/float16/bfloat16/float64 (see Shape).
        target (Tensor): class indices (int64 or uint8), or class probabilities with ``input``'s
            shape and a floating dtype (differentiable, like PyTorch's).
        weight (Tensor, optional): ``(C)`` class weights (any sign; a weighted mean divides by their
            sum over counted targets whatever its sign; differentiable only with probability targets,
            as in PyTorch). Default: None
        ignore_index (int, optional): target value that is skipped (index targets only). Default: -100
        reduction (str, optional): ``"mean"`` (weighted), ``"sum"`` or ``"none"``. Default: ``"mean"``
        label_smoothing (float, optional): in [0, 1]. Default: 0.0
        logit_scale (float, keyword-only): multiplies the logits first. Default: 1.0
        softcap (float, optional, keyword-only): then applies ``softcap * tanh(x / softcap)``;
            None: no capping. Default: None
        z_loss (float, keyword-only): adds ``z_loss * lse**2`` per counted row, weighted by the row's
            target class weight like the main term (so the weighted mean stays a weighted average).
            Default: 0.0
        return_lse (bool, keyword-only): also return the per-row lse (differentiable). Default: False
        return_z_loss (bool, keyword-only): also return the z-loss part of the loss (reduced like the
            loss, for logging). Default: False
        inplace_backward (bool, keyword-only): write the gradient into the logits' buffer during
            forward: their values are destroyed, autograd's version counter is bumped (an op that
            saved them raises instead of silently using the gradient), the returned lse is then not
            differentiable, and it is refused (RuntimeError) on a leaf that requires grad or a view
            of one, and on rows sharing memory. Default: False
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None
            (automatic by device). Default: None

    Shape:
        - Input: ``(C)``, ``(N, C)`` or ``(N, C, d_1, ..., d_K)`` with ``K >= 1``.
        - Target: class indices ``()``, ``(N)`` or ``(N, d_1, ..., d_K)``; probability targets have
          the input's shape.
        - Output: ``()``; with ``reduction="none"``, the target's shape (index targets) or
          ``input``'s shape without dim 1 (probability targets). The lse has that unreduced shape.

    Returns:
        Tensor: the loss, in ``input``'s dtype (promoted with the target's for probability targets).
        With ``return_lse`` or ``return_z_loss``: a :class:`CrossEntropyOutput` ``(loss, lse, z_loss)``
        whose unset fields are None; the lse is float32 for float16/bfloat16/float32 input (float64
        for float64) and the z-loss part has the loss's dtype.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> logits = torch.randn(8, 1000, requires_grad=True)
        >>> target = torch.randint(0, 1000, (8,))
        >>> loss = celoss.cross_entropy(logits, target, label_smoothing=0.1)
        >>> torch.allclose(loss, F.cross_entropy(logits, target, label_smoothing=0.1))
        True
        >>> loss.backward()
        >>> logits.grad.shape
        torch.Size([8, 1000])
        >>> out = celoss.cross_entropy(logits, target, z_loss=1e-4, return_lse=True, return_z_loss=True)
        >>> out.lse.shape, out.z_loss.shape
        (torch.Size([8]), torch.Size([]))
    """
    softcap = _checks.positive_or_none("softcap", softcap)
    label_smoothing = _checks.probability("label_smoothing", label_smoothing)
    if isinstance(target, Tensor) and target.dtype == torch.uint8:
        _uint8_like_pytorch(input, weight, reduction, label_smoothing)
    if float(z_loss) < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    return softmax_loss(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, logit_scale=logit_scale, softcap=softcap,
                        z_loss=z_loss, focal_gamma=None, weighted_mean=True, return_lse=return_lse,
                        return_z_loss=return_z_loss, inplace_backward=inplace_backward, backend=backend)
