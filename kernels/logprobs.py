"""Triton row kernels for token log-probabilities and entropy (``celoss.token_logprobs``).

Math, per row (x the logits, T the temperature, z = x / T, p = softmax(z), y the token):

* Forward, one pass over the row in blocks with three running statistics, all in float32:
  ``m = max_j z_j``, ``s = sum_j e^(z_j - m)`` and ``u = sum_j e^(z_j - m) (z_j - m)``
  (a -inf logit adds 0 to ``u``: 0 log 0 = 0). When a block raises the max from ``m`` to ``m'``,
  with ``r = e^(m - m')``: ``s <- r s``, ``u <- r (u + (m - m') s)`` (``u`` is kept relative to the
  running max, so the entropy does not cancel against a large ``|m|``); partial statistics of
  blocks, chunks or vocabulary shards merge the same way. Then
  ``lse = m + log s``, ``log p_y = (z_y - m) - log s`` and the entropy
  ``H = -sum_j p_j log p_j = lse - sum_j p_j z_j = log s - u / s``.
* Backward, from the saved ``lse`` and ``H`` and the upstream gradients ``gl`` (of log p_y) and
  ``gh`` (of H), with ``a_j = z_j - lse = log p_j``:
  ``d log p_y / dz_j = [j == y] - p_j``;
  ``dH/dz_j = -d/dz_j sum_k p_k a_k = -sum_k p_k ([k == j] - p_j) a_k - sum_k p_k ([k == j] - p_j)
  = -p_j (a_j + H)`` (the second sum is 0), so
  ``dz_j = gl [j == y] - p_j (gl + gh (a_j + H))`` and ``dx_j = dz_j / T``. Where ``p_j == 0``
  the second term is exactly 0 (a -inf logit would make ``p_j a_j`` NaN).

Rows with a NaN, a +inf z or only -inf logits get NaN log p, H, lse and gradient (as
``torch.log_softmax``). Ignored rows (``y == ignore_index``) are never read: log p = H = 0 and a
zero gradient. The same formulas are in ``cpu/logprobs.h`` (CPU) and ``celoss/logprobs.py``
(reference). No ``tl.dot``: the kernels run (and are tested) in bf16 under the interpreter.

Launchers (``forward``, ``backward``) take (N, V) logits with unit class stride (fp32, fp16,
bf16), int64 tokens, and float32 per-row vectors; they check nothing else.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import SUPPORTED_DTYPES, check_rows, launch, with_flags  # noqa: F401 (SUPPORTED_DTYPES: API)
from ._tl import safe_shift
from .cross_entropy import MAXNREG, block_config


@triton.jit
def _logprobs_fwd_kernel(x_ptr, stride_x, y_ptr, out_ptr, C, ignore_index, scale,
                         BLOCK: tl.constexpr):
    """out[row] = (log p_y, H, lse) of one row (program_id(0) = row)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y = tl.load(y_ptr + row)
    counted = y != ignore_index
    in_range = (y >= 0) & (y < C)  # the host checks; never read out of bounds regardless
    n_read = tl.where(counted & in_range, C, 0)  # ignored rows: read nothing
    m = -float("inf")
    s = 0.0
    u = 0.0
    nan = 0
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_read
        z = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * scale
        nan = nan | tl.max((z != z).to(tl.int32), axis=0)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = safe_shift(m_new)
        d = z - m_safe
        e = tl.exp(d)
        r = tl.exp(m - m_safe)
        u = r * (u + tl.where(s > 0, (m - m_safe) * s, 0.0)) + tl.sum(tl.where(e > 0, e * d, 0.0), axis=0)
        s = r * s + tl.sum(e, axis=0)
        m = m_new
    y_safe = tl.where(counted & in_range, y, 0)
    z_y = tl.load(x_row + y_safe, mask=n_read > 0, other=0.0).to(tl.float32) * scale
    log_s = tl.log(s)
    bad = (nan != 0) | (tl.abs(m) == float("inf")) | (y < 0) | (y >= C)
    lp = tl.where(bad, float("nan"), (z_y - m) - log_s)
    h = tl.where(bad, float("nan"), log_s - u / s)
    lse = tl.where(bad, float("nan"), m + log_s)
    tl.store(out_ptr + 3 * row, tl.where(counted, lp, 0.0))
    tl.store(out_ptr + 3 * row + 1, tl.where(counted, h, 0.0))
    tl.store(out_ptr + 3 * row + 2, tl.where(counted, lse, 0.0))


