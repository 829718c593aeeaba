/* ce_rows.h -- cross-entropy row kernels of celoss's OpenMP CPU backend (row loops: _kernels.pyx).
 *
 * Contract: celoss/backends/__init__.py. Math: celoss/stats.py; ce_index_loss()/ce_soft_loss()
 * below are its only copy in C (loss and gradient coefficients A, B, D of one row).
 *
 * A row is read from memory once. Passes 1 (max) and 2 (sum of exp(z - max), linear sums) run
 * chunk by chunk over an L1-sized chunk, each chunk with its own max, merged exactly at the end;
 * pass 2 also keeps exp(z - chunk max) (in the gradient row itself for fp32/fp64, else in an fp32
 * scratch row), so pass 3 (the gradient) is one multiply per element over a row still in L2. exp
 * is the bulk of the arithmetic. The inner loops are branch-free so gcc vectorizes them (check
 * with -fopt-info-vec); the row functions are cloned for AVX-512, AVX2+FMA and baseline x86-64
 * and picked at load time (target_clones), so the build needs no -march. Every dtype shares one
 * template (bottom of this file), instantiated per storage dtype by per_dtype.h: fp32/fp16/bf16
 * accumulate in fp32, fp64 in fp64. fp16/bf16 rows: a shorter exp polynomial (ce_expf_lowp) and
 * gradients narrowed in L1-sized pieces, bf16 ones through vcvtneps2bf16 where the CPU has
 * AVX512-BF16 (ce_f2bf_row, chosen at load time, with a portable fallback).
 *
 * NaN/inf: pass 1 also flags NaN; a row with a NaN, a +inf z or only -inf gets NaN lse, loss and
 * gradient, like torch's log_softmax (ce_exp() itself does not propagate NaN); an ignored row has
 * loss 0 but still a NaN gradient then, as in PyTorch. -inf logits just get probability 0.
 */
#ifndef CE_ROW_TEMPLATE
#ifndef CELOSS_CE_ROWS_H
#define CELOSS_CE_ROWS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CE_INLINE static inline __attribute__((always_inline))
/* A difference that -fassociative-math must not regroup (scalar code only: gcc 12's vectorizer
 * gives up on loops that hold it) */
#if defined(__has_builtin)
#if __has_builtin(__builtin_assoc_barrier)
#define CE_KEEP(x) __builtin_assoc_barrier(x)
#endif
#endif
#ifndef CE_KEEP
#define CE_KEEP(x) (x)
#endif
#if defined(__x86_64__) && defined(__linux__) && !defined(CE_NO_CLONES)
#define CE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CE_CLONES
#endif
#ifndef CE_CHUNK
#define CE_CHUNK 1024 /* classes per chunk: passes 1 and 2 of a chunk run over it in L1 */
#endif
#define CE_NARROW_PIECE 256 /* 16-bit gradients: fp32 values per narrowing call (1 KiB) */
#define CE_MAX_CHUNKS 1024 /* per-chunk (max, sum) slots on the stack; longer rows: longer chunks */

enum { CE_F32 = 0, CE_F64 = 1, CE_F16 = 2, CE_BF16 = 3 };

typedef struct {
    int64_t C;              /* classes in this block of the row */
    int64_t class_start;    /* global index of the block's first class (stats/grad) */
    int64_t ignore_index;
    double scale, softcap;  /* z = softcap tanh(scale x / softcap); scale x if softcap <= 0 */
    double eps, z_loss;     /* label smoothing, z-loss */
    double gamma;           /* focal gamma; < 0: cross-entropy */
    double wsum;            /* sum of the class weights (C without weights) */
} ce_opts;

/* ---- bit casts and 16-bit float conversions (integer ops only, so they vectorize) ---- */
CE_INLINE float ce_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
CE_INLINE uint32_t ce_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

CE_INLINE float ce_bf2f(uint16_t h) { return ce_u2f((uint32_t)h << 16); }
CE_INLINE uint16_t ce_f2bf(float f) { /* round to nearest even; NaN -> 0x7fc0 like c10 */
    uint32_t u = ce_f2u(f);
    uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7fc0 : r;
}

CE_INLINE float ce_h2f(uint16_t h) { /* exact, subnormals included, without fp32 denormals */
    uint32_t em = (uint32_t)(h & 0x7fffu) << 13, e = em & 0x0f800000u;
    uint32_t u = em + ((e == 0x0f800000u ? 255u - 31u : 127u - 15u) << 23); /* inf/nan, else rebias */
    float sub = ce_u2f(em + (113u << 23)) - ce_u2f(113u << 23);              /* zero/subnormal */
    u = e == 0 ? ce_f2u(sub) : u;
    return ce_u2f(u | (uint32_t)(h & 0x8000u) << 16);
}
CE_INLINE uint16_t ce_f2h(float f) { /* round to nearest even (F. Giesen's float_to_half_fast3_rtne) */
    uint32_t u = ce_f2u(f), sign = u & 0x80000000u;
    u ^= sign;
    uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;                       /* nan, inf/overflow */
    uint32_t sub = ce_f2u(ce_u2f(u) + ce_u2f(126u << 23)) - (126u << 23);     /* fp add rounds */
    uint32_t nrm = (u + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
    uint32_t r = u >= (143u << 23) ? big : (u < (113u << 23) ? sub : nrm);
    return (uint16_t)(r | sign >> 16);
}

/* ---- fp32 -> bf16 rows (the 16-bit gradient stores), dispatched at load time ----
 * With AVX512-BF16, vcvtneps2bf16 (1 instruction for 16 values; the integer rounding above is
 * about 8). Both round to nearest even; the instruction also reads subnormal inputs as +-0 (bf16
 * subnormals: an absolute difference < 1.2e-38) and keeps a NaN's sign. ce_use_hw_bf16(0) (or CELOSS_NO_AVX512BF16=1 at load) forces the portable loop:
 * the tests compare the two. The pointer is written only from Python, between kernel calls. */
typedef void (*ce_f2bf_fn)(const float *src, uint16_t *dst, int64_t n);
static CE_CLONES void ce_f2bf_sw(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t j = 0; j < n; j++) dst[j] = ce_f2bf(src[j]);
}
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define CE_HW_BF16 1
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void
ce_f2bf_hw(const float *src, uint16_t *dst, int64_t n) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        _mm256_storeu_si256((__m256i *)(void *)(dst + j),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j)));
    if (j < n) {
        const __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        _mm256_mask_storeu_epi16(dst + j, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + j)));
    }
}
#else
#define CE_HW_BF16 0
#endif
static ce_f2bf_fn ce_f2bf_row = ce_f2bf_sw;
/* on > 0: use vcvtneps2bf16 where the CPU has it, 0: the portable loop, < 0: no change. Returns
 * whether the instruction is used now. */
