"""Per-token log-probabilities and entropy, for RL policy losses (PPO, GRPO):
:func:`token_logprobs` from logits, :func:`linear_token_logprobs` from hidden states without the
N x V logits.

The math (one online pass with the running statistics max, sum of exps and sum of exps times
z; the gradient of both outputs) is written out in ``kernels/logprobs.py``. Row kernels: Triton
(CUDA), OpenMP ``celoss.cpu._logprobs`` (CPU; ``cpu/logprobs.h``), and the chunked plain-PyTorch
reference below (any other device, float64 on the triton backend, and the CPU fallback when the
extension is missing). Each public function runs inside ``torch.library`` custom ops
(``celoss::token_logprobs_*``, ``celoss::linear_token_logprobs_*``), so ``torch.compile`` sees
opaque ops with shape-only fake implementations.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _checks, _dispatch, _ops
from ._autograd import input_grads, once_differentiable
from ._dtypes import DTYPE_CODE, accum_dtype
from ._memory import fresh_like
from .linear_cross_entropy import (GradSink, _check_args, _contiguous_rows, default_chunk_bytes, dw_acc_bytes,
                                   gather_rows, plan_chunks, row_bytes, workspace)

_REF_CHUNK_ELEMENTS = 1 << 22  # the reference's float32 temporaries per chunk of rows (16 MB)


class TokenLogprobsOutput(NamedTuple):
    """``(logprobs, entropy)`` of :func:`token_logprobs` / :func:`linear_token_logprobs` with
    ``return_entropy=True``.

    Attributes:
        logprobs (Tensor): per-token ``log softmax(logits / temperature)[token]``, 0 at ignored
            positions; differentiable.
        entropy (Tensor): per-token entropy of that distribution, of the same shape and dtype, 0 at
            ignored positions; differentiable.

    Example::

        >>> logits, tokens = torch.randn(3, 10), torch.tensor([0, 4, -100])
        >>> out = celoss.token_logprobs(logits, tokens, return_entropy=True)
        >>> out.logprobs.shape, out.entropy.shape
        (torch.Size([3]), torch.Size([3]))
        >>> out.logprobs[2].item(), out.entropy[2].item()
        (0.0, 0.0)
    """
    logprobs: Tensor
    entropy: Tensor


# ------------------------------------------------------------------------------------------------
# Row kernels per backend: forward -> (N, 3) (log p_y, entropy, lse); backward -> dlogits
# ------------------------------------------------------------------------------------------------

def _reference_forward(logits: Tensor, tokens: Tensor, ignore_index: int, scale: float) -> Tensor:
    n, v = logits.shape
    out = torch.zeros(n, 3, dtype=accum_dtype(logits.dtype), device=logits.device)
    step = max(1, _REF_CHUNK_ELEMENTS // max(v, 1))
    for s in range(0, n, step):
        y = tokens[s:s + step]
        counted = y != ignore_index
        z = logits[s:s + step].to(out.dtype) * scale
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        a = z - lse
        p = a.exp()
        ent = -torch.where(p > 0, p * a, 0.0).sum(1)
        lp = a.gather(1, torch.where(counted, y, 0).unsqueeze(1)).squeeze(1)
        # a NaN, +inf or all -inf row: NaN everywhere (logsumexp alone gives +-inf there)
        bad = ~torch.isfinite(lse.squeeze(1))
        vals = torch.stack([lp, ent, lse.squeeze(1)], dim=1)
        vals = torch.where(bad.unsqueeze(1), math.nan, vals)
        out[s:s + step] = torch.where(counted.unsqueeze(1), vals, 0.0)
    return out


def _reference_backward(logits, tokens, lse, entropy, gl, gh, grad_out, ignore_index, scale) -> None:
    n, v = logits.shape
    acc = accum_dtype(logits.dtype)
    step = max(1, _REF_CHUNK_ELEMENTS // max(v, 1))
    for s in range(0, n, step):
        rows = slice(s, s + step)
        y = tokens[rows]
        counted = y != ignore_index
        a = logits[rows].to(acc) * scale - lse[rows].unsqueeze(1)  # log p
        p = a.exp()
        c = torch.zeros_like(lse[rows]) if gl is None else gl[rows]
        if gh is None:
            g = -p * c.unsqueeze(1)
        else:  # exactly 0 where p == 0 (0 * -inf would be NaN)
            g = torch.where(p == 0, 0.0, -p * (c + gh[rows] * entropy[rows]).unsqueeze(1)
                            - p * gh[rows].unsqueeze(1) * a)
        g.scatter_add_(1, torch.where(counted, y, 0).unsqueeze(1), c.unsqueeze(1))
        grad_out[rows] = torch.where(counted.unsqueeze(1), g * scale, 0.0).to(grad_out.dtype)


@functools.lru_cache(maxsize=1)
def _cpu_module():
    """``celoss.cpu._logprobs``, or None (after a warning, once) when the extension is missing."""
    try:
        from .cpu import _logprobs
        return _logprobs
    except ImportError as exc:
        warnings.warn(f"celoss: celoss.cpu._logprobs is unavailable ({type(exc).__name__}: {exc}); "
                      f"token_logprobs runs on the torch reference backend", RuntimeWarning, stacklevel=2)
        return None


def _kernel_of(backend: str, dtype: torch.dtype) -> str:
    """Which row kernel runs: "cython", "triton" or "torch" (the reference)."""
    if backend == "cython" and _cpu_module() is not None:
        return "cython"
    if backend == "triton" and dtype != torch.float64:  # float64: the reference, as for cross_entropy
        return "triton"
    return "torch"


def _unit_rows(x: Tensor) -> Tensor:
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _rows_forward(backend: str, logits: Tensor, tokens: Tensor, ignore_index: int, scale: float) -> Tensor:
    kernel = _kernel_of(backend, logits.dtype)
    if kernel == "torch":
        return _reference_forward(logits, tokens, ignore_index, scale)
    x = _unit_rows(logits)
    if kernel == "triton":
        from .kernels import logprobs as K
        return K.forward(x, tokens, ignore_index=ignore_index, scale=scale)
    n, v = x.shape
    out = torch.empty(n, 3, dtype=accum_dtype(x.dtype))
    _cpu_module().forward(DTYPE_CODE[x.dtype], n, v, x.data_ptr(), x.stride(0), tokens.data_ptr(),
                          ignore_index, scale, out.data_ptr(), torch.get_num_threads())
    return out


def _rows_backward(backend, logits, tokens, lse, entropy, gl, gh, grad_out, ignore_index, scale) -> None:
    """dlogits into ``grad_out`` (contiguous; may be ``logits`` itself: in place). ``gl``/``gh``:
    contiguous per-row upstream gradients in the accumulation dtype, or None (zeros)."""
    kernel = _kernel_of(backend, logits.dtype)
    if kernel == "torch":
        return _reference_backward(logits, tokens, lse, entropy, gl, gh, grad_out, ignore_index, scale)
    x = _unit_rows(logits)
    if kernel == "triton":
        from .kernels import logprobs as K
        return K.backward(x, tokens, lse, entropy, gl, gh, grad_out, ignore_index=ignore_index, scale=scale)
    n, v = x.shape

    def ptr(t):
        return 0 if t is None else t.data_ptr()
    _cpu_module().backward(DTYPE_CODE[x.dtype], n, v, x.data_ptr(), x.stride(0), grad_out.data_ptr(),
                           grad_out.stride(0), tokens.data_ptr(), ignore_index, scale, lse.data_ptr(),
                           ptr(entropy if gh is not None else None), ptr(gl), ptr(gh), torch.get_num_threads())


def _check_token_values(tokens: Tensor, vocab: int, ignore_index: int) -> None:
    """Token ids must be in [0, V) or equal ignore_index.

    On the CPU: IndexError naming the first bad token. On a device
    (:func:`celoss._checks.device_side`) the check is queued on the stream, as
    :func:`celoss._checks.target_indices` does (``torch._assert_async``: no host synchronisation,
    captured with a CUDA graph): a bad token fails with a device-side assert at the next
    synchronisation. The kernels never read out of bounds whatever the tokens (the row is NaN)."""
    if tokens.numel() == 0:
        return
    bad = ((tokens < 0) | (tokens >= vocab)) & (tokens != ignore_index)
    if _checks.device_side(tokens):
        torch._assert_async(~bad.any(), f"celoss: a token is out of range: token ids must be in [0, {vocab}) "
                                        f"(the vocabulary size) or equal ignore_index={ignore_index}")
        return
    if bool(bad.any()):
        raise IndexError(f"token {int(tokens[bad][0])} is out of range: token ids must be in [0, {vocab}) "
                         f"(the vocabulary size) or equal ignore_index={ignore_index}")


def _split(out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Three separate tensors (a custom op's outputs may not alias each other)."""
    return tuple(out[:, i].clone(memory_format=torch.contiguous_format) for i in range(3))


