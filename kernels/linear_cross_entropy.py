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
``_lce_backward_kernel`` grid (row blocks x vocabulary blocks, grouped for L2 reuse of W tiles).
                       Recomputes one logit tile, forms the gradient tile in registers::

                           g_nj = dz_nj/dx_nj * (A_n p_nj - B_n [j == y_n] - D_n w_j)

                       with ``p = exp(z - lse)`` and the row coefficients (A, B, D) (already
                       multiplied by the upstream gradient; the returned-lse gradient is folded
                       into A), then accumulates ``dX[src] += g W_tile`` and ``dW += g^T X_tile``
                       (and ``db += sum_rows g``) with float32 atomics, one D block at a time.
                       Gradient filtering (``FILTER``): a tile whose every
                       ``|A p - B onehot - D w|`` is at most the row's threshold (never one
                       holding a NaN; ``eps`` times
                       the row's upstream scale, so the test is on the unscaled
                       ``|softmax - onehot|`` of Cut Cross-Entropy) skips its dX/dW/db updates.

All offsets along rows and vocabulary entries are int64. fp32 inputs use IEEE fp32 ``tl.dot``
(no TF32, matching PyTorch's default), fp16/bf16 inputs use tensor-core dots with fp32
accumulation; the gradient tile is rounded to the input dtype only as the operand of the dX/dW
products (after division by the largest per-row upstream scale, so that a mean over many rows
does not underflow fp16), whose accumulators are float32 (relaxed atomics: the order of the
additions, hence the last bits of dX/dW, varies between runs).

Launchers (``stats``, ``backward``) are thin: a ``*_plan`` function plus
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
BACKWARD_CONFIGS = {
    ("lowp", True): dict(BLOCK_M=64, BLOCK_V=64, BLOCK_D=64, GROUP_M=8, num_warps=8, num_stages=2),
    ("lowp", False): dict(BLOCK_M=32, BLOCK_V=64, BLOCK_D=32, GROUP_M=8, num_warps=4, num_stages=2),
    ("fp32", True): dict(BLOCK_M=32, BLOCK_V=64, BLOCK_D=32, GROUP_M=8, num_warps=8, num_stages=2),
    ("fp32", False): dict(BLOCK_M=32, BLOCK_V=64, BLOCK_D=32, GROUP_M=8, num_warps=8, num_stages=2),
}
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_D=16, GROUP_M=2, num_warps=4, num_stages=1)


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
        return {k: v for k, v in INTERPRETER_CONFIG.items() if k != "GROUP_M"}
    return dict(STATS_CONFIGS["fp32" if dtype == torch.float32 else "lowp", bool(aligned)])


