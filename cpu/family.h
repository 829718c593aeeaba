/* family.h -- row kernels of the celoss loss family (binary CE with logits, sigmoid focal loss,
 * distillation) on top of ce_rows.h (ce_exp, fp16/bf16 conversions, CE_CLONES per-ISA dispatch);
 * the row loops are in _family.pyx.
 *
 * Layout: a row is processed in chunks of FAM_CHUNK elements; a chunk of fp16/bf16 input is
 * first converted to the accumulation type in a stack buffer (one vectorized loop), so every
 * math loop runs on float (double for fp64) arrays, branch-free, and vectorizes. The template
 * (bottom of this file) is instantiated through per_dtype.h for its two accumulation types:
 * float (suffix f32: the fast inline exp/log, cloned per ISA) and double (f64: the fp64 exp of
 * ce_rows.h and libm log/log1p); fp16/bf16 inputs go through the float instance (any mix of
 * input dtypes: fam_ld/fam_st convert per chunk). This file is compiled without
 * -fassociative-math (setup.py says why).
 * Where the CPU has AVX-512 and ce_rows.h's switch is on (ce_use_avx512_rows, this module's own
 * copy: _family.use_avx512_rows, CELOSS_NO_AVX512_ROWS), the hottest loops are hand-written on
 * its helpers (ce_load512, ce_exp512): sigmoid focal loss at gamma = 2 and distillation's pass 1
 * (plus the kl / ce bf16 gradient); the portable loops stay for everything else and are tested
 * against the same float64 oracle (tests/cpu/test_family_avx512.py).
 */
#ifndef FAM_ROW_TEMPLATE
#ifndef CELOSS_FAMILY_H
#define CELOSS_FAMILY_H

#include "ce_rows.h"
#include <float.h>
#include <stdlib.h>

#define FAM_CHUNK 1024

/* ---- log and log1p on [0, 1] for float (double: libm), branch-free ---- */
/* 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), the series to s^(2 terms + 1); terms is a constant, so
 * the loop unrolls into one Horner chain. */
CE_INLINE float fam_2atanhf(float s, const int terms) {
    float s2 = s * s, p = 2.0f / (float)(2 * terms + 1);
    for (int k = terms - 1; k >= 0; k--) p = p * s2 + 2.0f / (float)(2 * k + 1);
    return s * p;
}
CE_INLINE float fam_logf(float x) { /* x > 0 and finite; denormals are treated as FLT_MIN */
    x = x < FLT_MIN ? FLT_MIN : x;
    uint32_t u = ce_f2u(x);
    int32_t e = (int32_t)(u >> 23) - 127;
    float m = ce_u2f((u & 0x007fffffu) | 0x3f800000u); /* [1, 2) */
    int big = m > 1.41421356f;
    m = big ? 0.5f * m : m;
    e += big;
    /* |s| <= 0.1716: to s^13 */
    return (float)e * 0.69314718056f + fam_2atanhf((m - 1.0f) / (m + 1.0f), 6);
}
CE_INLINE float fam_log1p01f(float z) { /* log(1 + z), z in [0, 1]: 2 atanh(z / (2 + z)) */
    return fam_2atanhf(z / (2.0f + z), 9); /* s <= 1/3: to s^19, < 1e-9 relative */
}
#define fam_log(x) _Generic((x), float: fam_logf, double: log)(x)
#define fam_log1p01(x) _Generic((x), float: fam_log1p01f, double: log1p)(x)

/* ---- chunk loads / stores: n elements of dtype dt starting at element off ---- */
CE_INLINE const float *fam_ld_f32(const void *base, int dt, int64_t off, int64_t n, float *buf) {
    if (dt == CE_F32) return (const float *)base + off;
    const uint16_t *h = (const uint16_t *)base + off;
    if (dt == CE_BF16) {
        for (int64_t j = 0; j < n; j++) buf[j] = ce_bf2f(h[j]);
    } else {
        for (int64_t j = 0; j < n; j++) buf[j] = ce_h2f(h[j]);
    }
    return buf;
}
CE_INLINE void fam_st_f32(void *base, int dt, int64_t off, int64_t n, const float *src) {
    if (dt == CE_F32) {
        if (src != (const float *)base + off) memcpy((float *)base + off, src, (size_t)n * 4);
        return;
    }
    uint16_t *h = (uint16_t *)base + off;
    if (dt == CE_BF16) {
        ce_f2bf_row(src, h, n); /* vcvtneps2bf16 where present (ce_rows.h) */
    } else {
        for (int64_t j = 0; j < n; j++) h[j] = ce_f2h(src[j]);
    }
}
CE_INLINE const double *fam_ld_f64(const void *base, int dt, int64_t off, int64_t n, double *buf) {
    if (dt == CE_F64) return (const double *)base + off;
    if (dt == CE_F32) {
        const float *f = (const float *)base + off;
        for (int64_t j = 0; j < n; j++) buf[j] = f[j];
    } else {
        const uint16_t *h = (const uint16_t *)base + off;
        for (int64_t j = 0; j < n; j++) buf[j] = dt == CE_BF16 ? ce_bf2f(h[j]) : ce_h2f(h[j]);
    }
    return buf;
}
CE_INLINE void fam_st_f64(void *base, int dt, int64_t off, int64_t n, const double *src) {
    if (dt == CE_F64) {
        if (src != (const double *)base + off) memcpy((double *)base + off, src, (size_t)n * 8);
        return;
    }
    if (dt == CE_F32) {
        float *f = (float *)base + off;
        for (int64_t j = 0; j < n; j++) f[j] = (float)src[j];
        return;
    }
    uint16_t *h = (uint16_t *)base + off;
    for (int64_t j = 0; j < n; j++)
        h[j] = dt == CE_BF16 ? ce_f2bf((float)src[j]) : ce_f2h((float)src[j]);
}
/* Per-thread scratch (grown on demand, kept for the thread's life: OpenMP reuses its threads). */
static __thread void *fam_tls_buf = NULL;
static __thread size_t fam_tls_cap = 0;
static void *fam_scratch(size_t bytes) {
    if (bytes > fam_tls_cap) {
        free(fam_tls_buf);
        fam_tls_buf = malloc(bytes);
        fam_tls_cap = fam_tls_buf ? bytes : 0;
    }
    return fam_tls_buf;
}

/* one element as double (target logits) */
static inline double fam_get(const void *base, int dt, int64_t i) {
    switch (dt) {
    case CE_F32: return ((const float *)base)[i];
    case CE_F64: return ((const double *)base)[i];
    case CE_BF16: return ce_bf2f(((const uint16_t *)base)[i]);
    default: return ce_h2f(((const uint16_t *)base)[i]);
    }
}

