"""Triton row kernels for cross-entropy and focal loss (the ``celoss.backends`` contract).

One program per row of logits, looping over the classes in blocks of ``BLOCK`` with an online
max / sum-of-exps accumulated in float32 whatever the logits' dtype (fp32, fp16, bf16). No N x C
probability tensor is ever written: the gradient pass recomputes ``p`` block by block from the
row's ``lse``.

Kernels
-------
``_ce_fused_kernel``  statistics pass, loss and lse, then (``HAS_GRAD``) a second pass writing
                      ``coef_n * dloss_n/dx_nj`` (``grad`` may alias the logits: in place).
``_ce_stats_kernel``  row statistics ``(max, sumexp, target_z, weighted_z)`` of a block of classes.
``_ce_grad_kernel``   ``dz/dx * (A p - B [j == y] - D w)`` of a block of classes, given the full-row
                      lse and the row coefficients (A, B, D).

Split-vocabulary mode (few rows of many classes, :func:`split_count`): :func:`fused` launches the
statistics kernel with several programs per row, each over a contiguous range of classes (grid
(rows, splits), EXCLUDE_TARGET), then the fused kernel with SPLIT on the same grid: each program
merges its row's range statistics (as ``celoss.stats.merge_all`` merges those of vocab-parallel
ranks), derives loss and coefficients exactly as without a split, and writes its range's gradient.
The gradient kernel takes the same grid.

Launchers (``fused``, ``stats``, ``grad``) allocate the outputs, pick ``BLOCK`` / ``num_warps``
(:func:`block_config`) and launch; nothing here knows about autograd or checks arguments beyond
what the kernels need. Each is a ``*_plan`` function plus :func:`kernels._host.launch`.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._host import SUPPORTED_DTYPES, aligned16, check_rows, f32, launch, softcap_args, with_flags  # noqa: F401
from ._tl import class_weight, expm1, lane_finish, lane_update, log1m, row_coef, safe_shift, transform

# (BLOCK, num_warps) pairs block_config can return: at most 16 elements per thread and at most
# 8 warps (256 threads). Every launch also passes maxnreg=MAXNREG (PTX .maxnreg). Measured with
# Triton 3.6's ptxas (CUDA 12.8) on all launchable variants (tests/kernels/test_aot_compile.py):
# without .maxnreg, ptxas picks its own occupancy-driven register target (64 for 512 threads,
# 48-80 for 256) and spilled 8-24 bytes in 70 variants (mostly unaligned rows, whose unvectorized
# loads need a 64-bit address per element); with .maxnreg 128 none spills and the heaviest variant
# uses 96 registers (2 programs of 8 warps per SM at worst). BLOCK 8192 with 16 warps was dropped
# without .maxnreg (ptxas capped 512-thread programs at 64 registers; fused variants spilled on
# sm_90a). With .maxnreg 128 the heaviest 16-bit variants of every kernel compile without spills
# on sm_80 and sm_90 (issue 12, 121-128 registers for probability targets), but a program then
# fills an SM's register file alone: the same 16 warps per SM, 16 elements per thread and bytes
# in flight as two 8-warp programs, so nothing predicts a gain; not adopted before a GPU
# measurement says otherwise.
MIN_BLOCK = 64
MAX_BLOCK = 4096
BLOCK_CONFIGS = tuple((1 << k, max(1, (1 << k) // 512)) for k in range(6, 13))
MAXNREG = 128


# Split-vocabulary mode: rows are split over several programs when one program per row would
# leave SMs idle (few rows, many classes). Each split streams at least SPLIT_MIN_BLOCKS blocks, so
# its (max, sumexp, target_z, weighted_z) write and the merge stay small against its reads.
PROGRAMS_PER_SM = 2  # 8-warp programs at MAXNREG resident per SM (64K registers / (256 x 128))
SPLIT_MIN_BLOCKS = 4
MAX_SPLITS = tl.constexpr(64)  # the fused kernel merges up to this many range statistics per row
FORCE_SPLITS = None  # tests: an int forces that many splits (where the split path applies)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(num_rows: int, num_classes: int, device: torch.device) -> int:
    """Programs per row for ``num_rows`` rows of ``num_classes`` classes: enough for PROGRAMS_PER_SM
    programs on every multiprocessor of the (CUDA) device, each split at least SPLIT_MIN_BLOCKS
    blocks; 1 (no split) when the rows alone fill the device. ``FORCE_SPLITS`` overrides (tests:
    the interpreter has no multiprocessors)."""
    if FORCE_SPLITS is not None:
        return min(int(FORCE_SPLITS), MAX_SPLITS.value)
    if device.type != "cuda" or num_rows == 0:
        return 1
    wanted = triton.cdiv(PROGRAMS_PER_SM * _multiprocessors(device), num_rows)
    most = num_classes // (SPLIT_MIN_BLOCKS * block_config(num_classes)[0])
    return max(1, min(wanted, most, MAX_SPLITS.value))


def block_config(num_classes: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``num_classes`` classes: one block for C <= MAX_BLOCK, else
    a loop over blocks of MAX_BLOCK; one warp per 512 classes of the block (16 per thread)."""
    block = min(max(triton.next_power_of_2(max(int(num_classes), 1)), MIN_BLOCK), MAX_BLOCK)
    return block, max(1, block // 512)


# ----------------------------------------------------------------------------------------------
# Shared @triton.jit helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _term_weight(weight_ptr, t_ptr, cols, mask, one_minus_eps, eps_over_c, HAS_WEIGHT: tl.constexpr,
                 HAS_SOFT_TARGET: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """Per-class weight of the loss's linear term in z, 0 on masked lanes.

    Index targets: w_j (1 without class weights). Probability targets: w_j ((1 - eps) t_j + eps/C).
    """
    if HAS_SOFT_TARGET:
        v = tl.load(t_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTHING:
            v = tl.where(mask, v * one_minus_eps + eps_over_c, 0.0)
        if HAS_WEIGHT:
            v = v * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        v = class_weight(weight_ptr, cols, mask, HAS_WEIGHT)
    return v


@triton.jit
def _block_cols(start, BLOCK: tl.constexpr, CONTIGUOUS: tl.constexpr):
    """The columns of the block at ``start``. Gradient rows that are not 16-byte aligned are stored
    one element per thread; a 16-byte aligned class-weight (or target) row would be loaded four
    per thread, and the layout conversion between the two costs 8 bar.sync per block. Declaring
    the columns non-contiguous (``CONTIGUOUS`` False) keeps every access of a row loop in the
    store's layout."""
    cols = start + tl.arange(0, BLOCK)
    if not CONTIGUOUS:
        cols = tl.max_contiguous(cols, 1)
    return cols


@triton.jit
def _merge_target(m, s, z_y, counted):
    """Fold the target logit z_y, left out of the online (m, s) of a row, back in.

    Returns (lse, shift, sumexp, p_y, p_other = 1 - p_y, log p_y) with sumexp = sum_j exp(z_j - shift), so
    p_j = exp(z_j - shift) / sumexp: z_j - shift is exact where it matters, unlike z_j - lse once
    lse has been rounded (at |z| ~ 1e30, lse - z_y is 0 in float32 while log p_y is -log 2).
    1 - p_y = (sum of the other classes' exps) / sumexp is accurate to float32 rounding for any
    p_y (no 1 - p cancellation); log p_y = log1p(-(1 - p_y)) where p_y > 1/2, else
    (z_y - shift) - log(sumexp). Rows that are not counted (m, s hold all classes) return
    (lse, ..., 0, 1, -inf)-like values that the caller masks out.
    """
    m_full = tl.where(counted, tl.maximum(m, z_y), m)
    shift = safe_shift(m_full)
    s_other = s * tl.exp(m - shift)
    e_y = tl.where(counted, tl.exp(z_y - shift), 0.0)
    s_all = s_other + e_y
    log_s = tl.log(s_all)
    lse = m_full + log_s
    p_other = s_other / s_all
    p_y = e_y / s_all
    lp = tl.where(p_other < 0.5, log1m(tl.minimum(p_other, 0.5)), (z_y - shift) - log_s)
    return lse, shift, s_all, p_y, p_other, lp


@triton.jit
def _focal_terms(lp, p_y, p_other, gamma):
    """((1 - p)^gamma, 1 - gamma p lp / (1 - p)) for p = p_y (celoss.stats.focal_factor), finite
    as p -> 1 (lp / (1 - p) -> -1), for gamma < 1, and as p -> 0; p_other = 1 - p_y."""
    pos = p_other > 0
    safe = tl.where(pos, p_other, 1.0)
    ratio = tl.where(pos, lp / safe, -1.0)
    decay = tl.where(pos, tl.exp2(gamma * tl.log2(safe)), tl.where(gamma == 0, 1.0, 0.0))
    p_ratio = tl.where(p_y > 0, p_y * ratio, 0.0)
    return decay, 1.0 - gamma * p_ratio


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _ce_fused_kernel(
    logits_ptr, stride_x, target_ptr, soft_ptr, stride_t, weight_ptr, wsum_ptr, coef_ptr,
    grad_ptr, stride_g, loss_ptr, lse_ptr, C, ignore_index, one_minus_eps, eps_over_c,
    scale, softcap, inv_softcap, z_loss, gamma, split_ptr, num_splits, span,
    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SOFT_TARGET: tl.constexpr, IS_FOCAL: tl.constexpr,
    HAS_GRAD: tl.constexpr, PER_ROW_COEF: tl.constexpr, ALIGNED_GRAD: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Loss, lse and (HAS_GRAD) the gradient of one row (program_id(0) = row).

    SPLIT (index targets; split-vocabulary mode): pass 1 is replaced by the merge of the row's
    ``num_splits`` range statistics in ``split_ptr`` ((K, N, 4) from ``_ce_stats_kernel`` with
    EXCLUDE_TARGET, so the merged (max, sumexp) are pass 1's), and program (row, k) writes the
    gradient of classes [k span, (k + 1) span) only; split 0 stores loss and lse.

    Math (celoss/stats.py; z = transformed logits, p = softmax(z), w = class weights or 1,
    W = sum_c w_c, eps = label smoothing, lam = z-loss, y = target, lp = log p_y = z_y - lse):

    * Pass 1 (online over blocks): max and sumexp of the classes other than y (all classes for
      probability targets and ignored rows), then z_y (one scalar load) folded in:
      lse = max + log(sumexp), 1 - p_y = sumexp_other / sumexp (accurate for p_y -> 1),
      lp = log1p(-(1 - p_y)) for p_y > 1/2 else z_y - lse. For smoothing wz = sum_j w_j z_j;
      for probability targets wt_j = w_j ((1 - eps) t_j + eps / C), mass = sum_j wt_j and
      wz = sum_j wt_j z_j.
    * Loss and coefficients of dloss/dz_j = A p_j - B [j == y] - D w_j (index targets) or
      A p_j - wt_j (probability targets):
        cross-entropy  loss = -w_y (1-eps) lp + eps/C (W lse - wz) + lam w_y lse^2
                       A = w_y (1-eps) + eps W / C + 2 lam w_y lse,  B = w_y (1-eps),  D = eps / C
        focal          loss = -w_y (1-p_y)^gamma lp,  A = B = g,  D = 0,
                       g = w_y (1-p_y)^gamma (1 - gamma p_y lp / (1-p_y))
                       (lp / (1-p_y) -> -1 as p_y -> 1, so g stays finite for gamma < 1)
        probabilities  loss = mass lse - wz + lam lse^2,  A = mass + 2 lam lse
      Ignored rows (y == ignore_index): loss 0 and A = B = D = 0, so a zero gradient; their
      logits are not re-read by pass 2.
    * Pass 2: grad_j = coef_n * dz_j/dx_j * dloss/dz_j with dz/dx = scale (1 - (z/softcap)^2)
      (scale without softcap). The target element A p_y - B - D w_y is evaluated as
      (A - B) p_y - B (1 - p_y) - D w_y: no 1 - p_y cancellation as p_y -> 1 (where float32
      p_y - 1 would round to 0 and bf16 gradients would lose the true-class term).
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride_x
    t_row = soft_ptr
    if HAS_SOFT_TARGET:
        t_row = soft_ptr + row * stride_t
        counted = True
        y = 0
        y_out = -1
    else:
        y = tl.load(target_ptr + row)
        counted = y != ignore_index
        # an out-of-range target (the host check is skipped while a CUDA graph is captured) reads
        # class 0 and makes the row's loss NaN: never an out-of-bounds read
        bad_target = counted & ((y < 0) | (y >= C))
        y = tl.where(counted & (y >= 0) & (y < C), y, 0).to(tl.int32)  # valid (< C < 2^31): int32 compares
        y_out = tl.where(counted, y, -1)  # the class left out of pass 1 (none if ignored)
    NEED_LIN: tl.constexpr = HAS_SOFT_TARGET or (HAS_SMOOTHING and not IS_FOCAL)

    # Probability targets keep their 16-byte target and weight loads: unvectorized, they spilled on
    # sm_90 (fp32 rows off the 16-byte grid); their unaligned gradient loop pays the conversion.
    CONTIGUOUS: tl.constexpr = ALIGNED_GRAD or HAS_SOFT_TARGET

    if SPLIT:
        # ---- the split statistics, merged as celoss.stats.merge_all does ---------------------
        ks = tl.arange(0, MAX_SPLITS)
        st = split_ptr + row * 4 + ks.to(tl.int64) * tl.num_programs(0) * 4
        m, s = lane_finish(tl.load(st, mask=ks < num_splits, other=-float("inf")),
                           tl.load(st + 1, mask=ks < num_splits, other=0.0))
        wz = tl.sum(tl.load(st + 3, mask=ks < num_splits, other=0.0), axis=0)
        # z_y from the statistics: in place, another split may already have overwritten x_y
        z_y_split = tl.sum(tl.load(st + 2, mask=ks < num_splits, other=0.0), axis=0)
    else:
        # ---- pass 1: online statistics, per lane (no barrier in the loop), merged once --------
        m_lane = tl.full((BLOCK,), -float("inf"), tl.float32)
        s_lane = tl.zeros((BLOCK,), tl.float32)
        wz_lane = tl.zeros((BLOCK,), tl.float32)
        mass = 0.0  # (created after the lane vectors: the loop-carried order ptxas allocates best)
        for start in range(0, C, BLOCK):
            cols = _block_cols(start, BLOCK, CONTIGUOUS)
            mask = cols < C
            # keep the row in L2 for pass 2 (the contract: one read of the logits from memory)
            x = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy="evict_last")
            z, _ = transform(x, scale, softcap, inv_softcap, HAS_SOFTCAP)
            if HAS_SOFT_TARGET:
                m_lane, s_lane = lane_update(m_lane, s_lane, tl.where(mask, z, -float("inf")))
            else:
                m_lane, s_lane = lane_update(m_lane, s_lane, tl.where(mask & (cols != y_out), z, -float("inf")))
            if NEED_LIN:
                v = _term_weight(weight_ptr, t_row, cols, mask, one_minus_eps, eps_over_c,
                                 HAS_WEIGHT, HAS_SOFT_TARGET, HAS_SMOOTHING)
                wz_lane += v * z
                if HAS_SOFT_TARGET:  # a block sum, not a fourth lane vector: that one spilled
                    mass += tl.sum(v, axis=0)
        m, s = lane_finish(m_lane, s_lane)
        wz = tl.sum(wz_lane, axis=0)

    # ---- loss and row coefficients -------------------------------------------------------
    d = 0.0
    g_y = 0.0
    if HAS_SOFT_TARGET:
        lse = m + tl.log(s)
        shift = safe_shift(m)
        s_all = s
        loss = mass * lse - wz + z_loss * lse * lse
        a = mass + 2.0 * z_loss * lse
    else:
        if SPLIT:
            z_y = z_y_split
        else:
            x_y = tl.load(x_row + y)
            z_y, _ = transform(x_y, scale, softcap, inv_softcap, HAS_SOFTCAP)
        lse, shift, s_all, p_y, p_other, lp = _merge_target(m, s, z_y, counted)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y, mask=counted, other=0.0).to(tl.float32)
        else:
            w_y = tl.where(counted, 1.0, 0.0)
        if IS_FOCAL:
            decay, slope = _focal_terms(lp, p_y, p_other, gamma)
            loss = -w_y * decay * lp
            a = w_y * decay * slope
            b = a
        else:
            b = w_y * one_minus_eps
            loss = -b * lp + z_loss * w_y * lse * lse
            a = b + 2.0 * z_loss * w_y * lse
            if HAS_SMOOTHING:
                c = tl.where(counted, 1.0, 0.0)
                if HAS_WEIGHT:
                    w_sum = tl.load(wsum_ptr).to(tl.float32)
                else:
                    w_sum = C * 1.0
                loss += eps_over_c * (w_sum * lse - wz)
                a += eps_over_c * w_sum * c
                d = eps_over_c * c
        # target element of dloss/dz: A p_y - B - D w_y without the 1 - p_y cancellation
        g_y = (a - b) * p_y - b * p_other - d * w_y
        # ignored rows: exact zeros, whatever their logits (0 * inf / NaN would not be)
        loss = tl.where(bad_target, float("nan"), tl.where(counted, loss, 0.0))
        a = tl.where(counted, a, 0.0)
        g_y = tl.where(counted, g_y, 0.0)
    # a NaN / +inf logit, or only -inf ones: PyTorch's log_softmax is NaN for the whole row
    finite_row = tl.abs(lse) < float("inf")
    loss = tl.where(counted & (finite_row == 0), float("nan"), loss)
    if SPLIT:
        tl.store(loss_ptr + row, loss, mask=tl.program_id(1) == 0)
        tl.store(lse_ptr + row, lse, mask=tl.program_id(1) == 0)
        lo = tl.program_id(1) * span
        hi = tl.minimum(lo + span, C)
    else:
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        lo = 0
        hi = C

    # ---- pass 2: gradient ----------------------------------------------------------------
    if HAS_GRAD:
        coef = row_coef(coef_ptr, row, PER_ROW_COEF)
        g_row = grad_ptr + row * stride_g
        # ignored rows read nothing and get 0 * softmax, as in PyTorch: zeros, or NaN where the
        # row's softmax is NaN (a NaN / +inf logit, or every logit -inf), whatever the coefficient
        ignored_g = tl.where(finite_row, 0.0, float("nan"))
        n_read = tl.where(counted, C, 0)
        shift = tl.where(finite_row, shift, float("nan"))  # p_j = NaN for a non-finite row
        a_over_s = a / s_all
        g_y = tl.where(finite_row, g_y, float("nan"))
        for start in range(lo, hi, BLOCK):
            cols = _block_cols(start, BLOCK, CONTIGUOUS)
            mask = cols < C
            x = tl.load(x_row + cols, mask=cols < n_read, other=0.0, eviction_policy="evict_first")
            z, dz = transform(x, scale, softcap, inv_softcap, HAS_SOFTCAP)
            g = a_over_s * tl.exp(z - shift)
            if HAS_SOFT_TARGET:
                g -= _term_weight(weight_ptr, t_row, cols, mask, one_minus_eps,
                                  eps_over_c, HAS_WEIGHT, HAS_SOFT_TARGET, HAS_SMOOTHING)
            else:
                if HAS_SMOOTHING and not IS_FOCAL:
                    g -= d * class_weight(weight_ptr, cols, mask, HAS_WEIGHT)
                g = tl.where(cols == y, g_y, g)
            g = tl.where(counted, g * dz * coef, ignored_g)
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_stats_kernel(
    logits_ptr, stride_x, target_ptr, weight_ptr, out_ptr, C, span, class_start, ignore_index,
    scale, softcap, inv_softcap,
    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EXCLUDE_TARGET: tl.constexpr,
):
    """(max, sumexp, target_z, weighted_z) of the classes [lo, lo + span) of one row (program_id(0)),
    lo = span * program_id(1) (the split), the row's classes numbered from class_start.
    EXCLUDE_TARGET: (max, sumexp) leave the target class out, as the fused kernel's pass 1 does
    (its split mode folds z_y back in without the 1 - p_y cancellation).

    target_z = z_y if the (non-ignored) target falls in the split, else 0;
    weighted_z = sum_j w_j z_j (w = 1 without class weights). Stored in out (splits, N, 4) float32.
    ``span`` is a multiple of BLOCK, so no block crosses into the next split.
    """
    row = tl.program_id(0).to(tl.int64)
    lo = tl.program_id(1) * span
    hi = tl.minimum(lo + span, C)
    x_row = logits_ptr + row * stride_x
    y = tl.load(target_ptr + row)
    local = y - class_start
    here = (local >= lo) & (local < hi) & (y != ignore_index)
    local = tl.where(here, local, 0)
    y_col = tl.where(here, local, -1).to(tl.int32)  # valid: < C < 2^31
    m_lane = tl.full((BLOCK,), -float("inf"), tl.float32)
    s_lane = tl.zeros((BLOCK,), tl.float32)
    wz_lane = tl.zeros((BLOCK,), tl.float32)
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(x_row + cols, mask=mask, other=0.0)
        z, _ = transform(x, scale, softcap, inv_softcap, HAS_SOFTCAP)
        if EXCLUDE_TARGET:
            m_lane, s_lane = lane_update(m_lane, s_lane, tl.where(mask & (cols != y_col), z, -float("inf")))
        else:
            m_lane, s_lane = lane_update(m_lane, s_lane, tl.where(mask, z, -float("inf")))
        wz_lane += class_weight(weight_ptr, cols, mask, HAS_WEIGHT) * z
    m, s = lane_finish(m_lane, s_lane)
    wz = tl.sum(wz_lane, axis=0)
    x_y = tl.load(x_row + local, mask=here, other=0.0)
    z_y, _ = transform(x_y, scale, softcap, inv_softcap, HAS_SOFTCAP)
    z_y = tl.where(here, z_y, 0.0)
    o = out_ptr + row * 4 + tl.program_id(1).to(tl.int64) * tl.num_programs(0) * 4
    tl.store(o, m)
    tl.store(o + 1, s)
    tl.store(o + 2, z_y)
    tl.store(o + 3, wz)


@triton.jit
def _ce_grad_kernel(
    logits_ptr, stride_x, target_ptr, weight_ptr, lse_ptr, row_coefs_ptr, grad_ptr, stride_g,
    C, span, class_start, scale, softcap, inv_softcap,
    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ALIGNED_GRAD: tl.constexpr,
):
    """grad_j = dz_j/dx_j (A p_j - B [j + class_start == y] - D w_j) for one row (program_id(0)) of a
    class block, over its classes [lo, lo + span), lo = span * program_id(1) (the split).

    p_j = exp(z_j - lse) with the full-row lse; (A, B, D) = row_coefs[row] (already scaled by the
    upstream gradient). The target element uses (A - B) p_y + B expm1(z_y - lse) (see the fused
    kernel). Rows with A = B = D = 0 (ignored rows) are written as zeros without reading logits.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride_x
    g_row = grad_ptr + row * stride_g
    y = tl.load(target_ptr + row)
    local = y - class_start
    here = (local >= 0) & (local < C)
    local = tl.where(here, local, 0).to(tl.int32)
    lse = tl.load(lse_ptr + row).to(tl.float32)
    a = tl.load(row_coefs_ptr + row * 3).to(tl.float32)
    b = tl.load(row_coefs_ptr + row * 3 + 1).to(tl.float32)
    d = tl.load(row_coefs_ptr + row * 3 + 2).to(tl.float32)
    # Columns to read: none for rows with A = B = D = 0. (An integer bound rather than
    # `mask & scalar_float_compare`, which Triton 3.6's interpreter mis-broadcasts.)
    active = (a != 0.0) | (b != 0.0) | (d != 0.0)
    n_read = tl.where(active, C, 0)
    lse = tl.where(active, lse, 0.0)  # zeros for inactive rows even if their lse is inf / NaN
    x_y = tl.load(x_row + local, mask=local < n_read, other=0.0)
    z_y, _ = transform(x_y, scale, softcap, inv_softcap, HAS_SOFTCAP)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + local, mask=here, other=0.0).to(tl.float32)
    else:
        w_y = 1.0
    lp = z_y - lse
    g_y = (a - b) * tl.exp(lp) + b * expm1(lp) - d * w_y
    y_col = tl.where(here, local, -1)  # the target's column in this block, -1 if elsewhere
    lo = tl.program_id(1) * span
    for start in range(lo, tl.minimum(lo + span, C), BLOCK):
        cols = _block_cols(start, BLOCK, ALIGNED_GRAD)
        mask = cols < C
        x = tl.load(x_row + cols, mask=cols < n_read, other=0.0)
        z, dz = transform(x, scale, softcap, inv_softcap, HAS_SOFTCAP)
        g = a * tl.exp(z - lse)
        g -= d * class_weight(weight_ptr, cols, mask, HAS_WEIGHT)
        g = tl.where(cols == y_col, g_y, g)
        g = g * dz
        tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def fused_plan(logits, target, soft_target, weight, coef, grad_out, *, ignore_index, label_smoothing,
               logit_scale, softcap, z_loss, focal_gamma, split_stats=None):
    """Kernel, grid, keyword arguments and launch options of :func:`fused`, plus (loss, lse).
    ``split_stats``: (K, N, 4) range statistics of index-target rows (``stats_plan`` with
    ``exclude_target``), K > 1: the split-vocabulary mode, K programs per row."""
    check_rows(logits, "logits", "cross-entropy")
    n, c = logits.shape
    if c == 0 and n > 0:
        raise ValueError("cross-entropy needs at least one class")
    dev = logits.device
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    weight = f32(weight)
    has_soft = soft_target is not None
    is_focal = focal_gamma is not None
    eps = float(label_smoothing or 0.0)
    has_smoothing = eps != 0.0 and not is_focal
    wsum = weight.sum().reshape(1) if (weight is not None and has_smoothing and not has_soft) else None
    has_grad = grad_out is not None
    scale, cap, inv_cap = softcap_args(logit_scale, softcap)
    block, num_warps = block_config(c)
    if has_soft and soft_target.shape[1] > 1 and soft_target.stride(1) != 1:
        soft_target = soft_target.contiguous()
    if target is not None:
        target = target.contiguous()
    if has_grad:
        assert grad_out.shape[1] <= 1 or grad_out.stride(1) == 1
    splits = 1 if split_stats is None else split_stats.shape[0]
    span, count = split_span(c, splits, block)
    assert count == splits and (splits == 1 or not has_soft), (count, splits)
    kwargs = with_flags(dict(
        logits_ptr=logits, stride_x=logits.stride(0),
        target_ptr=None if has_soft else target,
        soft_ptr=soft_target if has_soft else None,
        stride_t=soft_target.stride(0) if has_soft else 0,
        weight_ptr=weight, wsum_ptr=wsum,
        coef_ptr=f32(coef) if has_grad else None,
        grad_ptr=grad_out, stride_g=grad_out.stride(0) if has_grad else 0,
        loss_ptr=loss, lse_ptr=lse, C=c, ignore_index=int(ignore_index),
        one_minus_eps=1.0 - eps, eps_over_c=eps / max(c, 1),
        scale=scale, softcap=cap, inv_softcap=inv_cap, z_loss=float(z_loss or 0.0),
        gamma=float(focal_gamma) if is_focal else 0.0, split_ptr=split_stats, num_splits=splits, span=span,
        BLOCK=block, HAS_SMOOTHING=has_smoothing, HAS_SOFTCAP=softcap is not None, IS_FOCAL=is_focal,
        PER_ROW_COEF=has_grad and coef.numel() != 1, ALIGNED_GRAD=not has_grad or aligned16(grad_out),
    ), HAS_WEIGHT="weight_ptr", HAS_SOFT_TARGET="soft_ptr", HAS_GRAD="grad_ptr", SPLIT="split_ptr")
    grid = (n, splits if has_grad else 1)  # without a gradient, split 0 merges and stores alone
    return _ce_fused_kernel, grid, kwargs, dict(num_warps=num_warps, maxnreg=MAXNREG), (loss, lse)


def split_span(num_classes: int, splits: int, block: int) -> tuple[int, int]:
    """(span, count): ``splits`` contiguous class ranges of ``span`` classes each, ``span`` a multiple
    of ``block`` (so every split but the last is whole blocks, and its columns keep the row's
    16-byte alignment), ``count`` <= ``splits`` of them non-empty; (whole blocks of the row, 1)
    without a split."""
    blocks = max(triton.cdiv(num_classes, block), 1)
    span = triton.cdiv(blocks, max(min(int(splits), blocks), 1)) * block
    return span, max(triton.cdiv(num_classes, span), 1)


def stats_plan(logits, target, weight, *, class_start, ignore_index, logit_scale, softcap, splits=1,
               exclude_target=False):
    check_rows(logits, "logits", "cross-entropy")
    n, c = logits.shape
    scale, cap, inv_cap = softcap_args(logit_scale, softcap)
    block, num_warps = block_config(c)
    span, count = split_span(c, splits, block)
    out = torch.empty(count, n, 4, dtype=torch.float32, device=logits.device)
    kwargs = with_flags(dict(
        logits_ptr=logits, stride_x=logits.stride(0), target_ptr=target.contiguous(), weight_ptr=f32(weight),
        out_ptr=out, C=c, span=span, class_start=int(class_start), ignore_index=int(ignore_index),
        scale=scale, softcap=cap, inv_softcap=inv_cap, BLOCK=block, HAS_SOFTCAP=softcap is not None,
        EXCLUDE_TARGET=exclude_target,
    ), HAS_WEIGHT="weight_ptr")
    return _ce_stats_kernel, (n, count), kwargs, dict(num_warps=num_warps, maxnreg=MAXNREG), out


def grad_plan(logits, target, weight, lse, row_coefs, grad_out, *, class_start, logit_scale, softcap,
              splits=1):
    check_rows(logits, "logits", "cross-entropy")
    n, c = logits.shape
    scale, cap, inv_cap = softcap_args(logit_scale, softcap)
    block, num_warps = block_config(c)
    span, count = split_span(c, splits, block)
    assert grad_out.shape[1] <= 1 or grad_out.stride(1) == 1
    kwargs = with_flags(dict(
        logits_ptr=logits, stride_x=logits.stride(0), target_ptr=target.contiguous(), weight_ptr=f32(weight),
        lse_ptr=f32(lse), row_coefs_ptr=f32(row_coefs), grad_ptr=grad_out, stride_g=grad_out.stride(0),
        C=c, span=span, class_start=int(class_start), scale=scale, softcap=cap, inv_softcap=inv_cap,
        BLOCK=block, HAS_SOFTCAP=softcap is not None, ALIGNED_GRAD=aligned16(grad_out),
    ), HAS_WEIGHT="weight_ptr")
    return _ce_grad_kernel, (n, count), kwargs, dict(num_warps=num_warps, maxnreg=MAXNREG), grad_out


def _row_major_out(out: torch.Tensor):
    """A unit-class-stride tensor to write into (``out`` itself when it already is one)."""
    if out.dim() == 2 and (out.shape[1] <= 1 or out.stride(1) == 1):
        return out
    return torch.empty(out.shape, dtype=out.dtype, device=out.device)


def fused(logits, target, soft_target, weight, coef, grad_out, *, ignore_index=-100,
          label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0, focal_gamma=None):
    """Per-row (loss, lse) float32 and, when ``grad_out`` is given, ``coef * dloss/dlogits``.

    Few rows of many classes with index targets (:func:`split_count`) run split: range statistics
    (``_ce_stats_kernel``, several programs per row), then the fused kernel merging them and writing
    each range's gradient (two launches, no host synchronization)."""
    buf = None if grad_out is None else _row_major_out(grad_out)
    split_stats = None
    if soft_target is None and logits.dim() == 2:
        splits = split_count(*logits.shape, logits.device)
        if splits > 1 and split_span(logits.shape[1], splits, block_config(logits.shape[1])[0])[1] > 1:
            split_stats = launch(stats_plan(logits, target, weight, class_start=0, ignore_index=ignore_index,
                                            logit_scale=logit_scale, softcap=softcap, splits=splits,
                                            exclude_target=True))
    loss, lse = launch(fused_plan(
        logits, target, soft_target, weight, coef, buf, ignore_index=ignore_index,
        label_smoothing=label_smoothing, logit_scale=logit_scale, softcap=softcap,
        z_loss=z_loss, focal_gamma=focal_gamma, split_stats=split_stats))
    if buf is not None and buf is not grad_out:
        grad_out.copy_(buf)
    return loss, lse


def stats(logits, target, weight, *, class_start=0, ignore_index=-100, logit_scale=1.0, softcap=None,
          splits=None):
    """(N, 4) float32 row statistics of the class block ``[class_start, class_start + C)``; with
    ``splits``, (K, N, 4) statistics of K <= splits contiguous ranges of it (:func:`split_span`),
    several programs per row, to merge with ``celoss.stats.merge_all``."""
    out = launch(stats_plan(logits, target, weight, class_start=class_start, ignore_index=ignore_index,
                            logit_scale=logit_scale, softcap=softcap, splits=splits or 1))
    return out if splits else out[0]


def grad(logits, target, weight, lse, row_coefs, grad_out, *, class_start=0, logit_scale=1.0,
         softcap=None, splits=1):
    """Writes ``dz/dx * (A p - B onehot - D w)`` of a class block into ``grad_out`` (may alias);
    ``splits`` programs per row, each over a contiguous range of classes."""
    buf = _row_major_out(grad_out)
    launch(grad_plan(logits, target, weight, lse, row_coefs, buf, class_start=class_start,
                     logit_scale=logit_scale, softcap=softcap, splits=splits))
    if buf is not grad_out:
        grad_out.copy_(buf)
    return grad_out
