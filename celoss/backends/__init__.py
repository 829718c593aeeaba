"""Backends: one module per engine, each implementing :class:`Backend`.

``reference`` (plain PyTorch, chunked), ``cython`` (OpenMP kernels in ``celoss.cpu``) and
``triton`` (kernels in ``celoss.kernels``). :mod:`celoss._dispatch` picks the module by name and
refuses one that does not implement the protocol. Every function works on torch tensors, with no
autograd and no argument checking (``celoss`` validated everything, targets included, before
calling). Statistics and losses are in the accumulation dtype (:func:`celoss._dtypes.accum_dtype`:
float32, float64 when an input is float64); gradients are written in their input's dtype.

Row statistics -- the one idea everything is built on
------------------------------------------------------
For a row of logits ``x`` (any block of its classes), with the transformed logits
``z = softcap * tanh(logit_scale * x / softcap)`` (just ``logit_scale * x`` without softcap),
the *row statistics* are ``(max, sumexp, target_z, weighted_z)``:
``max = max_j z_j``, ``sumexp = sum_j exp(z_j - max)``, ``target_z = z_y`` if the target class
``y`` falls in this block else 0, ``weighted_z = sum_j w_j z_j`` (w = 1 without class weights).
Blocks, chunks and ranks merge them exactly (``celoss.stats.merge_all``); ``lse = max + log(sumexp)``.

Gradient in coefficient form
----------------------------
Every softmax loss here (cross-entropy with weights, smoothing and z-loss; focal loss) has
``dloss_n/dz_j = A_n p_j - B_n [j == y_n] - w_j (D_n + E_n t_nj)`` with ``p_j = exp(z_j - lse_n)``
(``t`` = probability targets, E = 0 for index targets), and
``dz_j/dx_j = logit_scale * (1 - (z_j / softcap)**2)`` (``logit_scale`` without softcap).
``celoss.stats.coefficients`` gives the loss and ``row_coefs`` = (A, B, D) from the statistics.

Words
-----
``coef``: the upstream scale of a loss (d reduced loss / d row loss, times the caller's upstream
gradient), one value or one per row. ``row_coefs``: the (N, 3) triple (A, B, D) above.
A ``*_fused`` call computes the loss and, when a gradient buffer is given, the gradient in the
same pass over its inputs. (An autograd Function whose forward asked for that gradient records
``ctx.grad_in_forward``: see :mod:`celoss._autograd`.)
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Backend(Protocol):
    """What a backend module provides (each function's contract in its docstring)."""

    LINEAR_CE_KERNELS: bool
    """Whether the module has the linear cross-entropy kernels (:class:`LinearCEKernels`: matrix
    product and row statistics in one kernel), which ``linear_cross_entropy(engine="fused")`` needs."""

    def ce_fused(self, logits: Tensor, target: Optional[Tensor], soft_target: Optional[Tensor],
                 weight: Optional[Tensor], coef: Optional[Tensor], grad_out: Optional[Tensor], *,
                 ignore_index: int, label_smoothing: float, logit_scale: float, softcap: Optional[float],
                 z_loss: float, focal_gamma: Optional[float]) -> tuple[Tensor, Tensor]:
        """Cross-entropy (or focal loss) rows: ``(loss, lse)``, both (N,).

        logits (N, C), stride(1) == 1, fp32/fp16/bf16 (fp64 on cython/reference). ``target`` (N,)
        int64, or None with ``soft_target`` (N, C) class probabilities (same dtype, stride(1) == 1).
        ``weight`` (C,) contiguous float32/float64 or None (focal: the per-class alpha).
        ``softcap`` None or > 0; ``focal_gamma`` None (cross-entropy) or >= 0 (focal loss, index
        targets, no smoothing/z-loss). Ignored rows have loss 0. When ``grad_out`` (N, C) is given
        (it may be ``logits`` itself: in place), writes ``coef_n * dloss_n/dlogits_nj`` into it;
        ``coef`` is a float tensor of shape (1,) (one scale for all rows) or (N,), applied in the
        accumulation dtype. A counted row holding a NaN or +inf transformed logit, or only -inf
        ones, gets a NaN loss and gradient (PyTorch's log_softmax is NaN there). Ignored rows get
        PyTorch's gradient ``0 * softmax``: zeros, or NaN for such a row, whatever ``coef`` is (a
        0/0 mean gives NaN). One read of the logits for the loss and the gradient (the row is
        re-read from cache, not from memory, where possible)."""

    def ce_stats(self, logits: Tensor, target: Tensor, weight: Optional[Tensor], *, class_start: int,
                 ignore_index: int, logit_scale: float, softcap: Optional[float]) -> Tensor:
        """(N, 4) row statistics (see above) of a block of classes ``[class_start, class_start + C)``."""

    def ce_grad(self, logits: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
                row_coefs: Tensor, grad_out: Tensor, *, class_start: int, logit_scale: float,
                softcap: Optional[float]) -> None:
        """Writes ``dz_j/dx_j * (A_n p_j - B_n [j + class_start == y_n] - D_n w_j)`` for a block of
        classes given the full-row ``lse`` (N,) and ``row_coefs`` (N, 3) = (A, B, D) (already
        multiplied by the upstream gradient). ``grad_out`` may alias ``logits``."""

    def binary_fused(self, x: Tensor, y: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
                     coef: Optional[Tensor], *, per_element: bool, grad_input: bool, grad_target: bool,
                     focal_alpha: float, focal_gamma: Optional[float]
                     ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Elementwise binary cross-entropy with logits (``focal_gamma`` None) or the sigmoid focal
        loss (torchvision's; ``focal_alpha`` < 0 disables the alpha term; no weights then): ``(loss,
        grad_x, grad_y)``.

        ``x`` and ``y`` are contiguous ``(R, C)`` (C = the input's last dimension) in any float
        dtypes. ``weight`` / ``pos_weight`` are None or ``(R, C)`` broadcast views (any strides, 0
        included) of a float tensor. ``coef`` is the upstream gradient: a float32 tensor of one
        element, or an ``(R, C)`` tensor (any float dtype); None when no gradient is asked for.
        Returns the loss per element (``(R, C)``, x's dtype) when ``per_element``, else a 1-D
        tensor of partial sums (accumulation dtype of x and y) whose sum is the total; and ``coef *
        dloss/dx`` (x's dtype) / ``coef * dloss/dy`` (y's dtype) when ``grad_input`` /
        ``grad_target``, else None."""

    def distill_fused(self, student: Tensor, teacher: Tensor, target: Optional[Tensor],
                      coef: Optional[Tensor], grad_out: Optional[Tensor], grad_teacher: Optional[Tensor], *,
                      kind: str, temperature: float, beta: float, alpha: float, ignore_index: int) -> Tensor:
        """Per-row distillation loss ``alpha T^2 D + (1 - alpha) CE`` with a target (``T^2 D``
        without; D: see :mod:`celoss.distillation`), 0 for rows whose target is ``ignore_index``;
        accumulation dtype.

        ``student``, ``teacher``: ``(N, V)`` logits with unit class stride, V > 0, dtypes
        fp32/fp16/bf16 in any mix (fp64 too). ``target``: ``(N,)`` int64 or None. ``kind``: "kl",
        "reverse_kl", "ce" or "jsd" (then 0 < beta < 1; the callers map beta 0 / 1 to the KLs).
        ``grad_out`` / ``grad_teacher`` (``(N, V)``, the student's / teacher's dtype, or None):
        written with ``coef_n * dloss_n/dstudent`` / ``dteacher``; ``coef`` float32 of shape (1,)
        or (N,). A row whose student or teacher (at temperature T) holds a NaN, a +inf or only -inf
        gets a NaN loss (0 if ignored) and NaN gradients (PyTorch's log_softmax composition does);
        other ignored rows get loss 0 and zero gradients. Both softmaxes are computed online (no
        N x V probability tensor; the reference backend holds a bounded chunk of rows)."""


@runtime_checkable
class LinearCEKernels(Protocol):
    """What a backend with ``LINEAR_CE_KERNELS = True`` provides besides :class:`Backend` (triton)."""

    def lce_stats(self, x: Tensor, linear_weight: Tensor, b: Optional[Tensor], src: Optional[Tensor],
                  tgt: Tensor, weight: Optional[Tensor], *, logit_scale: float, softcap: Optional[float],
                  need_wz: bool) -> Tensor:
        """(S, M, 4) partial row statistics of ``x[src] @ linear_weight.T + b`` over S vocabulary
        splits (``weight``: the class weights)."""

    def lce_backward(self, x: Tensor, linear_weight: Tensor, b: Optional[Tensor], src: Optional[Tensor],
                     tgt: Tensor, weight: Optional[Tensor], lse: Tensor, row_coefs: Tensor,
                     thresholds: Optional[Tensor], dx: Optional[Tensor], dw: Optional[Tensor],
                     db: Optional[Tensor], *, logit_scale: float, softcap: Optional[float], has_d: bool,
                     unit=None) -> None:
        """Accumulates dX / dW / db (float32, in place) from the ``row_coefs`` (A, B, D)."""


def _members(proto) -> list[str]:
    return sorted({n for n in vars(proto) if not n.startswith("_")} | set(proto.__annotations__))


def conformance_error(module) -> Optional[str]:
    """None if ``module`` implements :class:`Backend` (and :class:`LinearCEKernels` when it says it
    has them), else what it lacks."""
    protos = (Backend, LinearCEKernels) if getattr(module, "LINEAR_CE_KERNELS", False) else (Backend,)
    missing = [name for proto in protos for name in _members(proto) if not hasattr(module, name)]
    return f"{module.__name__} lacks {', '.join(missing)} of celoss.backends.Backend" if missing else None