/* ---- distillation ----
 * Per row, with a = s / T, b = t / T (student, teacher), p_S = softmax(a), p_T = softmax(b):
 *   kind 0 "kl"          D = KL(p_T || p_S)   dD/da = p_S - p_T
 *   kind 1 "reverse_kl"  D = KL(p_S || p_T)   dD/da = p_S (log p_S - log p_T - D)
 *   kind 2 "ce"          D = H(p_T, p_S)      dD/da = p_S - p_T
 *   kind 3 "jsd"         M = beta p_T + (1 - beta) p_S,
 *                        D = beta KL(p_T || M) + (1 - beta) KL(p_S || M)
 *                        dD/da = (1 - beta) p_S (log p_S - log M - KL(p_S || M))
 * loss = ws D + wh (lse(s) - s_y)  (ws = alpha T^2, wh = 1 - alpha; wh = 0 without class term)
 * grad = coef (ws / T dD/da + wh (softmax(s) - onehot(y))).
 * Pass 1 (one read of both rows, L1-sized chunks merged online): running maxima ms, mt and
 * Ss = sum e^(a - ms), St = sum e^(b - mt), and for kl/ce/reverse_kl the weighted sum
 *   kl: K = sum e^(b-mt) ((b - mt) - (a - ms))  ->  D = K / St + log Ss - log St
 *   ce: K = sum e^(b-mt) (a - ms)               ->  D = log Ss - K / St
 *   rkl: K = sum e^(a-ms) ((a - ms) - (b - mt)) ->  D = K / Ss - log Ss + log St
 * (differences of max-shifted logits, so no cancellation of large common offsets), rescaled
 * when a chunk raises a maximum. Terms with a zero weight e^(.) are 0 (0 log 0 = 0), so -inf
 * teacher logits (masked classes) are fine. jsd needs both lse first: a second pass sums D and
 * KL(p_S || M). For kl / ce with a gradient, pass 1 also keeps e^(a - ms), e^(b - mt) (in the
 * gradient row itself when it has the accumulation type, else in per-thread scratch) and each
 * chunk's maxima, so the gradient pass is p_S - p_T = A_c e_S - B_c e_T without any exp; the
 * other kinds re-read the row (from L2 for rows up to ~100k classes) and recompute. With a
 * separate class term at T != 1 pass 1 also sums e^(s - max s). */
typedef struct {
    int64_t V;
    int kind, t_is_one;
    double inv_T, ws, wh, beta;
} fam_dcfg;

/* ---- binary (elementwise) ----
 * mode 0, binary_cross_entropy_with_logits: lw = 1 + (pw - 1) y,
 *   loss = w ((1 - y) x + lw softplus(-x)), dx = w ((1 - y) - lw sigmoid(-x)),
 *   dy = w (pw softplus(-x) - softplus(x)) (-x without pw), softplus(-x) = max(-x, 0) + log1p(e^-|x|).
 * mode 1, sigmoid focal loss (torchvision): p = sigmoid(x), ce = (1 - y) x + softplus(-x),
 *   q = 1 - p_t = p (1 - y) + y (1 - p), at = alpha y + (1 - alpha)(1 - y) (1 if alpha < 0),
 *   loss = at ce q^gamma, dx = at q^gamma ((p - y) + gamma ce (1 - 2y) p (1 - p) / q)
 *   with p (1 - p) / q -> 1 as q -> 0 (only possible for p, y both 0 or both 1). */
typedef struct {
    const void *x, *y, *up, *w, *pw; /* w, pw: accumulation dtype, (row, col) strides */
    void *loss, *gx, *gy;
    int xdt, ydt, updt, gxdt, gydt, focal;
    int64_t C, ws0, ws1, ps0, ps1;
    double coef, alpha, gamma;
} fam_bcfg;

/* Row template helpers: the cases of `switch (kind * NF + f)` that call CALL with kind (0-3) and
 * flag f as constants, and the two calls they make */
#define FAM_KIND_CASES(CALL, F, NF)                                                                \
    case 0 * NF + F: CALL(0, F); break;                                                           \
    case 1 * NF + F: CALL(1, F); break;                                                           \
    case 2 * NF + F: CALL(2, F); break;                                                           \
    case 3 * NF + F: CALL(3, F); break;
/* ---- sigmoid focal loss at gamma = 2 on hand-written AVX-512 (ce_rows.h's switch) ----
 * The portable chunk widens x, y and the upstream gradient into buffers and spends per element
 * an exp, three divisions (1 / (1 + e), e / (2 + e) in log1p, p (1 - p) / q) and the integer
 * clamps of ce_expf. Here bf16 / fp32 lanes convert in registers (ce_load512), the exp is
 * ce_exp512 (vscalefps; the degree-4 polynomial for bf16 x, as the other 16-bit rows), and one
 * division serves both quotients: R = 1 / ((1 + e)(2 + e)), 1 / (1 + e) = (2 + e) R,
 * e / (2 + e) = e (1 + e) R. At gamma = 2, q^gamma / q = q, so the gradient needs no division:
 *   dx = at q (q ((1 - y) p - y (1 - p)) + 2 ce (1 - 2y) p (1 - p)).
 * log1p(e) = 2 atanh(s), s <= 1/3: 9 terms for fp32 x, 5 for bf16 (2 (1/3)^13 / 13 = 1.2e-7).
 * NaN propagates through ce_exp512, so no NaN select is needed. */
