"""Triton row kernel for knowledge distillation (the ``distill_fused`` backend contract).

One program per row of ``(N, V)`` student / teacher logits, looping over the classes in blocks of
``BLOCK``. Both softmaxes (at temperature T) are computed online in float32 whatever the dtypes
(fp32 / fp16 / bf16, student and teacher independently): no N x V probability tensor is written.

Math (a = s / T, b = t / T, p_S = softmax(a), p_T = softmax(b); the same as the CPU kernel in
``cpu/_family.pyx`` and the reference in ``celoss/backends/reference.py``)::

    KIND 0 "kl"          D = KL(p_T || p_S)   dD/da = p_S - p_T
    KIND 1 "reverse_kl"  D = KL(p_S || p_T)   dD/da = p_S (log p_S - log p_T - D)
    KIND 2 "ce"          D = H(p_T, p_S)      dD/da = p_S - p_T
    KIND 3 "jsd"         M = beta p_T + (1 - beta) p_S
                         D = beta KL(p_T || M) + (1 - beta) KL(p_S || M)
                         dD/da = (1 - beta) p_S (log p_S - log M - KL(p_S || M))
    loss = ws D + wh (lse(s) - s_y)          (ws = alpha T^2, wh = 1 - alpha, or 0: no class term)
    grad = coef (ws / T dD/da + wh (softmax(s) - onehot(y)))

Pass 1 keeps running maxima (ms, mt) and rescaled sums Ss = sum e^(a - ms), St = sum e^(b - mt)
and, for kl / ce / reverse_kl, a weighted sum of max-shifted differences (no cancellation of
large common offsets)::

    kl:  K = sum e^(b - mt) ((b - mt) - (a - ms))   D = K / St + log Ss - log St
    ce:  K = sum e^(b - mt) (a - ms)                D = log Ss - K / St
    rkl: K = sum e^(a - ms) ((a - ms) - (b - mt))   D = K / Ss - log Ss + log St

A term whose weight e^(.) is 0 contributes 0 (0 log 0 = 0), so -inf logits (masked classes) work.
jsd needs both log-sum-exps first: pass 2 sums D and KL(p_S || M). The last pass writes the
gradient; the target element of the class term uses expm1 (no 1 - p cancellation). With a class
term at T != 1, pass 1 also sums e^(s - max s). Rows whose target is ``ignore_index`` get loss 0
and a zero gradient (the gradient pass does not read them); a target outside [0, V) (celoss checks
them before the launch) reads class 0 and gets a NaN loss: never an out-of-bounds read. A row with
a NaN or +inf in a or b, or only -inf, gets a NaN loss (0 if ignored) and a NaN gradient, as
PyTorch's composition.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._host import SUPPORTED_DTYPES, check_rows, f32, launch, with_flags  # noqa: F401 (SUPPORTED_DTYPES: API)
from ._tl import expm1, log1p01, row_coef, safe_shift

KINDS = {"kl": 0, "reverse_kl": 1, "ce": 2, "jsd": 3}
MIN_BLOCK = 64
MAX_BLOCK = 4096  # two rows (student and teacher) in flight: half of cross-entropy's block
MAX_BLOCK_JSD = 2048  # jsd keeps more state per element (log M in two passes)
# At most 8 elements per thread and tensor, and jsd at most 2048 per block: offline sweeps of every
# flag combination found small spills on sm_80 / sm_90 for bf16 jsd at 4096 (8 or 16 warps) and for
# bf16 reverse_kl with a class term at 4096 / 8 warps; none with these configurations.
BLOCK_CONFIGS = tuple((1 << k, max(1, min(16, (1 << k) // 256))) for k in range(6, 13))


def max_block(kind: str = "kl") -> int:
    return MAX_BLOCK_JSD if kind == "jsd" else MAX_BLOCK


def block_config(num_classes: int, kind: str = "kl") -> tuple[int, int]:
    """(BLOCK, num_warps): at most 8 elements per thread and tensor (no spills, see the AOT test)."""
    block = min(max(triton.next_power_of_2(max(int(num_classes), 1)), MIN_BLOCK), max_block(kind))
    return block, max(1, min(16, block // 256))


@triton.jit
def _log_mix(lpS, lpT, log_beta, log_1mbeta):
    """log M = log(beta p_T + (1 - beta) p_S) from the log-probabilities."""
    u = log_beta + lpT
    v = log_1mbeta + lpS
    mx = tl.maximum(u, v)
    d = tl.where(u > v, v - u, u - v)
    return mx + log1p01(tl.exp(d))


@triton.jit
def _soft_grad(a, b, ms, mt, lSs, lSt, r, log_beta, log_1mbeta, one_minus_beta, KIND: tl.constexpr):
    """(dD/da, p_S) of elements a, b (blocks or scalars); r = D for reverse_kl, KL(p_S||M) for jsd."""
    da = a - ms
    db = b - mt
    lpS = da - lSs
    pS = tl.exp(lpS)
    if KIND == 0 or KIND == 2:
        g = pS - tl.exp(db - lSt)
    elif KIND == 1:
        g = tl.where(pS > 0, pS * (da - db - r), 0.0)
    else:
        lM = _log_mix(lpS, db - lSt, log_beta, log_1mbeta)
        g = tl.where(pS > 0, one_minus_beta * pS * (lpS - lM - r), 0.0)
    return g, pS


@triton.jit
def _distill_kernel(
    s_ptr, stride_s, t_ptr, stride_t, y_ptr, coef_ptr, g_ptr, stride_g, loss_ptr,
    V, ignore_index, inv_T, ws, wh, beta, log_beta, log_1mbeta,
    BLOCK: tl.constexpr, KIND: tl.constexpr, HAS_TARGET: tl.constexpr, HARD: tl.constexpr,
    T_IS_ONE: tl.constexpr, HAS_GRAD: tl.constexpr, PER_ROW_COEF: tl.constexpr,
):
    """Loss (and with HAS_GRAD the student gradient) of one row; see the module docstring."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        counted = y != ignore_index
        # an out-of-range target (the device-side assert is queued, it doesn't stop this kernel)
        # reads class 0 and makes the row's loss NaN: never an out-of-bounds read
        bad_target = counted & ((y < 0) | (y >= V))
        y = tl.where(counted & (y >= 0) & (y < V), y, 0)
        # the gradient pass reads no class of an ignored row: a scalar bound, not `block &
        # scalar` (Triton 3.9's interpreter rejects a mask broadcast from a scalar)
        v_read = tl.where(counted, V, 0)
    else:
        counted = True
        bad_target = False
        y = 0
        v_read = V
    SEP1: tl.constexpr = HARD and not T_IS_ONE

    # ---- pass 1: online maxima and sums ---------------------------------------------------
    ms = -float("inf")
    mt = -float("inf")
    m1 = -float("inf")
    nan = 0
    ss = 0.0
    st = 0.0
    kk = 0.0
    s1 = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V  # ignored rows too: their gradient is NaN when the row is poisoned
        s = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        a = s * inv_T
        b = t * inv_T
        # a max may drop NaN (the GPU's max.f32 does): count NaNs explicitly
        nan += tl.sum(((a != a) | (b != b)).to(tl.int32), axis=0)
        ms_new = tl.maximum(ms, tl.max(a, axis=0))
        mt_new = tl.maximum(mt, tl.max(b, axis=0))
        msf, mtf = safe_shift(ms), safe_shift(mt)
        msf_new, mtf_new = safe_shift(ms_new), safe_shift(mt_new)
        dms = msf_new - msf
        dmt = mtf_new - mtf
        fs = tl.where(ss > 0, tl.exp(-dms), 0.0)
        ft = tl.where(st > 0, tl.exp(-dmt), 0.0)
        if KIND == 0:
            kk = tl.where(st > 0, (kk + st * (dms - dmt)) * ft, 0.0)
        elif KIND == 2:
            kk = tl.where(st > 0, (kk - st * dms) * ft, 0.0)
        elif KIND == 1:
            kk = tl.where(ss > 0, (kk + ss * (dmt - dms)) * fs, 0.0)
        ms, mt = ms_new, mt_new
        da = a - msf_new
        db = b - mtf_new
        es = tl.exp(da)
        et = tl.exp(db)
        ss = ss * fs + tl.sum(es, axis=0)
        st = st * ft + tl.sum(et, axis=0)
        if KIND == 0:
            kk += tl.sum(tl.where(et > 0, et * (db - da), 0.0), axis=0)
        elif KIND == 2:
            kk += tl.sum(tl.where(et > 0, et * da, 0.0), axis=0)
        elif KIND == 1:
            kk += tl.sum(tl.where(es > 0, es * (da - db), 0.0), axis=0)
        if SEP1:
            m1_new = tl.maximum(m1, tl.max(s, axis=0))
            m1f, m1f_new = safe_shift(m1), safe_shift(m1_new)
            s1 = tl.where(s1 > 0, s1 * tl.exp(m1f - m1f_new), 0.0) + tl.sum(tl.exp(s - m1f_new), axis=0)
            m1 = m1_new
    # a NaN, a +inf or only -inf in either row: NaN loss and gradient (PyTorch's log_softmax)
    poison = (nan > 0) | (tl.abs(ms) == float("inf")) | (tl.abs(mt) == float("inf"))
    ms = safe_shift(ms)
    mt = safe_shift(mt)
    m1 = safe_shift(m1)
    lSs = tl.log(ss)
    lSt = tl.log(st)
    one_minus_beta = 1.0 - beta

    # ---- the divergence (pass 2 for jsd) ---------------------------------------------------
    ksm = 0.0
    if KIND == 0:
        d_val = kk / st + lSs - lSt
    elif KIND == 2:
        d_val = lSs - kk / st
    elif KIND == 1:
        d_val = kk / ss - lSs + lSt
    else:
        kt = 0.0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < v_read
            s = tl.load(s_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            lpS = (s * inv_T - ms) - lSs
            lpT = (t * inv_T - mt) - lSt
            pS = tl.exp(lpS)
            pT = tl.exp(lpT)
            lM = _log_mix(lpS, lpT, log_beta, log_1mbeta)
            kt += tl.sum(tl.where(pT > 0, pT * (lpT - lM), 0.0), axis=0)
            ksm += tl.sum(tl.where(pS > 0, pS * (lpS - lM), 0.0), axis=0)
        d_val = beta * kt + one_minus_beta * ksm

    loss = ws * d_val
    lS1 = 0.0
    if HARD:
        # y is 0 for an ignored or out-of-range target and V >= 1: always in bounds (no scalar
        # mask: Triton >= 3.9's interpreter rejects them)
        s_y = tl.load(s_row + y).to(tl.float32)
        if T_IS_ONE:
            lp1_y = (s_y - ms) - lSs
        else:
            lS1 = tl.log(s1)
            lp1_y = (s_y - m1) - lS1
        loss += wh * -lp1_y
    loss = tl.where(poison, float("nan"), loss)
    loss = tl.where(bad_target, float("nan"), tl.where(counted, loss, 0.0))
    tl.store(loss_ptr + row, loss)

    # ---- last pass: gradient --------------------------------------------------------------
    if HAS_GRAD:
        coef = row_coef(coef_ptr, row, PER_ROW_COEF)
        cw = coef * ws * inv_T
        c1 = coef * wh
        if KIND == 1:
            r = lSs - lSt + d_val
        else:
            r = ksm
        g_y = 0.0
        if HARD:
            t_y = tl.load(t_row + y).to(tl.float32)
            soft_y, _ = _soft_grad(s_y * inv_T, t_y * inv_T, ms, mt, lSs, lSt, r, log_beta,
                                   log_1mbeta, one_minus_beta, KIND)
            g_y = cw * soft_y + c1 * expm1(lp1_y)
        g_row = g_ptr + row * stride_g
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < V
            mask = cols < v_read
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            soft, pS = _soft_grad(s * inv_T, t * inv_T, ms, mt, lSs, lSt, r, log_beta, log_1mbeta,
                                  one_minus_beta, KIND)
            g = cw * soft
            if HARD:
                if T_IS_ONE:
                    g += c1 * pS
                else:
                    g += c1 * tl.exp((s - m1) - lS1)
                g = tl.where(cols == y, g_y, g)
            g = tl.where(mask, g, 0.0)
            g = tl.where(poison, float("nan"), g)  # ignored rows too: 0 * NaN, as in PyTorch
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=in_row)


