"""celoss.cross_entropy: torch.nn.functional.cross_entropy semantics on online-softmax kernels."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _checks, _dispatch, _ops


class CrossEntropyOutput(NamedTuple):
    """Returned when `return_lse` or `return_z_loss` is set; unset fields are None."""
    loss: Tensor
    lse: Optional[Tensor]
    z_loss: Optional[Tensor]


class SoftmaxRows(NamedTuple):
    """Logits as (rows, C) with the matching targets, and how to map rows back to the input."""
    logits: Tensor
    target: Optional[Tensor]       # (rows,) int64 class indices
    soft_target: Optional[Tensor]  # (rows, C) class probabilities
    out_shape: tuple               # shape of the unreduced loss


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
    logits = moved.reshape(-1, c)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if target.dtype.is_floating_point:
        if target.shape != input.shape:
            raise ValueError(f"probability targets must have the input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        if target.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError("celoss: gradients with respect to probability targets are not "
                                      "supported; pass target.detach()")
        soft = target.movedim(class_dim, -1).reshape(-1, c).to(input.dtype).contiguous()
        return SoftmaxRows(logits, None, soft, out_shape)
    if target.dtype != torch.int64:
        raise TypeError(f"class-index targets must be int64 (torch.long), got {target.dtype}")
    if tuple(target.shape) != out_shape:
        raise ValueError(f"expected target of shape {out_shape} for input of shape {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}")
    return SoftmaxRows(logits, target.reshape(-1).contiguous(), None, out_shape)


def counted_weight(target: Tensor, weight: Optional[Tensor], ignore_index: int) -> Tensor:
    """Per-row weight of the target class (0 for ignored rows): the weighted-mean denominator terms."""
    counted = target != ignore_index
    if weight is None:
        return counted.to(torch.float32)
    safe = torch.where(counted, target, torch.zeros_like(target)).clamp(0, weight.numel() - 1)
    return torch.where(counted, weight[safe], torch.zeros((), dtype=weight.dtype, device=weight.device))


def _scaled(grad: Tensor, scale: Tensor) -> Tensor:
    """grad * scale for a one-element scale, without a pass over grad when the scale is 1 (the usual
    ``loss.backward()``). The saved gradient itself is never modified, so backward can run twice."""
    if not torch.compiler.is_compiling() and float(scale) == 1.0:
        return grad
    return grad * scale.to(grad.dtype)


class _SoftmaxLoss(torch.autograd.Function):
    """Row losses reduced in forward. With reduction mean/sum (or `inplace`), the gradient is formed in
    the same kernel call as the loss and only rescaled by grad_output in backward; with reduction
    none it is recomputed in backward with the per-row upstream gradient (one read + one write)."""

    @staticmethod
    def forward(ctx, logits, target, soft_target, weight, denom, reduction, needs_grad, inplace, lse_used,
                backend, options):
        ctx.set_materialize_grads(False)
        # a used lse needs the logits in backward: fuse only if they needn't be kept (or in place)
        fused = needs_grad and (inplace or (reduction != "none" and not lse_used))
        # d(reduced loss)/d(row loss); an all-ignored mean is NaN, but its gradient is 0 (as in PyTorch)
        one = torch.ones((), device=logits.device)
        coef = torch.where(denom > 0, one / denom, 0.0) if reduction == "mean" else one
        coef = coef.reshape(1).to(torch.float32)
        if fused:
            if inplace:
                loss_rows, lse = _ops.ce_forward_inplace(logits, target, soft_target, weight, coef, backend,
                                                         **options)
                grad = logits
            else:
                loss_rows, lse, grad = _ops.ce_forward(logits, target, soft_target, weight, coef, backend,
                                                       **options)
            ctx.save_for_backward(grad, target, soft_target, weight, lse)
        else:
            loss_rows, lse, _ = _ops.ce_forward(logits, target, soft_target, weight, None, backend, **options)
            ctx.save_for_backward(logits, target, soft_target, weight, lse)
        ctx.coef = coef
        ctx.fused, ctx.inplace, ctx.backend, ctx.options = fused, inplace, backend, options
        if reduction == "none":
            loss = loss_rows
        else:
            loss = loss_rows.sum() if reduction == "sum" else loss_rows.sum() / denom
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        saved, target, soft_target, weight, lse = ctx.saved_tensors
        opts = ctx.options
        grad = None
        if grad_loss is not None:
            if ctx.inplace:
                grad = saved
                _ops.scale_(grad, grad_loss.float())
            elif ctx.fused:
                grad = _scaled(saved, grad_loss)
            else:
                grad = _ops.ce_forward(saved, target, soft_target, weight,
                                       (grad_loss.float() * ctx.coef).reshape(-1).contiguous(), ctx.backend,
                                       **opts)[2]
        if grad_lse is not None:
            if ctx.inplace:
                raise RuntimeError("celoss: the gradient of the returned lse can't flow with "
                                   "inplace_backward=True (the logits were overwritten); use "
                                   "inplace_backward=False")
            zeros = torch.zeros_like(grad_lse, dtype=lse.dtype)
            coefs = torch.stack([grad_lse.to(lse.dtype), zeros, zeros], dim=1)
            extra = _ops.ce_grad(saved, target if target is not None else torch.zeros_like(lse, dtype=torch.int64),
                                 weight, lse, coefs, ctx.backend, 0, opts["logit_scale"], opts["softcap"])
            grad = extra if grad is None else grad + extra
        return grad, None, None, None, None, None, None, None, None, None, None


def softmax_loss(input: Tensor, target: Tensor, weight, *, ignore_index: int, reduction: str,
                 label_smoothing: float, logit_scale: float, softcap, z_loss: float, focal_gamma,
                 weighted_mean: bool, return_lse: bool, return_z_loss: bool, inplace_backward: bool,
                 backend, class_dim_last: bool = False):
    """Shared driver of cross_entropy and focal_loss: checks, rows, dispatch, reduction."""
    _checks.reduction(reduction)
    rows = as_rows(input, target, class_dim_last)
    c = rows.logits.shape[1]
    weight = _checks.class_weight(weight, c, input)
    name = _dispatch.resolve(input.device, backend)
    if rows.target is not None:
        per_row = counted_weight(rows.target, weight if weighted_mean else None, ignore_index)
    else:
        per_row = torch.ones(rows.logits.shape[0], device=input.device)
    denom = per_row.sum()
    options = dict(ignore_index=int(ignore_index), label_smoothing=float(label_smoothing),
                   logit_scale=float(logit_scale), softcap=softcap, z_loss=float(z_loss),
                   focal_gamma=focal_gamma)
    needs_grad = torch.is_grad_enabled() and input.requires_grad
    if inplace_backward and needs_grad and rows.logits.data_ptr() != input.data_ptr():
        inplace_backward = False  # rows are a copy of the input: writing into them saves nothing
    loss, lse = _SoftmaxLoss.apply(rows.logits, rows.target, rows.soft_target, weight, denom, reduction,
                                   needs_grad, inplace_backward and needs_grad, return_lse, name, options)
    if reduction == "none":
        loss = loss.reshape(rows.out_shape)
    loss = loss.to(input.dtype)
    if not (return_lse or return_z_loss):
        return loss
    z_term = None
    if return_z_loss:
        lse_d = lse.detach()
        z_rows = z_loss * per_row.to(lse_d.dtype) * lse_d * lse_d
        z_term = {"none": lambda: z_rows.reshape(rows.out_shape), "sum": z_rows.sum,
                  "mean": lambda: z_rows.sum() / denom}[reduction]().to(input.dtype)
    return CrossEntropyOutput(loss, lse.reshape(rows.out_shape) if return_lse else None, z_term)


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, logit_scale: float = 1.0,
                  softcap: Optional[float] = None, z_loss: float = 0.0, return_lse: bool = False,
                  return_z_loss: bool = False, inplace_backward: bool = False, backend: Optional[str] = None):
    """Drop-in for ``torch.nn.functional.cross_entropy`` (class dimension 1), on online-softmax kernels.

    Extras (keyword-only): ``logit_scale`` multiplies the logits first; ``softcap`` then applies
    ``softcap * tanh(x / softcap)``; ``z_loss`` adds ``z_loss * lse**2`` per counted row, weighted by the
    row's target class weight like the main term (so the weighted mean stays a weighted average);
    ``return_lse`` / ``return_z_loss`` return ``CrossEntropyOutput(loss, lse, z_loss)`` with the per-row
    lse (differentiable) and the z-loss part of the loss (reduced like the loss, for logging).
    ``inplace_backward=True`` writes the gradient into the logits' buffer during forward (their
    values are destroyed; autograd's version counter is bumped so an op that saved them raises
    instead of silently using the gradient). ``backend``: "triton", "cython", "torch" or None (auto).
    """
    softcap = _checks.positive_or_none("softcap", softcap)
    label_smoothing = _checks.probability("label_smoothing", label_smoothing)
    if float(z_loss) < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    return softmax_loss(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, logit_scale=logit_scale, softcap=softcap,
                        z_loss=z_loss, focal_gamma=None, weighted_mean=True, return_lse=return_lse,
                        return_z_loss=return_z_loss, inplace_backward=inplace_backward, backend=backend)