#if CE_HW_BF16
CE_AVX512 static inline __m512 fam_2atanh512(__m512 s, const int terms) {
    const __m512 s2 = _mm512_mul_ps(s, s);
    __m512 p = _mm512_set1_ps(2.0f / (float)(2 * terms + 1));
#pragma GCC unroll 16 /* constant coefficients (terms is a constant in every caller) */
    for (int k = terms - 1; k >= 0; k--) p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(2.0f / (float)(2 * k + 1)));
    return _mm512_mul_ps(s, p);
}
/* 16 lanes (m) from element j: loss into *l, the upstream-scaled dx into *gx */
CE_AVX512 static inline void fam_focal16(const fam_bcfg *c, int64_t j, __mmask16 m, __m512 a1,
                                         __m512 a0, __m512 vcoef, __m512 *l, __m512 *gx,
                                         const int xbf, const int ybf, const int ubf, const int up) {
    const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
    const __m512 x = ce_load512(c->x, j, m, xbf ? CE_BF16 : CE_F32);
    const __m512 y = ce_load512(c->y, j, m, ybf ? CE_BF16 : CE_F32);
    const __m512 ax = _mm512_abs_ps(x), e = ce_exp512(_mm512_sub_ps(_mm512_setzero_ps(), ax), xbf);
    const __m512 d1 = _mm512_add_ps(one, e), d2 = _mm512_add_ps(two, e);
    const __m512 dd = _mm512_mul_ps(d1, d2), r0 = _mm512_rcp14_ps(dd); /* dd in [2, 6] */
    const __m512 R = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(dd, r0, one), r0); /* Newton: 2^-28 */
    const __m512 inv = _mm512_mul_ps(d2, R), s = _mm512_mul_ps(_mm512_mul_ps(e, d1), R);
    const __m512 l1 = fam_2atanh512(s, xbf ? 5 : 9);
    const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
    const __m512 einv = _mm512_mul_ps(e, inv);
    const __m512 p = _mm512_mask_blend_ps(pos, einv, inv), sg = _mm512_mask_blend_ps(pos, inv, einv);
    const __m512 spn = _mm512_add_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), x), _mm512_setzero_ps()), l1);
    const __m512 omy = _mm512_sub_ps(one, y);
    const __m512 ce = _mm512_fmadd_ps(omy, x, spn);
    const __m512 pa = _mm512_mul_ps(p, omy), pb = _mm512_mul_ps(y, sg);
    const __m512 q = _mm512_add_ps(pa, pb);
    const __m512 at = _mm512_fmadd_ps(a1, y, _mm512_mul_ps(a0, omy));
    *l = _mm512_mul_ps(_mm512_mul_ps(at, ce), _mm512_mul_ps(q, q));
    const __m512 t = _mm512_mul_ps(_mm512_mul_ps(two, ce), _mm512_mul_ps(_mm512_fnmadd_ps(two, y, one), _mm512_mul_ps(p, sg)));
    const __m512 dx = _mm512_mul_ps(_mm512_mul_ps(at, q), _mm512_fmadd_ps(q, _mm512_sub_ps(pa, pb), t));
    *gx = _mm512_mul_ps(dx, up ? ce_load512(c->up, j, m, ubf ? CE_BF16 : CE_F32) : vcoef);
}
/* fam_binary_seg of a focal (gamma = 2) segment without weights or a target gradient, fp32 /
 * bf16 x, y and upstream gradient: the loss and dx in fp32 (into lb / gxb, or the fp32 outputs
 * themselves), stored by the caller's fam_st. Returns the loss sum. */
CE_AVX512 static inline float fam_focal_body512(const fam_bcfg *c, int64_t off, int64_t n, float *lb,
                                                float *gxb, const int xbf, const int up) {
    const int ybf = c->ydt == CE_BF16, ubf = c->updt == CE_BF16;
    const float alpha = (float)c->alpha;
    const __m512 a1 = _mm512_set1_ps(alpha >= 0 ? alpha : 1.0f), a0 = _mm512_set1_ps(alpha >= 0 ? 1 - alpha : 1.0f);
    const __m512 vcoef = _mm512_set1_ps((float)c->coef);
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    fam_bcfg sh = *c; /* pointers advanced to the segment, so the loads index from 0 */
    sh.x = (const char *)c->x + off * (xbf ? 2 : 4);
    sh.y = (const char *)c->y + off * (ybf ? 2 : 4);
    if (up) sh.up = (const char *)c->up + off * (ubf ? 2 : 4);
    int64_t j = 0;
#define FAM_FOCAL_ARGS a1, a0, vcoef, &l, &g, xbf, ybf, ubf, up
    for (; j + 16 <= n; j += 16) {
        __m512 l, g;
        fam_focal16(&sh, j, 0xffff, FAM_FOCAL_ARGS);
        if ((j & 16) == 0) s0 = _mm512_add_ps(s0, l);
        else s1 = _mm512_add_ps(s1, l);
        _mm512_storeu_ps(lb + j, l);
        _mm512_storeu_ps(gxb + j, g);
    }
    if (j < n) {
        const __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        __m512 l, g;
        fam_focal16(&sh, j, m, FAM_FOCAL_ARGS);
        s0 = _mm512_mask_add_ps(s0, m, s0, l);
        _mm512_mask_storeu_ps(lb + j, m, l);
        _mm512_mask_storeu_ps(gxb + j, m, g);
    }
#undef FAM_FOCAL_ARGS
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
/* the body with x's dtype and the upstream gradient's presence as constants */
CE_AVX512 static float fam_focal_seg512(const fam_bcfg *c, int64_t off, int64_t n, float *lb, float *gxb) {
    const int xbf = c->xdt == CE_BF16;
    if (c->up) return xbf ? fam_focal_body512(c, off, n, lb, gxb, 1, 1) : fam_focal_body512(c, off, n, lb, gxb, 0, 1);
    return xbf ? fam_focal_body512(c, off, n, lb, gxb, 1, 0) : fam_focal_body512(c, off, n, lb, gxb, 0, 0);
}
/* Distillation pass 1 of one chunk on AVX-512 (fp32 rows: the chunk as loaded or widened by
 * fam_max2): fam_p1 / fam_p1s without a separate class term, so with the same sums and kept
 * exps, the exps through ce_exp512 (full precision: the loss is a difference of sums). a = s / T
 * is rounded before the max is subtracted (CE_MUL512), as the portable loop. NaN reaches the
 * sums (the row is flagged by fam_max2 anyway). */
CE_AVX512 static inline void fam_p1_512_body(const void *sp, const void *tp, float *eo, float *to,
                                             int64_t n, float inv_T, float ms, float mt,
                                             double acc[4], const int kind, const int keep,
                                             const int dt) {
    const __m512 vs = _mm512_set1_ps(inv_T), vms = _mm512_set1_ps(ms), vmt = _mm512_set1_ps(mt);
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        const __m512 da = _mm512_sub_ps(CE_MUL512(ce_load512(sp, j, m, dt), vs), vms);
        const __m512 db = _mm512_sub_ps(CE_MUL512(ce_load512(tp, j, m, dt), vs), vmt);
        const __m512 es = ce_exp512(da, 0), et = ce_exp512(db, 0);
        s0 = _mm512_mask_add_ps(s0, m, s0, es);
        s1 = _mm512_mask_add_ps(s1, m, s1, et);
        if (kind != 3) { /* a zero weight makes its term 0: -inf logits (0 log 0 = 0) */
            const __m512 w = kind == 1 ? es : et;
            const __m512 d = kind == 0 ? _mm512_sub_ps(db, da) : kind == 2 ? da : _mm512_sub_ps(da, db);
            const __mmask16 pos = _mm512_mask_cmp_ps_mask(m, w, _mm512_setzero_ps(), _CMP_GT_OQ);
            s2 = _mm512_add_ps(s2, _mm512_maskz_mul_ps(pos, w, d));
        }
        if (keep && m == 0xffff) _mm512_storeu_ps(eo + j, es), _mm512_storeu_ps(to + j, et);
        else if (keep) _mm512_mask_storeu_ps(eo + j, m, es), _mm512_mask_storeu_ps(to + j, m, et);
    }
    acc[0] += _mm512_reduce_add_ps(s0);
    acc[1] += _mm512_reduce_add_ps(s1);
    acc[2] += _mm512_reduce_add_ps(s2);
}
/* kind: 0-3 (see fam_dcfg); eo / to: where to keep the exps (NULL: not kept); sp, tp: fp32
 * arrays or, with dt CE_BF16, bf16 rows (converted in registers) */
