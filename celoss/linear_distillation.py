"""celoss.linear_distillation_loss: knowledge distillation from hidden states, without either N x V
logits tensor.

``distillation_loss(F.linear(x_s, W_s, b_s), F.linear(x_t, W_t, b_t), target, ...)`` computed on row
chunks (the chunked design of :mod:`celoss.linear_cross_entropy`, whose helpers it shares): per
chunk of rows, both logits chunks by one matrix product each (BLAS / cuBLAS), the backend's fused
distillation row kernel (``distill_fused``: the loss of each row and ``coef * dloss/dlogits`` of the
student, and of the teacher when it requires grad), then ``dX = G W``, ``dW += G^T X``,
``db += sum_rows G`` by matrix products (float32 accumulation of dW / db for fp16/bf16 weights).

The workspace is bounded by ``chunk_bytes``: per row, the student's and the teacher's logits and
gradient rows plus the gathered hidden rows. With a scalar reduction the gradients are formed in
forward (one pass; backward rescales them in place); with reduction "none" forward computes the
losses only and backward recomputes the chunks with the per-row upstream gradient.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _checks, _dispatch, _ops
from ._autograd import once_differentiable
from .distillation import distill_options
from .linear_cross_entropy import (DEFAULT_CHUNK_BYTES, GradSink, _contiguous_rows, _hidden_rows,
                                   _may_be_nonfinite, _Rows, check_layer, check_shift, gather_rows, hand_over,
                                   dw_acc_bytes, plan_chunks, row_bytes, workspace)

_NAME = "celoss.linear_distillation_loss"


class _Plan(NamedTuple):
    """The non-tensor arguments of the custom ops, in their order."""
    backend: str
    kind: str
    temperature: float
    beta: float
    alpha: float
    ignore_index: int
    seq_len: int            # T with shift=True, else 0
    chunk_bytes: int

    def opts(self) -> dict:
        return dict(kind=self.kind, temperature=self.temperature, beta=self.beta, alpha=self.alpha,
                    ignore_index=self.ignore_index)


def _acc(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _plan_rows(labels: Optional[Tensor], n_out: int, plan: _Plan, layers) -> _Rows:
    """The processed rows: every output row, less the ignored ones whose logits (student's or
    teacher's, at temperature 1 or T) are certainly finite. An ignored row that may hold NaN / inf
    is kept: its gradient is then NaN, as in PyTorch's composition."""
    proc = None
    capturing = labels is not None and labels.is_cuda and torch.cuda.is_current_stream_capturing()
    if labels is not None and n_out and not capturing:
        counted = labels != plan.ignore_index
        if not bool(counted.all()):
            for x, w, b in layers:
                counted |= _may_be_nonfinite(x, w, b, 1.0 / plan.temperature, plan.seq_len, n_out)
            proc = counted.nonzero().squeeze(1)
    tgt = labels if proc is None or labels is None else labels[proc]
    src = proc
    if plan.seq_len and n_out:
        device = layers[0][0].device
        src = _hidden_rows(proc if proc is not None else torch.arange(n_out, device=device), plan.seq_len)
    return _Rows(src, tgt, proc, n_out)


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor], out: Tensor) -> Tensor:
    return torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)