static int ce_use_hw_bf16(int on) {
#if CE_HW_BF16
    __builtin_cpu_init();
    if (on >= 0) ce_f2bf_row = on && __builtin_cpu_supports("avx512bf16") ? ce_f2bf_hw : ce_f2bf_sw;
    return ce_f2bf_row == ce_f2bf_hw;
#else
    (void)on;
    return 0;
#endif
}
__attribute__((constructor)) static void ce_init_hw_bf16(void) {
    const char *off = getenv("CELOSS_NO_AVX512BF16");
    ce_use_hw_bf16(!(off && *off && strcmp(off, "0") != 0));
}

/* ---- exp and tanh: x = n ln2 + r, polynomial for e^r, 2^n through the exponent bits ----
 * For x <= 88 (beyond: garbage; the kernels only use x <= ~0); below -87.3 the result is +0 or a
 * denormal of about the right size, exp(-inf) = +0. NaN is not propagated: rows with a NaN are
 * handled before (see the row functions). n = round(x log2 e) comes from the bits of
 * x log2 e + 1.5 2^23 + bias, clamped as an integer, and every other clamp is an integer min/max
 * too: a float compare-and-select costs more (NaN rules) and lets gcc fold exp at the bound into
 * extra blends. Arithmetic bounds the speed (one 512-bit FMA per cycle on the Zen 5 measured), so
 * the fp32 exp reduces with one fma and float(ln2) (error n 1.9e-9: < 1e-7 relative for
 * x > -12, 3e-7 at -87); the fp64 exp uses the exact two-step (Cody-Waite) reduction, with an
 * integer clamp between the steps that keeps -fassociative-math from merging them (gcc 12's
 * vectorizer drops __builtin_assoc_barrier). Measured max relative error: fp32 3e-7, fp64 2.3e-16
 * (fp32 without FMA, the baseline clone: 4e-6). */
CE_INLINE int32_t ce_clamp32(int32_t a, int32_t lo, int32_t hi) { return a < lo ? lo : (a > hi ? hi : a); }
CE_INLINE int64_t ce_clamp64(int64_t a, int64_t lo, int64_t hi) { return a < lo ? lo : (a > hi ? hi : a); }

CE_INLINE float ce_expf_poly(float x, const int lowp) {
    const float M = 12582912.0f + 127.0f; /* 1.5 2^23 + exponent bias: n + 127 in the low bits */
    uint32_t kb = (uint32_t)ce_clamp32((int32_t)ce_f2u(x * 1.44269504f + M), 0x4b400000 - 100,
                                       0x4b4000fe); /* n in [-227, 127] */
    float n = ce_u2f(kb) - M;
    uint32_t rb = ce_f2u(x - n * 0.693147182f); /* one fma: ln2 - (float)ln2 = 1.9e-9 */
    float r = ce_u2f(rb < 0xbf800000u ? rb : 0xbf800000u); /* r >= -1 (x = -inf) */
    float q;
    if (lowp) { /* degree 4, 5.4e-6: for 16-bit storage (bf16 rounds to 2e-3), 2 FMAs fewer */
        q = 4.127765227700239e-2f;
        q = q * r + 1.675353143450736e-1f;
        q = q * r + 5.000511830165396e-1f;
    } else { /* e^r: degree-6 minimax with exact 1 + r, 3e-9 */
        q = 1.3814593030815068e-3f;
        q = q * r + 8.368708362507856e-3f;
        q = q * r + 4.1668387524302165e-2f;
        q = q * r + 1.666652070223355e-1f;
        q = q * r + 4.9999993451752395e-1f;
    }
    q = q * r + 1.0f;
    q = q * r + 1.0f;
    /* times 2^n by adding n to the exponent (an integer op, not a multiply); below the normal
     * range the sign bit turns on and the max gives +0 (or a tiny denormal just above it) */
    int32_t e = (int32_t)(ce_f2u(q) + ((kb - 0x4b40007fu) << 23));
    return ce_u2f((uint32_t)(e > 0 ? e : 0));
}
CE_INLINE float ce_expf(float x) { return ce_expf_poly(x, 0); }
/* The exp of the bulk loops of 16-bit rows (their p_j and sums): 5.4e-6 relative error, far
 * below a bf16/fp16 rounding of the loss and gradient, which is all that is returned of them. */
CE_INLINE float ce_expf_lowp(float x) { return ce_expf_poly(x, 1); }
CE_INLINE double ce_expd(double x) {
    const double M = 6755399441055744.0 + 1023.0; /* 1.5 2^52 + exponent bias */
    int64_t t;
    double d = x * 1.4426950408889634 + M, n, p2, r;
    memcpy(&t, &d, 8);
    uint64_t kb = (uint64_t)ce_clamp64(t, 0x4338000000000000ll, 0x43380000000007ffll), r1;
    memcpy(&n, &kb, 8);
    n -= M;
    kb <<= 52;
    memcpy(&p2, &kb, 8);
    d = x - n * 6.93145751953125e-1;
    memcpy(&r1, &d, 8);
    r1 = r1 < 0xbff0000000000000ull ? r1 : 0xbff0000000000000ull; /* >= -1 */
    memcpy(&r, &r1, 8);
    r -= n * 1.42860682030941723212e-6;
    double q = 1.6059043836821613e-10; /* Taylor to r^13: < 1e-17 on |r| <= ln2/2 */
    q = q * r + 2.08767569878681e-09;
    q = q * r + 2.505210838544172e-08;
    q = q * r + 2.755731922398589e-07;
    q = q * r + 2.7557319223985893e-06;
    q = q * r + 2.48015873015873e-05;
    q = q * r + 1.984126984126984e-04;
    q = q * r + 1.388888888888889e-03;
    q = q * r + 8.333333333333333e-03;
    q = q * r + 4.1666666666666664e-02;
    q = q * r + 1.6666666666666666e-01;
    q = q * r + 0.5;
    return p2 + p2 * (r + r * r * q);
}
CE_INLINE float ce_tanhf(float u) {
    /* (1 - e^-2|u|) / (1 + e^-2|u|) loses bits for small |u|: Taylor to u^11 there (< 3e-9) */
    float a = u < 0 ? -u : u, e = ce_expf(-2.0f * a), big = (1.0f - e) / (1.0f + e), u2 = u * u;
    float s = -1382.0f / 155925.0f;
    s = s * u2 + 62.0f / 2835.0f;
    s = s * u2 + -17.0f / 315.0f;
    s = s * u2 + 2.0f / 15.0f;
    s = s * u2 + -1.0f / 3.0f;
    return a < 0.3f ? u + u * u2 * s : (u < 0 ? -big : big);
}
#define ce_exp(x) _Generic((x), float: ce_expf, double: ce_expd)(x)
#define ce_tanh(x) _Generic((x), float: ce_tanhf, double: tanh)(x) /* fp64: libm (not a fast path) */