CE_AVX512 static void fam_p1_512(const void *sp, const void *tp, int dt, float *eo, float *to,
                                 int64_t n, float inv_T, float ms, float mt, double acc[4], int kind) {
#define FAM_P1_512_(K, S) fam_p1_512_body(sp, tp, eo, to, n, inv_T, ms, mt, acc, K, (S) & 1, (S) >> 1 ? CE_BF16 : CE_F32)
    switch (kind * 4 + (eo != NULL) + (dt == CE_BF16) * 2) {
    FAM_KIND_CASES(FAM_P1_512_, 0, 4)
    FAM_KIND_CASES(FAM_P1_512_, 1, 4)
    FAM_KIND_CASES(FAM_P1_512_, 2, 4)
    FAM_KIND_CASES(FAM_P1_512_, 3, 4)
    }
#undef FAM_P1_512_
}
/* the maxima of n values of two fp32 or bf16 (dt) rows (NaN may drop out: the sums carry it) */
CE_AVX512 static void fam_max2_512(const void *sp, const void *tp, int dt, int64_t n, float *a, float *b) {
    if (dt == CE_BF16) *a = ce_max512(sp, n, 1.0f, CE_BF16, 0), *b = ce_max512(tp, n, 1.0f, CE_BF16, 0);
    else *a = ce_max512(sp, n, 1.0f, CE_F32, 0), *b = ce_max512(tp, n, 1.0f, CE_F32, 0);
}
/* The kl / ce gradient of a chunk from the kept exps, A e_S - B e_T (fam_gkept without a
 * separate class term), for a bf16 gradient: into the fp32 buffer gb (for fam_st's portable
 * rounding) or, with dst, rounded by vcvtneps2bf16 and streamed into dst (written once, not read
 * again: a cached store would first read its line, a third stream). Both compute the same fp32. */
CE_AVX512 static inline __m512 fam_gk16(const float *eo, const float *to, int64_t j, __mmask16 m,
                                        __m512 vA, __m512 vB) {
    return _mm512_fmsub_ps(vA, _mm512_maskz_loadu_ps(m, eo + j), _mm512_mul_ps(vB, _mm512_maskz_loadu_ps(m, to + j)));
}
CE_AVX512 static void fam_gkept512(const float *eo, const float *to, float *gb, int64_t n, float A, float B) {
    const __m512 vA = _mm512_set1_ps(A), vB = _mm512_set1_ps(B);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        const __m512 v = fam_gk16(eo, to, j, m, vA, vB);
        if (m == 0xffff) _mm512_storeu_ps(gb + j, v);
        else _mm512_mask_storeu_ps(gb + j, m, v); /* masked stores are slow on AMD: the tail only */
    }
}
#define FAM_BF16_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
FAM_BF16_AVX512 static void fam_gkept512_bf16(const float *eo, const float *to, uint16_t *dst,
                                              int64_t n, float A, float B) {
    const __m512 vA = _mm512_set1_ps(A), vB = _mm512_set1_ps(B);
    /* masked stores up to the first 32-byte boundary (all of a row not 2-byte aligned) */
    int64_t head = (uintptr_t)dst & 1 ? n : (int64_t)(((32 - ((uintptr_t)dst & 31)) & 31) / 2), j = 0;
    head = head < n ? head : n;
    for (; j < n; j += 16) {
        const int64_t lim = j < head ? head : n;
        const __mmask16 m = lim - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (lim - j)) - 1);
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(fam_gk16(eo, to, j, m, vA, vB));
        if (j >= head && m == 0xffff) _mm256_stream_si256((__m256i *)(void *)(dst + j), h);
        else _mm256_mask_storeu_epi16(dst + j, m, h);
        if (j < head && j + 16 > head) j = head - 16; /* the boundary: realign */
    }
    _mm_sfence();
}
#else
#define fam_p1_512(...) ((void)0)
#define fam_max2_512(...) ((void)0)
#define fam_gkept512(...) ((void)0)
#define fam_gkept512_bf16(...) ((void)0)
#endif
/* whether fam_binary_seg_f32 takes fam_focal_seg512 */
static inline int fam_focal512_ok(const fam_bcfg *c) {
#define FAM_F32_OR_BF16(dt) ((dt) == CE_F32 || (dt) == CE_BF16)
    return CE_HW_BF16 && ce_avx512_rows && c->focal && c->gamma == 2 && !c->w && !c->pw && !c->gy
           && FAM_F32_OR_BF16(c->xdt) && FAM_F32_OR_BF16(c->ydt) && (!c->up || FAM_F32_OR_BF16(c->updt))
           && (!c->gx || FAM_F32_OR_BF16(c->gxdt));
#undef FAM_F32_OR_BF16
}

#define FAM_P1_(K, S) CE_F(fam_p1)(sp, tp, n, inv_T, ms, mt, m1, acc, K, S)
#define FAM_G_(K, H)                                                                              \
    CE_F(fam_gchunk)(sp, tp, gp, n, inv_T, ms, mt, lSs, lSt, r, lb, l1b, omb, cw, c1, m1, lS1, K, H)

#define FAM_ROW_TEMPLATE
#define CE_TEMPLATE "family.h"
#include "per_dtype.h"
#undef FAM_ROW_TEMPLATE

#endif /* CELOSS_FAMILY_H */

