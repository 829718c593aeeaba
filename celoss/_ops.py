"""torch.library custom ops around the backend row kernels, so torch.compile sees opaque ops
(with fake implementations) instead of graph-breaking on pointers, OpenMP or Triton launches."""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch
from torch import Tensor, _C

from . import _checks, _dispatch
from ._dtypes import accum_dtype
from ._memory import fresh_like
from ._options import SoftmaxOptions
from .backends import reference
from .stats import NUM_STATS

_PLAIN = (Tensor, torch.nn.Parameter)  # Parameter: no __torch_function__ of its own


class _Op:
    """A ``torch.library`` custom op whose eager calls skip the dispatcher.

    Tracing (torch.compile, export, make_fx, FakeTensor), tensor subclasses, modes, functorch
    transforms and autograd through the op see the registered op, as before. A plain eager call runs
    the implementation directly: the same work without the dispatcher's overhead, and without the
    ``torch._dynamo`` import (about 1.5 s) that torch.library's kernel wrapper does on an op's first
    call. The one effect of the dispatcher kept is the version-counter bump of mutated arguments
    (autograd's check that saved tensors were not modified relies on it)."""

    def __init__(self, name: str, fn: Callable, mutates_args: tuple[str, ...]):
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        params = list(inspect.signature(fn).parameters)
        self._mutated = tuple((params.index(a), a) for a in mutates_args)

    def register_fake(self, fn: Callable) -> Callable:
        return self._op.register_fake(fn)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or not plain_eager(args, kwargs):
            return self._op(*args, **kwargs)
        if self._mutated:
            torch.autograd.graph.increment_version(
                [args[i] if i < len(args) else kwargs[name] for i, name in self._mutated])
        return self._fn(*args, **kwargs)


def plain_eager(args, kwargs=None) -> bool:
    """No tracing, mode or functorch transform is active and every tensor argument is a plain
    tensor that autograd doesn't track here (the op has no autograd formula of its own)."""
    if (_C._len_torch_dispatch_stack() or _C._is_torch_function_mode_enabled()
            or _C._get_tracing_state() is not None or _C._are_functorch_transforms_active()):
        return False
    grad = torch.is_grad_enabled()
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, Tensor) and (type(a) not in _PLAIN or grad and a.requires_grad):
            return False
    return True


def custom_op(name: str, *, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], _Op]:
    """``torch.library.custom_op`` as a decorator, eager calls made direct (see :class:`_Op`)."""
    return lambda fn: _Op(name, fn, tuple(mutates_args))


def _ce_fused(logits, target, soft_target, weight, coef, grad_out, backend, options: SoftmaxOptions):
    if target is not None:
        _checks.target_indices(target, logits.shape[1], options.ignore_index)
    return _dispatch.module(backend).ce_fused(logits, target, soft_target, weight, coef, grad_out,
                                              **options.kwargs())


def _rows_fake(logits: Tensor) -> Tensor:
    return logits.new_empty(logits.shape[0], dtype=accum_dtype(logits.dtype))


def or_empty(grad: Optional[Tensor], like: Tensor) -> Tensor:
    """A custom op returns tensors only: an empty one stands for a gradient not asked for."""
    return grad if grad is not None else like.new_empty(0)


def fake_grad(asked: bool, like: Tensor) -> Tensor:
    """The fake implementation's counterpart of a gradient output (``fresh_like`` or :func:`or_empty`)."""
    return torch.empty_like(like, memory_format=torch.contiguous_format) if asked else like.new_empty(0)


