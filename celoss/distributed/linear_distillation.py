"""Vocabulary-parallel knowledge distillation from hidden states:
:func:`vocab_parallel_linear_distillation_loss` (both classifiers sharded by rows alike), its
``(N, 8)`` per-row statistics by kind, the merge into row losses (with ``kind="jsd"``'s second pass
and all-reduce) and the gradients."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _checks
from .._autograd import input_grads, once_differentiable
from .._dtypes import accum_dtype
from ..distillation import distill_options
from ..linear_cross_entropy import check_layer, check_shift
from ._common import (_aux_plan, _block, _check_chunk_size, _chunks, _gather_rows, _group_info, _Layer,
                      _LayerGrads, _linear_rows, _merge, _Plan, _pmul, _prepare, _unwrap_dtensors,
                      _vocab_layout)


# ---- distillation ----
# local statistics per row (s = student / T, t = teacher / T, y the hard target):
#   0, 1: m, sum e^(s - m)             2, 3: m, sum e^(t - m)
#   4: the kind's sum: kl sum e^(t - m_t) (t - s); ce sum e^(t - m_t) s; reverse_kl
#      sum e^(s - m_s) (s - t); jsd none (its mixture term is not a row statistic: a second pass
#      sums it elementwise, with the merged lse's, and all-reduces the sums)
#   5, 6, 7: the hard-label cross-entropy's softmax of the student at temperature 1: m, sum, z_y

_STUDENT_SUM_KINDS, _TEACHER_SUM_KINDS = ("reverse_kl",), ("kl", "ce")


def _distill_stats(zs: Tensor, zt: Tensor, p: _Plan, rows: slice) -> Tensor:
    s, t = zs * p.inv_t, zt * p.inv_t
    ms, _, es = _block(s)
    mt, _, et = _block(t)
    kind_sum = {"kl": lambda: _pmul(et, t - s), "ce": lambda: _pmul(et, s),
                "reverse_kl": lambda: _pmul(es, s - t)}.get(p.kind, lambda: torch.zeros_like(s))().sum(1)
    cols = [ms, es.sum(1), mt, et.sum(1), kind_sum]
    if p.hard:
        m1, e1 = (ms, es) if p.inv_t == 1.0 else _block(zs)[::2]
        zy = zs.gather(1, p.local_tok[rows].unsqueeze(1)).squeeze(1)
        cols += [m1, e1.sum(1), torch.where(p.here[rows], zy, 0.0)]
    else:
        cols += [torch.full_like(ms, -math.inf), torch.zeros_like(ms), torch.zeros_like(ms)]
    return torch.stack(cols, 1)


def _jsd_logs(zs: Tensor, zt: Tensor, p: _Plan, rows: slice, saved: Tensor):
    """(log p_S, log p_T, log M) of a chunk, M = beta p_T + (1 - beta) p_S."""
    ls = zs * p.inv_t - saved[rows, 0].unsqueeze(1)
    lt = zt * p.inv_t - saved[rows, 1].unsqueeze(1)
    lm = torch.logaddexp(lt + math.log(p.beta), ls + math.log1p(-p.beta)) if p.kind == "jsd" else None
    return ls, lt, lm


def _distill_rows(dist, group, world, recv: Tensor, p: _Plan, layers) -> tuple[Tensor, Tensor]:
    """(row losses, saved (N, 5): lse_S, lse_T, D (jsd: KL(p_S || M)), KL(p_T || M) (jsd), lse of
    the student at temperature 1) from the gathered (K, N, 8) statistics; jsd's second pass here."""
    c = recv.unbind(-1)
    ms, ss, *a_s = _merge(c[0], c[1], scaled=c[4:5] if p.kind in _STUDENT_SUM_KINDS else ())
    mt, st, *a_t = _merge(c[2], c[3], scaled=c[4:5] if p.kind in _TEACHER_SUM_KINDS else ())
    lse_s, lse_t = ms + ss.log(), mt + st.log()
    saved = torch.zeros(p.n, 5, dtype=p.acc, device=p.device)
    saved[:, 0], saved[:, 1] = lse_s, lse_t
    if p.kind == "kl":
        d = a_t[0] / st + lse_s - lse_t
    elif p.kind == "ce":
        d = lse_s - a_t[0] / st
    elif p.kind == "reverse_kl":
        d = a_s[0] / ss + lse_t - lse_s
    else:
        sums = torch.zeros(p.n, 2, dtype=p.acc, device=p.device)
        if p.v_local:
            for rows in _chunks(p.n, p.v_local, p.chunk_size):
                zs, zt = (layer.chunk(rows)[2].to(p.acc) for layer in layers)
                ls, lt, lm = _jsd_logs(zs, zt, p, rows, saved)
                sums[rows, 0] = _pmul(ls.exp(), ls - lm).sum(1)
                sums[rows, 1] = _pmul(lt.exp(), lt - lm).sum(1)
        dist.all_reduce(sums, group=group)
        saved[:, 2:4] = sums
        d = (1 - p.beta) * sums[:, 0] + p.beta * sums[:, 1]
    d = torch.where(torch.isfinite(lse_s) & torch.isfinite(lse_t), d, math.nan)
    if p.kind != "jsd":
        saved[:, 2] = d
    loss = p.temperature ** 2 * d
    if p.hard:
        m1, s1 = _merge(c[5], c[6])
        log_s1 = s1.log()
        saved[:, 4] = m1 + log_s1
        nll = torch.where(torch.isfinite(saved[:, 4]), (m1 - c[7].sum(0)) + log_s1, math.nan)
        loss = p.alpha * loss + (1 - p.alpha) * nll
    return torch.where(p.counted, loss, 0.0), saved


