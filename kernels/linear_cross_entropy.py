"""Triton kernels for fused linear cross-entropy: the loss of ``X W^T (+ b)`` without N x V logits.

The rows processed are a list of ``M`` rows of the hidden states ``X`` (``(N_in, D)``, any
strides), given by an optional int64 row map ``src`` (compacted counted rows, next-token shift:
index arithmetic done by the caller, no copy of ``X``) and their int64 targets ``tgt``. The
classifier ``W`` (``linear_weight``) is ``(V, D)`` (any strides), ``b`` an optional ``(V,)`` bias;
``weight`` is always the class weights. Logit tiles are
``tl.dot`` products accumulated in float32; nothing of size M x V is ever written to memory.

Kernels
-------
``_lce_stats_kernel``  grid (row blocks, vocabulary splits). Each program walks the vocabulary
                       blocks of its split, computing a ``BLOCK_M x BLOCK_V`` logit tile per block
                       (loop over D), transforming it (logit_scale, softcap) and folding it into
                       per-row online statistics ``(max, sumexp, target_z, weighted_z)``
                       (:mod:`celoss.backends`). Writes ``(n_splits, M, 4)`` partial statistics,
                       merged by the caller with :func:`celoss.stats.merge_all`, and turned into
                       the loss / lse / gradient coefficients by :func:`celoss.stats.coefficients`.
``_lce_dx_kernel``     grid (row blocks x D blocks). Each program owns a ``BLOCK_M x BLOCK_N``
                       block of dX and walks the whole vocabulary (see "Backward" below).
``_lce_dw_kernel``     grid (vocabulary blocks x D blocks). Each program owns a ``BLOCK_V x BLOCK_N``
                       block of dW (and, for the first D block, those classes' db) and walks all rows.

Backward
--------
With ``z = transform(X[src] W^T + b)`` (logit_scale, softcap), ``p = exp(z - lse)`` and the row
coefficients ``(A, B, D)`` (already multiplied by the upstream gradient; the returned-lse gradient
is folded into A; see :mod:`celoss.backends`), the gradient of the logits is::

    G_nj = dz_nj/dx_nj * (A_n p_nj - B_n [j == y_n] - D_n w_j)
    dX[src] = G W,   dW = G^T X[src],   db = sum_n G_n

the target element evaluated as ``(A - B) p_y + B expm1(z_y - lse) - D w_y`` (no ``1 - p_y``
cancellation as ``p_y -> 1``). G is never stored: both kernels recompute its tiles from X and W
(:func:`_grad_tile`), and each program accumulates the block of dX or dW it owns in registers over
the whole vocabulary (dX) or all rows (dW), then adds it to the output once: no atomics, no
contention, bit-reproducible results. The price is FLOPs: a G tile costs the full-D product
``2 BLOCK_M BLOCK_V D`` while a program only uses it for ``BLOCK_N`` columns of D, so the logits
are recomputed ``ceil(D / BLOCK_N)`` times in each kernel; the backward costs about
``2 + ceil(D / BLOCK_N_dx) + ceil(D / BLOCK_N_dw)`` GEMMs of ``M x V x D`` (4 when D fits one
block; 38 at D = 2304 with the 16-bit tiles below, whose BLOCK_N = 128 the register budget caps)
against 3 for a kernel that forms each tile once and accumulates with atomics. This engine
is the smallest-memory option (no logits, not even a chunk); the chunked engine of
:mod:`celoss.linear_cross_entropy` (cuBLAS products on a bounded logits chunk) is the fast one.

Gradient filtering (``FILTER``): a G tile whose every ``|A p - B onehot - D w|`` is at most the
row's threshold (``eps`` times the row's upstream scale, so the test is on the unscaled
``|softmax - onehot|`` of Cut Cross-Entropy; never a tile holding a NaN) is skipped by the kernel
that formed it (each kernel decides on its own tiles).

All offsets along rows and vocabulary entries are int64. fp32 inputs use IEEE fp32 ``tl.dot``
(no TF32, matching PyTorch's default), fp16/bf16 inputs use tensor-core dots with fp32
accumulation; the gradient tile is rounded to the input dtype only as the operand of the dX/dW
products (after division by the largest per-row upstream scale, so that a mean over many rows
does not underflow fp16), whose accumulators are float32.

Launchers (``stats``, ``backward``) are thin: ``stats_plan`` / ``backward_plans`` plus
:func:`kernels._host.launch`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._host import SUPPORTED_DTYPES, f32, launch, softcap_args, with_flags
from ._tl import class_weight, expm1, safe_shift, transform


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Launch configurations: (dtype class, alignment) -> tile sizes and warps. "aligned" means every
# pointer is 16-byte aligned, every non-unit stride and D are multiples of 16 elements (Triton then
# vectorizes the loads); anything else gets smaller tiles, since element-wise int64 addresses of a
# row-gathered tile cost registers. Chosen so that no kernel variant spills on sm_80 / sm_90
# (tests/kernels/test_linear_cross_entropy_aot.py compiles every one). Under the interpreter,
# small tiles keep the numpy emulation fast on the small test shapes.
STATS_CONFIGS = {
    ("lowp", True): dict(BLOCK_M=128, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=3),
    ("lowp", False): dict(BLOCK_M=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2),
    ("fp32", True): dict(BLOCK_M=64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3),
    ("fp32", False): dict(BLOCK_M=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2),
}
# Backward, per kernel: BLOCK_M x BLOCK_V gradient tiles (the logits recomputed over D in BLOCK_D
# steps), BLOCK_N the D columns a program owns (backward_configs narrows it for a small D). The
# epilogue forming a gradient tile (softcap, smoothing, filter) keeps several fp32 tiles live: the
# largest tiles that compile without spills on sm_80 and sm_90 with every flag on (measured with
# tests/kernels/aot.py; 128 x 128 gradient tiles spill there).
BACKWARD_CONFIGS = {
    ("dx", "lowp", True): dict(BLOCK_M=64, BLOCK_V=128, BLOCK_D=64, BLOCK_N=128, num_warps=8, num_stages=3),
    ("dw", "lowp", True): dict(BLOCK_M=128, BLOCK_V=64, BLOCK_D=64, BLOCK_N=128, num_warps=8, num_stages=3),
    ("dx", "lowp", False): dict(BLOCK_M=64, BLOCK_V=64, BLOCK_D=32, BLOCK_N=64, num_warps=8, num_stages=2),
    ("dw", "lowp", False): dict(BLOCK_M=64, BLOCK_V=64, BLOCK_D=32, BLOCK_N=64, num_warps=8, num_stages=2),
    ("dx", "fp32", True): dict(BLOCK_M=64, BLOCK_V=64, BLOCK_D=32, BLOCK_N=64, num_warps=8, num_stages=3),
    ("dw", "fp32", True): dict(BLOCK_M=32, BLOCK_V=32, BLOCK_D=16, BLOCK_N=32, num_warps=4, num_stages=2),
    ("dx", "fp32", False): dict(BLOCK_M=32, BLOCK_V=32, BLOCK_D=32, BLOCK_N=64, num_warps=8, num_stages=2),
    ("dw", "fp32", False): dict(BLOCK_M=32, BLOCK_V=32, BLOCK_D=32, BLOCK_N=16, num_warps=4, num_stages=2),
}
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_D=16, BLOCK_N=32, num_warps=4, num_stages=1)


def _aligned(*tensors) -> bool:
    """All given tensors 16-byte aligned with unit inner stride and 16-element-multiple row
    strides and widths (what Triton's divisibility specialization looks at)."""
    for t in tensors:
        if t is None:
            continue
        if t.data_ptr() % 16:
            return False
        if t.dim() == 2 and (t.stride(1) != 1 or t.stride(0) % 16 or t.shape[1] % 16):
            return False
    return True


def stats_config(dtype: torch.dtype, aligned: bool = True) -> dict:
    if _interpreting():
        return dict(INTERPRETER_CONFIG)
    return dict(STATS_CONFIGS["fp32" if dtype == torch.float32 else "lowp", bool(aligned)])


def backward_configs(dtype: torch.dtype, d: int, aligned: bool = True) -> dict:
    """``{"dx": tiles, "dw": tiles}`` of the backward kernels for inputs of ``dtype`` and width
    ``d``: the table's, keyed on (dtype, alignment), with BLOCK_N narrowed to cover a small D in one
    block (no padded columns computed)."""
    out = {}
    for kernel in ("dx", "dw"):
        cfg = dict(INTERPRETER_CONFIG if _interpreting() else
                   BACKWARD_CONFIGS[kernel, "fp32" if dtype == torch.float32 else "lowp", bool(aligned)])
        cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], triton.next_power_of_2(max(d, 1))))
        out[kernel] = cfg
    return out


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _row_block(pid_m, M, src_ptr, tgt_ptr, BLOCK_M: tl.constexpr, HAS_SRC: tl.constexpr):
    """The rows of block ``pid_m``: indices, mask, the hidden-state row each reads (``src``, for
    a shift without a copy) and its target (-1 past the end)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    if HAS_SRC:
        src = tl.load(src_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    y = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    return rows, row_mask, src, y


@triton.jit
def _logit_tile(x_ptr, stride_xn, stride_xd, lw_ptr, stride_lwv, stride_lwd, b_ptr, src, row_mask,
                cols, col_mask, D, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """float32 (BLOCK_M, BLOCK_V) tile of X[src] W[cols]^T (+ b[cols]); 0 on masked lanes."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    x_rows = x_ptr + src[:, None] * stride_xn
    w_cols = lw_ptr + cols.to(tl.int64)[None, :] * stride_lwv
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        k_mask = ks < D
        xt = tl.load(x_rows + ks[None, :] * stride_xd, mask=row_mask[:, None] & k_mask[None, :],
                     other=0.0)
        wt = tl.load(w_cols + ks[:, None] * stride_lwd, mask=k_mask[:, None] & col_mask[None, :],
                     other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lce_stats_kernel(
    x_ptr, stride_xn, stride_xd, src_ptr, lw_ptr, stride_lwv, stride_lwd, b_ptr, tgt_ptr, weight_ptr,
    out_ptr, M, V, D, blocks_per_split, scale, softcap, inv_softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SRC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, NEED_WZ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partial row statistics of the vocabulary split ``program_id(1)`` for a block of rows.

    out[split, row] = (max_j z, sum_j exp(z - max), z_y if y in the split else 0,
    sum_j w_j z_j if NEED_WZ else 0) over the split's columns j, z = transformed logits.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows, row_mask, src, y = _row_block(pid_m, M, src_ptr, tgt_ptr, BLOCK_M, HAS_SRC)

    m_i = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    wz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_begin = pid_s.to(tl.int64) * blocks_per_split * BLOCK_V
    for vb in range(0, blocks_per_split):
        cols = v_begin + vb * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        acc = _logit_tile(x_ptr, stride_xn, stride_xd, lw_ptr, stride_lwv, stride_lwd, b_ptr, src,
                          row_mask, cols, col_mask, D, BLOCK_M, BLOCK_V, BLOCK_D, HAS_BIAS,
                          DOT_PRECISION)
        z, _ = transform(acc, scale, softcap, inv_softcap, HAS_SOFTCAP)
        zm = tl.where(col_mask[None, :], z, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(zm, axis=1))
        m_safe = safe_shift(m_new)
        s_i = s_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(zm - m_safe[:, None]), axis=1)
        m_i = m_new
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        if NEED_WZ:
            wz += tl.sum(z * class_weight(weight_ptr, cols, col_mask, HAS_WEIGHT)[None, :], axis=1)
    o = out_ptr + (pid_s.to(tl.int64) * M + rows.to(tl.int64)) * 4
    tl.store(o, m_i, mask=row_mask)
    tl.store(o + 1, s_i, mask=row_mask)
    tl.store(o + 2, zy, mask=row_mask)
    tl.store(o + 3, wz, mask=row_mask)


@triton.jit
def _row_coefs(rows, row_mask, lse_ptr, row_coefs_ptr, thr_ptr, HAS_D: tl.constexpr, FILTER: tl.constexpr):
    """Per-row backward inputs of a row block: lse, (A, B, D) and the filter threshold."""
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    c_ptr = row_coefs_ptr + rows.to(tl.int64) * 3
    a = tl.load(c_ptr, mask=row_mask, other=0.0).to(tl.float32)
    b = tl.load(c_ptr + 1, mask=row_mask, other=0.0).to(tl.float32)
    d = tl.zeros_like(a)
    if HAS_D:
        d = tl.load(c_ptr + 2, mask=row_mask, other=0.0).to(tl.float32)
    thr = a  # unused without FILTER
    if FILTER:
        thr = tl.load(thr_ptr + rows, mask=row_mask, other=float("inf"))
    return lse, a, b, d, thr


@triton.jit
def _grad_tile(x_ptr, stride_xn, stride_xd, lw_ptr, stride_lwv, stride_lwd, b_ptr, weight_ptr, src, y, row_mask,
               cols, col_mask, lse, a, b, d, thr, D, scale, softcap, inv_softcap,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_D: tl.constexpr, FILTER: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """The float32 gradient tile ``dloss/dx_nj`` of rows x cols (0 on masked lanes), recomputed from
    the logits, and whether it is kept (``FILTER``: not every ``|A p - B onehot - D w|`` is at most
    the row's threshold; a NaN keeps it)."""
    acc = _logit_tile(x_ptr, stride_xn, stride_xd, lw_ptr, stride_lwv, stride_lwd, b_ptr, src, row_mask,
                      cols, col_mask, D, BLOCK_M, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_PRECISION)
    z, dz = transform(acc, scale, softcap, inv_softcap, HAS_SOFTCAP)
    p = tl.exp(z - lse[:, None])
    is_t = cols[None, :] == y[:, None]
    # target element, per row (0 when y is not in this block: unused then)
    lp_y = tl.sum(tl.where(is_t, z, 0.0), axis=1) - lse
    g_y = (a - b) * tl.exp(lp_y) + b * expm1(lp_y)
    g = tl.where(is_t, g_y[:, None], a[:, None] * p)
    if HAS_D:
        g -= d[:, None] * class_weight(weight_ptr, cols, col_mask, HAS_WEIGHT)[None, :]
    g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
    keep = True
    if FILTER:
        # "not <=" rather than ">": a NaN element (or threshold) keeps the tile, so NaN propagates
        keep = tl.max(tl.max(tl.where(tl.abs(g) <= thr[:, None], 0, 1), axis=1), axis=0) > 0
    return g * dz, keep


@triton.jit
def _lce_dx_kernel(
    x_ptr, stride_xn, stride_xd, src_ptr, lw_ptr, stride_lwv, stride_lwd, b_ptr, tgt_ptr, weight_ptr,
    lse_ptr, row_coefs_ptr, thr_ptr, unit_ptr, dx_ptr, stride_dxn,
    M, V, D, scale, softcap, inv_softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SRC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_D: tl.constexpr, FILTER: tl.constexpr,
    NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dX[src[rows], n-block] += sum over the vocabulary of G[rows, v] W[v, n-block]: one program owns
    a (rows, BLOCK_N columns of D) block of dX and walks every vocabulary block (recomputing its
    gradient tile over the whole of D); the block is written once, without atomics.

    NORMALIZE (fp16/bf16): gradient tiles are divided by ``unit`` (the largest per-row upstream
    scale) before they are rounded to the input dtype for the tensor-core product, and the float32
    accumulator multiplied back once, so that e.g. a mean over many rows (gradients ~ p / N) does
    not underflow fp16."""
    pid = tl.program_id(0)
    n_n = tl.cdiv(D, BLOCK_N)
    pid_m = pid // n_n  # the D blocks of one row block are neighbours: they stream the same W tiles
    pid_n = pid % n_n
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < D
    inv_unit = 1.0
    if NORMALIZE:
        inv_unit = 1.0 / tl.load(unit_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for vb in range(0, tl.cdiv(V, BLOCK_V)):
        # the row data are reloaded (L1 hits) rather than held across the loop: registers
        rows, row_mask, src, y = _row_block(pid_m, M, src_ptr, tgt_ptr, BLOCK_M, HAS_SRC)
        lse, a, b, d, thr = _row_coefs(rows, row_mask, lse_ptr, row_coefs_ptr, thr_ptr, HAS_D, FILTER)
        cols = (vb * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < V
        g, keep = _grad_tile(x_ptr, stride_xn, stride_xd, lw_ptr, stride_lwv, stride_lwd, b_ptr, weight_ptr, src, y,
                             row_mask, cols, col_mask, lse, a, b, d, thr, D, scale, softcap, inv_softcap,
                             BLOCK_M, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_WEIGHT, HAS_SOFTCAP, HAS_D, FILTER,
                             DOT_PRECISION)
        if keep:
            wt = tl.load(lw_ptr + cols[:, None] * stride_lwv + ns[None, :] * stride_lwd,
                         mask=col_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot((g * inv_unit).to(x_ptr.dtype.element_ty), wt, acc, input_precision=DOT_PRECISION)
    if NORMALIZE:
        acc = acc * tl.load(unit_ptr)
    rows, row_mask, src, _ = _row_block(pid_m, M, src_ptr, tgt_ptr, BLOCK_M, HAS_SRC)
    out = dx_ptr + src[:, None] * stride_dxn + ns[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _lce_dw_kernel(
    x_ptr, stride_xn, stride_xd, src_ptr, lw_ptr, stride_lwv, stride_lwd, b_ptr, tgt_ptr, weight_ptr,
    lse_ptr, row_coefs_ptr, thr_ptr, unit_ptr, dw_ptr, stride_dwv, db_ptr,
    M, V, D, scale, softcap, inv_softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SRC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_D: tl.constexpr, FILTER: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dW[cols, n-block] += sum over rows of G[rows, cols]^T X[src[rows], n-block] and
    db[cols] += sum over rows of G[rows, cols]: one program owns a (BLOCK_V classes, BLOCK_N columns
    of D) block of dW (the first D block of each class block also owns its db) and walks every row
    block, recomputing the gradient tiles; written once, without atomics. NORMALIZE: see
    :func:`_lce_dx_kernel`."""
    pid = tl.program_id(0)
    n_n = tl.cdiv(D, BLOCK_N)
    if NEED_DW:
        pid_v = pid // n_n
        pid_n = pid % n_n
    else:
        pid_v = pid
        pid_n = 0
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < D
    inv_unit = 1.0
    if NORMALIZE:
        inv_unit = 1.0 / tl.load(unit_ptr)
    acc = tl.zeros((BLOCK_V, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for mb in range(0, tl.cdiv(M, BLOCK_M)):
        rows, row_mask, src, y = _row_block(mb, M, src_ptr, tgt_ptr, BLOCK_M, HAS_SRC)
        lse, a, b, d, thr = _row_coefs(rows, row_mask, lse_ptr, row_coefs_ptr, thr_ptr, HAS_D, FILTER)
        g, keep = _grad_tile(x_ptr, stride_xn, stride_xd, lw_ptr, stride_lwv, stride_lwd, b_ptr, weight_ptr, src, y,
                             row_mask, cols, col_mask, lse, a, b, d, thr, D, scale, softcap, inv_softcap,
                             BLOCK_M, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_WEIGHT, HAS_SOFTCAP, HAS_D, FILTER,
                             DOT_PRECISION)
        if keep:
            if NEED_DB:
                db_acc += tl.sum(g, axis=0)
            if NEED_DW:
                xt = tl.load(x_ptr + src[:, None] * stride_xn + ns[None, :] * stride_xd,
                             mask=row_mask[:, None] & n_mask[None, :], other=0.0)
                acc = tl.dot(tl.trans((g * inv_unit).to(x_ptr.dtype.element_ty)), xt, acc,
                             input_precision=DOT_PRECISION)
    if NEED_DW:
        if NORMALIZE:
            acc = acc * tl.load(unit_ptr)
        out = dw_ptr + cols[:, None] * stride_dwv + ns[None, :]
        mask = col_mask[:, None] & n_mask[None, :]
        tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)
    if NEED_DB:
        db_mask = col_mask & (pid_n == 0)
        tl.store(db_ptr + cols, tl.load(db_ptr + cols, mask=db_mask, other=0.0) + db_acc, mask=db_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 operands


def _check(x, linear_weight, b):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton linear cross-entropy kernels take fp32/fp16/bf16, got {x.dtype}")
    if linear_weight.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise TypeError("input, linear_weight and linear_bias must share one dtype")
    if x.dim() != 2 or linear_weight.dim() != 2 or x.shape[1] != linear_weight.shape[1]:
        raise ValueError("expected input (N, D) and linear_weight (V, D)")


def _common_args(x, linear_weight, b, src, tgt, weight, cfg, logit_scale, softcap) -> dict:
    """Arguments both kernels take (operands, tile sizes, logit transform)."""
    scale, cap, inv_cap = softcap_args(logit_scale, softcap)
    v, d = linear_weight.shape
    return dict(
        x_ptr=x, stride_xn=x.stride(0), stride_xd=x.stride(1), src_ptr=src,
        lw_ptr=linear_weight, stride_lwv=linear_weight.stride(0), stride_lwd=linear_weight.stride(1),
        b_ptr=b, tgt_ptr=tgt, weight_ptr=weight, M=tgt.shape[0], V=v, D=d,
        scale=scale, softcap=cap, inv_softcap=inv_cap,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION=cfg.get("DOT_PRECISION", _dot_precision(x.dtype)),
    )


def stats_plan(x, linear_weight, b, src, tgt, weight, *, logit_scale=1.0, softcap=None, need_wz=False,
               config=None, num_splits=None):
    """Plan of :func:`stats`: ``(kernel, grid, kwargs, options, partial_stats (S, M, 4))``."""
    _check(x, linear_weight, b)
    m = tgt.shape[0]
    v = linear_weight.shape[0]
    cfg = dict(config or stats_config(x.dtype, _aligned(x, linear_weight, b)))
    n_m = triton.cdiv(m, cfg["BLOCK_M"])
    n_vb = triton.cdiv(v, cfg["BLOCK_V"])
    if num_splits is None:
        # enough programs for ~4 waves over the SMs, at least 8 vocabulary blocks per program
        want = max(1, (4 * _num_sms(x.device)) // max(n_m, 1))
        num_splits = max(1, min(want, n_vb // 8 if n_vb >= 8 else 1))
    num_splits = max(1, min(int(num_splits), n_vb))
    per_split = triton.cdiv(n_vb, num_splits)
    num_splits = triton.cdiv(n_vb, per_split)  # every split starts on a real column
    out = torch.empty(num_splits, m, 4, dtype=torch.float32, device=x.device)
    kwargs = with_flags(dict(
        _common_args(x, linear_weight, b, src, tgt, f32(weight) if need_wz else None, cfg, logit_scale, softcap),
        out_ptr=out, blocks_per_split=per_split, NEED_WZ=bool(need_wz),
    ), HAS_SRC="src_ptr", HAS_BIAS="b_ptr", HAS_WEIGHT="weight_ptr")
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return _lce_stats_kernel, (n_m, num_splits), kwargs, options, out


def backward_plans(x, linear_weight, b, src, tgt, weight, lse, row_coefs, thresholds, dx, dw, db, *,
                   logit_scale=1.0, softcap=None, has_d=False, unit=None, config=None) -> dict:
    """Plans of :func:`backward`: ``{"dx": plan, "dw": plan}`` for the kernels the requested
    gradients need (``"dw"`` also computes db), each accumulating into the float32 ``dx``/``dw``/``db``.
    ``config``: one tile configuration for both kernels (default: :func:`backward_configs`)."""
    _check(x, linear_weight, b)
    v, d = linear_weight.shape
    m = tgt.shape[0]
    for t in (dx, dw, db):
        assert t is None or (t.dtype == torch.float32 and t.stride(-1) == 1)
    cfgs = ({k: dict(config) for k in ("dx", "dw")} if config else
            backward_configs(x.dtype, d, _aligned(x, linear_weight, b, dx, dw)))
    if d == 0:
        dx = dw = None  # nothing to accumulate (db still has its bias terms)

    def args(cfg, **extra):
        return dict(with_flags(dict(
            _common_args(x, linear_weight, b, src, tgt, f32(weight) if has_d else None, cfg, logit_scale, softcap),
            lse_ptr=lse, row_coefs_ptr=row_coefs, thr_ptr=thresholds, unit_ptr=unit, BLOCK_N=cfg["BLOCK_N"],
            HAS_D=bool(has_d), **extra,
        ), HAS_SRC="src_ptr", HAS_BIAS="b_ptr", HAS_WEIGHT="weight_ptr", FILTER="thr_ptr", NORMALIZE="unit_ptr"))

    def options(cfg):
        return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    plans = {}
    if dx is not None:
        cfg = cfgs["dx"]
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(d, cfg["BLOCK_N"]),)
        plans["dx"] = (_lce_dx_kernel, grid, args(cfg, dx_ptr=dx, stride_dxn=dx.stride(0)), options(cfg), dx)
    if dw is not None or db is not None:
        cfg = cfgs["dw"]
        grid = (triton.cdiv(v, cfg["BLOCK_V"]) * (triton.cdiv(d, cfg["BLOCK_N"]) if dw is not None else 1),)
        kwargs = with_flags(args(cfg, dw_ptr=dw, stride_dwv=dw.stride(0) if dw is not None else 0, db_ptr=db),
                            NEED_DW="dw_ptr", NEED_DB="db_ptr")
        plans["dw"] = (_lce_dw_kernel, grid, kwargs, options(cfg), (dw, db))
    return plans


def stats(x, linear_weight, b, src, tgt, weight=None, *, logit_scale=1.0, softcap=None, need_wz=False,
          config=None, num_splits=None):
    """Partial row statistics ``(S, M, 4)`` float32 of ``X[src] W^T + b`` over S vocabulary splits.

    ``x`` (N_in, D), ``linear_weight`` W (V, D), ``b`` (V,) or None, one dtype (fp32/fp16/bf16);
    ``src`` (M,) int64 rows of ``x`` or None (rows 0..M-1); ``tgt`` (M,) int64 (any value outside
    [0, V) for "no target"); ``weight`` the class weights (only used with ``need_wz``, for label
    smoothing). Merge over the first dimension with :func:`celoss.stats.merge_all`.
    """
    return launch(stats_plan(x, linear_weight, b, src, tgt, weight, logit_scale=logit_scale, softcap=softcap,
                             need_wz=need_wz, config=config, num_splits=num_splits))


def backward(x, linear_weight, b, src, tgt, weight, lse, row_coefs, thresholds, dx, dw, db, *, logit_scale=1.0,
             softcap=None, has_d=False, unit=None, config=None):
    """Accumulate the gradients of ``sum_n loss_n`` into float32 ``dx`` (N_in, D), ``dw`` (V, D),
    ``db`` (V,) (each may be None: not computed).

    ``lse`` (M,) float32 full-row log-sum-exp; ``row_coefs`` (M, 3) float32 (A, B, D) already
    scaled by the upstream gradient (see :mod:`celoss.backends`); ``thresholds`` (M,) float32 or
    None: gradient filtering (skip tiles whose |A p - B onehot - D w| never exceeds the row's
    threshold). ``has_d`` must be True when any D coefficient is non-zero (label smoothing).
    ``unit``: None, or a (1,) float32 tensor > 0, the magnitude of the largest row coefficient
    scale; fp16/bf16 tiles are normalized by it before rounding (see the kernel). The entries of
    ``src`` must be distinct (each dX row has one owner; the caller's row maps are injective).
    """
    if unit is not None and x.dtype == torch.float32:
        unit = None  # fp32 operands are not rounded
    plans = backward_plans(x, linear_weight, b, src, tgt, weight, lse, row_coefs, thresholds, dx, dw, db,
                           logit_scale=logit_scale, softcap=softcap, has_d=has_d, unit=unit, config=config)
    for plan in plans.values():
        launch(plan)
    return dx, dw, db