@custom_op("celoss::ce_forward", mutates_args=())
def ce_forward(logits: Tensor, target: Optional[Tensor], soft_target: Optional[Tensor],
               weight: Optional[Tensor], coef: Optional[Tensor], backend: str, ignore_index: int,
               label_smoothing: float, logit_scale: float, softcap: Optional[float], z_loss: float,
               focal_gamma: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss, lse and, when `coef` is given, coef * dloss/dlogits (else an empty tensor)."""
    options = SoftmaxOptions(ignore_index, label_smoothing, logit_scale, softcap, z_loss, focal_gamma)
    grad = fresh_like(logits) if coef is not None else None
    loss, lse = _ce_fused(logits, target, soft_target, weight, coef, grad, backend, options)
    return loss, lse, or_empty(grad, logits)


@ce_forward.register_fake
def _(logits, target, soft_target, weight, coef, backend, ignore_index, label_smoothing, logit_scale,
      softcap, z_loss, focal_gamma):
    return _rows_fake(logits), _rows_fake(logits), fake_grad(coef is not None, logits)


@custom_op("celoss::ce_forward_inplace", mutates_args=("logits",))
def ce_forward_inplace(logits: Tensor, target: Optional[Tensor], soft_target: Optional[Tensor],
                       weight: Optional[Tensor], coef: Tensor, backend: str, ignore_index: int,
                       label_smoothing: float, logit_scale: float, softcap: Optional[float],
                       z_loss: float, focal_gamma: Optional[float]) -> tuple[Tensor, Tensor]:
    """Like ce_forward, but overwrites `logits` with coef * dloss/dlogits."""
    return _ce_fused(logits, target, soft_target, weight, coef, logits, backend,
                     SoftmaxOptions(ignore_index, label_smoothing, logit_scale, softcap, z_loss, focal_gamma))


@ce_forward_inplace.register_fake
def _(logits, target, soft_target, weight, coef, backend, ignore_index, label_smoothing, logit_scale,
      softcap, z_loss, focal_gamma):
    return _rows_fake(logits), _rows_fake(logits)


@custom_op("celoss::ce_stats", mutates_args=())
def ce_stats(logits: Tensor, target: Tensor, weight: Optional[Tensor], backend: str, class_start: int,
             ignore_index: int, logit_scale: float, softcap: Optional[float]) -> Tensor:
    """(N, 4) row statistics of a block of classes starting at `class_start`."""
    return _dispatch.module(backend).ce_stats(logits, target, weight, class_start=class_start,
                                              ignore_index=ignore_index, logit_scale=logit_scale,
                                              softcap=softcap)


@ce_stats.register_fake
def _(logits, target, weight, backend, class_start, ignore_index, logit_scale, softcap):
    return logits.new_empty(logits.shape[0], NUM_STATS, dtype=accum_dtype(logits.dtype))


@custom_op("celoss::ce_grad", mutates_args=())
def ce_grad(logits: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor, row_coefs: Tensor,
            backend: str, class_start: int, logit_scale: float, softcap: Optional[float]) -> Tensor:
    """dlogits for a block of classes from the full-row lse and (N, 3) coefficients (A, B, D)."""
    grad = fresh_like(logits)
    _dispatch.module(backend).ce_grad(logits, target, weight, lse, row_coefs, grad, class_start=class_start,
                                      logit_scale=logit_scale, softcap=softcap)
    return grad


@ce_grad.register_fake
def _(logits, target, weight, lse, row_coefs, backend, class_start, logit_scale, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@custom_op("celoss::ce_target_grads", mutates_args=())
def ce_target_grads(logits: Tensor, soft_target: Tensor, weight: Optional[Tensor], lse: Tensor,
                    coef: Tensor, grad_target: bool, grad_weight: bool, label_smoothing: float,
                    logit_scale: float, softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    """Gradients of sum_n coef_n loss_n w.r.t. probability targets and class weights (empty when
    not asked for). One chunked plain-PyTorch pass on every backend (the reference's, not part of
    the backend protocol): these gradients are rare, and -log p = lse - z is all they need."""
    gt, gw = reference.ce_target_grads(
        logits, soft_target, weight, lse, coef, grad_target=grad_target, grad_weight=grad_weight,
        label_smoothing=label_smoothing, logit_scale=logit_scale, softcap=softcap)
    return or_empty(gt, logits), or_empty(gw, logits)


@ce_target_grads.register_fake
def _(logits, soft_target, weight, lse, coef, grad_target, grad_weight, label_smoothing, logit_scale,
      softcap):
    gt = torch.empty_like(soft_target, memory_format=torch.contiguous_format) if grad_target \
        else logits.new_empty(0)
    gw = torch.empty_like(weight) if grad_weight else logits.new_empty(0)
    return gt, gw


@custom_op("celoss::scale_", mutates_args=("grad",))
def scale_(grad: Tensor, scale: Tensor, backend: Optional[str] = None) -> None:
    """grad *= scale.to(grad.dtype), in place; ``scale`` is one value or one per row.

    Cost: on the host side (:func:`celoss._checks.device_side` False: CPU, cython / reference) nothing when the
    scale is exactly 1 (read on the host), else one pass over ``grad``. On the device side, the
    triton kernel (``celoss.kernels.scale``) decides on the device: one launch when the scale is 1,
    else one pass, and the host never waits; layouts it doesn't take (or no Triton) get one
    ``mul_`` pass whatever the scale."""
    per_row = scale.numel() != 1
    if _checks.device_side(grad, backend):
        triton = _dispatch.module("triton")
        if triton is None or not triton.scale_(grad, scale):
            grad.mul_(_row_scale(scale, grad) if per_row else scale.to(grad.dtype))
    elif per_row:
        grad.mul_(_row_scale(scale, grad))
    elif not bool(scale.reshape(()) == 1):
        grad.mul_(scale.to(grad.dtype))


def _row_scale(scale: Tensor, grad: Tensor) -> Tensor:
    return scale.reshape(-1, *([1] * (grad.dim() - 1))).to(grad.dtype)


@scale_.register_fake
def _(grad, scale, backend=None):
    return None