/* ---- hand-written AVX-512 passes 1 and 2, dispatched at load time ----
 * gcc's vectorized exp above spends ~6 integer ops per vector on the clamps and the exponent add;
 * vscalefps does the 2^n with the right overflow (inf) and underflow (denormal, +0) in one, and
 * intrinsics convert bf16 in registers (the portable pass widens into a buffer first). So where
 * the CPU has AVX-512 (F, BW, DQ, VL), fp32 and bf16 rows without softcap or linear sums (index
 * targets without label smoothing: the common case) take these loops: per chunk its max, then
 * exp(z_j - chunk max), summed with two accumulators; the same chunk statistics and E_j as the
 * portable pass, so pass 3 and the merge are unchanged. NaN propagates through this exp (unlike
 * ce_expf): a NaN sum flags a row with a NaN or a +inf z. ce_use_avx512_rows(0) (or
 * CELOSS_NO_AVX512_ROWS=1 at load) forces the portable passes: the tests run both. */
#if CE_HW_BF16
#define CE_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
/* exp(d) for d <= 88 (above: +inf), NaN -> NaN; lowp as ce_expf_poly (same polynomials). */
CE_AVX512 static inline __m512 ce_exp512(__m512 d, const int lowp) {
    d = _mm512_max_ps(_mm512_set1_ps(-110.0f), d); /* -inf -> e^-110, which rounds to +0; NaN stays */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(d, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147182f), d);
    __m512 q;
    if (lowp) {
        q = _mm512_fmadd_ps(_mm512_set1_ps(4.127765227700239e-2f), r, _mm512_set1_ps(1.675353143450736e-1f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.000511830165396e-1f));
    } else {
        q = _mm512_fmadd_ps(_mm512_set1_ps(1.3814593030815068e-3f), r, _mm512_set1_ps(8.368708362507856e-3f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1668387524302165e-2f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.666652070223355e-1f));
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.9999993451752395e-1f));
    }
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(q, n);
}
/* scale z, rounded: the explicit-rounding form is never contracted with the subtraction that
 * follows into an FMA (-ffp-contract=fast; see ce_rounded for why that must not happen) */