@triton.jit
def _logprobs_bwd_kernel(x_ptr, stride_x, g_ptr, stride_g, y_ptr, lse_ptr, h_ptr, gl_ptr, gh_ptr,
                         C, ignore_index, scale, BLOCK: tl.constexpr, HAS_GL: tl.constexpr,
                         HAS_ENTROPY: tl.constexpr):
    """dx of one row into g (which may alias x: each block is read before it is written)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    g_row = g_ptr + row * stride_g
    y = tl.load(y_ptr + row)
    counted = y != ignore_index
    n_read = tl.where(counted, C, 0)
    lse = tl.where(counted, tl.load(lse_ptr + row), 0.0)  # NaN for NaN rows: the gradient follows
    gl = 0.0
    if HAS_GL:
        gl = tl.where(counted, tl.load(gl_ptr + row).to(tl.float32), 0.0)
    gh = 0.0
    h = 0.0
    if HAS_ENTROPY:
        gh = tl.where(counted, tl.load(gh_ptr + row).to(tl.float32), 0.0)
        h = tl.where(counted, tl.load(h_ptr + row), 0.0)
    c = gl + gh * h
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        z = tl.load(x_row + cols, mask=cols < n_read, other=0.0).to(tl.float32) * scale
        a = z - lse
        p = tl.exp(a)
        if HAS_ENTROPY:
            g = tl.where(p == 0.0, 0.0, -p * (c + gh * a))
        else:
            g = -p * c
        g = tl.where(cols == y, g + gl, g) * scale
        g = tl.where(counted, g, 0.0)
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


def forward_plan(logits, tokens, *, ignore_index: int, scale: float):
    """Kernel, grid, keyword arguments, launch options and the (N, 3) output of :func:`forward`."""
    check_rows(logits, "logits", "token log-prob", "V")
    n, c = logits.shape
    out = torch.empty(n, 3, dtype=torch.float32, device=logits.device)
    block, num_warps = block_config(c)
    kwargs = dict(x_ptr=logits, stride_x=logits.stride(0), y_ptr=tokens, out_ptr=out, C=c,
                  ignore_index=int(ignore_index), scale=float(scale), BLOCK=block)
    return _logprobs_fwd_kernel, (n,), kwargs, dict(num_warps=num_warps, maxnreg=MAXNREG), out


def backward_plan(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, grad_out, *, ignore_index: int,
                  scale: float):
    check_rows(logits, "logits", "token log-prob", "V")
    n, c = logits.shape
    assert grad_out.shape[1] <= 1 or grad_out.stride(1) == 1
    block, num_warps = block_config(c)
    has_h = grad_entropy is not None
    kwargs = with_flags(dict(
        x_ptr=logits, stride_x=logits.stride(0), g_ptr=grad_out, stride_g=grad_out.stride(0), y_ptr=tokens,
        lse_ptr=lse, h_ptr=entropy if has_h else None, gl_ptr=grad_logprobs, gh_ptr=grad_entropy, C=c,
        ignore_index=int(ignore_index), scale=float(scale), BLOCK=block,
    ), HAS_GL="gl_ptr", HAS_ENTROPY="gh_ptr")
    return _logprobs_bwd_kernel, (n,), kwargs, dict(num_warps=num_warps, maxnreg=MAXNREG), grad_out


def forward(logits: torch.Tensor, tokens: torch.Tensor, *, ignore_index: int, scale: float) -> torch.Tensor:
    """(N, 3) float32: per row (log p_y, entropy, lse); ignored rows 0."""
    return launch(forward_plan(logits, tokens, ignore_index=ignore_index, scale=scale))


def backward(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, grad_out, *, ignore_index: int,
             scale: float) -> None:
    """dlogits into ``grad_out`` (unit class stride; may be ``logits``). ``grad_logprobs`` /
    ``grad_entropy``: float32 per-row upstream gradients or None (zeros); ``entropy`` is needed
    with ``grad_entropy``."""
    launch(backward_plan(logits, tokens, lse, entropy, grad_logprobs, grad_entropy, grad_out,
                         ignore_index=ignore_index, scale=scale))
