"""Vocabulary-parallel cross-entropy: :func:`vocab_parallel_cross_entropy` (sharded logits) and
:func:`vocab_parallel_linear_cross_entropy` (a classifier sharded by rows, hidden states
replicated), with what only they use: the merge of the backends' ``(max, sumexp, target_z,
weighted_z)`` statistics into loss, lse and gradient coefficients (:func:`_global_rows`), the
weighted-mean reduction and the upstream row coefficients of backward."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _ops
from .. import stats as S
from .._autograd import input_grads, once_differentiable
from ..cross_entropy import CrossEntropyOutput
from ._common import (_chunks, _class_last_rows, _common_plan, _gather_rows, _group_info, _Plan, _prepare,
                      _unwrap_dtensors, _vocab_layout)


def _int_target(target) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must hold global class indices as int64 (torch.long), got {target.dtype}"
                        f" (probability targets are not supported by the vocab-parallel functions)")
    return target


def _local_target_weight(p: _Plan) -> Tensor:
    """Class weight of each row's target if it falls in this slice, else 0 (ignored rows: 0)."""
    t = p.target
    if p.v_local == 0:
        return torch.zeros(p.n, dtype=p.acc, device=t.device)
    local = t - p.vocab_start
    here = (local >= 0) & (local < p.v_local) & (t != p.ignore_index)
    w = p.weight[torch.where(here, local, torch.zeros_like(local))]
    return torch.where(here, w, torch.zeros_like(w)).to(p.acc)


def _empty_stats(p: _Plan) -> Tensor:
    """Statistics of an empty class block: max -inf, sum 0 (merge_all drops them exactly)."""
    out = torch.zeros(p.n, S.NUM_STATS, dtype=p.acc, device=p.device)
    out[:, 0] = -float("inf")
    return out


def _global_rows(dist, group, world: int, p: _Plan, local_stats: Tensor):
    """One all-gather of the local statistics -> (loss, lse, row_coefs (N, 3), per_row weight,
    weighted-mean denominator); the loss is reduced as ``p.reduction`` says."""
    n = p.n
    if p.weight is None:
        send = local_stats.to(p.acc)
    else:
        # column 4: the target's class weight (non-zero on the owning rank only); extra last row:
        # this slice's weight sum (for label smoothing's W = sum_c w_c).
        send = torch.zeros(n + 1, S.NUM_STATS + 1, dtype=p.acc, device=p.device)
        send[:n, :S.NUM_STATS] = local_stats
        send[:n, S.NUM_STATS] = _local_target_weight(p)
        send[n, 0] = p.weight.sum()
    recv = _gather_rows(dist, group, world, send)
    merged = S.merge_all(recv[:, :n, :S.NUM_STATS])
    options = dict(num_classes=p.vocab_size, label_smoothing=p.label_smoothing, z_loss=p.z_loss)
    counted = p.target != p.ignore_index
    if p.weight is None:
        loss, lse, row_coefs = S.coefficients(merged, p.target, None, ignore_index=p.ignore_index, **options)
        per_row = counted.to(p.acc)
    else:
        # coefficients() looks class weights up as weight[target] and sums them for W. Hand it a
        # table indexed by row instead: entry i = w_{y_i} (gathered), the last entry makes the
        # table sum to W; rows are "classes" 0..N-1 and ignored rows -1 (no collision with a row
        # index whatever ignore_index is).
        per_row = recv[:, :n, S.NUM_STATS].sum(0)
        w_total = recv[:, n, 0].sum(0)
        table = torch.cat([per_row, (w_total - per_row.sum()).reshape(1)])
        rows_as_classes = torch.where(counted, torch.arange(n, device=p.device), torch.full_like(p.target, -1))
        loss, lse, row_coefs = S.coefficients(merged, rows_as_classes, table, ignore_index=-1, **options)
    denom = per_row.sum()
    nll_rows = None
    if p.label_smoothing and p.reduction == "mean":
        # the (1 - eps) * w_y * (lse - z_y) part of each row (B = (1 - eps) w_y; 0 for ignored rows)
        nll_rows = torch.where(counted, row_coefs[:, 1] * (lse - merged[:, 2]), torch.zeros_like(lse))
    return _reduce(loss, denom, p.reduction, nll_rows), lse, row_coefs, per_row, denom