def distill_plan(student, teacher, target, coef, grad_out, *, kind, temperature, beta, alpha,
                 ignore_index):
    """Kernel, grid, keyword arguments and launch options of :func:`distill`, plus the loss."""
    check_rows(student, "student logits", "distillation", "V")
    check_rows(teacher, "teacher logits", "distillation", "V")
    n, v = student.shape
    if teacher.shape != student.shape:
        raise ValueError("student and teacher logits must have the same shape")
    if kind not in KINDS:
        raise ValueError(f"unknown distillation kind {kind!r}")
    kind_id = KINDS[kind]
    if kind_id == 3 and not 0.0 < beta < 1.0:
        raise ValueError("the jsd kernel needs 0 < beta < 1 (beta 0 / 1 are kl / reverse_kl)")
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    has_target = target is not None
    t2 = float(temperature) ** 2
    ws = t2 * (float(alpha) if has_target else 1.0)
    wh = (1.0 - float(alpha)) if has_target else 0.0
    has_grad = grad_out is not None
    if has_grad:
        assert grad_out.shape == student.shape and (v <= 1 or grad_out.stride(1) == 1)
    block, num_warps = block_config(v, kind)
    kwargs = with_flags(dict(
        s_ptr=student, stride_s=student.stride(0), t_ptr=teacher, stride_t=teacher.stride(0),
        y_ptr=target, coef_ptr=f32(coef) if has_grad else None,
        g_ptr=grad_out, stride_g=grad_out.stride(0) if has_grad else 0, loss_ptr=loss,
        V=v, ignore_index=int(ignore_index), inv_T=1.0 / float(temperature), ws=ws, wh=wh,
        beta=float(beta), log_beta=math.log(beta) if kind_id == 3 else 0.0,
        log_1mbeta=math.log1p(-beta) if kind_id == 3 else 0.0,
        BLOCK=block, KIND=kind_id, HARD=has_target and wh != 0.0, T_IS_ONE=float(temperature) == 1.0,
        PER_ROW_COEF=has_grad and coef.numel() != 1,
    ), HAS_TARGET="y_ptr", HAS_GRAD="g_ptr")
    return _distill_kernel, (n,), kwargs, dict(num_warps=num_warps), loss


def distill(student, teacher, target, coef, grad_out, *, kind="kl", temperature=1.0, beta=0.5,
            alpha=1.0, ignore_index=-100):
    """Per-row float32 loss; with ``grad_out`` (N, V), writes ``coef * dloss/dstudent`` into it."""
    buf = grad_out
    if grad_out is not None and grad_out.shape[1] > 1 and grad_out.stride(1) != 1:
        buf = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device)
    plan = distill_plan(student, teacher, target, coef, buf, kind=kind, temperature=temperature, beta=beta,
                        alpha=alpha, ignore_index=ignore_index)
    if student.shape[1] == 0:  # no class: D = 0 (the kernel reads one element of each row)
        loss = plan[-1].zero_()
    else:
        loss = launch(plan)
    if buf is not grad_out:
        grad_out.copy_(buf)
    return loss