def _distill_grads(zs: Tensor, zt: Tensor, p: _Plan, rows: slice, saved: Tensor, coef: Tensor, teacher: bool):
    """(d/dz_S, d/dz_T or None) of ``sum_rows coef * loss`` for a chunk (``coef`` 0 on ignored rows:
    0 times the row's gradient, NaN where that is NaN, as in PyTorch); dD/ds and dD/dt by kind."""
    ls, lt, lm = _jsd_logs(zs, zt, p, rows, saved)
    ps, pt = ls.exp(), lt.exp()
    d = saved[rows, 2].unsqueeze(1)
    gs, gt = {"kl": (lambda: ps - pt, lambda: _pmul(pt, lt - ls - d)),
              "ce": (lambda: ps - pt, lambda: -_pmul(pt, ls + d)),
              "reverse_kl": (lambda: _pmul(ps, ls - lt - d), lambda: pt - ps),
              "jsd": (lambda: (1 - p.beta) * _pmul(ps, ls - lm - d),
                      lambda: p.beta * _pmul(pt, lt - lm - saved[rows, 3].unsqueeze(1)))}[p.kind]
    c = coef[rows].unsqueeze(1)
    k = c * (p.alpha * p.temperature)  # T^2 D of z / T: T dD/d(z / T)
    dzs, dzt = k * gs(), k * gt() if teacher else None
    if p.hard:
        ch = c * (1 - p.alpha)
        dzs += ch * (zs - saved[rows, 4].unsqueeze(1)).exp()
        dzs.scatter_add_(1, p.local_tok[rows].unsqueeze(1), torch.where(p.here[rows].unsqueeze(1), -ch, 0.0))
    return dzs, dzt