#else /* ---- row template: one accumulation type (parameters: see per_dtype.h) ---- */
#if CE_DT <= 1 /* fp32 and fp64 only: fp16/bf16 rows are read through the fp32 instance */
#define R CE_ACC /* short: it is in every line */
#if CE_DT == 0
#define FAM_ATTR CE_CLONES
#else
#define FAM_ATTR
#endif

/* soft-part dD/da of one element (ps: p_S) */
CE_INLINE R CE_F(fam_gsoft)(R a, R b, R ms, R mt, R lSs, R lSt, R r, R lb, R l1b, R omb, R *ps,
                            const int kind) {
    R da = a - ms, db = b - mt, lpS = da - lSs, pS = ce_exp(lpS);
    *ps = pS;
    if (kind == 0 || kind == 2) return pS - ce_exp(db - lSt);
    if (kind == 1) return pS > 0 ? pS * (da - db - r) : (R)0;
    R lpT = db - lSt, u = lb + lpT, v = l1b + lpS;
    R mx = u > v ? u : v, d = u > v ? v - u : u - v;
    R lM = mx + fam_log1p01(ce_exp(d));
    return pS > 0 ? omb * pS * (lpS - lM - r) : (R)0;
}
/* Loads chunk [off, off + n) of s and t (*sp, *tp: R arrays, through the buffers), raises the
 * running maxima *msr, *mtr of s / T and t / T and sets *nan if either holds a NaN (the max skips
 * NaN). Returns the chunk's max of s itself. */
CE_INLINE R CE_F(fam_max2)(const void *s, int sdt, const void *t, int tdt, int64_t off, int64_t n,
                           R inv_T, R *sbuf, R *tbuf, const R **sp, const R **tp, R *msr, R *mtr,
                           int *nan) {
    const R *x = CE_F(fam_ld)(s, sdt, off, n, sbuf), *u = CE_F(fam_ld)(t, tdt, off, n, tbuf);
    R a = -INFINITY, b = -INFINITY;
    int bad = 0;
#pragma omp simd reduction(max : a, b) reduction(| : bad)
    for (int64_t j = 0; j < n; j++) {
        a = x[j] > a ? x[j] : a;
        b = u[j] > b ? u[j] : b;
        bad |= (x[j] != x[j]) | (u[j] != u[j]);
    }
    *sp = x;
    *tp = u;
    *nan |= bad;
    *msr = a * inv_T > *msr ? a * inv_T : *msr;
    *mtr = b * inv_T > *mtr ? b * inv_T : *mtr;
    return a;
}
/* pass 1 of one chunk, against the (safe) maxima of the chunks so far, this one included */
CE_INLINE void CE_F(fam_p1)(const R *sp, const R *tp, int64_t n, R inv_T, R ms, R mt, R m1,
                            double acc[4], const int kind, const int sep1) {
    R s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t j = 0; j < n; j++) {
        R a = sp[j] * inv_T, b = tp[j] * inv_T, da = a - ms, db = b - mt;
        R es = ce_exp(da), et = ce_exp(db);
        s0 += es;
        s1 += et;
        if (kind == 0) s2 += et > 0 ? et * (db - da) : (R)0;
        if (kind == 2) s2 += et > 0 ? et * da : (R)0;
        if (kind == 1) s2 += es > 0 ? es * (da - db) : (R)0;
        if (sep1) s3 += ce_exp(sp[j] - m1);
    }
    acc[0] += s0;
    acc[1] += s1;
    acc[2] += s2;
    acc[3] += s3;
}
/* pass 1 of kl / ce with the gradient to come: also keeps e^(a - ms) and e^(b - mt) (eo, to) */
CE_INLINE void CE_F(fam_p1s)(const R *sp, const R *tp, R *eo, R *to, int64_t n, R inv_T, R ms, R mt,
                             double acc[4], const int kind) {
    R s0 = 0, s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s0, s1, s2)
    for (int64_t j = 0; j < n; j++) {
        R a = sp[j] * inv_T, b = tp[j] * inv_T, da = a - ms, db = b - mt;
        R es = ce_exp(da), et = ce_exp(db);
        eo[j] = es;
        to[j] = et;
        s0 += es;
        s1 += et;
        if (kind == 0) s2 += et > 0 ? et * (db - da) : (R)0;
        else s2 += et > 0 ? et * da : (R)0;
    }
    acc[0] += s0;
    acc[1] += s1;
    acc[2] += s2;
}
/* sum of e^(s - m1): the class term's softmax at T = 1 */
CE_INLINE R CE_F(fam_sum1)(const R *sp, int64_t n, R m1) {
    R s3 = 0;
#pragma omp simd reduction(+ : s3)
    for (int64_t j = 0; j < n; j++) s3 += ce_exp(sp[j] - m1);
    return s3;
}
/* gradient of kl / ce from the kept exps: A e_S - B e_T (+ c1 p1 for a class term at T != 1) */
CE_INLINE void CE_F(fam_gkept)(const R *eo, const R *to, const R *sp, R *gp, int64_t n, R A, R B,
                               R c1, R m1, R lS1, const int sep1) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        R g = A * eo[j] - B * to[j];
        if (sep1) g += c1 * ce_exp((sp[j] - m1) - lS1);
        gp[j] = g;
    }
}
/* jsd pass 2: out += (sum p_T (log p_T - log M), sum p_S (log p_S - log M)) */
CE_INLINE void CE_F(fam_jsd)(const R *sp, const R *tp, int64_t n, R inv_T, R ms, R mt, R lSs,
                             R lSt, R lb, R l1b, double out[2]) {
    R s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0, s1)
    for (int64_t j = 0; j < n; j++) {
        R lpS = (sp[j] * inv_T - ms) - lSs, lpT = (tp[j] * inv_T - mt) - lSt;
        R pS = ce_exp(lpS), pT = ce_exp(lpT), u = lb + lpT, v = l1b + lpS;
        R mx = u > v ? u : v, d = u > v ? v - u : u - v;
        R lM = mx + fam_log1p01(ce_exp(d));
        s0 += pT > 0 ? pT * (lpT - lM) : (R)0;
        s1 += pS > 0 ? pS * (lpS - lM) : (R)0;
    }
    out[0] += s0;
    out[1] += s1;
}
/* gradient of one chunk; hm: class term 0 none, 1 on p_S (T = 1), 2 on its own softmax */
CE_INLINE void CE_F(fam_gchunk)(const R *sp, const R *tp, R *gp, int64_t n, R inv_T, R ms, R mt,
                                R lSs, R lSt, R r, R lb, R l1b, R omb, R cw, R c1, R m1, R lS1,
                                const int kind, const int hm) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        R pS, g = cw * CE_F(fam_gsoft)(sp[j] * inv_T, tp[j] * inv_T, ms, mt, lSs, lSt, r, lb, l1b,
                                       omb, &pS, kind);
        if (hm == 1) g += c1 * pS;
        if (hm == 2) g += c1 * ce_exp((sp[j] - m1) - lS1);
        gp[j] = g;
    }
}
/* NaN over a gradient row of V elements (dtype gdt) */
CE_INLINE void CE_F(fam_nan_row)(void *g, int gdt, int64_t V) {
    R buf[FAM_CHUNK];
    for (int64_t j = 0; j < FAM_CHUNK; j++) buf[j] = (R)NAN;
    for (int64_t off = 0; off < V; off += FAM_CHUNK)
        CE_F(fam_st)(g, gdt, off, V - off < FAM_CHUNK ? V - off : FAM_CHUNK, buf);
}
/* The gradient of an ignored row: 0 times the row's gradient, as in PyTorch's composition: NaN
 * over the row when s / T or t / T holds a NaN, a +inf or only -inf, else 0 (one max pass). */
