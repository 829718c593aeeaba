"""Vocabulary-parallel token log-probabilities and entropy (RL): :func:`vocab_parallel_token_logprobs`
(sharded logits) and :func:`vocab_parallel_linear_token_logprobs` (a classifier sharded by rows),
their per-row statistics ``(m, s, u, z_y)``, the merge into ``(log p_y, entropy, lse)`` and the
gradient."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _checks
from .._autograd import input_grads, once_differentiable
from ..linear_cross_entropy import check_layer, check_shift
from ..logprobs import _check_temperature, _check_tokens, _result
from ._common import (_aux_plan, _block, _check_chunk_size, _chunks, _class_last_rows, _gather_rows,
                      _group_info, _Layer, _LayerGrads, _linear_rows, _merge, _Plan, _pmul, _prepare,
                      _unwrap_dtensors, _vocab_layout)


# ---- token log-probabilities and entropy ----
# local statistics per row: (m, s, u = sum e^(z - m) (z - m), z_y on the rank holding the token)

def _positions(p: _Plan, rows: slice):
    """Output rows of processed rows ``rows`` (ignored rows are not processed where ``p.proc`` lists
    the others: their outputs and gradients are 0 whatever their logits)."""
    return rows if p.proc is None else p.proc[rows]


def _logprobs_stats(z: Tensor, p: _Plan, pos) -> Tensor:
    m, d, e = _block(z)
    zy = z.gather(1, p.local_tok[pos].unsqueeze(1)).squeeze(1)
    return torch.stack([m, e.sum(1), _pmul(e, d).sum(1), torch.where(p.here[pos], zy, 0.0)], 1)


def _logprobs_rows(recv: Tensor, p: _Plan) -> tuple[Tensor, Tensor, Tensor]:
    """(log p_y, entropy, lse) per row from the gathered (K, N, 4) statistics: as the single-process
    kernels, log p_y = (z_y - M) - log S, H = log S - U / S; NaN where lse is not finite, 0 on
    ignored rows."""
    big, s, u = _merge(recv[..., 0], recv[..., 1], shifted=(recv[..., 2],))
    log_s = s.log()
    lse = big + log_s
    vals = torch.stack([(recv[..., 3].sum(0) - big) - log_s, log_s - u / s, lse])
    vals = torch.where(torch.isfinite(lse), vals, math.nan)
    return tuple(torch.where(p.counted, vals, 0.0).unbind(0))


def _logprobs_grad(z: Tensor, p: _Plan, pos, lse, ent, gl, gh) -> Tensor:
    """dz = gl [j == y] - p_j (gl + gh (a_j + H)) times 1/T, a = z - lse (0 where p_j == 0),
    0 on ignored rows."""
    a = z - lse[pos].unsqueeze(1)
    prob = a.exp()
    c = torch.zeros_like(lse[pos]) if gl is None else gl[pos]
    if gh is None:
        g = -prob * c.unsqueeze(1)
    else:
        g = -_pmul(prob, (c + gh[pos] * ent[pos]).unsqueeze(1) + gh[pos].unsqueeze(1) * a)
    g.scatter_add_(1, p.local_tok[pos].unsqueeze(1), torch.where(p.here[pos], c, 0.0).unsqueeze(1))
    return torch.where(p.counted[pos].unsqueeze(1), g * p.scale, 0.0)


class _VocabParallelLogprobs(torch.autograd.Function):
    """Inputs (logits, None, None) or (hidden, weight, bias); outputs (log p_y, entropy)."""

    @staticmethod
    def forward(ctx, x, w, b, plan, dist, group, world):
        ctx.set_materialize_grads(False)
        p = plan
        layer = _Layer(x, w, b, p.src)
        local = torch.zeros(p.n, 4, dtype=p.acc, device=p.device)
        local[:, 0] = -math.inf  # an empty block (V_local = 0)
        if p.v_local:
            for rows in _chunks(p.m, p.v_local, p.chunk_size):
                pos = _positions(p, rows)
                local[pos] = _logprobs_stats(layer.chunk(rows)[2].to(p.acc) * p.scale, p, pos)
        lp, ent, lse = _logprobs_rows(_gather_rows(dist, group, world, local), p)
        ctx.plan, ctx.dist, ctx.group = p, dist, group
        ctx.save_for_backward(x, w, b, lse, ent)
        if not p.entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent


def _logprobs_backward(ctx, gl, gh):
    x, w, b, lse, ent = ctx.saved_tensors
    p = ctx.plan
    layer = _Layer(x, w, b, p.src)
    grads = _LayerGrads(layer, ctx.needs_input_grad[:3])
    if p.v_local and (gl is not None or gh is not None):
        gl, gh = (None if g is None else g.reshape(-1).to(p.acc) for g in (gl, gh))
        for rows in _chunks(p.m, p.v_local, p.chunk_size):
            sel, h, z = layer.chunk(rows)
            grads.add(rows, sel, h, _logprobs_grad(z.to(p.acc) * p.scale, p, _positions(p, rows), lse, ent, gl, gh))
    return input_grads(ctx, *grads.result(ctx.dist, ctx.group))


class _VocabParallelLinearLogprobs(_VocabParallelLogprobs):
    @staticmethod
    @once_differentiable("celoss.distributed.vocab_parallel_linear_token_logprobs")
    def backward(ctx, grad_logprobs, grad_entropy):
        return _logprobs_backward(ctx, grad_logprobs, grad_entropy)


class _VocabParallelTokenLogprobs(_VocabParallelLogprobs):
    @staticmethod
    @once_differentiable("celoss.distributed.vocab_parallel_token_logprobs")
    def backward(ctx, grad_logprobs, grad_entropy):
        return _logprobs_backward(ctx, grad_logprobs, grad_entropy)


def _logprobs_plan(like, tokens, out_shape, v_local, layout, temperature, ignore_index, return_entropy,
                   variant_key) -> _Plan:
    scale = 1.0 / _check_temperature(temperature)
    p = _aux_plan(like, tokens, out_shape, v_local, layout, ignore_index,
                  ("token_logprobs", scale, bool(return_entropy)) + variant_key)
    p.scale, p.entropy, p.src, p.chunk_size, p.proc, p.m = scale, bool(return_entropy), None, None, None, p.n
    return p


def vocab_parallel_token_logprobs(local_logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                                  ignore_index: int = -100, return_entropy: bool = False,
                                  vocab_start: Optional[int] = None, vocab_size: Optional[int] = None,
                                  group=None, validate: bool = True):
    """:func:`celoss.token_logprobs` of logits sharded over the vocabulary across the ranks of ``group``.

    Per position, ``log softmax(z)[token]`` and (``return_entropy``) the entropy ``H = lse - sum_j
    p_j z_j`` of ``z = logits / temperature`` over the whole vocabulary, although each rank holds
    only its slice ``[vocab_start, vocab_start + V_local)`` of the logits. Forward: each rank's row
    statistics (max, sum of exps, sum of exps times ``z - max``, the token's logit on the rank that
    holds it), one all-gather of those ``(N, 4)`` statistics, merged in rank order: the results are
    identical on every rank and equal the single-process call on the concatenated logits (ignored
    positions 0 with a zero gradient; NaN rows where ``log_softmax`` has them). Backward: local, no
    communication; gradients flow from both outputs with any (replicated) upstream gradients. The
    local pass is row-chunked plain PyTorch (any device). Differentiable once.

    Args:
        local_logits (Tensor): this rank's slice of the logits (class dimension last),
            float32/float16/bfloat16/float64; or a DTensor sharded on the class dimension
            (``Shard(-1)``): slice, ``vocab_size`` and ``group`` then come from its placement.
        tokens (Tensor): integer global token ids in ``[0, vocab_size)`` or ``ignore_index``, the
            same on every rank (a replicated DTensor is accepted).
        temperature (float, keyword-only): finite and > 0. Default: 1.0
        ignore_index (int, keyword-only): token value whose outputs and gradients are 0. Default: -100
        return_entropy (bool, keyword-only): also return the entropy (differentiable). Default: False
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
        - Local_logits: ``(..., V_local)``.
        - Tokens: ``(...)``.
        - Output(s): ``(...)``.

    Returns:
        Tensor: the log-probabilities (float32 for float32/float16/bfloat16 logits, float64 for
        float64), replicated; with ``return_entropy``, a :class:`celoss.TokenLogprobsOutput`
        ``(logprobs, entropy)``.

    Example::

        >>> import torch.distributed as dist
        >>> # every rank of the tensor-parallel group runs this; here a group of one process
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> rank, world = dist.get_rank(), dist.get_world_size()
        >>> _ = torch.manual_seed(0)
        >>> logits = torch.randn(2, 8, 1000)                      # the same on every rank
        >>> tokens = torch.randint(0, 1000, (2, 8))
        >>> start, end = celoss.distributed.vocab_range(1000, rank, world)
        >>> local = logits[..., start:end].clone().requires_grad_()
        >>> out = celoss.distributed.vocab_parallel_token_logprobs(
        ...     local, tokens, temperature=0.7, return_entropy=True, vocab_start=start, vocab_size=1000)
        >>> ref = celoss.token_logprobs(logits, tokens, temperature=0.7, return_entropy=True)
        >>> torch.allclose(out.logprobs, ref.logprobs) and torch.allclose(out.entropy, ref.entropy)
        True
        >>> advantages = torch.randn(2, 8)
        >>> (-(out.logprobs * advantages).mean() - 0.01 * out.entropy.mean()).backward()
        >>> dist.destroy_process_group()
    """
    local_logits, group, derived, rest = _unwrap_dtensors("local_logits", local_logits, -1, group, tokens=tokens)
    tokens = rest["tokens"]
    dist, world, rank = _group_info(group)

    def make_plan():
        _checks.floating("local_logits", local_logits)
        if local_logits.dim() == 0:
            raise ValueError("local_logits must have at least 1 dimension (the local classes, last)")
        t = _check_tokens(tokens, tuple(local_logits.shape[:-1]), local_logits, "local_logits")
        rows, t, out_shape = _class_last_rows(local_logits, t)
        layout = _vocab_layout(vocab_start, vocab_size, rows.shape[1], rank, world, derived)
        p = _logprobs_plan(local_logits, t, out_shape, rows.shape[1], layout, temperature, ignore_index,
                           return_entropy, ("logits",))
        p.rows = rows
        return p

    p = _prepare(dist, group, world, rank, make_plan, validate)
    lp, ent = _VocabParallelTokenLogprobs.apply(p.rows, None, None, p, dist, group, world)
    p.rows = None  # the autograd graph keeps what backward needs
    return _result(lp, ent, p.out_shape, return_entropy)


def vocab_parallel_linear_token_logprobs(hidden: Tensor, local_weight: Tensor, tokens: Tensor, *,
                                         local_bias: Optional[Tensor] = None, temperature: float = 1.0,
                                         ignore_index: int = -100, shift: bool = False,
                                         return_entropy: bool = False, chunk_size: Optional[int] = None,
                                         vocab_start: Optional[int] = None, vocab_size: Optional[int] = None,
                                         group=None, validate: bool = True):
    """:func:`celoss.linear_token_logprobs` with the classifier sharded by rows across ``group``.

    The logits ``hidden @ local_weight.T + local_bias`` of this rank's classes are computed
    ``chunk_size`` rows at a time (default: about ``LINEAR_CHUNK_ELEMENTS / V_local`` rows), never
    gathered; the statistics flow is the one of :func:`vocab_parallel_token_logprobs` (one
    all-gather of ``(N, 4)`` statistics in forward). Backward recomputes each chunk's logits; the
    gradient of ``hidden`` is **summed over the group** by one all-reduce (every rank gets the full
    gradient, the tensor-parallel convention; every rank must run backward), the gradients of
    ``local_weight`` / ``local_bias`` stay local (accumulated in float32 at least across chunks).
    Results equal the single-process call with the full classifier. Differentiable once.

    Args:
        hidden (Tensor): hidden states, replicated on the group (a replicated DTensor is accepted).
        local_weight (Tensor): classifier rows ``[vocab_start, vocab_start + V_local)``, the dtype
            and device of ``hidden``; or a DTensor sharded by rows (``Shard(0)``).
        tokens (Tensor): integer global token ids or ``ignore_index``, replicated.
        local_bias (Tensor, optional, keyword-only): the bias of those rows (a DTensor sharded like
            the classifier). Default: None
        temperature (float, keyword-only): finite and > 0. Default: 1.0
        ignore_index (int, keyword-only): token value whose outputs and gradients are 0. Default: -100
        shift (bool, keyword-only): next-token scoring on ``(..., T, D)`` / ``(..., T)``: position t
            is scored against token t + 1, the last position is dropped (by index arithmetic).
            Default: False
        return_entropy (bool, keyword-only): also return the entropy (differentiable). Default: False
        chunk_size (int, optional, keyword-only): rows of local logits per chunk. Default: None
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
        - Hidden: ``(..., D)``; local_weight: ``(V_local, D)``; local_bias: ``(V_local)``.
        - Tokens: ``(...)``.
        - Output(s): ``(...)``; with ``shift``, ``(..., T - 1)``.

    Returns:
        Tensor: the log-probabilities (float32, or float64 for float64 inputs), replicated; with
        ``return_entropy``, a :class:`celoss.TokenLogprobsOutput` ``(logprobs, entropy)``.

    Example::

        >>> import torch.distributed as dist
        >>> # every rank of the tensor-parallel group runs this; here a group of one process
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> rank, world = dist.get_rank(), dist.get_world_size()
        >>> _ = torch.manual_seed(0)
        >>> hidden = torch.randn(2, 8, 16, requires_grad=True)    # replicated
        >>> head = torch.randn(1000, 16)                           # the full LM head
        >>> input_ids = torch.randint(0, 1000, (2, 8))
        >>> start, end = celoss.distributed.vocab_range(1000, rank, world)
        >>> out = celoss.distributed.vocab_parallel_linear_token_logprobs(
        ...     hidden, head[start:end], input_ids, shift=True, return_entropy=True,
        ...     vocab_start=start, vocab_size=1000)
        >>> out.logprobs.shape
        torch.Size([2, 7])
        >>> ref = celoss.linear_token_logprobs(hidden, head, input_ids, shift=True)
        >>> torch.allclose(out.logprobs, ref, atol=1e-5)
        True
        >>> (-(out.logprobs * torch.randn(2, 7)).mean() - 0.01 * out.entropy.mean()).backward()
        >>> dist.destroy_process_group()
    """
    local_weight, group, derived, rest = _unwrap_dtensors(
        "local_weight", local_weight, 0, group, hidden=hidden, tokens=tokens, local_bias=local_bias)
    hidden, tokens, local_bias = rest["hidden"], rest["tokens"], rest["local_bias"]
    dist, world, rank = _group_info(group)

    def make_plan():
        check_layer(hidden, local_weight, local_bias, ("hidden", "local_weight", "local_bias"))
        check_shift(hidden, shift, "hidden")
        t = _check_tokens(tokens, tuple(hidden.shape[:-1]), hidden, "hidden")
        _check_chunk_size(chunk_size)
        x, labels, src, out_shape = _linear_rows(hidden, t, shift)
        v_local = local_weight.shape[0]
        layout = _vocab_layout(vocab_start, vocab_size, v_local, rank, world, derived)
        needs = torch.is_grad_enabled() and hidden.requires_grad
        p = _logprobs_plan(hidden, labels, out_shape, v_local, layout, temperature, ignore_index, return_entropy,
                           ("linear", hidden.shape[-1], local_bias is not None, bool(shift), needs))
        if not bool(p.counted.all()):  # ignored positions cost no matrix-product work
            p.proc = p.counted.nonzero().squeeze(1)
            p.m = p.proc.numel()
            src = p.proc if src is None else src[p.proc]
        p.hidden, p.src, p.chunk_size = x, src, chunk_size
        return p

    p = _prepare(dist, group, world, rank, make_plan, validate)
    lp, ent = _VocabParallelLinearLogprobs.apply(p.hidden, local_weight, local_bias, p, dist, group, world)
    p.hidden = None
    return _result(lp, ent, p.out_shape, return_entropy)
