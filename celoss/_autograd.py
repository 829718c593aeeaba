"""The autograd pattern shared by every celoss Function.

A loss either forms its input gradients in the forward kernel call, for an upstream gradient of 1
(``ctx.grad_in_forward``: a scalar reduction, where backward only rescales them with
:func:`upstream_scaled`, or ``celoss::scale_`` in place), or saves its inputs and recomputes the
gradients in backward with the upstream gradient as the kernels' ``coef`` (reduction "none", or
where the forward's inputs are kept anyway). Every backward is :func:`once_differentiable` and
returns through :func:`input_grads`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _checks, _ops


class _SecondOrderError(torch.autograd.Function):
    """Passes first-order gradients through; differentiating them again raises a clear error."""

    @staticmethod
    def forward(ctx, name, anchor, *grads):
        ctx.name = name
        ctx.set_materialize_grads(False)
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"celoss: {ctx.name} is differentiable once only (its kernels form the first-order "
                           f"gradient directly); for higher-order gradients use the plain PyTorch composition, "
                           f"e.g. torch.nn.functional.cross_entropy")


def once_differentiable(name: str):
    """Decorator for an autograd.Function's backward: runs it without building a graph and, when a
    higher-order graph was asked for (``create_graph=True``), makes differentiating its result raise
    an error naming the loss instead of PyTorch's 'element 0 of tensors does not require grad'."""
    def wrap(backward):
        @functools.wraps(backward)
        def run(ctx, *grad_outputs):
            create_graph = torch.is_grad_enabled()
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not create_graph:
                return grads
            single = not isinstance(grads, tuple)
            grads = (grads,) if single else grads
            present = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
            if not present:
                return grads[0] if single else grads
            anchor = torch.zeros((), requires_grad=True)
            wrapped = _SecondOrderError.apply(name, anchor, *(grads[i] for i in present))
            out = list(grads)
            for i, g in zip(present, wrapped):
                out[i] = g
            return out[0] if single else tuple(out)
        return run
    return wrap


def upstream_scaled(formed, grad_output: Tensor, backend: Optional[str] = None) -> tuple:
    """The gradients a forward formed for an upstream gradient of 1 (``ctx.grad_in_forward``), times
    the one-element ``grad_output``; None stays None. Called from backward.

    When this backward is the graph's last use (no ``retain_graph`` / ``create_graph``: autograd
    frees the saved tensors right after it), the saved gradients are scaled in place and returned
    (``celoss::scale_``: no allocation; a launch only for a scale of 1 on the device side, one pass
    otherwise). When the graph is kept, new tensors (one pass each, the scale never read on the
    device side; the saved ones returned as they are for a host-side scale of 1), so backward can
    run again; likewise while tracing (torch.compile, make_fx), where the product is a graph node."""
    tensors = tuple(g for g in formed if g is not None)
    traced = torch.compiler.is_compiling() or not _ops.plain_eager(tensors + (grad_output,))
    if not traced and not torch._C._autograd._get_current_graph_task_keep_graph():
        for g in tensors:
            _ops.scale_(g, grad_output, backend)
        return tuple(formed)
    if not traced and not _checks.device_side(grad_output, backend) and bool(grad_output.reshape(()) == 1):
        return tuple(formed)
    return tuple(g if g is None else g * grad_output.to(g.dtype) for g in formed)


def input_grads(ctx, *grads) -> tuple:
    """backward's return value: ``grads`` for the leading inputs of forward (None where an input
    needs no gradient), None for the remaining ones."""
    needs = ctx.needs_input_grad
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * (len(needs) - len(grads))


def loss_forward(ctx, grad_in_forward: bool, run, coef: Tensor, inputs: tuple):
    """The forward half of the pattern, for a loss whose kernel call ``run(coef)`` returns ``(loss,
    *input_grads)`` (``run(None)``: the loss only). With ``grad_in_forward`` the gradients are formed
    now, for the reduction's ``coef`` (an upstream gradient of 1), and saved (None where an input
    needs none); otherwise the ``inputs`` are saved for :func:`loss_backward` to recompute from."""
    ctx.grad_in_forward = grad_in_forward
    if grad_in_forward:
        loss, *grads = run(coef)
        ctx.save_for_backward(*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)))
    else:
        loss = run(None)[0]
        ctx.save_for_backward(*inputs)
    return loss


def loss_backward(ctx, grad_output, recompute) -> tuple:
    """The backward half: the saved gradients times ``grad_output`` (:func:`upstream_scaled`, on the
    loss's ``ctx.backend``), or ``recompute(*inputs, grad_output)`` -> the input gradients formed
    with ``grad_output`` as the kernels' ``coef``."""
    if grad_output is None:
        return input_grads(ctx)
    if ctx.grad_in_forward:
        return input_grads(ctx, *upstream_scaled(ctx.saved_tensors, grad_output, ctx.backend))
    return input_grads(ctx, *recompute(*ctx.saved_tensors, grad_output))