#define CE_MUL512(z, vs) _mm512_mul_round_ps(z, vs, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
/* 16 values (m: the lanes to read) of fp32 (dt CE_F32) or bf16 storage, as fp32 */
CE_AVX512 static inline __m512 ce_load512(const void *x, int64_t j, __mmask16 m, const int dt) {
    if (dt == CE_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)x + j)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)x + j);
}
/* max_j z_j of n values (NaN lanes may drop out of it: the sums below carry them) */
CE_AVX512 static inline float ce_max512(const void *x, int64_t n, float scale, const int dt,
                                        const int scaled) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    const __m512 vs = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        __m512 z = ce_load512(x, j, m, dt);
        mx = _mm512_mask_max_ps(mx, m, mx, scaled ? CE_MUL512(z, vs) : z);
    }
    return _mm512_reduce_max_ps(mx);
}
/* sum_j exp(z_j - shift) of n values (E_j = the terms, with E; E may alias x) */
CE_AVX512 static inline float ce_sum_exp512(const void *x, float *E, int64_t n, float scale,
                                            float shift, const int dt, const int scaled) {
    const int lowp = dt != CE_F32;
    const __m512 vs = _mm512_set1_ps(scale), vsh = _mm512_set1_ps(shift);
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) { /* two accumulators: the adds' latency */
        __m512 z0 = ce_load512(x, j, 0xffff, dt), z1 = ce_load512(x, j + 16, 0xffff, dt);
        if (scaled) z0 = CE_MUL512(z0, vs), z1 = CE_MUL512(z1, vs);
        const __m512 p0 = ce_exp512(_mm512_sub_ps(z0, vsh), lowp),
                     p1 = ce_exp512(_mm512_sub_ps(z1, vsh), lowp);
        s0 = _mm512_add_ps(s0, p0), s1 = _mm512_add_ps(s1, p1);
        if (E) _mm512_storeu_ps(E + j, p0), _mm512_storeu_ps(E + j + 16, p1);
    }
    for (; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        __m512 z = ce_load512(x, j, m, dt);
        const __m512 p = ce_exp512(_mm512_sub_ps(scaled ? CE_MUL512(z, vs) : z, vsh), lowp);
        s0 = _mm512_mask_add_ps(s0, m, s0, p);
        if (E) _mm512_mask_storeu_ps(E + j, m, p);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
/* ce_row_sums (fp32 or bf16 storage, z = x or scale x, no linear sums) on these loops. */
CE_AVX512 static int ce_row_sums512(const void *x, float *E, void *pf, int64_t C, int64_t L,
                                    float scale, float *mk, float *sk, float *row_max, int *has_nan,
                                    const int dt, const int scaled) {
    const int isz = dt == CE_F32 ? 4 : 2;
    float m = -INFINITY;
    int nan = 0;
    for (int64_t k = 0, j0 = 0; j0 < C; k++, j0 += L) {
        const int64_t n = C - j0 < L ? C - j0 : L;
        const char *xk = (const char *)x + j0 * isz;
        if (pf) /* as ce_row_sums: the gradient's lines for pass 3 */
            for (int64_t b = 0; b < n * isz; b += 64) __builtin_prefetch((char *)pf + j0 * isz + b, 1, 3);
        mk[k] = ce_max512(xk, n, scale, dt, scaled);
        sk[k] = ce_sum_exp512(xk, E ? E + j0 : NULL, n, scale, isfinite(mk[k]) ? mk[k] : 0, dt, scaled);
        nan |= sk[k] != sk[k];
        m = mk[k] > m ? mk[k] : m;
    }
    *row_max = m, *has_nan = nan;
    return 1;
}
/* Pass 3 of a bf16 row without linear terms: g_j = bf16(a exp(z_j - shift) dz), exp recomputed
 * from x rather than kept in an fp32 row by pass 2 (writing and reading back that row, twice the
 * logits' bytes, cost more than the exp: 31 vs 22 ms at 4096 x 32000), stored with streaming
 * stores from the first 32-byte boundary on: the gradient is not read again here, and a cached
 * store would first read each line from memory (a third stream). The sfence orders them before
 * the caller's threads synchronize. */
CE_AVX512 __attribute__((target("avx512bf16"))) static inline __m256i
ce_grad16_bf16(const uint16_t *x, __m512 va, __m512 vs, __m512 vsh, __mmask16 m, const int scaled) {
    __m512 z = ce_load512(x, 0, m, CE_BF16);
    if (scaled) z = CE_MUL512(z, vs);
    __m512 v = _mm512_mul_ps(va, ce_exp512(_mm512_sub_ps(z, vsh), 1));
    return (__m256i)_mm512_cvtneps_pbh(scaled ? _mm512_mul_ps(v, vs) : v);
}
CE_AVX512 __attribute__((target("avx512bf16"))) static void
ce_grads_bf16_512(const uint16_t *x, uint16_t *g, int64_t n, float a, float shift, float scale,
                  const int scaled) {
    const __m512 va = _mm512_set1_ps(a), vs = _mm512_set1_ps(scale), vsh = _mm512_set1_ps(shift);
    int64_t j = 0, head = (uintptr_t)g & 1 ? n : (int64_t)(((32 - ((uintptr_t)g & 31)) & 31) / 2);
    head = head < n ? head : n;
    for (; j < head; j += 16) { /* up to the boundary (all of a row not 2-byte aligned) */
        const __mmask16 m = (__mmask16)(head - j >= 16 ? 0xffff : (1u << (head - j)) - 1);
        _mm256_mask_storeu_epi16(g + j, m, ce_grad16_bf16(x + j, va, vs, vsh, m, scaled));
    }
    for (j = head; j + 16 <= n; j += 16)
        _mm256_stream_si256((__m256i *)(void *)(g + j), ce_grad16_bf16(x + j, va, vs, vsh, 0xffff, scaled));
    if (j < n) {
        const __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        _mm256_mask_storeu_epi16(g + j, m, ce_grad16_bf16(x + j, va, vs, vsh, m, scaled));
    }
    _mm_sfence();
}
#define CE_AVX512_BF16_GRADS 1
#else
#define ce_row_sums512(...) 0
#define CE_AVX512_BF16_GRADS 0
#endif
static int ce_avx512_rows = 0;
/* on > 0: the AVX-512 pass where the CPU has it, 0: the portable passes, < 0: no change. Returns
 * whether the AVX-512 pass is used now. Written only from Python, between kernel calls. */
static int ce_use_avx512_rows(int on) {
#if CE_HW_BF16
    __builtin_cpu_init();
    if (on >= 0)
        ce_avx512_rows = on && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                         && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    (void)on;
#endif
    return ce_avx512_rows;
}
__attribute__((constructor)) static void ce_init_avx512_rows(void) {
    const char *off = getenv("CELOSS_NO_AVX512_ROWS");
    ce_use_avx512_rows(!(off && *off && strcmp(off, "0") != 0));
}
/* bf16 rows without softcap or linear terms: pass 3 recomputes the exp (ce_grads_bf16_512) */
static inline int ce_bf16_recompute(void) {
    return CE_AVX512_BF16_GRADS && ce_avx512_rows && ce_f2bf_row == ce_f2bf_hw;
}

/* ---- the math of celoss/stats.py for one row, in double ----
 * Logits enter relative to the row max m (lse = m + log_s): lse - z_j as log_s - (z_j - m) keeps
 * the loss exact when |m| is far above it (PyTorch's log_softmax subtracts the max first too).
 * Index target, counted row, from log_s, zy = z_y - m, wz = sum_j w_j (z_j - m) (used only when
 * eps != 0) and w_y: returns the loss, sets abd = (A, B, D) with
 * dloss/dz_j = A p_j - B [j == y] - D w_j. */
static inline double ce_index_loss(const ce_opts *o, double lse, double log_s, double zy, double wz,
                                   double wy, double abd[3]) {
    if (o->gamma >= 0) { /* focal: g (p_j - [j == y]), lp / (1 - p_y) -> -1 as p_y -> 1 */
        double lp = zy - log_s;
        lp = lp > 0 ? 0 : lp; /* rounding; keeps NaN */
        double q = -expm1(lp), ratio = q > 0 ? lp / q : -1.0, decay = pow(q, o->gamma);
        abd[0] = abd[1] = wy * decay * (1.0 - o->gamma * exp(lp) * ratio);
        abd[2] = 0;
        return -wy * decay * lp;
    }
    double e = o->eps, C = (double)o->C;
    double loss = wy * (1 - e) * (log_s - zy) + o->z_loss * wy * lse * lse;
    if (e != 0) loss += e / C * (o->wsum * log_s - wz);
    abd[0] = wy * (1 - e) + e * o->wsum / C + 2 * o->z_loss * wy * lse;
    abd[1] = wy * (1 - e);
    abd[2] = e / C;
    return loss;
}
/* Probability targets, from mass = sum_j u_j and uz = sum_j u_j (z_j - m),
 * u_j = w_j ((1 - eps) t_j + eps / C): returns the loss, sets *a = A with dloss/dz_j = A p_j - u_j. */
static inline double ce_soft_loss(const ce_opts *o, double lse, double log_s, double mass, double uz,
                                  double *a) {
    *a = mass + 2 * o->z_loss * lse;
    return mass * log_s - uz + o->z_loss * lse * lse;
}

/* Chunk length: CE_CHUNK, or longer for rows of more than CE_MAX_CHUNKS chunks. */
static inline int64_t ce_chunk_len(int64_t C) {
    int64_t L = ((C + CE_MAX_CHUNKS - 1) / CE_MAX_CHUNKS + 63) / 64 * 64;
    return L > CE_CHUNK ? L : CE_CHUNK;
}

/* The logit transform z(x) of a row, a compile-time flag of the loops: */
enum { CE_SCALED = 0, /* z = scale x */
       CE_CAPPED = 1, /* z = softcap tanh(scale x / softcap) */
       CE_UNIT = 2 }; /* z = x (scale 1, no softcap): no product, so no guard against FMA (ce_z) */
static inline int ce_mode_of(const ce_opts *o) {
    return o->softcap > 0 ? CE_CAPPED : (o->scale == 1 ? CE_UNIT : CE_SCALED);
}

/* Calls FN(args..., mode, e, lin, has_w, has_t) with compile-time flags, so every combination
 * gets its own branch-free vectorized loop (e: the exp row buffer, only without softcap). */
#define CE_LIN_VARIANTS(FN, mode, e, lin, has_w, has_t, ...)                                      \
    if (!(lin)) FN(__VA_ARGS__, mode, e, 0, 0, 0);                                                \
    else if (!(has_w) && !(has_t)) FN(__VA_ARGS__, mode, e, 1, 0, 0);                             \
    else if (!(has_w)) FN(__VA_ARGS__, mode, e, 1, 0, 1);                                         \
    else if (!(has_t)) FN(__VA_ARGS__, mode, e, 1, 1, 0);                                         \
    else FN(__VA_ARGS__, mode, e, 1, 1, 1);
#define CE_E_VARIANTS(FN, mode, e, lin, has_w, has_t, ...)                                        \
    if (e) { CE_LIN_VARIANTS(FN, mode, 1, lin, has_w, has_t, __VA_ARGS__) }                       \
    else { CE_LIN_VARIANTS(FN, mode, 0, lin, has_w, has_t, __VA_ARGS__) }
#define CE_SPECIALIZE(FN, mode, e, lin, has_w, has_t, ...)                                        \
    do {                                                                                          \
        if ((mode) == CE_CAPPED) { CE_LIN_VARIANTS(FN, CE_CAPPED, 0, lin, has_w, has_t, __VA_ARGS__) } \
        else if ((mode) == CE_UNIT) { CE_E_VARIANTS(FN, CE_UNIT, e, lin, has_w, has_t, __VA_ARGS__) } \
        else { CE_E_VARIANTS(FN, CE_SCALED, e, lin, has_w, has_t, __VA_ARGS__) }                   \
    } while (0)

#define CE_ROW_TEMPLATE
#define CE_TEMPLATE "ce_rows.h"
#include "per_dtype.h"
#undef CE_ROW_TEMPLATE

/* ---- dtype dispatch: pointers are row starts; acc-typed ones are float (double for fp64) ---- */
#define CE_DISPATCH(dt, FN, ...)                                                                  \
    switch (dt) {                                                                                 \
    case CE_F32: FN##_f32(__VA_ARGS__); break;                                                    \
    case CE_F64: FN##_f64(__VA_ARGS__); break;                                                    \
    case CE_F16: FN##_f16(__VA_ARGS__); break;                                                    \
    default: FN##_bf16(__VA_ARGS__); break;                                                       \
    }
static inline void ce_fused_row(int dt, const ce_opts *o, const void *x, void *g, const void *t,
                                int64_t y, const void *w, double coef, void *loss, void *lse,
                                void *scratch) {
    CE_DISPATCH(dt, ce_fused_row, o, x, g, t, y, w, coef, loss, lse, scratch)
}
static inline void ce_stats_row(int dt, const ce_opts *o, const void *x, int64_t y, const void *w,
                                void *out) {
    CE_DISPATCH(dt, ce_stats_row, o, x, y, w, out)
}
static inline void ce_grad_row(int dt, const ce_opts *o, const void *x, void *g, int64_t y,
                               const void *w, const void *lse, const void *abd) {
    CE_DISPATCH(dt, ce_grad_row, o, x, g, y, w, lse, abd)
}

#endif /* CELOSS_CE_ROWS_H */

#else /* ---- row template: one storage dtype (parameters: see per_dtype.h) ---- */

#if CE_NARROW
#define CE_EXP ce_expf_lowp
#else
#define CE_EXP ce_exp
#endif
/* The logit transform, copied out of ce_opts so the loops keep it in registers. */
typedef struct { CE_ACC scale, k, cap; } CE_F(ce_tr);
CE_INLINE CE_F(ce_tr) CE_F(ce_tr_of)(const ce_opts *o) {
    CE_F(ce_tr) tr = {(CE_ACC)o->scale, (CE_ACC)(o->softcap > 0 ? o->scale / o->softcap : 0),
                      (CE_ACC)o->softcap};
    return tr;
}
/* z rounded to CE_ACC, as torch rounds it (CE_SCALED, CE_CAPPED). The build contracts a product followed by a sum into
 * one FMA (-ffp-contract=fast, on in the FMA clones), so z - shift would be the exact product minus
 * the rounded row max: for |z| > 2^31 (fp32) that is up to +ulp(z)/2 > 88 above the max, and exp
 * overflows. min(z, +inf) is the identity on non-NaN z, so it survives as one vminps that takes the
 * product out of reach of contraction (NaN becomes +inf: rows with a NaN are flagged in pass 1
 * and handled apart). CE_UNIT has no product: z - shift is a plain subtraction, without the vminps. */
CE_INLINE CE_ACC CE_F(ce_rounded)(CE_ACC z) { return z < (CE_ACC)INFINITY ? z : (CE_ACC)INFINITY; }
/* z = cap tanh(k x) (k = scale / cap) when capped, else scale x (x for CE_UNIT); *dz = dz/dx. */
CE_INLINE CE_ACC CE_F(ce_z)(CE_ACC x, CE_F(ce_tr) tr, const int mode, CE_ACC *dz) {
    if (mode == CE_UNIT) { *dz = 1; return x; }
    if (mode == CE_SCALED) { *dz = tr.scale; return CE_F(ce_rounded)(tr.scale * x); }
    CE_ACC th = ce_tanh(x * tr.k);
    *dz = tr.scale * (1 - th * th);
    return CE_F(ce_rounded)(tr.cap * th);
}

/* Pass 1: max_j z_j, from the extreme x (z is monotonic in x), and whether x holds a NaN (the
 * largest |x| as bits, an integer max: cheaper than a float compare). */
typedef __typeof__(_Generic((CE_ACC)0, float: (uint32_t)0, default: (uint64_t)0)) CE_F(ce_bits);
CE_INLINE CE_ACC CE_F(ce_max_body)(const CE_T *x, int64_t n, const int neg, int *has_nan) {
    const CE_F(ce_bits) abs_mask = (CE_F(ce_bits))-1 >> 1; /* and the bits of inf: */
    const CE_F(ce_bits) inf = abs_mask ^ (abs_mask >> (sizeof(CE_ACC) == 4 ? 8 : 11));
    CE_ACC m = -INFINITY;
    CE_F(ce_bits) a = 0;
#pragma omp simd reduction(max : m, a)
    for (int64_t j = 0; j < n; j++) {
        CE_ACC v = neg ? -CE_LOAD(x[j]) : CE_LOAD(x[j]);
        CE_F(ce_bits) b;
        memcpy(&b, &v, sizeof b);
        b &= abs_mask;
        m = v > m ? v : m;
        a = b > a ? b : a;
    }
    *has_nan = a > inf;
    return neg ? -m : m;
}
CE_INLINE CE_ACC CE_F(ce_max)(const CE_T *x, int64_t n, CE_F(ce_tr) tr, const int mode,
                              int *has_nan) {
    CE_ACC dz, m = tr.scale < 0 ? CE_F(ce_max_body)(x, n, 1, has_nan)
                                : CE_F(ce_max_body)(x, n, 0, has_nan);
    return CE_F(ce_z)(m, tr, mode, &dz);
}

/* u_j = w_j (c1 t_j + c0), w_j = 1 without has_w, t_j = 0 without has_t. */
#define CE_U(j) ((has_t ? c1 * CE_LOAD(t[j]) + c0 : c0) * (has_w ? w[j] : 1))

/* Pass 2: out = (sum_j exp(z_j - shift), sum_j u_j, sum_j u_j (z_j - c)) (u sums only with lin;
 * c = shift when centered, else 0),
 * with e: also E_j = exp(z_j - shift), from xa = x in the accumulation type. E may alias xa (fp32
 * in place): j is read before it is written. */
CE_INLINE void CE_F(ce_sums)(const CE_ACC *xa, const CE_T *t, const CE_ACC *w, CE_ACC *E, int64_t n,
                             CE_F(ce_tr) tr, CE_ACC shift, CE_ACC c1, CE_ACC c0, CE_ACC out[3],
                             const int centered, const int mode, const int e, const int lin,
                             const int has_w, const int has_t) {
    CE_ACC s = 0, su = 0, suz = 0;
#pragma omp simd reduction(+ : s, su, suz)
    for (int64_t j = 0; j < n; j++) {
        CE_ACC dz, z = CE_F(ce_z)(xa[j], tr, mode, &dz), d = z - shift, p = CE_EXP(d);
        s += p;
        if (e) E[j] = p;
        if (lin) {
            CE_ACC u = CE_U(j);
            su += u;
            suz += u * (centered ? d : z);
        }
    }
    out[0] = s, out[1] = su, out[2] = suz;
}

/* x in the accumulation type: x itself for fp32/fp64; 16-bit input is widened into buf first
 * (converting inside the exp loop makes gcc pick half-width vectors for it). */
CE_INLINE const CE_ACC *CE_F(ce_widen)(const CE_T *x, int64_t n, CE_ACC *buf) {
#if CE_NARROW
    for (int64_t j = 0; j < n; j++) buf[j] = CE_LOAD(x[j]);
    return buf;
#else
    (void)n, (void)buf;
    return x;
#endif
}

/* Passes 1 and 2 chunk by chunk, so that only pass 1 reads from memory: per chunk k of L classes
 * its max mk[k] and sk[k] = sum exp(z_j - shift_k) (shift_k = mk[k], 0 where not finite; E_j too
 * with e), the row max *m, lin = (sum u_j, sum u_j (z_j - c)) and the NaN flag. centered: c = *m
 * (0 where not finite; each chunk's sum is moved there at the end, exactly), so the loss needs no
 * lse - z_j and its error is relative to the loss itself; else c = 0 (the weighted_z statistic). The per-chunk sums
 * also bound the rounding error of the row sum. pf: the gradient row, to prefetch when pass 2
 * doesn't write it (E elsewhere), so that its memory traffic overlaps the exp arithmetic. */
CE_INLINE void CE_F(ce_row_sums)(const CE_T *x, const CE_T *t, const CE_ACC *w, CE_ACC *E,
                                 CE_T *pf, int64_t C, int64_t L, CE_F(ce_tr) tr, CE_ACC c1,
                                 CE_ACC c0, CE_ACC *mk, CE_ACC *sk, CE_ACC *row_max,
                                 double lin[2], int *has_nan, const int centered, const int mode,
                                 const int e, const int lin_, const int has_w, const int has_t) {
    CE_ACC m = -INFINITY, out[3], buf[CE_NARROW ? CE_CHUNK : 1];
    CE_ACC uk[CE_MAX_CHUNKS], uzk[CE_MAX_CHUNKS]; /* per chunk: sum u_j, sum u_j (z_j - shift_k) */
    int nan = 0;
    for (int64_t k = 0, j0 = 0; j0 < C; k++, j0 += L) {
        const int64_t n = C - j0 < L ? C - j0 : L;
        int nk;
        mk[k] = CE_F(ce_max)(x + j0, n, tr, mode, &nk);
        const CE_ACC shift = isfinite(mk[k]) ? mk[k] : 0;
        sk[k] = uk[k] = uzk[k] = 0;
        for (int64_t i = j0; i < j0 + n; i += CE_CHUNK) { /* one piece unless C is huge */
            const int64_t ni = j0 + n - i < CE_CHUNK ? j0 + n - i : CE_CHUNK;
            if (pf) /* fetch the gradient's lines for pass 3 while this piece computes */
                for (int64_t b = 0; b < ni * (int64_t)sizeof(CE_T); b += 64)
                    __builtin_prefetch((char *)(pf + i) + b, 1, 3);
            CE_F(ce_sums)(CE_F(ce_widen)(x + i, ni, buf), has_t ? t + i : t, has_w ? w + i : w,
                          e ? E + i : E, ni, tr, shift, c1, c0, out, centered, mode, e, lin_, has_w,
                          has_t);
            sk[k] += out[0], uk[k] += out[1], uzk[k] += out[2];
        }
        nan |= nk;
        m = mk[k] > m ? mk[k] : m;
    }
    const double shift = centered && isfinite(m) ? m : 0;
    lin[0] = lin[1] = 0;
    for (int64_t k = 0; lin_ && k * L < C; k++) {
        const double ck = centered && isfinite(mk[k]) ? mk[k] : 0;
        lin[0] += uk[k];
        lin[1] += uzk[k] + CE_KEEP(ck - shift) * (double)uk[k];
    }
    *has_nan = nan;
    *row_max = m;
}

/* Pass 3: ga_j = (a exp(z_j - shift) - u_j) dz_j in the accumulation type (u_j only with lin);
 * with e, from pass 2's E_j instead of x: chunk k scaled by a exp(mk[k] - shift) (then dz = scale).
 * ga may alias x or E: j is read before it is written, so there is no loop-carried dependence
 * (omp simd). */
CE_INLINE void CE_F(ce_grads_acc)(const CE_T *x, CE_ACC *ga, const CE_T *t, const CE_ACC *w,
                                  const CE_ACC *E, int64_t n, CE_F(ce_tr) tr, CE_ACC shift, CE_ACC a,
                                  CE_ACC c1, CE_ACC c0, const int mode, const int e, const int lin,
                                  const int has_w, const int has_t) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        CE_ACC dz = mode == CE_UNIT ? 1 : tr.scale,
               p = e ? E[j] : CE_EXP(CE_F(ce_z)(CE_LOAD(x[j]), tr, mode, &dz) - shift);
        ga[j] = (a * p - (lin ? CE_U(j) : 0)) * dz;
    }
}
#undef CE_U
/* Pass 3 into the gradient row g. 16-bit g: pieces of CE_NARROW_PIECE computed in fp32 into an
 * L1-resident buffer, then narrowed in one loop (bf16: ce_f2bf_row; into E itself instead, the
 * lines to write back double the L2 traffic: measured slower). */