class _VocabParallelLinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, plan, dist, group, world):
        ctx.set_materialize_grads(False)
        p = plan
        layers = (_Layer(xs, ws, bs, p.src), _Layer(xt, wt, bt, p.src))
        local = torch.zeros(p.n, 8, dtype=p.acc, device=p.device)
        local[:, [0, 2, 5]] = -math.inf  # an empty block (V_local = 0)
        if p.v_local:
            for rows in _chunks(p.n, p.v_local, p.chunk_size):
                zs, zt = (layer.chunk(rows)[2].to(p.acc) for layer in layers)
                local[rows] = _distill_stats(zs, zt, p, rows)
        loss_rows, saved = _distill_rows(dist, group, world, _gather_rows(dist, group, world, local), p, layers)
        ctx.plan, ctx.dist, ctx.group = p, dist, group
        ctx.save_for_backward(xs, ws, bs, xt, wt, bt, saved)
        if p.reduction == "none":
            return loss_rows
        total = loss_rows.sum()
        return total if p.reduction == "sum" else total / p.denom

    @staticmethod
    @once_differentiable("celoss.distributed.vocab_parallel_linear_distillation_loss")
    def backward(ctx, grad):
        xs, ws, bs, xt, wt, bt, saved = ctx.saved_tensors
        p = ctx.plan
        layers = (_Layer(xs, ws, bs, p.src), _Layer(xt, wt, bt, p.src))
        sinks = (_LayerGrads(layers[0], ctx.needs_input_grad[:3]), _LayerGrads(layers[1], ctx.needs_input_grad[3:6]))
        if p.v_local and grad is not None:
            coef = grad.to(p.acc).reshape(-1).expand(p.n)
            if p.reduction in ("mean", "batchmean"):
                coef = coef * torch.where(p.denom > 0, 1 / p.denom, 0.0)
            coef = torch.where(p.counted, coef, 0.0)
            teacher = any(ctx.needs_input_grad[3:6])
            for rows in _chunks(p.n, p.v_local, p.chunk_size):
                (sel_s, h_s, zs), (sel_t, h_t, zt) = (layer.chunk(rows) for layer in layers)
                dzs, dzt = _distill_grads(zs.to(p.acc), zt.to(p.acc), p, rows, saved, coef, teacher)
                sinks[0].add(rows, sel_s, h_s, dzs)
                if teacher:
                    sinks[1].add(rows, sel_t, h_t, dzt)
        return input_grads(ctx, *sinks[0].result(ctx.dist, ctx.group), *sinks[1].result(ctx.dist, ctx.group))


