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
and a zero gradient (the gradient pass does not read them). A row with a NaN or +inf in a or b,
or only -inf, gets a NaN loss (0 if ignored) and a NaN gradient, as PyTorch's composition.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .cross_entropy import _row_coef

KINDS = {"kl": 0, "reverse_kl": 1, "ce": 2, "jsd": 3}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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
def _log1p01(z):
    """log(1 + z) for z in [0, 1]: 2 atanh(z / (2 + z)), series to s^19 (< 1e-9 relative)."""
    s = z / (2.0 + z)
    s2 = s * s
    p = 2.0 / 19.0
    p = p * s2 + 2.0 / 17.0
    p = p * s2 + 2.0 / 15.0
    p = p * s2 + 2.0 / 13.0
    p = p * s2 + 2.0 / 11.0
    p = p * s2 + 2.0 / 9.0
    p = p * s2 + 2.0 / 7.0
    p = p * s2 + 2.0 / 5.0
    p = p * s2 + 2.0 / 3.0
    p = p * s2 + 2.0
    return s * p


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0 (Taylor series for |x| < 0.5)."""
    series = x * (1.0 + x * 0.5 * (1.0 + x * (1.0 / 3.0) * (1.0 + x * 0.25 * (1.0 + x * 0.2 * (
        1.0 + x * (1.0 / 6.0) * (1.0 + x * (1.0 / 7.0) * (1.0 + x * 0.125 * (1.0 + x * (1.0 / 9.0)))))))))
    return tl.where(tl.abs(x) < 0.5, series, tl.exp(x) - 1.0)


@triton.jit
def _safe(m):
    """The shift used for a running max: 0 where it is +-inf (or NaN), as celoss.stats.merge."""
    return tl.where(tl.abs(m) < float("inf"), m, 0.0)


@triton.jit
def _log_mix(lpS, lpT, log_beta, log_1mbeta):
    """log M = log(beta p_T + (1 - beta) p_S) from the log-probabilities."""
    u = log_beta + lpT
    v = log_1mbeta + lpS
    mx = tl.maximum(u, v)
    d = tl.where(u > v, v - u, u - v)
    return mx + _log1p01(tl.exp(d))


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
        y = tl.where(counted, y, 0)
        # the gradient pass reads no class of an ignored row: a scalar bound, not `block &
        # scalar` (Triton 3.9's interpreter rejects a mask broadcast from a scalar)
        v_read = tl.where(counted, V, 0)
    else:
        counted = True
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
        msf, mtf = _safe(ms), _safe(mt)
        msf_new, mtf_new = _safe(ms_new), _safe(mt_new)
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
            m1f, m1f_new = _safe(m1), _safe(m1_new)
            s1 = tl.where(s1 > 0, s1 * tl.exp(m1f - m1f_new), 0.0) + tl.sum(tl.exp(s - m1f_new), axis=0)
            m1 = m1_new
    # a NaN, a +inf or only -inf in either row: NaN loss and gradient (PyTorch's log_softmax)
    poison = (nan > 0) | (tl.abs(ms) == float("inf")) | (tl.abs(mt) == float("inf"))
    ms = _safe(ms)
    mt = _safe(mt)
    m1 = _safe(m1)
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
        # y is 0 for an ignored row and V >= 1: always in bounds (no scalar mask: Triton >= 3.9's
        # interpreter rejects them)
        s_y = tl.load(s_row + y).to(tl.float32)
        if T_IS_ONE:
            lp1_y = (s_y - ms) - lSs
        else:
            lS1 = tl.log(s1)
            lp1_y = (s_y - m1) - lS1
        loss += wh * -lp1_y
    loss = tl.where(poison, float("nan"), loss)
    loss = tl.where(counted, loss, 0.0)
    tl.store(loss_ptr + row, loss)

    # ---- last pass: gradient --------------------------------------------------------------
    if HAS_GRAD:
        coef = _row_coef(coef_ptr, row, PER_ROW_COEF)
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
            g_y = cw * soft_y + c1 * _expm1(lp1_y)
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


def _check(x: torch.Tensor, name: str):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton distillation kernel takes fp32/fp16/bf16 {name}, got {x.dtype}")
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"{name} must be (N, V) with unit stride along the classes")


def distill_plan(student, teacher, target, coef, grad_out, *, kind, temperature, beta, alpha,
                 ignore_index):
    """Kernel, grid, keyword arguments and launch options of :func:`distill`, plus the loss."""
    _check(student, "student logits")
    _check(teacher, "teacher logits")
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
    kwargs = dict(
        s_ptr=student, stride_s=student.stride(0), t_ptr=teacher, stride_t=teacher.stride(0),
        y_ptr=target, coef_ptr=coef.to(torch.float32).contiguous() if has_grad else None,
        g_ptr=grad_out, stride_g=grad_out.stride(0) if has_grad else 0, loss_ptr=loss,
        V=v, ignore_index=int(ignore_index), inv_T=1.0 / float(temperature), ws=ws, wh=wh,
        beta=float(beta), log_beta=math.log(beta) if kind_id == 3 else 0.0,
        log_1mbeta=math.log1p(-beta) if kind_id == 3 else 0.0,
        BLOCK=block, KIND=kind_id, HAS_TARGET=has_target, HARD=has_target and wh != 0.0,
        T_IS_ONE=float(temperature) == 1.0, HAS_GRAD=has_grad,
        PER_ROW_COEF=has_grad and coef.numel() != 1,
    )
    return _distill_kernel, (n,), kwargs, dict(num_warps=num_warps), loss


def distill(student, teacher, target, coef, grad_out, *, kind="kl", temperature=1.0, beta=0.5,
            alpha=1.0, ignore_index=-100):
    """Per-row float32 loss; with ``grad_out`` (N, V), writes ``coef * dloss/dstudent`` into it."""
    buf = grad_out
    if grad_out is not None and grad_out.shape[1] > 1 and grad_out.stride(1) != 1:
        buf = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device)
    kernel, grid, kwargs, options, loss = distill_plan(
        student, teacher, target, coef, buf, kind=kind, temperature=temperature, beta=beta,
        alpha=alpha, ignore_index=ignore_index)
    if student.shape[1] == 0:  # no class: D = 0 (the kernel reads one element of each row)
        loss.zero_()
    elif grid[0] > 0:
        kernel[grid](**kwargs, **options)
    if buf is not grad_out:
        grad_out.copy_(buf)
    return loss


# ----------------------------------------------------------------------------------------------
# Launch plans on CPU stand-in tensors, for ahead-of-time compile tests (kernels/_aot.py)
# ----------------------------------------------------------------------------------------------

def aot_plan(kind="kl", student="bfloat16", teacher="bfloat16", block=MAX_BLOCK, aligned=True, *,
             target=False, hard=False, t_is_one=True, grad=None):
    """The plan a launch would use for rows whose ``block_config`` is ``block``, with small CPU
    tensors standing in for CUDA ones. ``aligned=False``: odd V and row strides and pointers off
    the 16-byte grid. ``hard``: a class term (needs ``target``); ``grad``: None, "scalar", "row"."""
    v = block if aligned else block - 1
    if block == max_block(kind):
        v = 2 * block + (0 if aligned else 1)
    if block == MIN_BLOCK and not aligned:
        v = block - 5
    assert block_config(v, kind)[0] == block, (kind, block)
    n = 2

    def rows(dtype):
        dt = getattr(torch, dtype)
        return torch.zeros(n, v, dtype=dt) if aligned else torch.zeros(n, v + 2, dtype=dt)[:, 1:v + 1]

    s = rows(student)
    y = torch.zeros(n, dtype=torch.int64) if (target or hard) else None
    coef = torch.ones(n if grad == "row" else 1)
    g = rows(student) if grad else None
    return distill_plan(s, rows(teacher), y, coef, g, kind=kind, temperature=1.0 if t_is_one else 2.0,
                        beta=0.5, alpha=0.5 if hard else 1.0, ignore_index=-100)


def aot_cases(heaviest=False):
    """Flag combinations the launcher can produce (``heaviest``: the most live state per kind)."""
    combos = []
    for kind in KINDS:
        for target, hard in ((False, False), (True, False), (True, True)):
            for t_is_one in (True, False):
                for grad in (None, "scalar", "row"):
                    combos.append(dict(kind=kind, target=target, hard=hard, t_is_one=t_is_one, grad=grad))
    if heaviest:
        return [c for c in combos if c["hard"] and not c["t_is_one"] and c["grad"] == "row"]
    return combos