def _chunks(layers, rows: _Rows, coef: Optional[Tensor], need, plan: _Plan):
    """Per-processed-row losses and, with ``coef`` (one value or one per processed row, 0 on
    ignored rows), the gradients of ``sum_n coef_n loss_n`` w.r.t. (x_s, W_s, b_s, x_t, W_t, b_t)."""
    (xs, ws, bs), (xt, wt, bt) = layers
    m = rows.n_out if rows.proc is None else rows.proc.shape[0]
    v = ws.shape[0]
    acc = _acc(xs, xt)
    device = xs.device
    grads = coef is not None and any(need)
    grad_s, grad_t = grads and any(need[:3]), grads and any(need[3:])
    chunked = m if v else 0  # rows that chunks will write (without classes, none: zero gradients)
    every_row = rows.src is None and chunked == xs.shape[0]
    step, chunks = plan_chunks(plan.chunk_bytes, row_bytes(xs, v, 1 + grad_s) + row_bytes(xt, v, 1 + grad_t), chunked,
                               dw_acc_bytes(ws, grad_s and need[1]) + dw_acc_bytes(wt, grad_t and need[4]))
    sinks = (GradSink(xs, ws, bs, need[:3], chunked, every_row, chunks) if grad_s else None,
             GradSink(xt, wt, bt, need[3:], chunked, every_row, chunks) if grad_t else None)
    loss = torch.zeros(m, dtype=acc, device=device)
    if chunked:
        # workspace buffers recycled through the CPU cache: no page faults of fresh N x V chunks per step
        ls = workspace((step, v), xs.dtype, device)
        lt = workspace((step, v), xt.dtype, device)
        gs = workspace((step, v), xs.dtype, device) if grad_s else None
        gt = workspace((step, v), xt.dtype, device) if grad_t else None
        # the kernels take float32 coefficients: float64 gradients are scaled here instead, exactly
        scale_after = grads and acc == torch.float64
        unit = torch.ones(1, dtype=torch.float32, device=device)
        row_kernel = _dispatch.module(plan.backend).distill_fused
        for s in range(0, m, step):
            e = min(m, s + step)
            sel = _contiguous_rows(rows.src, s, e)
            xs_c, xt_c = gather_rows(xs, sel), gather_rows(xt, sel)
            zs, zt = _linear(xs_c, ws, bs, ls[: e - s]), _linear(xt_c, wt, bt, lt[: e - s])
            c = None
            if grads:
                c = coef if coef.numel() == 1 else coef[s:e]
            gs_c = None if gs is None else gs[: e - s]
            gt_c = None if gt is None else gt[: e - s]
            loss[s:e] = row_kernel(zs, zt, None if rows.tgt is None else rows.tgt[s:e],
                                   unit if scale_after else (None if c is None else c.to(torch.float32)),
                                   gs_c, gt_c, **plan.opts())
            for g, x_c, sink in ((gs_c, xs_c, sinks[0]), (gt_c, xt_c, sinks[1])):
                if sink is None:
                    continue
                if scale_after:
                    g.mul_(c.to(acc).reshape(-1, 1))
                sink.add(g, sel, x_c, first=s == 0)
    return loss, [g for sink in sinks for g in (sink.grads() if sink is not None else (None,) * 3)]


def _output_rows(values: Tensor, rows: _Rows) -> Tensor:
    if rows.proc is None:
        return values
    return values.new_zeros(rows.n_out).index_copy_(0, rows.proc, values)


def _or_empty(grads, like: Tensor):
    return tuple(like.new_empty(0) if g is None else g for g in grads)