CE_INLINE void CE_F(ce_grads)(const CE_T *x, CE_T *g, const CE_T *t, const CE_ACC *w, CE_ACC *E,
                              int64_t n, CE_F(ce_tr) tr, CE_ACC shift, CE_ACC a, CE_ACC c1,
                              CE_ACC c0, const int mode, const int e, const int lin,
                              const int has_w, const int has_t) {
#if CE_DT == 3 && CE_AVX512_BF16_GRADS /* see ce_bf16_recompute */
    if (!e && !lin && mode != CE_CAPPED && ce_bf16_recompute()) {
        ce_grads_bf16_512(x, g, n, a, shift, tr.scale, mode == CE_SCALED);
        return;
    }
#endif
#if CE_NARROW
    CE_ACC buf[CE_NARROW_PIECE];
    for (int64_t i = 0; i < n; i += CE_NARROW_PIECE) {
        const int64_t ni = n - i < CE_NARROW_PIECE ? n - i : CE_NARROW_PIECE;
        CE_F(ce_grads_acc)(x + i, buf, has_t ? t + i : t, has_w ? w + i : w, e ? E + i : E, ni, tr,
                           shift, a, c1, c0, mode, e, lin, has_w, has_t);
#if CE_DT == 3 /* bf16 */
        ce_f2bf_row(buf, g + i, ni);
#else
        for (int64_t j = 0; j < ni; j++) g[i + j] = CE_STORE(buf[j]);
#endif
    }
#else
    CE_F(ce_grads_acc)(x, g, t, w, E, n, tr, shift, a, c1, c0, mode, e, lin, has_w, has_t);
#endif
}
/* Pass 3 over the row (with e: chunk by chunk, scaled by a exp(mk[k] - shift)). */
CE_INLINE void CE_F(ce_row_grads)(const CE_T *x, CE_T *g, const CE_T *t, const CE_ACC *w,
                                  CE_ACC *E, int64_t C, int64_t L, const CE_ACC *mk,
                                  CE_F(ce_tr) tr, CE_ACC shift, CE_ACC a, CE_ACC c1, CE_ACC c0,
                                  const int mode, const int e, const int lin, const int has_w,
                                  const int has_t) {
    if (!e) {
        CE_F(ce_grads)(x, g, t, w, E, C, tr, shift, a, c1, c0, mode, e, lin, has_w, has_t);
        return;
    }
    for (int64_t k = 0, j0 = 0; j0 < C; k++, j0 += L) {
        CE_ACC ak = mk[k] == -INFINITY ? 0 : a * ce_exp(mk[k] - shift);
        CE_F(ce_grads)(x + j0, g + j0, has_t ? t + j0 : t, has_w ? w + j0 : w, E + j0,
                       C - j0 < L ? C - j0 : L, tr, shift, ak, c1, c0, mode, e, lin, has_w, has_t);
    }
}