def _upstream(lse: Tensor, grad_lp: Optional[Tensor], grad_ent: Optional[Tensor]) -> tuple:
    """The per-row upstream gradients in the accumulation dtype (None: nothing flows there)."""
    return tuple(None if g is None else g.reshape(-1).to(lse.dtype).contiguous() for g in (grad_lp, grad_ent))


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

@_ops.custom_op("celoss::token_logprobs_forward", mutates_args=())
def _forward_op(logits: Tensor, tokens: Tensor, backend: str, ignore_index: int,
                scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (log p_y, entropy, lse) of (N, V) logits; 0 on ignored rows."""
    _check_token_values(tokens, logits.shape[1], ignore_index)
    return _split(_rows_forward(backend, logits, tokens, ignore_index, scale))


@_forward_op.register_fake
def _(logits, tokens, backend, ignore_index, scale):
    return tuple(logits.new_empty(logits.shape[0], dtype=accum_dtype(logits.dtype)) for _ in range(3))


@_ops.custom_op("celoss::token_logprobs_backward", mutates_args=())
def _backward_op(logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, grad_logprobs: Optional[Tensor],
                 grad_entropy: Optional[Tensor], backend: str, ignore_index: int, scale: float) -> Tensor:
    grad = fresh_like(logits)
    _rows_backward(backend, logits, tokens, lse, entropy, grad_logprobs, grad_entropy, grad, ignore_index, scale)
    return grad


@_backward_op.register_fake
def _(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, backend, ignore_index, scale):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


class _Rows(NamedTuple):
    """The processed (counted) output rows: ``tgt`` their tokens, ``proc`` their output positions
    (None: all, in order), ``src`` their rows of the flattened hidden states (None: the same)."""
    tgt: Tensor
    proc: Optional[Tensor]
    src: Optional[Tensor]


def _plan_rows(labels: Tensor, ignore_index: int, seq_len: int) -> _Rows:
    """Ignored rows are compacted away (never read, no matrix-product work); with ``shift``
    (``seq_len`` = T) output row r of a sequence reads hidden row r + r // (T - 1)."""
    n = labels.shape[0]
    counted = labels != ignore_index
    proc = None if bool(counted.all()) else counted.nonzero().squeeze(1)
    pos = proc if proc is not None or not seq_len else torch.arange(n, device=labels.device)
    src = pos + pos // (seq_len - 1) if seq_len and n else pos
    return _Rows(labels if proc is None else labels[proc], proc, src)


def _chunk_step(x: Tensor, linear_weight: Tensor, rows: _Rows, chunk_bytes: int, need_dw: bool = False):
    """(rows per chunk, chunks): an even split whose logits plus gathered rows (plus a float32 dW
    accumulator beyond 2 chunks, see linear CE's ``plan_chunks``) fit ``chunk_bytes``."""
    return plan_chunks(chunk_bytes, row_bytes(x, linear_weight.shape[0], 1), rows.tgt.shape[0],
                       dw_acc_bytes(linear_weight, need_dw))


def _chunk_logits(x: Tensor, linear_weight: Tensor, b: Optional[Tensor], rows: _Rows, step: int):
    """Per chunk of ``step`` processed rows [s, e): (s, e, sel, X_c, L = X_c W^T (+ b)), ``L`` a
    view of one reused buffer (from the CPU cache: no page faults of a fresh one every step),
    ``sel`` the chunk's hidden rows (a slice when they are one run)."""
    m = rows.tgt.shape[0]
    if not m:
        return
    buf = workspace((step, linear_weight.shape[0]), x.dtype, x.device)
    for s in range(0, m, step):
        e = min(m, s + step)
        sel = _contiguous_rows(rows.src, s, e)
        xc = gather_rows(x, sel)
        logits = buf[: e - s]
        if b is None:
            torch.mm(xc, linear_weight.t(), out=logits)
        else:
            torch.addmm(b, xc, linear_weight.t(), out=logits)
        yield s, e, sel, xc, logits


@_ops.custom_op("celoss::linear_token_logprobs_forward", mutates_args=())
def _linear_forward_op(x: Tensor, linear_weight: Tensor, b: Optional[Tensor], labels: Tensor, backend: str,
                       ignore_index: int, scale: float, seq_len: int,
                       chunk_bytes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-output-row (log p_y, entropy, lse) of ``x W^T + b`` (``seq_len``: shift's T, else 0)."""
    _check_token_values(labels, linear_weight.shape[0], ignore_index)
    rows = _plan_rows(labels, ignore_index, seq_len)
    out = torch.zeros(labels.shape[0], 3, dtype=accum_dtype(x.dtype), device=x.device)
    step, _ = _chunk_step(x, linear_weight, rows, chunk_bytes)
    for s, e, _, _, logits in _chunk_logits(x, linear_weight, b, rows, step):
        vals = _rows_forward(backend, logits, rows.tgt[s:e], ignore_index, scale)
        if rows.proc is None:
            out[s:e] = vals
        else:
            out.index_copy_(0, rows.proc[s:e], vals)
    return _split(out)


@_linear_forward_op.register_fake
def _(x, linear_weight, b, labels, backend, ignore_index, scale, seq_len, chunk_bytes):
    return tuple(x.new_empty(labels.shape[0], dtype=accum_dtype(x.dtype)) for _ in range(3))


@_ops.custom_op("celoss::linear_token_logprobs_backward", mutates_args=())
def _linear_backward_op(x: Tensor, linear_weight: Tensor, b: Optional[Tensor], labels: Tensor, lse: Tensor, entropy: Tensor,
                        grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor], need_dx: bool,
                        need_dw: bool, need_db: bool, backend: str, ignore_index: int, scale: float,
                        seq_len: int, chunk_bytes: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) by recomputing the logits chunk by chunk, overwritten in place by dlogits, then
    accumulated by linear CE's :class:`GradSink` (``dX_c = dz W``, ``dW += dz^T X_c`` float32
    across chunks for fp16/bf16, one product in the weight's dtype when there is one chunk,
    ``db += sum dz``; the gradients from the CPU cache), empty where not asked for."""
    rows = _plan_rows(labels, ignore_index, seq_len)
    m = rows.tgt.shape[0]
    per_row = [t if t is None or rows.proc is None else t[rows.proc]
               for t in (lse, entropy, grad_logprobs, grad_entropy)]
    step, chunks = _chunk_step(x, linear_weight, rows, chunk_bytes, need_dw)
    sink = GradSink(x, linear_weight, b, (need_dx, need_dw, need_db), m,
                    every_row=rows.src is None and m == x.shape[0], chunks=chunks)
    for s, e, sel, xc, g in _chunk_logits(x, linear_weight, b, rows, step):
        _rows_backward(backend, g, rows.tgt[s:e], *(None if t is None else t[s:e] for t in per_row), g,
                       ignore_index, scale)
        sink.add(g, sel, xc, first=s == 0)
    return tuple(x.new_empty(0) if g is None else g for g in sink.grads())


@_linear_backward_op.register_fake
def _(x, linear_weight, b, labels, lse, entropy, grad_logprobs, grad_entropy, need_dx, need_dw, need_db, *plan):
    return tuple(torch.empty_like(t) if n and t is not None else x.new_empty(0)
                 for t, n in zip((x, linear_weight, b), (need_dx, need_dw, need_db)))


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------

def _forward_done(ctx, lp: Tensor, ent: Tensor, lse: Tensor, entropy: bool, inputs: Optional[tuple]):
    """Saves ``inputs`` (None: no gradient will be asked for) with lse and entropy for
    :func:`_backward`; the entropy output is differentiable only when it was asked for."""
    if inputs is not None:
        ctx.save_for_backward(*inputs, lse, ent)
    if not entropy:
        ctx.mark_non_differentiable(ent)
    return lp, ent


def _backward(ctx, grad_lp, grad_ent, grads_of) -> tuple:
    """``grads_of(*inputs, lse, entropy, grad_logprobs, grad_entropy)`` -> the input gradients."""
    if grad_lp is None and grad_ent is None:  # (grad_ent is None without return_entropy)
        return input_grads(ctx)
    *inputs, lse, ent = ctx.saved_tensors
    return input_grads(ctx, *grads_of(*inputs, lse, ent, *_upstream(lse, grad_lp, grad_ent)))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, backend, ignore_index, scale, entropy):
        ctx.set_materialize_grads(False)
        ctx.plan = (backend, ignore_index, scale)
        lp, ent, lse = _forward_op(logits, tokens, *ctx.plan)
        return _forward_done(ctx, lp, ent, lse, entropy, (logits, tokens))

    @staticmethod
    @once_differentiable("celoss.token_logprobs")
    def backward(ctx, grad_lp, grad_ent):
        return _backward(ctx, grad_lp, grad_ent, lambda *args: (_backward_op(*args, *ctx.plan),))


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, linear_weight, b, labels, entropy, grad_enabled, *plan):
        ctx.set_materialize_grads(False)
        ctx.plan = plan
        ctx.need = tuple(bool(grad_enabled and n) for n in ctx.needs_input_grad[:3])
        lp, ent, lse = _linear_forward_op(x, linear_weight, b, labels, *plan)
        return _forward_done(ctx, lp, ent, lse, entropy, (x, linear_weight, b, labels) if any(ctx.need) else None)

    @staticmethod
    @once_differentiable("celoss.linear_token_logprobs")
    def backward(ctx, grad_lp, grad_ent):
        def grads_of(*args):
            grads = _linear_backward_op(*args, *ctx.need, *ctx.plan)
            return tuple(g if n else None for g, n in zip(grads, ctx.need))
        return _backward(ctx, grad_lp, grad_ent, grads_of)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def _check_tokens(tokens, expected_shape: tuple, like: Tensor, what: str) -> Tensor:
    """Integer token ids of ``expected_shape`` on ``like``'s device, as int64."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must hold integer token ids (e.g. torch.long), got {tokens.dtype}")
    if tokens.device != like.device:
        raise ValueError(f"tokens is on {tokens.device} but {what} is on {like.device}")
    if tuple(tokens.shape) != expected_shape:
        raise ValueError(f"expected tokens of shape {expected_shape} for {what} of shape {tuple(like.shape)}, "
                         f"got {tuple(tokens.shape)}")
    return tokens.to(torch.int64)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return t


def _result(lp: Tensor, ent: Tensor, shape: tuple, return_entropy: bool):
    lp = lp.reshape(shape)
    return TokenLogprobsOutput(lp, ent.reshape(shape)) if return_entropy else lp


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                   return_entropy: bool = False, backend: Optional[str] = None):
    """Per-token log-probabilities ``log softmax(logits / temperature)[..., token]``, and optionally
    the per-token entropy of that distribution.

    The class dimension is LAST (the RL convention, unlike ``cross_entropy``). The entropy is
    ``-sum_j p_j log p_j = lse - sum_j p_j z_j`` with ``z = logits / temperature`` (``0 log 0 = 0``:
    -inf logits, e.g. a masked vocabulary, add nothing).

    Equals ``log_softmax(z, -1).gather(-1, tokens[..., None])[..., 0]`` (and the entropy from
    that ``log_softmax``), with ignored positions masked out before the softmax: their outputs are
    0 and their logits get a zero gradient whatever they hold. A row with a NaN, a +inf or only
    -inf logits gives NaN, as ``log_softmax`` does. Gradients flow from both outputs with any
    upstream gradients (log-probs times advantages plus an entropy bonus), in the logits' dtype;
    differentiable once (double backward raises).

    One pass over each row (running max, sum of exps and sum of exps times z) and one more in
    backward; no probability tensor is materialized. Out-of-range tokens raise IndexError naming
    the value.

    Args:
        logits (Tensor): ``(..., V)``, float32/float16/bfloat16/float64.
        tokens (Tensor): integer ids in [0, V) or ``ignore_index``, of shape ``logits.shape[:-1]``.
        temperature (float, keyword-only): divides the logits, finite and > 0. Default: 1.0
        ignore_index (int, keyword-only): token value whose outputs are 0. Default: -100
        return_entropy (bool, keyword-only): also return the entropy. Default: False
        backend (str, optional, keyword-only): ``"triton"`` (CUDA; float64 runs the reference),
            ``"cython"`` (CPU OpenMP kernel), ``"torch"`` (plain PyTorch, any device) or None
            (auto). Default: None

    Shape:
        - Logits: ``(..., V)`` (at least 1 dimension).
        - Tokens: ``(...)``.
        - Output: ``(...)``, the tokens' shape (both fields with ``return_entropy``).

    Returns:
        Tensor: the log-probabilities, float32 for float32/float16/bfloat16 logits (RL code compares
        log-probabilities in float32; the row statistics accumulate in float32 whatever the input)
        and float64 for float64 logits. With ``return_entropy=True``: a
        :class:`TokenLogprobsOutput` ``(logprobs, entropy)`` of that dtype.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> logits = torch.randn(2, 6, 50, requires_grad=True)   # (B, T, V)
        >>> tokens = torch.randint(0, 50, (2, 6))
        >>> lp, ent = celoss.token_logprobs(logits, tokens, temperature=0.7, return_entropy=True)
        >>> ref = (logits / 0.7).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        >>> torch.allclose(lp, ref, atol=1e-6)
        True
        >>> advantages = torch.randn(2, 6)
        >>> (-(lp * advantages).mean() - 0.01 * ent.mean()).backward()
        >>> logits.grad.shape
        torch.Size([2, 6, 50])
    """
    _checks.floating("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits must have at least 1 dimension (the vocabulary, last)")
    shape = tuple(logits.shape[:-1])
    tokens = _check_tokens(tokens, shape, logits, "logits")
    scale = 1.0 / _check_temperature(temperature)
    ignore_index = _checks.index_value("ignore_index", ignore_index)
    name = _dispatch.resolve(logits.device, backend)
    x2d = logits.reshape(math.prod(shape), logits.shape[-1])
    lp, ent = _TokenLogprobs.apply(x2d, tokens.reshape(-1).contiguous(), name, ignore_index, scale,
                                   bool(return_entropy))
    return _result(lp, ent, shape, return_entropy)