@_ops.custom_op("celoss::linear_distill_forward", mutates_args=())
def _ld_forward(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor, bt: Optional[Tensor],
                labels: Optional[Tensor], coef: Optional[Tensor], need_dxs: bool, need_dws: bool, need_dbs: bool,
                need_dxt: bool, need_dwt: bool, need_dbt: bool, backend: str, kind: str, temperature: float,
                beta: float, alpha: float, ignore_index: int, seq_len: int,
                chunk_bytes: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-output-row loss (0 for ignored rows) and, with ``coef`` (one value), the gradients of
    ``coef * sum(loss)`` (empty where not asked for)."""
    plan = _Plan(backend, kind, temperature, beta, alpha, ignore_index, seq_len, chunk_bytes)
    if labels is not None:
        _checks.target_indices(labels, ws.shape[0], ignore_index)
    n_out = labels.shape[0] if labels is not None else _n_out(xs, seq_len)
    layers = ((xs, ws, bs), (xt, wt, bt))
    rows = _plan_rows(labels, n_out, plan, layers)
    need = (need_dxs, need_dws, need_dbs and bs is not None, need_dxt, need_dwt, need_dbt and bt is not None)
    loss, grads = _chunks(layers, rows, coef, need, plan)
    return (_output_rows(loss, rows), *_or_empty(grads, xs))


@_ld_forward.register_fake
def _(xs, ws, bs, xt, wt, bt, labels, coef, *flags_and_plan):
    need, seq_len = flags_and_plan[:6], flags_and_plan[12]
    n_out = labels.shape[0] if labels is not None else _n_out(xs, seq_len)
    grads = (torch.empty_like(t) if coef is not None and n and t is not None else xs.new_empty(0)
             for t, n in zip((xs, ws, bs, xt, wt, bt), need))
    return (xs.new_empty(n_out, dtype=_acc(xs, xt)), *grads)


@_ops.custom_op("celoss::linear_distill_backward", mutates_args=())
def _ld_backward(xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Tensor, wt: Tensor, bt: Optional[Tensor],
                 labels: Optional[Tensor], scale: Tensor, need_dxs: bool, need_dws: bool, need_dbs: bool,
                 need_dxt: bool, need_dwt: bool, need_dbt: bool, backend: str, kind: str, temperature: float,
                 beta: float, alpha: float, ignore_index: int, seq_len: int,
                 chunk_bytes: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``sum_n scale_n loss_n`` (``scale``: one per output row) by recomputing the chunks."""
    plan = _Plan(backend, kind, temperature, beta, alpha, ignore_index, seq_len, chunk_bytes)
    layers = ((xs, ws, bs), (xt, wt, bt))
    rows = _plan_rows(labels, scale.shape[0], plan, layers)
    if rows.proc is not None:
        scale = scale[rows.proc]
    if rows.tgt is not None:  # an ignored row's gradient is 0 (or NaN) whatever its upstream gradient
        scale = torch.where(rows.tgt != ignore_index, scale, 0.0)
    need = (need_dxs, need_dws, need_dbs and bs is not None, need_dxt, need_dwt, need_dbt and bt is not None)
    _, grads = _chunks(layers, rows, scale.contiguous(), need, plan)
    return _or_empty(grads, xs)


@_ld_backward.register_fake
def _(xs, ws, bs, xt, wt, bt, labels, scale, *flags_and_plan):
    return tuple(torch.empty_like(t) if n and t is not None else xs.new_empty(0)
                 for t, n in zip((xs, ws, bs, xt, wt, bt), flags_and_plan[:6]))


def _n_out(x2d: Tensor, seq_len: int) -> int:
    """Output rows of flattened hidden states: all of them, less one per sequence with shift."""
    return x2d.shape[0] // seq_len * (seq_len - 1) if seq_len else x2d.shape[0]


class _LinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, labels, denom, reduction, plan, grad_enabled):
        ctx.set_materialize_grads(False)
        need = tuple(bool(grad_enabled and n) for n in ctx.needs_input_grad[:6])
        ctx.fused = any(need) and reduction != "none"
        if ctx.fused:
            one = torch.ones((), dtype=_acc(xs, xt), device=denom.device)  # float64: applied exactly
            coef = torch.where(denom > 0, one / denom, 0.0) if reduction in ("mean", "batchmean") else one
            loss_rows, *grads = _ld_forward(xs, ws, bs, xt, wt, bt, labels, coef.reshape(1), *need, *plan)
            # saved, not kept on ctx: autograd releases them after backward (see linear_cross_entropy)
            ctx.save_for_backward(*(g if n else None for g, n in zip(grads, need)))
        else:
            loss_rows, *_ = _ld_forward(xs, ws, bs, xt, wt, bt, labels, None, *(False,) * 6, *plan)
            if any(need):
                ctx.save_for_backward(xs, ws, bs, xt, wt, bt, labels)
        ctx.need, ctx.plan, ctx.consumed = need, plan, False
        if reduction == "none":
            return loss_rows
        total = loss_rows.sum()
        return total if reduction == "sum" else total / denom

    @staticmethod
    @once_differentiable(_NAME)
    def backward(ctx, grad):
        nothing = (None,) * 5
        if ctx.fused:
            return hand_over(ctx, grad, _NAME, "use reduction='none' (it recomputes in backward)") + nothing
        if grad is None:
            return (None,) * 6 + nothing
        xs, ws, bs, xt, wt, bt, labels = ctx.saved_tensors
        scale = grad.reshape(-1).to(_acc(xs, xt))
        grads = _ld_backward(xs, ws, bs, xt, wt, bt, labels, scale, *ctx.need, *ctx.plan)
        return tuple(g if n else None for g, n in zip(grads, ctx.need)) + nothing