def _reduce(loss_rows: Tensor, denom: Tensor, reduction: str, nll_rows: Optional[Tensor] = None) -> Tensor:
    """Sum, or the weighted mean: divided by ``denom`` whatever its sign (PyTorch does; 0 -> NaN/inf)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    total = loss_rows.sum()
    if nll_rows is None:
        return total / denom
    # label smoothing: PyTorch divides its cross-entropy and smoothing terms separately, so a zero
    # denominator with a zero cross-entropy sum is NaN (0/0) even when the smoothing term is not 0
    nll = nll_rows.sum()
    return torch.where(denom == 0, nll / denom + (total - nll) / denom, total / denom)


def _upstream_row_coefs(p: _Plan, row_coefs, denom, grad_loss, grad_lse):
    """Row coefficients (A, B, D) times the upstream gradient (over the weighted-mean denominator,
    whatever its sign), plus the lse's gradient in A. Ignored rows get no loss gradient even when
    that factor is inf or NaN (all rows ignored: NaN loss, zero gradients, as in PyTorch)."""
    out = torch.zeros_like(row_coefs)
    if grad_loss is not None:
        g = grad_loss.to(row_coefs.dtype)
        if p.reduction == "none":
            g = g.reshape(-1, 1)
        elif p.reduction == "mean":
            g = g / denom
        scaled = row_coefs * g
        if p.label_smoothing:
            # PyTorch's smoothing term spreads a non-finite factor over every class of the row
            # (inf - inf in log_softmax's backward): the whole row is NaN
            scaled[:, :1] = torch.where(torch.isfinite(g), scaled[:, :1], float("nan"))
        else:
            scaled[:, 2] = 0  # D (smoothing) is 0 here; times an infinite factor it would be NaN
        # B only touches the target's class: keep an infinite B away from the kernels on ranks that
        # do not hold it (a masked-out B * 0 would be NaN there)
        local = p.target - p.vocab_start
        scaled[:, 1] = torch.where((local >= 0) & (local < p.v_local), scaled[:, 1], 0)
        counted = (p.target != p.ignore_index).unsqueeze(1)
        out = torch.where(counted, scaled, out)
    if grad_lse is not None:
        out[:, 0] += grad_lse.reshape(-1).to(out.dtype)
    return out.contiguous()


def _finish(p: _Plan, loss, lse, per_row, dtype, return_lse, return_z_loss):
    if p.reduction == "none":
        loss = loss.reshape(p.out_shape)
    loss = loss.to(dtype)
    if not (return_lse or return_z_loss):
        return loss
    z_term = None
    if return_z_loss:
        lse_d = lse.detach()
        z_rows = p.z_loss * per_row * lse_d * lse_d
        z_term = _reduce(z_rows, per_row.sum(), p.reduction)
        z_term = (z_term.reshape(p.out_shape) if p.reduction == "none" else z_term).to(dtype)
    return CrossEntropyOutput(loss, lse.reshape(p.out_shape) if return_lse else None, z_term)


# ----------------------------------------------------------------------------------------------
# logits variant
# ----------------------------------------------------------------------------------------------

class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, plan, dist, group, world):
        ctx.set_materialize_grads(False)
        p = plan
        if p.v_local:
            local = _ops.ce_stats(logits, p.target, p.weight, p.backend, p.vocab_start, p.ignore_index,
                                  p.logit_scale, p.softcap)
        else:
            local = _empty_stats(p)
        loss, lse, row_coefs, per_row, denom = _global_rows(dist, group, world, p, local)
        ctx.plan = p
        ctx.save_for_backward(logits, lse, row_coefs, denom)
        ctx.mark_non_differentiable(per_row)
        return loss, lse, per_row

    @staticmethod
    @once_differentiable("celoss.distributed.vocab_parallel_cross_entropy")
    def backward(ctx, grad_loss, grad_lse, _):
        logits, lse, row_coefs, denom = ctx.saved_tensors
        p = ctx.plan
        if (grad_loss is None and grad_lse is None) or not ctx.needs_input_grad[0]:
            return input_grads(ctx)
        if p.v_local == 0:
            return input_grads(ctx, torch.zeros_like(logits))
        upstream = _upstream_row_coefs(p, row_coefs, denom, grad_loss, grad_lse)
        grad = _ops.ce_grad(logits, p.target, p.weight, lse, upstream, p.backend, p.vocab_start,
                            p.logit_scale, p.softcap)
        return input_grads(ctx, grad)


def vocab_parallel_cross_entropy(local_logits: Tensor, target: Tensor, *,
                                 vocab_start: Optional[int] = None, vocab_size: Optional[int] = None,
                                 group=None, weight: Optional[Tensor] = None,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 label_smoothing: float = 0.0, logit_scale: float = 1.0,
                                 softcap: Optional[float] = None, z_loss: float = 0.0,
                                 return_lse: bool = False, return_z_loss: bool = False,
                                 backend: Optional[str] = None, validate: bool = True):
    """Cross-entropy of logits sharded over the vocabulary across the ranks of ``group``.

    ``local_logits`` (N, V_local) or (..., V_local) -- the class dimension is the **last** one (the
    tensor-parallel layout) -- holds classes ``[vocab_start, vocab_start + V_local)`` of a
    ``vocab_size``-class softmax; ``target`` holds global class indices (int64), the same on every
    rank. Options as :func:`celoss.cross_entropy`; results equal the single-process call on the
    concatenated vocabulary and are replicated on every rank. Forward: one all-gather of O(N)
    statistics (plus the tiny argument check unless ``validate=False``); backward: no
    communication. See the module docstring for the conventions and the bytes sent.

    ``local_logits`` may be a DTensor sharded on the class dimension (``Shard(-1)``, as under
    ``loss_parallel``): the slice, ``vocab_size`` and ``group`` then come from its placement.

    Args:
        local_logits (Tensor): this rank's slice of the logits, float32/float16/bfloat16/float64,
            or a DTensor ``Shard(-1)``.
        target (Tensor): int64 global class indices, replicated (a replicated DTensor is accepted).
        vocab_start (int, optional, keyword-only): first global class of this rank's slice; with
            ``vocab_size``, any tiling of the vocabulary (uneven, empty, in any rank order). Both
            left out: even shards, ``rank * V_local`` of ``world_size * V_local``. Default: None
        vocab_size (int, optional, keyword-only): the full vocabulary size. Default: None
        group (ProcessGroup, optional, keyword-only): the tensor-parallel group; None: the default
            group (with DTensor inputs: the mesh's group). Default: None
        weight (Tensor, optional, keyword-only): class weights, this rank's slice (``V_local``) or
            the full vector (``vocab_size``); a DTensor replicated or sharded like the logits.
            Default: None
        ignore_index (int, keyword-only): target value that is skipped. Default: -100
        reduction (str, keyword-only): ``"mean"`` (weighted), ``"sum"`` or ``"none"``. Default: ``"mean"``
        label_smoothing (float, keyword-only): in [0, 1]. Default: 0.0
        logit_scale (float, keyword-only): multiplies the logits first. Default: 1.0
        softcap (float, optional, keyword-only): then ``softcap * tanh(z / softcap)``. Default: None
        z_loss (float, keyword-only): adds ``z_loss * lse**2`` per counted row. Default: 0.0
        return_lse (bool, keyword-only): also return the per-row lse (differentiable). Default: False
        return_z_loss (bool, keyword-only): also return the z-loss part of the loss. Default: False
        backend (str, optional, keyword-only): the row kernels' backend (``"triton"``,
            ``"cython"``, ``"torch"`` or None: automatic), as :func:`celoss.cross_entropy`. Default: None
        validate (bool, keyword-only): check the arguments across the ranks first (one tiny
            all-gather and host sync; every rank then raises the same error on a mismatch). False
            skips it: arguments that differ between ranks can then hang or give wrong results.
            Default: True

    Shape:
        - Local_logits: ``(N, V_local)`` or ``(..., V_local)``.
        - Target: ``(N)`` or ``(...)``.
        - Output: ``()``; with ``reduction="none"``, the target's shape (the lse: always).

    Returns:
        Tensor: the loss in the logits' dtype, replicated; with ``return_lse`` / ``return_z_loss``,
        a :class:`celoss.CrossEntropyOutput` ``(loss, lse, z_loss)``.

    Example::

        >>> import torch.distributed as dist
        >>> # every rank of the tensor-parallel group runs this; here a group of one process
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> rank, world = dist.get_rank(), dist.get_world_size()
        >>> _ = torch.manual_seed(0)
        >>> logits, target = torch.randn(4, 1000), torch.tensor([1, 500, 999, -100])  # every rank
        >>> start, end = celoss.distributed.vocab_range(1000, rank, world)
        >>> local = logits[:, start:end].clone().requires_grad_()
        >>> loss = celoss.distributed.vocab_parallel_cross_entropy(
        ...     local, target, vocab_start=start, vocab_size=1000, label_smoothing=0.1)
        >>> torch.allclose(loss, celoss.cross_entropy(logits, target, label_smoothing=0.1))
        True
        >>> loss.backward()  # local.grad: this rank's slice of the gradient
        >>> dist.destroy_process_group()
    """
    local_logits, group, derived, rest = _unwrap_dtensors("local_logits", local_logits, -1, group,
                                                          target=target, weight=weight)
    target, weight = rest["target"], rest["weight"]
    dist, world, rank = _group_info(group)

    def make_plan():
        _checks.floating("local_logits", local_logits)
        if local_logits.dim() == 0:
            raise ValueError("local_logits must have at least 1 dimension (the local classes)")
        rows, t, out_shape = _class_last_rows(local_logits, _int_target(target))
        start, size = _vocab_layout(vocab_start, vocab_size, rows.shape[1], rank, world, derived)
        p = _common_plan(local_logits, t, out_shape, rows.shape[1],
                         vocab_start=start, vocab_size=size, weight=weight,
                         ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                         logit_scale=logit_scale, softcap=softcap, z_loss=z_loss, backend=backend,
                         variant_key=("logits",))
        p.rows = rows
        return p

    p = _prepare(dist, group, world, rank, make_plan, validate)
    loss, lse, per_row = _VocabParallelCE.apply(p.rows, p, dist, group, world)
    p.rows = None  # the autograd graph keeps what backward needs
    return _finish(p, loss, lse, per_row, local_logits.dtype, return_lse, return_z_loss)


# ----------------------------------------------------------------------------------------------
# linear variant
# ----------------------------------------------------------------------------------------------


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, plan, dist, group, world):
        ctx.set_materialize_grads(False)
        p = plan
        if p.v_local:
            local = torch.empty(p.n, S.NUM_STATS, dtype=p.acc, device=p.device)
            for rows in _chunks(p.n, p.v_local, p.chunk_size):
                logits = F.linear(hidden[rows], weight, bias)
                local[rows] = _ops.ce_stats(logits, p.target[rows], p.weight, p.backend, p.vocab_start,
                                            p.ignore_index, p.logit_scale, p.softcap)
        else:
            local = _empty_stats(p)
        loss, lse, row_coefs, per_row, denom = _global_rows(dist, group, world, p, local)
        ctx.plan, ctx.dist, ctx.group = p, dist, group
        ctx.save_for_backward(hidden, weight, bias, lse, row_coefs, denom)
        ctx.mark_non_differentiable(per_row)
        return loss, lse, per_row

    @staticmethod
    @once_differentiable("celoss.distributed.vocab_parallel_linear_cross_entropy")
    def backward(ctx, grad_loss, grad_lse, _):
        hidden, weight, bias, lse, row_coefs, denom = ctx.saved_tensors
        p = ctx.plan
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_loss is None and grad_lse is None:
            # nothing flows, but the group all-reduce must still run on every rank
            upstream = torch.zeros_like(row_coefs)
        else:
            upstream = _upstream_row_coefs(p, row_coefs, denom, grad_loss, grad_lse)
        grad_h = torch.zeros_like(hidden) if need_h else None
        acc_dtype = p.acc if weight.dtype in (torch.float32, torch.float64) else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) \
            if need_b and bias is not None else None
        if p.v_local:
            for rows in _chunks(p.n, p.v_local, p.chunk_size):
                h = hidden[rows]
                logits = F.linear(h, weight, bias)
                dlogits = _ops.ce_grad(logits, p.target[rows], p.weight, lse[rows], upstream[rows], p.backend,
                                       p.vocab_start, p.logit_scale, p.softcap)
                if grad_h is not None:
                    grad_h[rows] = dlogits @ weight
                if grad_w is not None:
                    # per-chunk product in the weight's dtype (fp32 accumulation inside the matmul),
                    # accumulated across chunks in fp32: no bf16 accumulation drift
                    grad_w += (dlogits.t() @ h).to(acc_dtype)
                if grad_b is not None:
                    grad_b += dlogits.sum(0, dtype=acc_dtype)
        if grad_h is not None:
            # tensor-parallel convention: hidden is replicated, its gradient is the sum over ranks
            ctx.dist.all_reduce(grad_h, group=ctx.group)
        return input_grads(ctx, grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                           grad_b.to(bias.dtype) if grad_b is not None else None)


def vocab_parallel_linear_cross_entropy(hidden: Tensor, local_weight: Tensor, target: Tensor, *,
                                        vocab_start: Optional[int] = None,
                                        vocab_size: Optional[int] = None, group=None,
                                        linear_bias: Optional[Tensor] = None,
                                        weight: Optional[Tensor] = None, ignore_index: int = -100,
                                        reduction: str = "mean", label_smoothing: float = 0.0,
                                        logit_scale: float = 1.0, softcap: Optional[float] = None,
                                        z_loss: float = 0.0, return_lse: bool = False,
                                        return_z_loss: bool = False, backend: Optional[str] = None,
                                        chunk_size: Optional[int] = None, validate: bool = True):
    """Cross-entropy of ``hidden @ local_weight.T (+ linear_bias)`` with the classifier sharded by rows.

    ``local_weight`` holds classifier rows ``[vocab_start, vocab_start + V_local)``; ``hidden`` is
    replicated. The local logits are computed ``chunk_size`` rows at a time (default: about
    ``LINEAR_CHUNK_ELEMENTS / V_local`` rows), so the workspace is bounded whatever N is and logits
    are never gathered; the statistics flow is the one of :func:`vocab_parallel_cross_entropy`.
    Backward recomputes each chunk's logits; the gradient of ``hidden`` is **summed over the group**
    with one all-reduce (every rank gets the full gradient -- the tensor-parallel convention; every
    rank must run backward), the gradients of ``local_weight`` / ``linear_bias`` are local
    (accumulated in fp32 across chunks). ``local_weight`` may be a DTensor sharded by rows
    (``Shard(0)``; ``linear_bias`` then sharded alike, ``hidden`` replicated).

    Args:
        hidden (Tensor): hidden states, replicated (a replicated DTensor is accepted).
        local_weight (Tensor): this rank's classifier rows (the dtype and device of ``hidden``), or
            a DTensor ``Shard(0)``.
        target (Tensor): int64 global class indices, replicated.
        vocab_start (int, optional, keyword-only): first global class of this rank's slice; with
            ``vocab_size``, any tiling of the vocabulary (uneven, empty, in any rank order). Both
            left out: even shards, ``rank * V_local`` of ``world_size * V_local``. Default: None
        vocab_size (int, optional, keyword-only): the full vocabulary size. Default: None
        group (ProcessGroup, optional, keyword-only): the tensor-parallel group; None: the default
            group (with DTensor inputs: the mesh's group). Default: None
        linear_bias (Tensor, optional, keyword-only): the bias of those rows. Default: None
        weight (Tensor, optional, keyword-only): class weights, this rank's slice or all of them.
            Default: None
        ignore_index (int, keyword-only): target value that is skipped. Default: -100
        reduction (str, keyword-only): ``"mean"`` (weighted), ``"sum"`` or ``"none"``. Default: ``"mean"``
        label_smoothing (float, keyword-only): in [0, 1]. Default: 0.0
        logit_scale (float, keyword-only): multiplies the logits first. Default: 1.0
        softcap (float, optional, keyword-only): then ``softcap * tanh(z / softcap)``. Default: None
        z_loss (float, keyword-only): adds ``z_loss * lse**2`` per counted row. Default: 0.0
        return_lse (bool, keyword-only): also return the per-row lse (differentiable). Default: False
        return_z_loss (bool, keyword-only): also return the z-loss part of the loss. Default: False
        backend (str, optional, keyword-only): the row kernels' backend (``"triton"``,
            ``"cython"``, ``"torch"`` or None: automatic), as :func:`celoss.cross_entropy`. Default: None
        chunk_size (int, optional, keyword-only): rows of local logits per chunk. Default: None
        validate (bool, keyword-only): check the arguments across the ranks first (one tiny
            all-gather and host sync; every rank then raises the same error on a mismatch). False
            skips it: arguments that differ between ranks can then hang or give wrong results.
            Default: True

    Shape:
        - Hidden: ``(N, D)`` or ``(..., D)``; local_weight: ``(V_local, D)``; linear_bias: ``(V_local)``.
        - Target: ``(N)`` or ``(...)``.
        - Output: ``()``; with ``reduction="none"``, the target's shape.

    Returns:
        Tensor: the loss in ``hidden``'s dtype, replicated; with ``return_lse`` /
        ``return_z_loss``, a :class:`celoss.CrossEntropyOutput`.

    Example::

        >>> import torch.distributed as dist
        >>> # every rank of the tensor-parallel group runs this; here a group of one process
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> rank, world = dist.get_rank(), dist.get_world_size()
        >>> _ = torch.manual_seed(0)
        >>> hidden = torch.randn(4, 16, requires_grad=True)             # replicated
        >>> head = torch.randn(1000, 16)                                 # the full LM head
        >>> target = torch.tensor([1, 500, 999, -100])
        >>> start, end = celoss.distributed.vocab_range(1000, rank, world)
        >>> local_head = head[start:end].clone().requires_grad_()        # this rank's rows
        >>> loss = celoss.distributed.vocab_parallel_linear_cross_entropy(
        ...     hidden, local_head, target, vocab_start=start, vocab_size=1000, chunk_size=2)
        >>> torch.allclose(loss, celoss.linear_cross_entropy(hidden, head, target))
        True
        >>> loss.backward()  # hidden.grad: the full gradient on every rank
        >>> dist.destroy_process_group()
    """
    local_weight, group, derived, rest = _unwrap_dtensors(
        "local_weight", local_weight, 0, group, hidden=hidden, target=target, linear_bias=linear_bias,
        weight=weight)
    hidden, target, linear_bias, weight = rest["hidden"], rest["target"], rest["linear_bias"], rest["weight"]
    dist, world, rank = _group_info(group)

    def make_plan():
        _checks.floating("hidden", hidden)
        _checks.floating("local_weight", local_weight)
        if hidden.dim() == 0:
            raise ValueError("hidden must have at least 1 dimension (the hidden size)")
        if local_weight.dim() != 2 or local_weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"local_weight must be (V_local, D={hidden.shape[-1]}), got "
                             f"{tuple(local_weight.shape)}")
        if local_weight.dtype != hidden.dtype or local_weight.device != hidden.device:
            raise ValueError(f"hidden ({hidden.dtype}, {hidden.device}) and local_weight "
                             f"({local_weight.dtype}, {local_weight.device}) must share dtype and device")
        v_local = local_weight.shape[0]
        if linear_bias is not None:
            _checks.floating("linear_bias", linear_bias)
            if tuple(linear_bias.shape) != (v_local,) or linear_bias.dtype != hidden.dtype:
                raise ValueError(f"linear_bias must be ({v_local},) of dtype {hidden.dtype}, got "
                                 f"{tuple(linear_bias.shape)} {linear_bias.dtype}")
        t = _int_target(target)
        out_shape = tuple(hidden.shape[:-1])
        if tuple(t.shape) != out_shape:
            raise ValueError(f"expected target of shape {out_shape} for hidden of shape "
                             f"{tuple(hidden.shape)}, got {tuple(t.shape)}")
        if chunk_size is not None and int(chunk_size) <= 0:
            raise ValueError(f"chunk_size must be None or > 0, got {chunk_size}")
        grad_on = torch.is_grad_enabled()
        needs = (grad_on and hidden.requires_grad,)
        start, size = _vocab_layout(vocab_start, vocab_size, v_local, rank, world, derived)
        p = _common_plan(hidden, t, out_shape, v_local, vocab_start=start, vocab_size=size,
                         weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, logit_scale=logit_scale, softcap=softcap,
                         z_loss=z_loss, backend=backend,
                         variant_key=("linear", hidden.shape[-1], needs))
        p.hidden, p.chunk_size = hidden.reshape(-1, hidden.shape[-1]), chunk_size
        return p

    p = _prepare(dist, group, world, rank, make_plan, validate)
    loss, lse, per_row = _VocabParallelLinearCE.apply(p.hidden, local_weight, linear_bias, p, dist, group,
                                                      world)
    p.hidden = None
    return _finish(p, loss, lse, per_row, hidden.dtype, return_lse, return_z_loss)
