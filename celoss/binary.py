"""celoss.binary_cross_entropy_with_logits and the shared elementwise driver of the binary losses
(also used by :func:`celoss.sigmoid_focal_loss`)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks, _dispatch, _family_ops
from ._autograd import loss_backward, loss_forward, once_differentiable
from ._dtypes import accum_dtype
from ._options import BinaryOptions


class _Binary(torch.autograd.Function):
    """Elementwise loss, reduced in forward. With reduction mean/sum the gradients come out of the
    forward kernel (``grad_in_forward``, coefficient 1/numel or 1) and are only rescaled in
    backward; with reduction "none" they are computed in backward from the per-element upstream
    gradient."""

    @staticmethod
    def forward(ctx, x, y, weight, pos_weight, reduction, backend, options: BinaryOptions):
        ctx.set_materialize_grads(False)
        need_x, need_y = ctx.needs_input_grad[:2]
        numel = x.numel()
        coef = torch.full((1,), 1.0 / numel if (reduction == "mean" and numel) else 1.0,
                          dtype=accum_dtype(x.dtype, y.dtype), device=x.device)  # float64: an exact scale

        def run(coef):
            grads = coef is not None
            return _family_ops.binary_forward(x, y, weight, pos_weight, coef, backend, reduction == "none",
                                              grads and need_x, grads and need_y, *options.op_args())

        loss = loss_forward(ctx, (need_x or need_y) and reduction != "none", run, coef, (x, y, weight, pos_weight))
        ctx.backend, ctx.options = backend, options
        if reduction == "mean":
            loss = loss / numel if numel else loss * float("nan")
        return loss

    @staticmethod
    @once_differentiable("celoss.binary_cross_entropy_with_logits / sigmoid_focal_loss")
    def backward(ctx, grad):
        def recompute(x, y, weight, pos_weight, grad):
            return _family_ops.binary_forward(x, y, weight, pos_weight, grad.contiguous(), ctx.backend, False,
                                              *ctx.needs_input_grad[:2], *ctx.options.op_args())[1:]
        return loss_backward(ctx, grad, recompute)


def _broadcast_view(name: str, w: Optional[Tensor], shape: torch.Size, r: int, c: int, like: Tensor):
    """``w`` broadcast to ``shape`` as an (r, c) view (strides may be 0; a copy only when needed)."""
    if w is None:
        return None
    _checks.floating(name, w)
    if w.device != like.device:
        raise ValueError(f"{name} is on {w.device} but input is on {like.device}")
    if w.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"celoss.binary_cross_entropy_with_logits is not differentiable with "
                           f"respect to {name} (like PyTorch's): pass {name}.detach()")
    try:
        full = torch.broadcast_shapes(w.shape, shape)
    except RuntimeError:
        full = None
    if full != shape:
        raise ValueError(f"{name} of shape {tuple(w.shape)} can't be broadcast to the input's shape "
                         f"{tuple(shape)}")
    return w.detach().to(accum_dtype(like.dtype)).expand(shape).reshape(r, c)


def binary_loss(input: Tensor, target: Tensor, weight, pos_weight, reduction: str, backend,
                focal_alpha: float = 0.0, focal_gamma: Optional[float] = None, name: str = "input",
                target_name: str = "target") -> Tensor:
    """Shared driver: checks, (R, C) layout, dispatch, reduction. Returns promote(input, target) dtype."""
    _checks.floating(name, input)
    _checks.floating(target_name, target)
    _checks.reduction(reduction)
    if target.shape != input.shape:
        raise ValueError(f"Target size ({tuple(target.shape)}) must be the same as input size "
                         f"({tuple(input.shape)})")
    if target.device != input.device:
        raise ValueError(f"{target_name} is on {target.device} but {name} is on {input.device}")
    shape = input.shape
    c = shape[-1] if input.dim() else 1
    r = input.numel() // c if c else 0
    # mixed dtypes compute in the promoted one, as PyTorch does (a float64 target is not narrowed to a
    # float32 input, a 1e30 target not to float16); autograd carries the gradients back through .to
    out_dtype = torch.promote_types(input.dtype, target.dtype)
    x = input.reshape(r, c).to(out_dtype).contiguous()
    y = target.reshape(r, c).to(out_dtype).contiguous()
    w = _broadcast_view("weight", weight, shape, r, c, input)
    pw = _broadcast_view("pos_weight", pos_weight, shape, r, c, input)
    backend_name = _dispatch.resolve(input.device, backend)
    loss = _Binary.apply(x, y, w, pw, reduction, backend_name, BinaryOptions(float(focal_alpha), focal_gamma))
    if reduction == "none":
        loss = loss.reshape(shape)
    return loss.to(out_dtype)


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                                     reduction: str = "mean", pos_weight: Optional[Tensor] = None, *,
                                     backend: Optional[str] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.binary_cross_entropy_with_logits``.

    ``loss = -weight * [pos_weight * y * log sigmoid(x) + (1 - y) * log(1 - sigmoid(x))]`` per
    element, computed as ``weight * ((1 - y) x + (1 + (pos_weight - 1) y) softplus(-x))`` in float32
    (float64 for float64 input), exact for |x| up to the float32 range (no exp overflow).
    Gradients flow to the input and to a target that requires grad. NaN and +-inf inputs give NaN /
    inf in the loss and both gradients where PyTorch's do.

    Args:
        input (Tensor): logits of any shape, float32/float16/bfloat16/float64.
        target (Tensor): the input's shape, any float dtype, may be soft (probabilities);
            differentiable.
        weight (Tensor, optional): rescaling weight broadcast to the input's shape; may not require
            grad (as in PyTorch). Default: None
        reduction (str, optional): ``"mean"`` (over all elements, not weight-normalised), ``"sum"``
            or ``"none"``. Default: ``"mean"``
        pos_weight (Tensor, optional): weight of the positive term, broadcast to the input's shape
            (of shape ``(C,)`` it weighs the classes of the last dimension); may not require grad.
            Default: None
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None
            (automatic). Default: None

    Shape:
        - Input: ``(*)``, any number of dimensions.
        - Target: ``(*)``, the input's shape.
        - Weight, pos_weight: broadcastable to ``(*)``.
        - Output: ``()``; with ``reduction="none"``, ``(*)``.

    Returns:
        Tensor: the loss, in ``torch.promote_types(input.dtype, target.dtype)``.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> logits = torch.randn(4, 5, requires_grad=True)
        >>> target = torch.rand(4, 5)
        >>> pos_weight = torch.full((5,), 2.0)
        >>> loss = celoss.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
        >>> torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight))
        True
        >>> loss.backward()
        >>> logits.grad.shape
        torch.Size([4, 5])
    """
    return binary_loss(input, target, weight, pos_weight, reduction, backend)