FAM_ATTR void CE_F(fam_distill_ignored)(const fam_dcfg *c, const void *s, int sdt, const void *t,
                                        int tdt, void *g, int gdt) {
    const int64_t V = c->V;
    const R inv_T = (R)c->inv_T;
    R sbuf[FAM_CHUNK], tbuf[FAM_CHUNK], msr = -INFINITY, mtr = -INFINITY;
    int nan = 0;
    for (int64_t off = 0; off < V; off += FAM_CHUNK) {
        const int64_t n = V - off < FAM_CHUNK ? V - off : FAM_CHUNK;
        const R *sp, *tp;
        CE_F(fam_max2)(s, sdt, t, tdt, off, n, inv_T, sbuf, tbuf, &sp, &tp, &msr, &mtr, &nan);
    }
    if (nan || !isfinite(msr) || !isfinite(mtr)) CE_F(fam_nan_row)(g, gdt, V);
    else memset(g, 0, (size_t)V * (gdt == CE_F64 ? 8 : gdt == CE_F32 ? 4 : 2));
}
/* One row: returns the loss; with g, writes coef * dloss/ds (dtype gdt). y < 0: no class term
 * (no target, alpha == 1 or an ignored row handled by the caller). */
FAM_ATTR double CE_F(fam_distill_row)(const fam_dcfg *c, const void *s, int sdt, const void *t,
                                      int tdt, int64_t y, double coef, void *g, int gdt) {
    const int64_t V = c->V;
    const int kind = c->kind, hard = y >= 0 && y < V && c->wh != 0, sep1 = hard && !c->t_is_one;
    const R inv_T = (R)c->inv_T;
    R sbuf[FAM_CHUNK], tbuf[FAM_CHUNK], gbuf[FAM_CHUNK];
    R msr = -INFINITY, mtr = -INFINITY, m1r = -INFINITY, ms = 0, mt = 0, m1 = 0;
    int nan = 0;
    double acc[4] = {0, 0, 0, 0}; /* Ss, St, K, S1 */
    /* kl / ce with a gradient: keep the exps of pass 1 (in the gradient row when it has type R,
     * else in thread-local scratch) with each chunk's maxima, so the gradient pass needs no exp */
    const int64_t nch = (V + FAM_CHUNK - 1) / FAM_CHUNK;
    const int own = gdt == CE_DT;
    R *keep = (g && (kind == 0 || kind == 2))
                  ? (R *)fam_scratch(sizeof(R) * (size_t)((own ? 1 : 2) * V + 2 * nch)) : NULL;
    R *keep_t = keep, *keep_s = keep ? (own ? (R *)g : keep + V) : NULL;
    R *cms = keep ? keep + (own ? 1 : 2) * V : NULL, *cmt = keep ? cms + nch : NULL;
#if CE_DT == 0 && CE_HW_BF16
    /* pass 1 on fam_p1_512; raw: straight from fp32 or bf16 rows of one dtype, no widening pass
     * (the class term's separate softmax needs the widened chunk) */
    const int v512 = ce_avx512_rows;
#else
    const int v512 = 0;
#endif
    const int raw = v512 && sdt == tdt && (sdt == CE_F32 || sdt == CE_BF16) && !sep1;
    const int64_t isz = sdt == CE_F32 ? 4 : 2;
    for (int64_t off = 0; off < V; off += FAM_CHUNK) {
        const int64_t n = V - off < FAM_CHUNK ? V - off : FAM_CHUNK;
        const R *sp = NULL, *tp = NULL;
        R cs = 0;
        if (raw) { /* as fam_max2, on the rows themselves; NaN: from the sums below */
            float a, b;
            fam_max2_512((const char *)s + off * isz, (const char *)t + off * isz, sdt, n, &a, &b);
            msr = a * inv_T > msr ? a * inv_T : msr;
            mtr = b * inv_T > mtr ? b * inv_T : mtr;
        } else cs = CE_F(fam_max2)(s, sdt, t, tdt, off, n, inv_T, sbuf, tbuf, &sp, &tp, &msr, &mtr, &nan);
        const R nms = isfinite(msr) ? msr : 0, nmt = isfinite(mtr) ? mtr : 0;
        if (nms != ms || nmt != mt) { /* rescale the sums to the new maxima */
            const double dms = (double)nms - (double)ms, dmt = (double)nmt - (double)mt;
            if (kind == 0 && acc[1] != 0) acc[2] += acc[1] * (dms - dmt);
            if (kind == 2 && acc[1] != 0) acc[2] -= acc[1] * dms;
            if (kind == 1 && acc[0] != 0) acc[2] += acc[0] * (dmt - dms);
            const double fs = acc[0] != 0 ? exp(-dms) : 0, ft = acc[1] != 0 ? exp(-dmt) : 0;
            acc[0] *= fs;
            acc[1] *= ft;
            if (kind == 0 || kind == 2) acc[2] *= ft;
            if (kind == 1) acc[2] *= fs;
            ms = nms;
            mt = nmt;
        }
        if (sep1) {
            m1r = cs > m1r ? cs : m1r;
            const R nm1 = isfinite(m1r) ? m1r : 0;
            if (nm1 != m1) {
                acc[3] = acc[3] != 0 ? acc[3] * exp((double)m1 - (double)nm1) : 0;
                m1 = nm1;
            }
        }
        if (keep) {
            cms[off / FAM_CHUNK] = ms;
            cmt[off / FAM_CHUNK] = mt;
            if (raw) fam_p1_512((const char *)s + off * isz, (const char *)t + off * isz, sdt,
                                (float *)(keep_s + off), (float *)(keep_t + off), n, (float)inv_T,
                                (float)ms, (float)mt, acc, kind);
            else if (v512) fam_p1_512(sp, tp, CE_F32, (float *)(keep_s + off),
                                 (float *)(keep_t + off), n, (float)inv_T, (float)ms, (float)mt, acc, kind);
            else CE_F(fam_p1s)(sp, tp, keep_s + off, keep_t + off, n, inv_T, ms, mt, acc, kind);
            if (sep1) acc[3] += CE_F(fam_sum1)(sp, n, m1);
            continue;
        }
        if (v512 && !sep1) {
            if (raw) fam_p1_512((const char *)s + off * isz, (const char *)t + off * isz, sdt, NULL, NULL,
                                n, (float)inv_T, (float)ms, (float)mt, acc, kind);
            else fam_p1_512(sp, tp, CE_F32, NULL, NULL, n, (float)inv_T, (float)ms, (float)mt, acc, kind);
            continue;
        }
        switch (kind * 2 + sep1) {
        FAM_KIND_CASES(FAM_P1_, 0, 2)
        FAM_KIND_CASES(FAM_P1_, 1, 2)
        }
    }
    if (raw) nan = acc[0] != acc[0] || acc[1] != acc[1];
    /* a NaN, a +inf or only -inf in either (scaled) row: NaN loss and gradient, as PyTorch's
     * log_softmax composition (the 0 log 0 = 0 sums above would hide it) */
    if (nan || !isfinite(msr) || !isfinite(mtr)) {
        if (g) CE_F(fam_nan_row)(g, gdt, V);
        return NAN;
    }
    const double dlSs = log(acc[0]), dlSt = log(acc[1]);
    const R lSs = (R)dlSs, lSt = (R)dlSt;
    const double beta = c->beta;
    const R lb = kind == 3 ? (R)log(beta) : 0, l1b = kind == 3 ? (R)log1p(-beta) : 0;
    const R omb = (R)(1 - beta);
    double D, ksm = 0;
    if (kind == 0) D = acc[2] / acc[1] + dlSs - dlSt;
    else if (kind == 2) D = dlSs - acc[2] / acc[1];
    else if (kind == 1) D = acc[2] / acc[0] - dlSs + dlSt;
    else {
        double out[2] = {0, 0};
        for (int64_t off = 0; off < V; off += FAM_CHUNK) {
            const int64_t n = V - off < FAM_CHUNK ? V - off : FAM_CHUNK;
            const R *sp = CE_F(fam_ld)(s, sdt, off, n, sbuf), *tp = CE_F(fam_ld)(t, tdt, off, n, tbuf);
            CE_F(fam_jsd)(sp, tp, n, inv_T, ms, mt, lSs, lSt, lb, l1b, out);
        }
        D = beta * out[0] + (1 - beta) * out[1];
        ksm = out[1];
    }
    double ce1 = 0, dlS1 = 0;
    if (hard) {
        const double sy = fam_get(s, sdt, y);
        if (c->t_is_one) ce1 = dlSs - (sy - (double)ms);
        else {
            dlS1 = log(acc[3]);
            ce1 = dlS1 - (sy - (double)m1);
        }
    }
    const double loss = c->ws * D + (hard ? c->wh * ce1 : 0);
    if (!g) return loss;
    const R cw = (R)(coef * c->ws * c->inv_T), c1 = hard ? (R)(coef * c->wh) : 0, lS1 = (R)dlS1;
    const R r = kind == 1 ? (R)(dlSs - dlSt + D) : (R)ksm;
    const int hm = !hard ? 0 : (c->t_is_one ? 1 : 2);
    R g_y = 0;
    if (hard) { /* target element: p - 1 as expm1, no cancellation */
        const R sy = (R)fam_get(s, sdt, y), ty = (R)fam_get(t, tdt, y);
        R pS, soft = cw * CE_F(fam_gsoft)(sy * inv_T, ty * inv_T, ms, mt, lSs, lSt, r, lb, l1b, omb, &pS,
                                          kind);
        const double lp1 = c->t_is_one ? ((double)(sy * inv_T) - (double)ms) - dlSs
                                       : ((double)sy - (double)m1) - dlS1;
        g_y = (R)((double)soft + (double)c1 * expm1(lp1));
    }
    for (int64_t off = 0; off < V; off += FAM_CHUNK) {
        const int64_t n = V - off < FAM_CHUNK ? V - off : FAM_CHUNK;
        R *gp = gdt == CE_DT ? (R *)g + off : gbuf;
        if (keep) {
            const int64_t ch = off / FAM_CHUNK;
            const R ps = (R)exp((double)cms[ch] - (double)ms - dlSs);
            const R pt = (R)exp((double)cmt[ch] - (double)mt - dlSt);
            const R A = cw * ps + (hm == 1 ? c1 * ps : (R)0), B = cw * pt;
            if (v512 && !sep1 && gdt == CE_BF16) {
                uint16_t *gh = (uint16_t *)g + off;
                if (ce_f2bf_row == ce_f2bf_hw) {
                    fam_gkept512_bf16((const float *)(keep_s + off), (const float *)(keep_t + off), gh, n,
                                      (float)A, (float)B);
                    if (hard && y >= off && y < off + n) gh[y - off] = ce_f2bf((float)g_y);
                    continue;
                }
                fam_gkept512((const float *)(keep_s + off), (const float *)(keep_t + off), (float *)gp, n,
                             (float)A, (float)B);
            } else {
                const R *sp = sep1 ? CE_F(fam_ld)(s, sdt, off, n, sbuf) : NULL;
                if (sep1) CE_F(fam_gkept)(keep_s + off, keep_t + off, sp, gp, n, A, B, c1, m1, lS1, 1);
                else CE_F(fam_gkept)(keep_s + off, keep_t + off, sp, gp, n, A, B, c1, m1, lS1, 0);
            }
        } else {
            const R *sp = CE_F(fam_ld)(s, sdt, off, n, sbuf), *tp = CE_F(fam_ld)(t, tdt, off, n, tbuf);
            switch (kind * 3 + hm) {
            FAM_KIND_CASES(FAM_G_, 0, 3)
            FAM_KIND_CASES(FAM_G_, 1, 3)
            FAM_KIND_CASES(FAM_G_, 2, 3)
            }
        }
        if (hard && y >= off && y < off + n) gp[y - off] = g_y;
        if (gp == gbuf) CE_F(fam_st)(g, gdt, off, n, gbuf);
    }
    return loss;
}