CE_INLINE void CE_F(ce_fill)(CE_T *g, int64_t C, CE_ACC v) {
    const CE_T s = CE_STORE(v);
    for (int64_t j = 0; j < C; j++) g[j] = s;
}

/* Fused loss, lse and (with g) coef * dloss/dx of one row; t: probability targets, else index y.
 * scratch: C floats for the exp row when CE_T is 16-bit (fp32/fp64 keep it in g). A row with a
 * NaN, a +inf z or only -inf gets NaN lse, loss and gradient (torch's log_softmax); an ignored
 * row gets loss 0 and gradient 0 (NaN in such a row, as in PyTorch). */
static CE_CLONES void CE_F(ce_fused_row)(const ce_opts *o, const CE_T *x, CE_T *g, const CE_T *t,
                                         int64_t y, const CE_ACC *w, double coef, CE_ACC *loss,
                                         CE_ACC *lse_out, void *scratch) {
    const int64_t C = o->C, L = ce_chunk_len(C);
    const CE_F(ce_tr) tr = CE_F(ce_tr_of)(o);
    const int mode = ce_mode_of(o), soft = t != NULL, counted = soft || y != o->ignore_index;
    if (!soft && counted && (y < 0 || y >= C)) { /* never read out of bounds (the caller raises) */
        *loss = *lse_out = NAN;
        return;
    }
    CE_ACC dzy = 0, zy = (!soft && counted) ? CE_F(ce_z)(CE_LOAD(x[y]), tr, mode, &dzy) : 0;
    double wy = counted && !soft && w ? (double)w[y] : 1.0;
    const int lin = soft || o->eps != 0; /* the linear sums only feed smoothing and soft targets */
    /* the exp row for pass 3 (not with softcap: pass 3 needs z for dz/dx anyway) */
    CE_ACC *E = !g || !counted || mode == CE_CAPPED || (CE_DT == 3 && !lin && ce_bf16_recompute()) ? NULL
                : sizeof(CE_T) == sizeof(CE_ACC) ? (CE_ACC *)(void *)g : (CE_ACC *)scratch;
    const CE_ACC c1 = soft ? (CE_ACC)(1 - o->eps) : 0, c0 = soft ? (CE_ACC)(o->eps / C) : 1;
    CE_ACC mk[CE_MAX_CHUNKS], sk[CE_MAX_CHUNKS], m;
    double sums[2];
    int nan;
    CE_T *pf = E && (void *)E != (void *)g && (const void *)g != (const void *)x ? g : NULL;

    sums[0] = sums[1] = 0;
#if CE_DT == 0 || CE_DT == 3 /* fp32, bf16 */
    const int fast = ce_avx512_rows && !lin && mode != CE_CAPPED
                     && ce_row_sums512(x, E, pf, C, L, tr.scale, mk, sk, &m, &nan, CE_DT, mode == CE_SCALED);
#else
    const int fast = 0;
#endif
    if (!fast)
        CE_SPECIALIZE(CE_F(ce_row_sums), mode, E != NULL, lin, w != NULL, soft, x, t, w, E, pf, C,
                      L, tr, c1, c0, mk, sk, &m, sums, &nan, 1);
    if (nan || !isfinite(m)) {
        *lse_out = NAN;
        *loss = counted ? NAN : 0;
        if (g) CE_F(ce_fill)(g, C, NAN); /* ignored too: log_softmax's backward, NaN - NaN * 0 */
        return;
    }
    double s = 0, loss_v, abd[3] = {0, 0, 0};
    for (int64_t k = 0; k * L < C; k++) s += mk[k] == -INFINITY ? 0 : sk[k] * exp((double)mk[k] - m);
    double log_s = log(s), lse = (double)m + log_s;
    if (soft)
        loss_v = ce_soft_loss(o, lse, log_s, sums[0], sums[1], &abd[0]);
    else
        loss_v = counted ? ce_index_loss(o, lse, log_s, CE_KEEP((double)zy - m), sums[1], wy, abd) : 0.0;
    *loss = (CE_ACC)loss_v;
    *lse_out = (CE_ACC)lse;
    if (!g) return;
    if (!counted) {
        CE_F(ce_fill)(g, C, 0);
        return;
    }
    /* p_j = exp(z_j - m) / s: z_j - m is exact where it matters, unlike z_j - (rounded lse) */
    const CE_ACC a = (CE_ACC)(coef * abd[0] / s);
    const CE_ACC gc1 = (CE_ACC)(coef * c1), gc0 = (CE_ACC)(coef * (soft ? c0 : abd[2]));
    CE_SPECIALIZE(CE_F(ce_row_grads), mode, E != NULL, soft || abd[2] != 0, w != NULL, soft, x, g,
                  t, w, E, C, L, mk, tr, m, a, gc1, gc0);
    if (!soft) /* the target term, from z_y read before x may have been overwritten */
        g[y] = CE_STORE((CE_ACC)((a * ce_exp(zy - m) - coef * (abd[1] + abd[2] * wy)) * dzy));
}

