"""Autograd helpers shared by every celoss Function."""
from __future__ import annotations

import functools

import torch


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