def linear_distillation_loss(student_input: Tensor, student_weight: Tensor, teacher_input: Tensor,
                             teacher_weight: Tensor, target: Optional[Tensor] = None, *,
                             student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                             temperature: float = 1.0, kind: str = "kl", beta: float = 0.5, alpha: float = 1.0,
                             ignore_index: int = -100, reduction: str = "batchmean", shift: bool = False,
                             chunk_bytes: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
    """``distillation_loss(F.linear(student_input, student_weight, student_bias), F.linear(teacher_input,
    teacher_weight, teacher_bias), target, ...)`` without either N x V logits tensor.

    Semantics (kinds "kl", "reverse_kl", "ce", "jsd" with ``beta``, ``temperature``, the hard-label
    term weighted ``1 - alpha``, ``ignore_index``, reductions "batchmean" / "mean" / "sum" / "none",
    NaN / inf propagation, V = 0) are those of :func:`celoss.distillation_loss`.

    Rows whose target is ``ignore_index`` cost no matrix product (unless their logits may be
    non-finite: PyTorch's gradient is NaN there, and so is this one).

    Gradients: for the student's input, weight and bias; for the teacher's only if they require
    grad (its gradient rows then come from the reference row kernel on every backend). With a
    scalar reduction they are formed in forward and handed over (rescaled in place) by backward, so
    a second backward through the same graph raises; reduction "none" recomputes in backward.
    Differentiable once (double backward raises).

    Args:
        student_input (Tensor): the student's hidden states ``(..., D_s)``.
        student_weight (Tensor): the student's classifier ``(V, D_s)``.
        teacher_input (Tensor): the teacher's hidden states ``(..., D_t)``: the same leading
            dimensions (the hidden sizes may differ).
        teacher_weight (Tensor): the teacher's classifier ``(V, D_t)`` (the same vocabulary).
        target (Tensor, optional): int64 class indices ``(...)`` for the hard-label term, or None.
            Default: None
        student_bias (Tensor, optional, keyword-only): ``(V)``. Default: None
        teacher_bias (Tensor, optional, keyword-only): ``(V)``. Default: None
        temperature (float, keyword-only): as in :func:`celoss.distillation_loss`. Default: 1.0
        kind (str, keyword-only): ``"kl"``, ``"reverse_kl"``, ``"ce"`` or ``"jsd"``, as in
            :func:`celoss.distillation_loss`. Default: ``"kl"``
        beta (float, keyword-only): the JSD mixture weight, in [0, 1]. Default: 0.5
        alpha (float, keyword-only): weight of the soft term; ``1 - alpha`` weighs the hard-label
            cross-entropy. Default: 1.0
        ignore_index (int, keyword-only): target value whose rows are excluded. Default: -100
        reduction (str, keyword-only): ``"batchmean"``, ``"mean"``, ``"sum"`` or ``"none"``, as in
            :func:`celoss.distillation_loss`. Default: ``"batchmean"``
        shift (bool, keyword-only): next-token prediction on ``(..., T, D)`` inputs: both hidden
            states drop their last position and the labels are ``target[..., 1:]``; the hidden
            states are addressed by index arithmetic, never copied. Default: False
        chunk_bytes (int, optional, keyword-only): bound of the workspace (None: 256 MB): per row of
            a chunk, the student's and teacher's logits (and the logit gradients asked for) plus the
            gathered hidden rows; fp16/bf16 weights add their float32 dW accumulators (and at most
            16 MB for the accumulation itself). Default: None
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None (auto:
            CUDA -> triton, CPU -> cython): the distillation row kernel; the matrix products are
            torch's (BLAS / cuBLAS). Default: None

    Shape:
        - Student_input: ``(..., D_s)``; teacher_input: ``(..., D_t)``; with ``shift``, ``(..., T, D)``
          (at least 3 dimensions).
        - Student_weight: ``(V, D_s)``; teacher_weight: ``(V, D_t)``; biases: ``(V)``. Each model's
          input, weight and bias share a dtype (fp32, fp16, bf16, fp64); the student's and the
          teacher's may differ.
        - Target: ``(...)``.
        - Output: ``()``; with ``reduction="none"``, ``(...)`` (with ``shift``, ``(..., T - 1)``).

    Returns:
        Tensor: the loss, in the student's dtype.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> x_s = torch.randn(2, 8, 16, requires_grad=True)    # student (B, T, D_s)
        >>> w_s = torch.randn(100, 16, requires_grad=True)
        >>> x_t, w_t = torch.randn(2, 8, 32), torch.randn(100, 32)   # teacher, D_t = 32
        >>> labels = torch.randint(0, 100, (2, 8))
        >>> loss = celoss.linear_distillation_loss(x_s, w_s, x_t, w_t, labels, alpha=0.5, temperature=2.0)
        >>> ref = celoss.distillation_loss(x_s @ w_s.T, x_t @ w_t.T, labels, alpha=0.5, temperature=2.0)
        >>> torch.allclose(loss, ref, rtol=1e-4)
        True
        >>> loss.backward()
        >>> x_s.grad.shape, w_s.grad.shape
        (torch.Size([2, 8, 16]), torch.Size([100, 16]))
    """
    check_layer(student_input, student_weight, student_bias, ("student_input", "student_weight", "student_bias"))
    check_layer(teacher_input, teacher_weight, teacher_bias, ("teacher_input", "teacher_weight", "teacher_bias"))
    if tuple(teacher_input.shape[:-1]) != tuple(student_input.shape[:-1]):
        raise ValueError(f"student_input {tuple(student_input.shape)} and teacher_input "
                         f"{tuple(teacher_input.shape)} must have the same leading dimensions (one row each)")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"student_weight has {student_weight.shape[0]} classes but teacher_weight has "
                         f"{teacher_weight.shape[0]}: the two models must share the vocabulary")
    if teacher_input.device != student_input.device:
        raise ValueError(f"teacher_input is on {teacher_input.device} but student_input is on "
                         f"{student_input.device}")
    check_shift(student_input, shift, "student_input")
    ignore_index = _checks.index_value("ignore_index", ignore_index)
    lead = tuple(student_input.shape[:-1])
    o = distill_options(kind, temperature, beta, alpha, ignore_index, reduction, target, lead, student_input,
                        "student_input")
    kind, temperature, beta, alpha = o.kind, o.temperature, o.beta, o.alpha
    chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    name = _dispatch.resolve(student_input.device, backend)

    def flat(x):
        return x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0)

    xs, xt = flat(student_input), flat(teacher_input)
    seq_len = student_input.shape[-2] if shift else 0
    out_shape = lead[:-1] + (max(seq_len - 1, 0),) if shift else lead
    labels = None if target is None else (target[..., 1:] if shift else target).reshape(-1).contiguous()
    v = student_weight.shape[0]
    if labels is None:
        counted = torch.tensor(float(math.prod(out_shape)), device=xs.device)
    else:
        counted = (labels != ignore_index).sum().to(torch.float32)
    denom = counted * v if reduction == "mean" else counted
    plan = _Plan(name, kind, temperature, beta, alpha, ignore_index, seq_len, chunk_bytes)
    loss = _LinearDistillation.apply(xs, student_weight, student_bias, xt, teacher_weight, teacher_bias, labels,
                                     denom, reduction, plan, torch.is_grad_enabled())
    if reduction == "none":
        loss = loss.reshape(out_shape)
    return loss.to(student_input.dtype)