/* Statistics (max, sumexp, target_z, weighted_z) of a block of classes (y: global target), with
 * the reference's special values: NaN row -> (NaN, NaN, ., NaN), NaN z_y -> NaN target_z (ce_z
 * would give +inf), max +inf -> sumexp +inf. */
static CE_CLONES void CE_F(ce_stats_row)(const ce_opts *o, const CE_T *x, int64_t y,
                                         const CE_ACC *w, CE_ACC *out) {
    const int64_t C = o->C, L = ce_chunk_len(C), local = y - o->class_start;
    const CE_F(ce_tr) tr = CE_F(ce_tr_of)(o);
    const int mode = ce_mode_of(o);
    CE_ACC mk[CE_MAX_CHUNKS], sk[CE_MAX_CHUNKS], m, dz;
    double sums[2];
    int nan;
    CE_SPECIALIZE(CE_F(ce_row_sums), mode, 0, 1, w != NULL, 0, x, NULL, w, NULL, NULL, C, L, tr, 0,
                  1, mk, sk, &m, sums, &nan, 0);
    double s = 0, shift = isfinite(m) ? m : 0; /* as celoss.stats.merge_all */
    for (int64_t k = 0; k * L < C; k++) s += mk[k] == -INFINITY ? 0 : sk[k] * exp((double)mk[k] - shift);
    out[0] = nan ? NAN : m;
    out[1] = nan ? NAN : (m == INFINITY ? INFINITY : (CE_ACC)s);
    const CE_ACC xy = y != o->ignore_index && local >= 0 && local < C ? CE_LOAD(x[local]) : 0;
    out[2] = xy != xy ? xy : CE_F(ce_z)(xy, tr, mode, &dz);
    out[3] = nan ? NAN : (CE_ACC)sums[1];
}