def backward_config(dtype: torch.dtype, aligned: bool = True) -> dict:
    if _interpreting():
        return dict(INTERPRETER_CONFIG)
    return dict(BACKWARD_CONFIGS["fp32" if dtype == torch.float32 else "lowp", bool(aligned)])


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
def _lce_backward_kernel(
    x_ptr, stride_xn, stride_xd, src_ptr, lw_ptr, stride_lwv, stride_lwd, b_ptr, tgt_ptr, weight_ptr,
    lse_ptr, row_coefs_ptr, thr_ptr, unit_ptr, dx_ptr, stride_dxn, dw_ptr, stride_dwv, db_ptr,
    M, V, D, scale, softcap, inv_softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_SRC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_D: tl.constexpr, FILTER: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dX[src] += g W_tile, dW[cols] += g^T X_tile, db[cols] += sum_rows g for one (rows, vocab) tile.

    g = dz/dx * (A p - B [j == y] - D w) with p = exp(z - lse) and (A, B, D) = row_coefs[row]; the
    target element is evaluated as (A - B) p_y + B expm1(z_y - lse) - D w_y (no 1 - p_y
    cancellation as p_y -> 1). dx/dw/db are float32 (atomics).

    NORMALIZE (fp16/bf16): the tile is divided by ``unit`` (the largest per-row upstream scale)
    before it is rounded to the input dtype for the tensor-core products, and their results
    multiplied back, so that e.g. a mean over many rows (gradients ~ p / N) does not underflow
    fp16.
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_v = tl.cdiv(V, BLOCK_V)
    # grouped order: GROUP_M consecutive programs share a vocabulary block (W tile in L2)
    per_group = GROUP_M * n_v
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows, row_mask, src, y = _row_block(pid_m, M, src_ptr, tgt_ptr, BLOCK_M, HAS_SRC)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    c_ptr = row_coefs_ptr + rows.to(tl.int64) * 3
    a = tl.load(c_ptr, mask=row_mask, other=0.0).to(tl.float32)
    b = tl.load(c_ptr + 1, mask=row_mask, other=0.0).to(tl.float32)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V

    acc = _logit_tile(x_ptr, stride_xn, stride_xd, lw_ptr, stride_lwv, stride_lwd, b_ptr, src,
                      row_mask, cols, col_mask, D, BLOCK_M, BLOCK_V, BLOCK_D, HAS_BIAS,
                      DOT_PRECISION)
    z, dz = transform(acc, scale, softcap, inv_softcap, HAS_SOFTCAP)
    p = tl.exp(z - lse[:, None])
    is_t = cols[None, :] == y[:, None]
    # target element, per row (0 when y is not in this block: unused then)
    lp_y = tl.sum(tl.where(is_t, z, 0.0), axis=1) - lse
    g_y = (a - b) * tl.exp(lp_y) + b * expm1(lp_y)
    g = tl.where(is_t, g_y[:, None], a[:, None] * p)
    if HAS_D:
        d = tl.load(c_ptr + 2, mask=row_mask, other=0.0).to(tl.float32)
        g -= d[:, None] * class_weight(weight_ptr, cols, col_mask, HAS_WEIGHT)[None, :]
    g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)

    keep = True
    if FILTER:
        thr = tl.load(thr_ptr + rows, mask=row_mask, other=float("inf"))
        # "not <=" rather than ">": a NaN element (or threshold) keeps the tile, so NaN propagates
        keep = tl.max(tl.max(tl.where(tl.abs(g) <= thr[:, None], 0, 1), axis=1), axis=0) > 0
    if keep:
        g = g * dz
        if NEED_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")
        if NORMALIZE:
            unit = tl.load(unit_ptr)
            gc = (g * (1.0 / unit)).to(x_ptr.dtype.element_ty)
        else:
            unit = 1.0
            gc = g.to(x_ptr.dtype.element_ty)
        x_rows = x_ptr + src[:, None] * stride_xn
        w_cols = lw_ptr + cols[:, None] * stride_lwv
        for k in range(0, D, BLOCK_D):
            ks = k + tl.arange(0, BLOCK_D)
            k_mask = ks < D
            if NEED_DX:
                wt = tl.load(w_cols + ks[None, :] * stride_lwd,
                             mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                dxp = tl.dot(gc, wt, input_precision=DOT_PRECISION)
                if NORMALIZE:
                    dxp = dxp * unit
                tl.atomic_add(dx_ptr + src[:, None] * stride_dxn + ks[None, :], dxp,
                              mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
            if NEED_DW:
                xt = tl.load(x_rows + ks[None, :] * stride_xd,
                             mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                dwp = tl.dot(tl.trans(gc), xt, input_precision=DOT_PRECISION)
                if NORMALIZE:
                    dwp = dwp * unit
                tl.atomic_add(dw_ptr + cols[:, None] * stride_dwv + ks[None, :], dwp,
                              mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")


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


def backward_plan(x, linear_weight, b, src, tgt, weight, lse, row_coefs, thresholds, dx, dw, db, *,
                  logit_scale=1.0, softcap=None, has_d=False, unit=None, config=None):
    """Plan of :func:`backward` (accumulates into the float32 ``dx``/``dw``/``db`` given)."""
    _check(x, linear_weight, b)
    cfg = dict(config or backward_config(x.dtype, _aligned(x, linear_weight, b, dx, dw)))
    grid = (triton.cdiv(tgt.shape[0], cfg["BLOCK_M"]) * triton.cdiv(linear_weight.shape[0], cfg["BLOCK_V"]),)
    for t in (dx, dw, db):
        assert t is None or (t.dtype == torch.float32 and t.stride(-1) == 1)
    kwargs = with_flags(dict(
        _common_args(x, linear_weight, b, src, tgt, f32(weight) if has_d else None, cfg, logit_scale, softcap),
        lse_ptr=lse, row_coefs_ptr=row_coefs, thr_ptr=thresholds, unit_ptr=unit,
        dx_ptr=dx, stride_dxn=dx.stride(0) if dx is not None else 0,
        dw_ptr=dw, stride_dwv=dw.stride(0) if dw is not None else 0, db_ptr=db,
        GROUP_M=cfg["GROUP_M"], HAS_D=bool(has_d),
    ), HAS_SRC="src_ptr", HAS_BIAS="b_ptr", HAS_WEIGHT="weight_ptr", FILTER="thr_ptr", NEED_DX="dx_ptr",
        NEED_DW="dw_ptr", NEED_DB="db_ptr", NORMALIZE="unit_ptr")
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return _lce_backward_kernel, grid, kwargs, options, (dx, dw, db)


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
    scale; fp16/bf16 tiles are normalized by it before rounding (see the kernel).
    """
    if unit is not None and x.dtype == torch.float32:
        unit = None  # fp32 operands are not rounded
    return launch(backward_plan(x, linear_weight, b, src, tgt, weight, lse, row_coefs, thresholds, dx, dw, db,
                                logit_scale=logit_scale, softcap=softcap, has_d=has_d, unit=unit, config=config))