def vocab_parallel_linear_distillation_loss(student_input: Tensor, local_student_weight: Tensor,
                                            teacher_input: Tensor, local_teacher_weight: Tensor,
                                            target: Optional[Tensor] = None, *,
                                            student_bias: Optional[Tensor] = None,
                                            teacher_bias: Optional[Tensor] = None, temperature: float = 1.0,
                                            kind: str = "kl", beta: float = 0.5, alpha: float = 1.0,
                                            ignore_index: int = -100, reduction: str = "batchmean",
                                            shift: bool = False, chunk_size: Optional[int] = None,
                                            vocab_start: Optional[int] = None, vocab_size: Optional[int] = None,
                                            group=None, validate: bool = True) -> Tensor:
    """:func:`celoss.linear_distillation_loss` with both classifiers sharded by rows across ``group``.

    Each rank holds rows ``[vocab_start, vocab_start + V_local)`` of the student's and of the
    teacher's classifier (the same slice for both); the hidden states and ``target`` are
    replicated. The loss equals the single-process call with the full classifiers (every
    ``kind``, the hard-label term, ``shift``, reductions, NaN / inf rows) and is replicated.

    Forward, per chunk of rows (``chunk_size``, default about ``LINEAR_CHUNK_ELEMENTS / V_local``),
    both local logits by one matrix product each and their row statistics: max and sum of exps of
    ``s = student / T`` and ``t = teacher / T``, plus the sum the kind needs, relative to a max that
    merges across ranks (``"kl"``: ``A = sum e^(t - m_t) (t - s)``, ``KL = A / S_t + lse_s -
    lse_t``; ``"ce"``: ``B = sum e^(t - m_t) s``, ``CE = lse_s - B / S_t``; ``"reverse_kl"``:
    ``sum e^(s - m_s) (s - t)``), and with a hard-label term the student's statistics at
    temperature 1 and its target logit: one all-gather of ``(N, 8)`` statistics. ``"jsd"``: the
    mixture's ``log M`` is not a function of row statistics, so a second pass recomputes the chunks
    and sums ``p_S (log p_S - log M)`` and ``p_T (log p_T - log M)`` elementwise with the merged
    lse's, then one all-reduce of those ``(N, 2)`` sums. Backward recomputes the chunks; the
    hidden-state gradients (the student's, and the teacher's if it requires grad) are summed over
    the group by one all-reduce each (every rank must run backward); the classifier and bias
    gradients stay local. The local pass is row-chunked plain PyTorch. Differentiable once.

    Args:
        student_input (Tensor): student hidden states, replicated.
        local_student_weight (Tensor): the student's classifier rows of this slice, or a DTensor
            sharded by rows (``Shard(0)``; slice, ``vocab_size`` and ``group`` from its placement).
        teacher_input (Tensor): teacher hidden states (the same leading dimensions; its hidden size
            may differ from the student's), replicated.
        local_teacher_weight (Tensor): the teacher's classifier rows of the same slice, or a
            DTensor laid out like the student's.
        target (Tensor, optional): int64 global class indices for the hard-label term, replicated;
            None: none (``alpha`` must be 1). Default: None
        student_bias (Tensor, optional, keyword-only): the student's bias slice (a DTensor sharded
            like its classifier). Default: None
        teacher_bias (Tensor, optional, keyword-only): the teacher's bias slice. Default: None
        temperature (float, keyword-only): ``T``, finite and > 0. Default: 1.0
        kind (str, keyword-only): ``"kl"``, ``"reverse_kl"``, ``"ce"`` or ``"jsd"``, as
            :func:`celoss.distillation_loss`. Default: ``"kl"``
        beta (float, keyword-only): the JSD mixture weight, in [0, 1]. Default: 0.5
        alpha (float, keyword-only): weight of the soft term; ``1 - alpha`` weighs the hard-label
            cross-entropy. Default: 1.0
        ignore_index (int, keyword-only): target value whose rows are excluded. Default: -100
        reduction (str, keyword-only): ``"batchmean"``, ``"mean"`` (divided by the counted rows
            times the full ``vocab_size``), ``"sum"`` or ``"none"``. Default: ``"batchmean"``
        shift (bool, keyword-only): both hidden states drop their last position and the labels are
            ``target[..., 1:]`` (``(..., T, D)`` inputs). Default: False
        chunk_size (int, optional, keyword-only): rows per chunk. Default: None
        vocab_start (int, optional, keyword-only): first global class of this rank's slice; with
            ``vocab_size``, any tiling of the vocabulary (uneven, empty, in any rank order). Both
            left out: even shards, ``rank * V_local`` of ``world_size * V_local``. Default: None
        vocab_size (int, optional, keyword-only): the full vocabulary size. Default: None
        group (ProcessGroup, optional, keyword-only): the tensor-parallel group; None: the default
            group (with DTensor inputs: the mesh's group). Default: None
        validate (bool, keyword-only): check the arguments across the ranks first (one tiny
            all-gather and host sync; every rank then raises the same error on a mismatch). False
            skips it: arguments that differ between ranks can then hang or give wrong results.
            Default: True

    Shape:
        - Student_input: ``(..., D_s)``; teacher_input: ``(..., D_t)``.
        - Local weights: ``(V_local, D_s)``, ``(V_local, D_t)``; biases: ``(V_local)``.
        - Target: ``(...)``.
        - Output: ``()``; with ``reduction="none"``, ``(...)`` (with ``shift``, ``(..., T - 1)``).

    Returns:
        Tensor: the loss in the student's dtype, replicated on the group.

    Example::

        >>> import torch.distributed as dist
        >>> # every rank of the tensor-parallel group runs this; here a group of one process
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> rank, world = dist.get_rank(), dist.get_world_size()
        >>> _ = torch.manual_seed(0)
        >>> student_hidden = torch.randn(2, 8, 16, requires_grad=True)
        >>> teacher_hidden = torch.randn(2, 8, 32)
        >>> student_head, teacher_head = torch.randn(1000, 16), torch.randn(1000, 32)
        >>> input_ids = torch.randint(0, 1000, (2, 8))
        >>> start, end = celoss.distributed.vocab_range(1000, rank, world)
        >>> loss = celoss.distributed.vocab_parallel_linear_distillation_loss(
        ...     student_hidden, student_head[start:end], teacher_hidden, teacher_head[start:end],
        ...     input_ids, kind="jsd", alpha=0.5, temperature=2.0, shift=True,
        ...     vocab_start=start, vocab_size=1000)
        >>> ref = celoss.linear_distillation_loss(
        ...     student_hidden, student_head, teacher_hidden, teacher_head, input_ids, kind="jsd",
        ...     alpha=0.5, temperature=2.0, shift=True)
        >>> torch.allclose(loss, ref)
        True
        >>> loss.backward()
        >>> dist.destroy_process_group()
    """
    local_student_weight, group, derived, rest = _unwrap_dtensors(
        "local_student_weight", local_student_weight, 0, group, student_input=student_input,
        teacher_input=teacher_input, target=target, student_bias=student_bias)
    local_teacher_weight, group, derived_t, rest_t = _unwrap_dtensors(
        "local_teacher_weight", local_teacher_weight, 0, group, teacher_bias=teacher_bias)
    if derived is not None and derived_t is not None and derived != derived_t:
        raise ValueError(f"celoss.distributed: the student's classifier holds classes [{derived[0]}, ...) of "
                         f"{derived[1]} but the teacher's [{derived_t[0]}, ...) of {derived_t[1]}: both must be "
                         f"sharded alike")
    derived = derived or derived_t
    xs, xt, target = rest["student_input"], rest["teacher_input"], rest["target"]
    ws, wt, bs, bt = local_student_weight, local_teacher_weight, rest["student_bias"], rest_t["teacher_bias"]
    dist, world, rank = _group_info(group)

    def make_plan():
        check_layer(xs, ws, bs, ("student_input", "local_student_weight", "student_bias"))
        check_layer(xt, wt, bt, ("teacher_input", "local_teacher_weight", "teacher_bias"))
        if tuple(xt.shape[:-1]) != tuple(xs.shape[:-1]):
            raise ValueError(f"student_input {tuple(xs.shape)} and teacher_input {tuple(xt.shape)} must have "
                             f"the same leading dimensions (one row each)")
        if wt.shape[0] != ws.shape[0]:
            raise ValueError(f"local_student_weight has {ws.shape[0]} classes but local_teacher_weight has "
                             f"{wt.shape[0]}: both must hold this rank's slice of the shared vocabulary")
        if xt.device != xs.device:
            raise ValueError(f"teacher_input is on {xt.device} but student_input is on {xs.device}")
        check_shift(xs, shift, "student_input")
        _check_chunk_size(chunk_size)
        lead = tuple(xs.shape[:-1])
        o = distill_options(kind, temperature, beta, alpha, _checks.index_value("ignore_index", ignore_index),
                            reduction, target, lead, xs, "student_input")
        labels = target if target is not None else torch.zeros(lead, dtype=torch.int64, device=xs.device)
        x_s, labels, src, out_shape = _linear_rows(xs, labels, shift)
        x_t = xt.reshape(-1, xt.shape[-1])
        v_local = ws.shape[0]
        layout = _vocab_layout(vocab_start, vocab_size, v_local, rank, world, derived)
        grad_on = torch.is_grad_enabled()
        needs = (grad_on and xs.requires_grad, grad_on and xt.requires_grad)
        p = _aux_plan(xs, labels, out_shape, v_local, layout, o.ignore_index,
                      ("distillation", o.kind, o.temperature, o.beta, o.alpha, reduction, target is not None,
                       str(xt.dtype), xs.shape[-1], xt.shape[-1], bs is not None, bt is not None, bool(shift),
                       needs))
        if target is None:
            p.counted = torch.ones_like(p.counted)
        p.acc = accum_dtype(xs.dtype, xt.dtype)
        p.kind, p.temperature, p.inv_t, p.beta, p.alpha = o.kind, o.temperature, 1.0 / o.temperature, o.beta, o.alpha
        p.reduction, p.hard, p.src, p.chunk_size = reduction, target is not None and o.alpha != 1.0, src, chunk_size
        counted = p.counted.sum().to(p.acc)
        p.denom = counted * p.vocab_size if reduction == "mean" else counted
        p.inputs = (x_s, x_t)
        return p

    p = _prepare(dist, group, world, rank, make_plan, validate)
    loss = _VocabParallelLinearDistillation.apply(p.inputs[0], ws, bs, p.inputs[1], wt, bt, p, dist, group, world)
    p.inputs = None
    if p.reduction == "none":
        loss = loss.reshape(p.out_shape)
    return loss.to(xs.dtype)