/* dz_j/dx_j (A p_j - B [j == y] - D w_j) for a block of classes, p_j = exp(z_j - lse); NaN
 * where lse is not finite. */
static CE_CLONES void CE_F(ce_grad_row)(const ce_opts *o, const CE_T *x, CE_T *g, int64_t y,
                                        const CE_ACC *w, const CE_ACC *lse, const CE_ACC *abd) {
    const int64_t C = o->C, local = y - o->class_start;
    const CE_F(ce_tr) tr = CE_F(ce_tr_of)(o);
    const int mode = ce_mode_of(o), here = local >= 0 && local < C;
    const CE_ACC l = *lse, A = abd[0], B = abd[1], D = abd[2];
    if (!isfinite(l)) {
        CE_F(ce_fill)(g, C, NAN);
        return;
    }
    CE_ACC dzy = 0, zy = here ? CE_F(ce_z)(CE_LOAD(x[local]), tr, mode, &dzy) : 0; /* before g */
    CE_SPECIALIZE(CE_F(ce_grads), mode, 0, D != 0, w != NULL, 0, x, g, NULL, w, NULL, C, tr, l, A,
                  0, D);
    if (here)
        g[local] = CE_STORE((A * ce_exp(zy - l) - B - D * (w ? w[local] : 1)) * dzy);
}
#undef CE_EXP
#endif /* CE_ROW_TEMPLATE */