/* binary: one element */
CE_INLINE void CE_F(fam_bin)(R x, R y, R w, R pw, R alpha, R gamma, R *loss, R *dx, R *dy,
                             const int focal, const int has_pw, const int sq) {
    R ax = x < 0 ? -x : x, e = ce_exp(-ax), inv = 1 / (1 + e);
    R l1 = fam_log1p01(e), spn = (x < 0 ? -x : (R)0) + l1; /* softplus(-x) */
    R sgn = x >= 0 ? e * inv : inv;            /* sigmoid(-x) = 1 - p */
    R nan_x = x != x ? x : (R)0; /* ce_exp(NaN) is finite here: a NaN x must reach dx and dy */
    if (!focal) {
        R lw = has_pw ? 1 + (pw - 1) * y : (R)1;
        *loss = w * ((1 - y) * x + lw * spn);
        *dx = w * ((1 - y) - lw * sgn + nan_x);
        /* pw softplus(-x) - softplus(x), not (pw - 1) softplus(-x) - x: inf - inf at x = -inf */
        *dy = w * (has_pw ? pw * spn - ((x > 0 ? x : (R)0) + l1) + nan_x : -x);
        return;
    }
    R p = x >= 0 ? inv : e * inv, ce = (1 - y) * x + spn;
    R q = p * (1 - y) + y * sgn;
    /* sq (gamma == 2, torchvision's default): q * q, as torch's pow does, without a log and an exp */
    R mod = sq ? q * q : (q > 0 ? ce_exp(gamma * fam_log(q)) : (gamma == 0 ? (R)1 : (R)0));
    R at = alpha >= 0 ? alpha * y + (1 - alpha) * (1 - y) : (R)1;
    R rr = (1 - 2 * y) * (q > 0 ? p * sgn / (q > 0 ? q : (R)1) : (R)1);
    *loss = at * ce * mod;
    /* gamma = 0 is at * BCE: no gamma ce rr term (0 * inf = NaN at |x| = inf) */
    *dx = at * mod * ((p * (1 - y) - y * sgn) + (gamma != 0 ? gamma * ce * rr : (R)0)) + nan_x;
    *dy = 0;
}
/* binary: a chunk (loss into lb, gradients times the upstream up into gxb, gyb) */
CE_INLINE R CE_F(fam_bloop)(const R *xp, const R *yp, const R *wb, const R *pb, const R *up, R *lb,
                            R *gxb, R *gyb, int64_t n, R alpha, R gamma, const int focal,
                            const int has_pw, const int sq) {
    R total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; j++) {
        R l, dx, dy;
        CE_F(fam_bin)(xp[j], yp[j], wb[j], pb[j], alpha, gamma, &l, &dx, &dy, focal, has_pw, sq);
        total += l;
        lb[j] = l;
        gxb[j] = dx * up[j];
        gyb[j] = dy * up[j];
    }
    return total;
}
/* n elements of a (row, column)-strided weight from (row, c0) into buf; ones without weight */
CE_INLINE void CE_F(fam_gather)(const void *w, int64_t s0, int64_t s1, int64_t row, int64_t c0,
                                int64_t n, R *buf) {
    if (!w) {
        for (int64_t j = 0; j < n; j++) buf[j] = 1;
        return;
    }
    const R *p = (const R *)w + row * s0 + c0 * s1;
    for (int64_t j = 0; j < n; j++) buf[j] = p[j * s1];
}
/* elements [off, off + n) of the flat (rows, C) arrays; row/c0 locate them for w and pw (the
 * caller keeps a weighted segment inside one row). Returns the segment's loss sum. */