def linear_token_logprobs(input: Tensor, linear_weight: Tensor, tokens: Tensor, *,
                          linear_bias: Optional[Tensor] = None, temperature: float = 1.0, ignore_index: int = -100,
                          shift: bool = False, return_entropy: bool = False, chunk_bytes: Optional[int] = None,
                          backend: Optional[str] = None):
    """:func:`token_logprobs` of ``input @ linear_weight.T + linear_bias`` without the N x V logits.

    Same outputs, dtypes and edge cases as :func:`token_logprobs` applied to
    ``F.linear(input, linear_weight, linear_bias)``; gradients for ``input``, ``linear_weight``
    and ``linear_bias`` (in their dtypes; for fp16/bf16 the weight's summed in place over up to 2
    chunks, in float32 over more).

    The rows are processed in chunks (as ``linear_cross_entropy``'s chunked engine): per chunk one
    matrix product forms its logits into a workspace of at most ``chunk_bytes``, the backend's row
    kernel reads them once; backward recomputes each chunk's logits, overwrites them with dlogits
    and accumulates ``dX = dz W``, ``dW += dz^T X``, ``db += sum dz`` by matrix products. Ignored
    positions cost no matrix-product work. Rows are split evenly across the chunks; the chunk
    buffer and the returned gradients are recycled through celoss's CPU cache (see
    :func:`celoss.cpu_cache_bytes`), so peak memory is the returned gradients plus the workspace
    (plus, for fp16/bf16 with more than 2 chunks, dW's float32 accumulator, counted in ``chunk_bytes``
    as far as it leaves half of it; up to 2 chunks a 16-bit dW is summed in place).

    Cost: 4 products of ``N x V x D`` (forward ``X W^T``; backward ``X W^T`` again, ``dz W``,
    ``dz^T X``), against the 3 of the eager composition, which keeps its N x V logits for backward.
    The fourth is the price of the memory bound, not an inefficiency: ``dz = g_lp (onehot - p) -
    g_H p (log p + H)`` needs each row's upstream gradients ``g_lp``, ``g_H``, unknown in forward
    (a PPO loss multiplies by advantages afterwards), so backward needs ``p`` again: stored it is
    N x V; folding ``(onehot - p) W`` and ``p (log p + H) W`` into forward gives dX without it but
    costs two products there, and dW still needs ``p``. So fwd+bwd is at best about 4/3 of the
    bare products ``X W^T``, ``G W``, ``G^T X`` (the ``matmuls`` row of ``python -m benchmarks
    logprobs``, whose outputs are fresh allocations). Measured with N=4096, D=1024, V=32000 on 2
    shared CPU cores (runs vary by a third there): 1.0-1.36x in float32, 1.0-1.6x in bfloat16.

    Args:
        input (Tensor): hidden states ``(..., D)``, float32/float16/bfloat16/float64.
        linear_weight (Tensor): ``(V, D)``, in ``input``'s dtype.
        tokens (Tensor): integer ids in [0, V) or ``ignore_index``, of shape ``input.shape[:-1]``.
        linear_bias (Tensor, optional, keyword-only): ``(V)``, in ``input``'s dtype. Default: None
        temperature (float, keyword-only): divides the logits, finite and > 0. Default: 1.0
        ignore_index (int, keyword-only): token value whose outputs are 0. Default: -100
        shift (bool, keyword-only): next-token scoring on ``input (..., T, D)`` /
            ``tokens (..., T)``, as in :func:`celoss.linear_cross_entropy`: position t is scored
            against token t + 1 and the last position is dropped, by index arithmetic (no copy).
            Default: False
        return_entropy (bool, keyword-only): also return the entropy. Default: False
        chunk_bytes (int, optional, keyword-only): bound of the logits workspace; None: 256 MB, and
            at most half of the whole workspace from 1024 rows on. At least one row is processed
            per chunk. Default: None
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None
            (automatic), as in :func:`token_logprobs`. Default: None

    Shape:
        - Input: ``(..., D)``; with ``shift``, ``(..., T, D)`` (at least 3 dimensions).
        - Linear_weight: ``(V, D)``; linear_bias: ``(V)``.
        - Tokens: ``input.shape[:-1]``.
        - Output: ``input.shape[:-1]``; with ``shift``, ``(..., T - 1)``.

    Returns:
        Tensor: the log-probabilities (float32, float64 for float64 input), or with
        ``return_entropy=True`` a :class:`TokenLogprobsOutput` ``(logprobs, entropy)``.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> hidden = torch.randn(2, 8, 32, requires_grad=True)   # (B, T, D)
        >>> lm_head = torch.randn(100, 32)                        # (V, D)
        >>> tokens = torch.randint(0, 100, (2, 8))
        >>> lp = celoss.linear_token_logprobs(hidden, lm_head, tokens, shift=True)
        >>> lp.shape
        torch.Size([2, 7])
        >>> ref = (hidden[:, :-1] @ lm_head.T).log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        >>> torch.allclose(lp, ref, atol=1e-4)
        True
        >>> lp.sum().backward()
    """
    _checks.floating("input", input)
    shape_in = tuple(input.shape[:-1]) if input.dim() else ()
    tokens = _check_tokens(tokens, shape_in, input, "input")
    _check_args(input, linear_weight, tokens, linear_bias, shift)
    scale = 1.0 / _check_temperature(temperature)
    ignore_index = _checks.index_value("ignore_index", ignore_index)
    if chunk_bytes is not None and int(chunk_bytes) <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    name = _dispatch.resolve(input.device, backend)
    labels, seq_len = (tokens[..., 1:], tokens.shape[-1]) if shift else (tokens, 0)
    shape = tuple(labels.shape)
    x2d = input.flatten(0, -2) if input.dim() > 1 else input.unsqueeze(0)
    chunk_bytes = (default_chunk_bytes(x2d.shape[0], row_bytes(x2d, linear_weight.shape[0], 1))
                   if chunk_bytes is None else int(chunk_bytes))
    lp, ent = _LinearTokenLogprobs.apply(x2d, linear_weight, linear_bias, labels.reshape(-1).contiguous(),
                                         bool(return_entropy), torch.is_grad_enabled(), name, ignore_index,
                                         scale, seq_len, chunk_bytes)
    return _result(lp, ent, shape, return_entropy)
