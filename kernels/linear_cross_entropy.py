"""Triton kernels for fused linear cross-entropy: the loss of ``X W^T (+ b)`` without N x V logits.

The rows processed are a list of ``M`` rows of the hidden states ``X`` (``(N_in, D)``, any
strides), given by an optional int64 row map ``src`` (compacted counted rows, next-token shift:
index arithmetic done by the caller, no copy of ``X``) and their int64 targets ``tgt``. The
classifier ``W`` is ``(V, D)`` (any strides), ``b`` an optional ``(V,)`` bias. Logit tiles are
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

                       with ``p = exp(z - lse)`` and the per-row coefficients (A, B, D) (already
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

Launchers (``stats``, ``backward``) are thin: each has a ``*_plan`` twin returning
``(kernel, grid, kwargs, options, result)`` so the AOT test compiles exactly what a launch would.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .cross_entropy import _expm1, _transform

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
def _logit_tile(x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, src, row_mask,
                cols, col_mask, D, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """float32 (BLOCK_M, BLOCK_V) tile of X[src] W[cols]^T (+ b[cols]); 0 on masked lanes."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    x_rows = x_ptr + src[:, None] * stride_xn
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        k_mask = ks < D
        xt = tl.load(x_rows + ks[None, :] * stride_xd, mask=row_mask[:, None] & k_mask[None, :],
                     other=0.0)
        wt = tl.load(w_cols + ks[:, None] * stride_wd, mask=k_mask[:, None] & col_mask[None, :],
                     other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lce_stats_kernel(
    x_ptr, stride_xn, stride_xd, src_ptr, w_ptr, stride_wv, stride_wd, b_ptr, tgt_ptr, cw_ptr,
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
        acc = _logit_tile(x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, src,
                          row_mask, cols, col_mask, D, BLOCK_M, BLOCK_V, BLOCK_D, HAS_BIAS,
                          DOT_PRECISION)
        z, _ = _transform(acc, scale, softcap, inv_softcap, HAS_SOFTCAP)
        zm = tl.where(col_mask[None, :], z, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(zm, axis=1))
        # rows whose max is +-inf (or NaN) shift by 0, like celoss.stats.merge
        m_safe = tl.where(tl.abs(m_new) < float("inf"), m_new, 0.0)
        s_i = s_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(zm - m_safe[:, None]), axis=1)
        m_i = m_new
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        if NEED_WZ:
            if HAS_WEIGHT:
                wv = tl.load(cw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            else:
                wv = tl.where(col_mask, 1.0, 0.0)
            wz += tl.sum(z * wv[None, :], axis=1)
    o = out_ptr + (pid_s.to(tl.int64) * M + rows.to(tl.int64)) * 4
    tl.store(o, m_i, mask=row_mask)
    tl.store(o + 1, s_i, mask=row_mask)
    tl.store(o + 2, zy, mask=row_mask)
    tl.store(o + 3, wz, mask=row_mask)


@triton.jit
def _lce_backward_kernel(
    x_ptr, stride_xn, stride_xd, src_ptr, w_ptr, stride_wv, stride_wd, b_ptr, tgt_ptr, cw_ptr,
    lse_ptr, coefs_ptr, thr_ptr, unit_ptr, dx_ptr, stride_dxn, dw_ptr, stride_dwv, db_ptr,
    M, V, D, scale, softcap, inv_softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_SRC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_D: tl.constexpr, FILTER: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dX[src] += g W_tile, dW[cols] += g^T X_tile, db[cols] += sum_rows g for one (rows, vocab) tile.

    g = dz/dx * (A p - B [j == y] - D w) with p = exp(z - lse) and (A, B, D) = coefs[row]; the
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
    c_ptr = coefs_ptr + rows.to(tl.int64) * 3
    a = tl.load(c_ptr, mask=row_mask, other=0.0).to(tl.float32)
    b = tl.load(c_ptr + 1, mask=row_mask, other=0.0).to(tl.float32)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V

    acc = _logit_tile(x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, src,
                      row_mask, cols, col_mask, D, BLOCK_M, BLOCK_V, BLOCK_D, HAS_BIAS,
                      DOT_PRECISION)
    z, dz = _transform(acc, scale, softcap, inv_softcap, HAS_SOFTCAP)
    p = tl.exp(z - lse[:, None])
    is_t = cols[None, :] == y[:, None]
    # target element, per row (0 when y is not in this block: unused then)
    lp_y = tl.sum(tl.where(is_t, z, 0.0), axis=1) - lse
    g_y = (a - b) * tl.exp(lp_y) + b * _expm1(lp_y)
    g = tl.where(is_t, g_y[:, None], a[:, None] * p)
    if HAS_D:
        d = tl.load(c_ptr + 2, mask=row_mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            wv = tl.load(cw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        else:
            wv = tl.where(col_mask, 1.0, 0.0)
        g -= d[:, None] * wv[None, :]
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
        w_cols = w_ptr + cols[:, None] * stride_wv
        for k in range(0, D, BLOCK_D):
            ks = k + tl.arange(0, BLOCK_D)
            k_mask = ks < D
            if NEED_DX:
                wt = tl.load(w_cols + ks[None, :] * stride_wd,
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

def _softcap_args(logit_scale, softcap):
    if softcap is None:
        return float(logit_scale), 1.0, 1.0
    return float(logit_scale), float(softcap), 1.0 / float(softcap)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 operands


def _check(x, w, b):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton linear cross-entropy kernels take fp32/fp16/bf16, got {x.dtype}")
    if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise TypeError("input, linear_weight and linear_bias must share one dtype")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError("expected x (N, D) and w (V, D)")


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def stats_plan(x, w, b, src, tgt, weight, *, logit_scale=1.0, softcap=None, need_wz=False,
               config=None, num_splits=None):
    """Plan of :func:`stats`: ``(kernel, grid, kwargs, options, partial_stats (S, M, 4))``."""
    _check(x, w, b)
    m = tgt.shape[0]
    v, d = w.shape
    cfg = dict(config or stats_config(x.dtype, _aligned(x, w, b)))
    bm, bv = cfg["BLOCK_M"], cfg["BLOCK_V"]
    n_m = triton.cdiv(m, bm)
    n_vb = triton.cdiv(v, bv)
    if num_splits is None:
        # enough programs for ~4 waves over the SMs, at least 8 vocabulary blocks per program
        want = max(1, (4 * _num_sms(x.device)) // max(n_m, 1))
        num_splits = max(1, min(want, n_vb // 8 if n_vb >= 8 else 1))
    num_splits = max(1, min(int(num_splits), n_vb))
    per_split = triton.cdiv(n_vb, num_splits)
    num_splits = triton.cdiv(n_vb, per_split)  # every split starts on a real column
    out = torch.empty(num_splits, m, 4, dtype=torch.float32, device=x.device)
    scale, cap, inv_cap = _softcap_args(logit_scale, softcap)
    weight = _f32(weight) if need_wz else None
    kwargs = dict(
        x_ptr=x, stride_xn=x.stride(0), stride_xd=x.stride(1), src_ptr=src,
        w_ptr=w, stride_wv=w.stride(0), stride_wd=w.stride(1), b_ptr=b, tgt_ptr=tgt,
        cw_ptr=weight, out_ptr=out, M=m, V=v, D=d, blocks_per_split=per_split,
        scale=scale, softcap=cap, inv_softcap=inv_cap,
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=cfg["BLOCK_D"], HAS_SRC=src is not None,
        HAS_BIAS=b is not None, HAS_WEIGHT=weight is not None, HAS_SOFTCAP=softcap is not None,
        NEED_WZ=bool(need_wz), DOT_PRECISION=cfg.get("DOT_PRECISION", _dot_precision(x.dtype)),
    )
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return _lce_stats_kernel, (n_m, num_splits), kwargs, options, out


def backward_plan(x, w, b, src, tgt, weight, lse, coefs, thresholds, dx, dw, db, *,
                  logit_scale=1.0, softcap=None, has_d=False, unit=None, config=None):
    """Plan of :func:`backward` (accumulates into the float32 ``dx``/``dw``/``db`` given)."""
    _check(x, w, b)
    m = tgt.shape[0]
    v, d = w.shape
    cfg = dict(config or backward_config(x.dtype, _aligned(x, w, b, dx, dw)))
    bm, bv = cfg["BLOCK_M"], cfg["BLOCK_V"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(v, bv),)
    scale, cap, inv_cap = _softcap_args(logit_scale, softcap)
    weight = _f32(weight) if has_d else None
    for t in (dx, dw, db):
        assert t is None or (t.dtype == torch.float32 and t.stride(-1) == 1)
    kwargs = dict(
        x_ptr=x, stride_xn=x.stride(0), stride_xd=x.stride(1), src_ptr=src,
        w_ptr=w, stride_wv=w.stride(0), stride_wd=w.stride(1), b_ptr=b, tgt_ptr=tgt,
        cw_ptr=weight, lse_ptr=lse, coefs_ptr=coefs, thr_ptr=thresholds, unit_ptr=unit,
        dx_ptr=dx, stride_dxn=dx.stride(0) if dx is not None else 0,
        dw_ptr=dw, stride_dwv=dw.stride(0) if dw is not None else 0, db_ptr=db,
        M=m, V=v, D=d, scale=scale, softcap=cap, inv_softcap=inv_cap,
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=cfg["BLOCK_D"], GROUP_M=cfg["GROUP_M"],
        HAS_SRC=src is not None, HAS_BIAS=b is not None, HAS_WEIGHT=weight is not None,
        HAS_SOFTCAP=softcap is not None, HAS_D=bool(has_d), FILTER=thresholds is not None,
        NEED_DX=dx is not None, NEED_DW=dw is not None, NEED_DB=db is not None,
        NORMALIZE=unit is not None, DOT_PRECISION=cfg.get("DOT_PRECISION", _dot_precision(x.dtype)),
    )
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return _lce_backward_kernel, grid, kwargs, options, (dx, dw, db)


def _launch(plan):
    kernel, grid, kwargs, options, result = plan
    if all(g > 0 for g in grid):
        kernel[grid](**kwargs, **options)
    return result


def stats(x, w, b, src, tgt, weight=None, *, logit_scale=1.0, softcap=None, need_wz=False,
          config=None, num_splits=None):
    """Partial row statistics ``(S, M, 4)`` float32 of ``X[src] W^T + b`` over S vocabulary splits.

    ``x`` (N_in, D), ``w`` (V, D), ``b`` (V,) or None, one dtype (fp32/fp16/bf16); ``src`` (M,)
    int64 rows of ``x`` or None (rows 0..M-1); ``tgt`` (M,) int64 (any value outside [0, V) for
    "no target"); ``weight`` the class weights (only used with ``need_wz``, for label smoothing).
    Merge over the first dimension with :func:`celoss.stats.merge_all`.
    """
    return _launch(stats_plan(x, w, b, src, tgt, weight, logit_scale=logit_scale, softcap=softcap,
                              need_wz=need_wz, config=config, num_splits=num_splits))


def backward(x, w, b, src, tgt, weight, lse, coefs, thresholds, dx, dw, db, *, logit_scale=1.0,
             softcap=None, has_d=False, unit=None, config=None):
    """Accumulate the gradients of ``sum_n loss_n`` into float32 ``dx`` (N_in, D), ``dw`` (V, D),
    ``db`` (V,) (each may be None: not computed).

    ``lse`` (M,) float32 full-row log-sum-exp; ``coefs`` (M, 3) float32 (A, B, D) already scaled by
    the upstream gradient (see :mod:`celoss.backends`); ``thresholds`` (M,) float32 or None:
    gradient filtering (skip tiles whose |A p - B onehot - D w| never exceeds the row's threshold).
    ``has_d`` must be True when any D coefficient is non-zero (label smoothing). ``unit``: None,
    or a (1,) float32 tensor > 0, the magnitude of the largest row coefficient scale; fp16/bf16
    tiles are normalized by it before rounding (see the kernel).
    """
    if unit is not None and x.dtype == torch.float32:
        unit = None  # fp32 operands are not rounded
    return _launch(backward_plan(x, w, b, src, tgt, weight, lse, coefs, thresholds, dx, dw, db,
                                 logit_scale=logit_scale, softcap=softcap, has_d=has_d, unit=unit,
                                 config=config))


# ----------------------------------------------------------------------------------------------
# Launch plans on CPU stand-in tensors, for ahead-of-time compile tests (kernels/_aot.py)
# ----------------------------------------------------------------------------------------------

KERNELS = ("stats", "backward")
_FLAGS = {"stats": ("src", "bias", "softcap", "smoothing", "weight"),
          "backward": ("src", "bias", "softcap", "smoothing", "weight", "filter", "no_dx", "no_dw")}


def aot_plan(kernel="backward", dtype="bfloat16", aligned=True, round_sizes=False, config=None, **flags):
    """The plan (kernel, grid, kwargs, options, outputs) a launch would use, with small CPU tensors
    standing in for CUDA ones (only dtypes and alignments matter to the compiler; the launch
    configuration is the GPU one when TRITON_INTERPRET is unset). ``aligned=False``: odd D and
    strides, pointers off the 16-byte grid; ``round_sizes``: M and V multiples of 16 (another
    specialization). Flags: see :data:`_FLAGS`."""
    unknown = set(flags) - set(_FLAGS[kernel])
    if unknown:
        raise ValueError(f"unknown flags {unknown}")
    dt = getattr(torch, dtype)
    n, v = (32, 320) if round_sizes else (5, 301)
    d = 64 if aligned else 63

    def mat(rows, cols, dtype=dt):
        if aligned:
            return torch.zeros(rows, cols, dtype=dtype)
        return torch.zeros(rows, cols + 2, dtype=dtype)[:, 1:cols + 1]

    x, w = mat(n, d), mat(v, d)
    b = torch.zeros(v, dtype=dt) if flags.get("bias") else None
    src = torch.arange(n) if flags.get("src") else None
    tgt = torch.zeros(n, dtype=torch.int64)
    smoothing = bool(flags.get("smoothing"))
    weight = torch.ones(v) if flags.get("weight") else None
    softcap = 30.0 if flags.get("softcap") else None
    if kernel == "stats":
        return stats_plan(x, w, b, src, tgt, weight, logit_scale=1.0, softcap=softcap, need_wz=smoothing,
                          config=config)
    if kernel == "backward":
        f32 = dict(dtype=torch.float32)
        dx = None if flags.get("no_dx") else torch.zeros(n, d, **f32)
        dw = None if flags.get("no_dw") else torch.zeros(v, d, **f32)
        db = torch.zeros(v, **f32) if b is not None else None
        thr = torch.zeros(n, **f32) if flags.get("filter") else None
        unit = None if dt == torch.float32 else torch.ones(1, **f32)
        return backward_plan(x, w, b, src, tgt, weight, torch.zeros(n, **f32), torch.zeros(n, 3, **f32), thr,
                             dx, dw, db, logit_scale=1.0, softcap=softcap, has_d=smoothing, unit=unit,
                             config=config)
    raise ValueError(kernel)


def aot_cases(kernel="backward", heaviest=False):
    """Flag combinations the launchers can produce (``heaviest``: the one with most live state).
    Class weights only matter with smoothing (the weighted_z / D terms)."""
    import itertools

    names = _FLAGS[kernel]
    combos = []
    for values in itertools.product((False, True), repeat=len(names)):
        c = dict(zip(names, values))
        if c["weight"] and not c["smoothing"]:
            continue
        if c.get("no_dx") and c.get("no_dw"):
            continue
        combos.append(c)
    if heaviest:
        return [c for c in combos if all(c[k] for k in names if not k.startswith("no_"))
                and not c.get("no_dx") and not c.get("no_dw")]
    return combos