FAM_ATTR double CE_F(fam_binary_seg)(const fam_bcfg *c, int64_t off, int64_t n, int64_t row,
                                     int64_t c0) {
    R xb[FAM_CHUNK], yb[FAM_CHUNK], ub[FAM_CHUNK], wb[FAM_CHUNK], pb[FAM_CHUNK];
    R lb[FAM_CHUNK], gxb[FAM_CHUNK], gyb[FAM_CHUNK];
#if CE_DT == 0 && CE_HW_BF16
    if (fam_focal512_ok(c)) {
        float *lp = c->loss && c->xdt == CE_F32 ? (float *)c->loss + off : lb;
        float *gp = c->gx && c->gxdt == CE_F32 ? (float *)c->gx + off : gxb;
        const float total = fam_focal_seg512(c, off, n, lp, gp);
        if (c->loss) CE_F(fam_st)(c->loss, c->xdt, off, n, lp);
        if (c->gx) CE_F(fam_st)(c->gx, c->gxdt, off, n, gp);
        return total;
    }
#endif
    const R *xp = CE_F(fam_ld)(c->x, c->xdt, off, n, xb), *up;
    const R *yp = CE_F(fam_ld)(c->y, c->ydt, off, n, yb);
    if (c->up) up = CE_F(fam_ld)(c->up, c->updt, off, n, ub);
    else {
        for (int64_t j = 0; j < n; j++) ub[j] = (R)c->coef;
        up = ub;
    }
    CE_F(fam_gather)(c->w, c->ws0, c->ws1, row, c0, n, wb);
    CE_F(fam_gather)(c->pw, c->ps0, c->ps1, row, c0, n, pb);
    const R alpha = (R)c->alpha, gamma = (R)c->gamma;
    R total = 0;
    if (c->focal && c->gamma == 2)
        total = CE_F(fam_bloop)(xp, yp, wb, pb, up, lb, gxb, gyb, n, alpha, gamma, 1, 0, 1);
    else if (c->focal) total = CE_F(fam_bloop)(xp, yp, wb, pb, up, lb, gxb, gyb, n, alpha, gamma, 1, 0, 0);
    else if (c->pw) total = CE_F(fam_bloop)(xp, yp, wb, pb, up, lb, gxb, gyb, n, alpha, gamma, 0, 1, 0);
    else total = CE_F(fam_bloop)(xp, yp, wb, pb, up, lb, gxb, gyb, n, alpha, gamma, 0, 0, 0);
    if (c->loss) CE_F(fam_st)(c->loss, c->xdt, off, n, lb);
    if (c->gx) CE_F(fam_st)(c->gx, c->gxdt, off, n, gxb);
    if (c->gy) CE_F(fam_st)(c->gy, c->gydt, off, n, gyb);
    return total;
}
#undef R
#undef FAM_ATTR
#endif /* CE_DT */
#endif /* FAM_ROW_TEMPLATE */
