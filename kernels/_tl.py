"""Device-side helpers shared by the Triton kernels (``@triton.jit`` functions, all float32).

Words used across ``kernels/``: ``z`` the transformed logits (:func:`transform`), ``coef`` the
upstream gradient scale of a row (:func:`row_coef`), ``row_coefs`` the per-row (A, B, D) of
``dloss/dz_j = A p_j - B [j == y] - D w_j`` (:mod:`celoss.backends`), ``weight`` the class weights.
"""
import triton
import triton.language as tl


@triton.jit
def transform(x, scale, softcap, inv_softcap, HAS_SOFTCAP: tl.constexpr):
    """z = softcap * tanh(scale * x / softcap) (or scale * x) in float32, and dz/dx.

    tanh(u) = 2 / (1 + exp(-2u)) - 1: one exp, saturates correctly at +-inf, absolute error of
    a few float32 ulps of 1 (so |error of z| ~ softcap * 1e-7), no libdevice needed.
    """
    z = x.to(tl.float32) * scale
    if HAS_SOFTCAP:
        th = 2.0 / (1.0 + tl.exp(-2.0 * inv_softcap * z)) - 1.0
        z = softcap * th
        dz = scale * (1.0 - th * th)
    else:
        dz = scale
    return z, dz


@triton.jit
def safe_shift(m):
    """The shift of a running max: the max itself, or 0 where it is +-inf or NaN (the safe shift of
    celoss.stats.merge_all), so exp(z - shift) is never inf - inf."""
    return tl.where(tl.abs(m) < float("inf"), m, 0.0)


@triton.jit
def lane_update(m, s, z):
    """Per-lane online (max, sumexp): lane i keeps the statistics of the elements it has seen, so
    the row loop needs no block-wide reduction (no barrier); :func:`lane_finish` merges the
    lanes once per row. One exp per element: exp(-|z - m|) is the rescale of the old sum when z
    is the new max and the new term otherwise. -inf lanes leave (m, s) unchanged, equal infinite
    values add 1 (as a shift by them would), NaN makes s NaN."""
    bigger = z > m
    d = tl.where(bigger, m - z, z - m)
    d = tl.where(z == m, 0.0, tl.where(z == -float("inf"), -float("inf"), d))
    e = tl.exp(d)
    s = tl.where(bigger, s * e + 1.0, s + e)
    return tl.where(bigger, z, m), s


@triton.jit
def lane_finish(m, s):
    """(max, sumexp) of a row from its per-lane statistics, shifted by :func:`safe_shift`."""
    m_row = tl.max(m, axis=0)
    return m_row, tl.sum(s * tl.exp(m - safe_shift(m_row)), axis=0)


@triton.jit
def class_weight(weight_ptr, cols, mask, HAS_WEIGHT: tl.constexpr):
    """Class weights w_j of ``cols`` in float32 (1 without class weights), 0 on masked lanes."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    return w


@triton.jit
def row_coef(coef_ptr, row, PER_ROW_COEF: tl.constexpr):
    """The gradient's scale for ``row``: its own upstream gradient, or one shared by all rows."""
    if PER_ROW_COEF:
        coef_ptr += row
    return tl.load(coef_ptr).to(tl.float32)


@triton.jit
def expm1(x):
    """exp(x) - 1 without cancellation near 0: 9-term Taylor series for |x| < 0.5 (relative
    truncation error < 1.1e-8), exp(x) - 1 elsewhere (relative error ~ 1e-7 / 0.5)."""
    series = x * (1.0 + x * 0.5 * (1.0 + x * (1.0 / 3.0) * (1.0 + x * 0.25 * (1.0 + x * 0.2 * (
        1.0 + x * (1.0 / 6.0) * (1.0 + x * (1.0 / 7.0) * (1.0 + x * 0.125 * (1.0 + x * (1.0 / 9.0)))))))))
    return tl.where(tl.abs(x) < 0.5, series, tl.exp(x) - 1.0)


@triton.jit
def log1m(u):
    """log(1 - u) for u >= 0 without cancellation near 0: -(u + u^2/2 + ... + u^8/8) for u < 0.1
    (relative truncation error < 1.2e-9), log(1 - u) elsewhere."""
    series = -u * (1.0 + u * (0.5 + u * ((1.0 / 3.0) + u * (0.25 + u * (0.2 + u * (
        (1.0 / 6.0) + u * ((1.0 / 7.0) + u * 0.125)))))))
    return tl.where(u < 0.1, series, tl.log(1.0 - u))


@triton.jit
def log1p01(z):
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
