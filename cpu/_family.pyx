# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""OpenMP row loops of the loss family (adapter: the "loss family" section of
celoss/backends/cython.py): binary cross-entropy with logits, sigmoid focal loss, distillation.

Arguments are raw addresses (``tensor.data_ptr()``), int64 sizes and strides in elements, and
dtype codes (0 fp32, 1 fp64, 2 fp16, 3 bf16, as in fastmath.h). ``use_double`` selects the fp64
kernels (every float input is then read as double), else fp32 accumulation (inputs fp32, fp16
or bf16, in any mix). Losses / partial sums are float32 (float64 with ``use_double``).
The C row kernels (below, with the math) come in a float and a double instance; the float
one is cloned per ISA (AVX-512 / AVX2 / baseline) by fastmath.h's CE_CLONES.
"""
from cython.parallel cimport prange
from libc.stdint cimport int64_t

cdef extern from * nogil:
    r"""
    /* Row kernels of the celoss loss family (binary CE, sigmoid focal loss, distillation) on top
     * of fastmath.h (ce_expf/ce_expd, fp16/bf16 conversions, CE_CLONES per-ISA dispatch).
     *
     * Layout: a row is processed in chunks of FAM_CHUNK elements; a chunk of fp16/bf16 input is
     * first converted to the accumulation type in a stack buffer (one vectorized loop), so every
     * math loop runs on float (double for fp64) arrays, branch-free, and vectorizes. Each
     * template below is instantiated twice (float with the fast inline exp/log, double with the
     * fp64 exp of fastmath.h and libm log/log1p) by FAM_DEFINE. */
    /* Reassociation would turn (a - max) - log(sum) into a - (max + log(sum)) and lose the
     * cancellation of large common offsets (measured: 1e3x larger gradient errors at |logits| ~ 1e4),
     * so this file is compiled without -fassociative-math; the reductions vectorize through
     * "omp simd reduction" anyway. Set before fastmath.h so that every inlined helper agrees. */
    #pragma GCC optimize("no-associative-math")
    #include "fastmath.h"
    #include <float.h>
    #include <stdlib.h>
    
    #define FAM_CHUNK 1024
    
    /* ---- float helpers that fastmath.h lacks: log and log1p on [0, 1], branch-free ---- */
    CE_INLINE float fam_logf(float x) { /* x > 0 and finite; denormals are treated as FLT_MIN */
        x = x < FLT_MIN ? FLT_MIN : x;
        uint32_t u = ce_f2u(x);
        int32_t e = (int32_t)(u >> 23) - 127;
        float m = ce_u2f((u & 0x007fffffu) | 0x3f800000u); /* [1, 2) */
        int big = m > 1.41421356f;
        m = big ? 0.5f * m : m;
        e += big;
        float s = (m - 1.0f) / (m + 1.0f), s2 = s * s; /* |s| <= 0.1716: 2 atanh(s) to s^13 */
        float p = 2.0f / 13.0f;
        p = p * s2 + 2.0f / 11.0f;
        p = p * s2 + 2.0f / 9.0f;
        p = p * s2 + 2.0f / 7.0f;
        p = p * s2 + 2.0f / 5.0f;
        p = p * s2 + 2.0f / 3.0f;
        p = p * s2 + 2.0f;
        return (float)e * 0.69314718056f + s * p;
    }
    CE_INLINE float fam_log1p01f(float z) { /* log(1 + z), z in [0, 1]: 2 atanh(z / (2 + z)) */
        float s = z / (2.0f + z), s2 = s * s; /* s <= 1/3: series to s^19, < 1e-9 relative */
        float p = 2.0f / 19.0f;
        p = p * s2 + 2.0f / 17.0f;
        p = p * s2 + 2.0f / 15.0f;
        p = p * s2 + 2.0f / 13.0f;
        p = p * s2 + 2.0f / 11.0f;
        p = p * s2 + 2.0f / 9.0f;
        p = p * s2 + 2.0f / 7.0f;
        p = p * s2 + 2.0f / 5.0f;
        p = p * s2 + 2.0f / 3.0f;
        p = p * s2 + 2.0f;
        return s * p;
    }
    CE_INLINE double fam_logd(double x) { return log(x); }
    CE_INLINE double fam_log1p01d(double z) { return log1p(z); }
    
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
            for (int64_t j = 0; j < n; j++) h[j] = ce_f2bf(src[j]);
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
        for (int64_t j = 0; j < n; j++) h[j] = dt == CE_BF16 ? ce_f2bf((float)src[j]) : ce_f2h((float)src[j]);
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

    /* dispatch helpers of the row template (expanded inside FAM_DEFINE) */
    /* the cases of `switch (kind * NF + f)` that call CALL with kind (0-3) and flag f as constants */
    #define FAM_KIND_CASES(CALL, SFX, F, NF)                                                       \
        case 0 * NF + F: CALL(SFX, 0, F); break;                                                   \
        case 1 * NF + F: CALL(SFX, 1, F); break;                                                   \
        case 2 * NF + F: CALL(SFX, 2, F); break;                                                   \
        case 3 * NF + F: CALL(SFX, 3, F); break;
    #define FAM_P1_(SFX, K, S) fam_p1_##SFX(sp, tp, n, inv_T, ms, mt, m1, acc, K, S)
    #define FAM_G_(SFX, K, H)                                                                      \
        fam_gchunk_##SFX(sp, tp, gp, n, inv_T, ms, mt, lSs, lSt, r, lb, l1b, omb, cw, c1, m1, lS1, K, H)
    
    /* The row template: R accumulation type, SFX name suffix, EXP/LOG/LOG1P01 elementwise math,
     * LD/ST chunk load/store, NATIVE the dtype code of R, ATTR function attributes (clones). */
    #define FAM_DEFINE(R, SFX, EXP, LOG, LOG1P01, LD, ST, NATIVE, ATTR) \
    /* soft-part dD/da of one element (ps: p_S) */                                                            \
    CE_INLINE R fam_gsoft_##SFX(R a, R b, R ms, R mt, R lSs, R lSt, R r, R lb, R l1b, R omb, R *ps,           \
                                const int kind) {                                                             \
        R da = a - ms, db = b - mt, lpS = da - lSs, pS = EXP(lpS);                                            \
        *ps = pS;                                                                                             \
        if (kind == 0 || kind == 2) return pS - EXP(db - lSt);                                                \
        if (kind == 1) return pS > 0 ? pS * (da - db - r) : (R)0;                                             \
        R lpT = db - lSt, u = lb + lpT, v = l1b + lpS;                                                        \
        R mx = u > v ? u : v, d = u > v ? v - u : u - v;                                                      \
        R lM = mx + LOG1P01(EXP(d));                                                                          \
        return pS > 0 ? omb * pS * (lpS - lM - r) : (R)0;                                                     \
    }                                                                                                         \
    /* chunk maxima of s and t; *nan |= whether either holds a NaN (the max skips NaN) */                     \
    CE_INLINE void fam_max2_##SFX(const R *sp, const R *tp, int64_t n, R *cs, R *ct, int *nan) {              \
        R a = -INFINITY, b = -INFINITY;                                                                       \
        int bad = 0;                                                                                          \
        _Pragma("omp simd reduction(max : a, b) reduction(| : bad)")                                          \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            a = sp[j] > a ? sp[j] : a;                                                                        \
            b = tp[j] > b ? tp[j] : b;                                                                        \
            bad |= (sp[j] != sp[j]) | (tp[j] != tp[j]);                                                       \
        }                                                                                                     \
        *cs = a;                                                                                              \
        *ct = b;                                                                                              \
        *nan |= bad;                                                                                          \
    }                                                                                                         \
    /* pass 1 of one chunk, against the (safe) maxima of the chunks so far, this one included */              \
    CE_INLINE void fam_p1_##SFX(const R *sp, const R *tp, int64_t n, R inv_T, R ms, R mt, R m1,               \
                                double acc[4], const int kind, const int sep1) {                              \
        R s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                                     \
        _Pragma("omp simd reduction(+ : s0, s1, s2, s3)")                                                     \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            R a = sp[j] * inv_T, b = tp[j] * inv_T, da = a - ms, db = b - mt;                                 \
            R es = EXP(da), et = EXP(db);                                                                     \
            s0 += es;                                                                                         \
            s1 += et;                                                                                         \
            if (kind == 0) s2 += et > 0 ? et * (db - da) : (R)0;                                              \
            if (kind == 2) s2 += et > 0 ? et * da : (R)0;                                                     \
            if (kind == 1) s2 += es > 0 ? es * (da - db) : (R)0;                                              \
            if (sep1) s3 += EXP(sp[j] - m1);                                                                  \
        }                                                                                                     \
        acc[0] += s0;                                                                                         \
        acc[1] += s1;                                                                                         \
        acc[2] += s2;                                                                                         \
        acc[3] += s3;                                                                                         \
    }                                                                                                         \
    /* pass 1 of kl / ce with the gradient to come: also keeps e^(a - ms) and e^(b - mt) (eo, to) */          \
    CE_INLINE void fam_p1s_##SFX(const R *sp, const R *tp, R *eo, R *to, int64_t n, R inv_T, R ms, R mt,      \
                                 double acc[4], const int kind) {                                             \
        R s0 = 0, s1 = 0, s2 = 0;                                                                             \
        _Pragma("omp simd reduction(+ : s0, s1, s2)")                                                         \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            R a = sp[j] * inv_T, b = tp[j] * inv_T, da = a - ms, db = b - mt;                                 \
            R es = EXP(da), et = EXP(db);                                                                     \
            eo[j] = es;                                                                                       \
            to[j] = et;                                                                                       \
            s0 += es;                                                                                         \
            s1 += et;                                                                                         \
            if (kind == 0) s2 += et > 0 ? et * (db - da) : (R)0;                                              \
            else s2 += et > 0 ? et * da : (R)0;                                                               \
        }                                                                                                     \
        acc[0] += s0;                                                                                         \
        acc[1] += s1;                                                                                         \
        acc[2] += s2;                                                                                         \
    }                                                                                                         \
    /* sum of e^(s - m1): the class term's softmax at T = 1 */                                                \
    CE_INLINE R fam_sum1_##SFX(const R *sp, int64_t n, R m1) {                                                \
        R s3 = 0;                                                                                             \
        _Pragma("omp simd reduction(+ : s3)")                                                                 \
        for (int64_t j = 0; j < n; j++) s3 += EXP(sp[j] - m1);                                                \
        return s3;                                                                                            \
    }                                                                                                         \
    /* gradient of kl / ce from the kept exps: A e_S - B e_T (+ c1 p1 for a class term at T != 1) */          \
    CE_INLINE void fam_gkept_##SFX(const R *eo, const R *to, const R *sp, R *gp, int64_t n, R A, R B,         \
                                   R c1, R m1, R lS1, const int sep1) {                                       \
        _Pragma("omp simd")                                                                                   \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            R g = A * eo[j] - B * to[j];                                                                      \
            if (sep1) g += c1 * EXP((sp[j] - m1) - lS1);                                                      \
            gp[j] = g;                                                                                        \
        }                                                                                                     \
    }                                                                                                         \
    /* jsd pass 2: out += (sum p_T (log p_T - log M), sum p_S (log p_S - log M)) */                           \
    CE_INLINE void fam_jsd_##SFX(const R *sp, const R *tp, int64_t n, R inv_T, R ms, R mt, R lSs,             \
                                 R lSt, R lb, R l1b, double out[2]) {                                         \
        R s0 = 0, s1 = 0;                                                                                     \
        _Pragma("omp simd reduction(+ : s0, s1)")                                                             \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            R lpS = (sp[j] * inv_T - ms) - lSs, lpT = (tp[j] * inv_T - mt) - lSt;                             \
            R pS = EXP(lpS), pT = EXP(lpT), u = lb + lpT, v = l1b + lpS;                                      \
            R mx = u > v ? u : v, d = u > v ? v - u : u - v;                                                  \
            R lM = mx + LOG1P01(EXP(d));                                                                      \
            s0 += pT > 0 ? pT * (lpT - lM) : (R)0;                                                            \
            s1 += pS > 0 ? pS * (lpS - lM) : (R)0;                                                            \
        }                                                                                                     \
        out[0] += s0;                                                                                         \
        out[1] += s1;                                                                                         \
    }                                                                                                         \
    /* gradient of one chunk; hm: class term 0 none, 1 on p_S (T = 1), 2 on its own softmax */                \
    CE_INLINE void fam_gchunk_##SFX(const R *sp, const R *tp, R *gp, int64_t n, R inv_T, R ms, R mt,          \
                                    R lSs, R lSt, R r, R lb, R l1b, R omb, R cw, R c1, R m1, R lS1,           \
                                    const int kind, const int hm) {                                           \
        _Pragma("omp simd")                                                                                   \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            R pS, g = cw * fam_gsoft_##SFX(sp[j] * inv_T, tp[j] * inv_T, ms, mt, lSs, lSt, r, lb, l1b,        \
                                           omb, &pS, kind);                                                   \
            if (hm == 1) g += c1 * pS;                                                                        \
            if (hm == 2) g += c1 * EXP((sp[j] - m1) - lS1);                                                   \
            gp[j] = g;                                                                                        \
        }                                                                                                     \
    }                                                                                                         \
    /* NaN over a gradient row of V elements (dtype gdt) */                                                   \
    CE_INLINE void fam_nan_row_##SFX(void *g, int gdt, int64_t V) {                                           \
        R buf[FAM_CHUNK];                                                                                     \
        for (int64_t j = 0; j < FAM_CHUNK; j++) buf[j] = (R)NAN;                                              \
        for (int64_t off = 0; off < V; off += FAM_CHUNK)                                                      \
            ST(g, gdt, off, V - off < FAM_CHUNK ? V - off : FAM_CHUNK, buf);                                  \
    }                                                                                                         \
    /* The gradient of an ignored row: 0 times the row's gradient, as in PyTorch's composition: NaN           \
     * over the row when s / T or t / T holds a NaN, a +inf or only -inf, else 0 (one max pass). */           \
    ATTR void fam_distill_ignored_##SFX(const fam_dcfg *c, const void *s, int sdt, const void *t, int tdt,    \
                                        void *g, int gdt) {                                                   \
        const int64_t V = c->V;                                                                               \
        const R inv_T = (R)c->inv_T;                                                                          \
        R sbuf[FAM_CHUNK], tbuf[FAM_CHUNK], msr = -INFINITY, mtr = -INFINITY;                                 \
        int nan = 0;                                                                                          \
        for (int64_t off = 0; off < V; off += FAM_CHUNK) {                                                    \
            const int64_t n = V - off < FAM_CHUNK ? V - off : FAM_CHUNK;                                      \
            const R *sp = LD(s, sdt, off, n, sbuf), *tp = LD(t, tdt, off, n, tbuf);                           \
            R cs, ct;                                                                                         \
            fam_max2_##SFX(sp, tp, n, &cs, &ct, &nan);                                                        \
            msr = cs * inv_T > msr ? cs * inv_T : msr;                                                        \
            mtr = ct * inv_T > mtr ? ct * inv_T : mtr;                                                        \
        }                                                                                                     \
        if (nan || !isfinite(msr) || !isfinite(mtr)) fam_nan_row_##SFX(g, gdt, V);                            \
        else memset(g, 0, (size_t)V * (gdt == CE_F64 ? 8 : gdt == CE_F32 ? 4 : 2));                           \
    }                                                                                                         \
    /* One row: returns the loss; with g, writes coef * dloss/ds (dtype gdt). y < 0: no class term            \
     * (no target, alpha == 1 or an ignored row handled by the caller). */                                    \
    ATTR double fam_distill_row_##SFX(const fam_dcfg *c, const void *s, int sdt, const void *t, int tdt,      \
                                      int64_t y, double coef, void *g, int gdt) {                             \
        const int64_t V = c->V;                                                                               \
        const int kind = c->kind, hard = y >= 0 && y < V && c->wh != 0, sep1 = hard && !c->t_is_one;          \
        const R inv_T = (R)c->inv_T;                                                                          \
        R sbuf[FAM_CHUNK], tbuf[FAM_CHUNK], gbuf[FAM_CHUNK];                                                  \
        R msr = -INFINITY, mtr = -INFINITY, m1r = -INFINITY, ms = 0, mt = 0, m1 = 0;                          \
        int nan = 0;                                                                                          \
        double acc[4] = {0, 0, 0, 0}; /* Ss, St, K, S1 */                                                     \
        /* kl / ce with a gradient: keep the exps of pass 1 (in the gradient row when it has type R,          \
         * else in thread-local scratch) with each chunk's maxima, so the gradient pass needs no exp */       \
        const int64_t nch = (V + FAM_CHUNK - 1) / FAM_CHUNK;                                                  \
        const int own = gdt == NATIVE;                                                                        \
        R *keep = (g && (kind == 0 || kind == 2))                                                             \
                      ? (R *)fam_scratch(sizeof(R) * (size_t)((own ? 1 : 2) * V + 2 * nch)) : NULL;           \
        R *keep_t = keep, *keep_s = keep ? (own ? (R *)g : keep + V) : NULL;                                  \
        R *cms = keep ? keep + (own ? 1 : 2) * V : NULL, *cmt = keep ? cms + nch : NULL;                      \
        for (int64_t off = 0; off < V; off += FAM_CHUNK) {                                                    \
            const int64_t n = V - off < FAM_CHUNK ? V - off : FAM_CHUNK;                                      \
            const R *sp = LD(s, sdt, off, n, sbuf), *tp = LD(t, tdt, off, n, tbuf);                           \
            R cs, ct;                                                                                         \
            fam_max2_##SFX(sp, tp, n, &cs, &ct, &nan);                                                        \
            msr = cs * inv_T > msr ? cs * inv_T : msr;                                                        \
            mtr = ct * inv_T > mtr ? ct * inv_T : mtr;                                                        \
            const R nms = isfinite(msr) ? msr : 0, nmt = isfinite(mtr) ? mtr : 0;                             \
            if (nms != ms || nmt != mt) { /* rescale the sums to the new maxima */                            \
                const double dms = (double)nms - (double)ms, dmt = (double)nmt - (double)mt;                  \
                if (kind == 0 && acc[1] != 0) acc[2] += acc[1] * (dms - dmt);                                 \
                if (kind == 2 && acc[1] != 0) acc[2] -= acc[1] * dms;                                         \
                if (kind == 1 && acc[0] != 0) acc[2] += acc[0] * (dmt - dms);                                 \
                const double fs = acc[0] != 0 ? exp(-dms) : 0, ft = acc[1] != 0 ? exp(-dmt) : 0;              \
                acc[0] *= fs;                                                                                 \
                acc[1] *= ft;                                                                                 \
                if (kind == 0 || kind == 2) acc[2] *= ft;                                                     \
                if (kind == 1) acc[2] *= fs;                                                                  \
                ms = nms;                                                                                     \
                mt = nmt;                                                                                     \
            }                                                                                                 \
            if (sep1) {                                                                                       \
                m1r = cs > m1r ? cs : m1r;                                                                    \
                const R nm1 = isfinite(m1r) ? m1r : 0;                                                        \
                if (nm1 != m1) {                                                                              \
                    acc[3] = acc[3] != 0 ? acc[3] * exp((double)m1 - (double)nm1) : 0;                        \
                    m1 = nm1;                                                                                 \
                }                                                                                             \
            }                                                                                                 \
            if (keep) {                                                                                       \
                cms[off / FAM_CHUNK] = ms;                                                                    \
                cmt[off / FAM_CHUNK] = mt;                                                                    \
                fam_p1s_##SFX(sp, tp, keep_s + off, keep_t + off, n, inv_T, ms, mt, acc, kind);               \
                if (sep1) acc[3] += fam_sum1_##SFX(sp, n, m1);                                                \
                continue;                                                                                     \
            }                                                                                                 \
            switch (kind * 2 + sep1) {                                                                        \
            FAM_KIND_CASES(FAM_P1_, SFX, 0, 2)                                                                \
            FAM_KIND_CASES(FAM_P1_, SFX, 1, 2)                                                                \
            }                                                                                                 \
        }                                                                                                     \
        /* a NaN, a +inf or only -inf in either (scaled) row: NaN loss and gradient, as PyTorch's             \
         * log_softmax composition (the 0 log 0 = 0 sums above would hide it) */                              \
        if (nan || !isfinite(msr) || !isfinite(mtr)) {                                                        \
            if (g) fam_nan_row_##SFX(g, gdt, V);                                                              \
            return NAN;                                                                                       \
        }                                                                                                     \
        const double dlSs = log(acc[0]), dlSt = log(acc[1]);                                                  \
        const R lSs = (R)dlSs, lSt = (R)dlSt;                                                                 \
        const double beta = c->beta;                                                                          \
        const R lb = kind == 3 ? (R)log(beta) : 0, l1b = kind == 3 ? (R)log1p(-beta) : 0;                     \
        const R omb = (R)(1 - beta);                                                                          \
        double D, ksm = 0;                                                                                    \
        if (kind == 0) D = acc[2] / acc[1] + dlSs - dlSt;                                                     \
        else if (kind == 2) D = dlSs - acc[2] / acc[1];                                                       \
        else if (kind == 1) D = acc[2] / acc[0] - dlSs + dlSt;                                                \
        else {                                                                                                \
            double out[2] = {0, 0};                                                                           \
            for (int64_t off = 0; off < V; off += FAM_CHUNK) {                                                \
                const int64_t n = V - off < FAM_CHUNK ? V - off : FAM_CHUNK;                                  \
                const R *sp = LD(s, sdt, off, n, sbuf), *tp = LD(t, tdt, off, n, tbuf);                       \
                fam_jsd_##SFX(sp, tp, n, inv_T, ms, mt, lSs, lSt, lb, l1b, out);                              \
            }                                                                                                 \
            D = beta * out[0] + (1 - beta) * out[1];                                                          \
            ksm = out[1];                                                                                     \
        }                                                                                                     \
        double ce1 = 0, dlS1 = 0;                                                                             \
        if (hard) {                                                                                           \
            const double sy = fam_get(s, sdt, y);                                                             \
            if (c->t_is_one) ce1 = dlSs - (sy - (double)ms);                                                  \
            else {                                                                                            \
                dlS1 = log(acc[3]);                                                                           \
                ce1 = dlS1 - (sy - (double)m1);                                                               \
            }                                                                                                 \
        }                                                                                                     \
        const double loss = c->ws * D + (hard ? c->wh * ce1 : 0);                                             \
        if (!g) return loss;                                                                                  \
        const R cw = (R)(coef * c->ws * c->inv_T), c1 = hard ? (R)(coef * c->wh) : 0, lS1 = (R)dlS1;          \
        const R r = kind == 1 ? (R)(dlSs - dlSt + D) : (R)ksm;                                                \
        const int hm = !hard ? 0 : (c->t_is_one ? 1 : 2);                                                     \
        R g_y = 0;                                                                                            \
        if (hard) { /* target element: p - 1 as expm1, no cancellation */                                     \
            const R sy = (R)fam_get(s, sdt, y), ty = (R)fam_get(t, tdt, y);                                   \
            R pS, soft = cw * fam_gsoft_##SFX(sy * inv_T, ty * inv_T, ms, mt, lSs, lSt, r, lb, l1b, omb, &pS, \
                                              kind);                                                          \
            const double lp1 = c->t_is_one ? ((double)(sy * inv_T) - (double)ms) - dlSs                       \
                                           : ((double)sy - (double)m1) - dlS1;                                \
            g_y = (R)((double)soft + (double)c1 * expm1(lp1));                                                \
        }                                                                                                     \
        for (int64_t off = 0; off < V; off += FAM_CHUNK) {                                                    \
            const int64_t n = V - off < FAM_CHUNK ? V - off : FAM_CHUNK;                                      \
            R *gp = gdt == NATIVE ? (R *)g + off : gbuf;                                                      \
            if (keep) {                                                                                       \
                const int64_t ch = off / FAM_CHUNK;                                                           \
                const R ps = (R)exp((double)cms[ch] - (double)ms - dlSs);                                     \
                const R pt = (R)exp((double)cmt[ch] - (double)mt - dlSt);                                     \
                const R A = cw * ps + (hm == 1 ? c1 * ps : (R)0), B = cw * pt;                                \
                const R *sp = sep1 ? LD(s, sdt, off, n, sbuf) : NULL;                                         \
                if (sep1) fam_gkept_##SFX(keep_s + off, keep_t + off, sp, gp, n, A, B, c1, m1, lS1, 1);       \
                else fam_gkept_##SFX(keep_s + off, keep_t + off, sp, gp, n, A, B, c1, m1, lS1, 0);            \
            } else {                                                                                          \
                const R *sp = LD(s, sdt, off, n, sbuf), *tp = LD(t, tdt, off, n, tbuf);                       \
                switch (kind * 3 + hm) {                                                                      \
                FAM_KIND_CASES(FAM_G_, SFX, 0, 3)                                                             \
                FAM_KIND_CASES(FAM_G_, SFX, 1, 3)                                                             \
                FAM_KIND_CASES(FAM_G_, SFX, 2, 3)                                                             \
                }                                                                                             \
            }                                                                                                 \
            if (hard && y >= off && y < off + n) gp[y - off] = g_y;                                           \
            if (gp == gbuf) ST(g, gdt, off, n, gbuf);                                                         \
        }                                                                                                     \
        return loss;                                                                                          \
    }                                                                                                         \
                                                                                                              \
    /* binary: one element */                                                                                 \
    CE_INLINE void fam_bin_##SFX(R x, R y, R w, R pw, R alpha, R gamma, R *loss, R *dx, R *dy,                \
                                 const int focal, const int has_pw) {                                         \
        R ax = x < 0 ? -x : x, e = EXP(-ax), inv = 1 / (1 + e);                                               \
        R l1 = LOG1P01(e), spn = (x < 0 ? -x : (R)0) + l1; /* softplus(-x) */                                 \
        R sgn = x >= 0 ? e * inv : inv;            /* sigmoid(-x) = 1 - p */                                  \
        R nan_x = x != x ? x : (R)0; /* EXP(NaN) is finite here: a NaN x must reach dx and dy */              \
        if (!focal) {                                                                                         \
            R lw = has_pw ? 1 + (pw - 1) * y : (R)1;                                                          \
            *loss = w * ((1 - y) * x + lw * spn);                                                             \
            *dx = w * ((1 - y) - lw * sgn + nan_x);                                                           \
            /* pw softplus(-x) - softplus(x), not (pw - 1) softplus(-x) - x: inf - inf at x = -inf */         \
            *dy = w * (has_pw ? pw * spn - ((x > 0 ? x : (R)0) + l1) + nan_x : -x);                           \
            return;                                                                                           \
        }                                                                                                     \
        R p = x >= 0 ? inv : e * inv, ce = (1 - y) * x + spn;                                                 \
        R q = p * (1 - y) + y * sgn;                                                                          \
        R mod = q > 0 ? EXP(gamma * LOG(q)) : (gamma == 0 ? (R)1 : (R)0);                                     \
        R at = alpha >= 0 ? alpha * y + (1 - alpha) * (1 - y) : (R)1;                                         \
        R rr = (1 - 2 * y) * (q > 0 ? p * sgn / (q > 0 ? q : (R)1) : (R)1);                                   \
        *loss = at * ce * mod;                                                                                \
        /* gamma = 0 is at * BCE: no gamma ce rr term (0 * inf = NaN at |x| = inf) */                         \
        *dx = at * mod * ((p * (1 - y) - y * sgn) + (gamma != 0 ? gamma * ce * rr : (R)0)) + nan_x;           \
        *dy = 0;                                                                                              \
    }                                                                                                         \
    /* binary: a chunk (loss into lb, gradients times the upstream up into gxb, gyb) */                       \
    CE_INLINE R fam_bloop_##SFX(const R *xp, const R *yp, const R *wb, const R *pb, const R *up, R *lb,       \
                                R *gxb, R *gyb, int64_t n, R alpha, R gamma, const int focal,                 \
                                const int has_pw) {                                                           \
        R total = 0;                                                                                          \
        _Pragma("omp simd reduction(+ : total)")                                                              \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            R l, dx, dy;                                                                                      \
            fam_bin_##SFX(xp[j], yp[j], wb[j], pb[j], alpha, gamma, &l, &dx, &dy, focal, has_pw);             \
            total += l;                                                                                       \
            lb[j] = l;                                                                                        \
            gxb[j] = dx * up[j];                                                                              \
            gyb[j] = dy * up[j];                                                                              \
        }                                                                                                     \
        return total;                                                                                         \
    }                                                                                                         \
    /* elements [off, off + n) of the flat (rows, C) arrays; row/c0 locate them for w and pw (the             \
     * caller keeps a weighted segment inside one row). Returns the segment's loss sum. */                    \
    ATTR double fam_binary_seg_##SFX(const fam_bcfg *c, int64_t off, int64_t n, int64_t row, int64_t c0) {    \
        R xb[FAM_CHUNK], yb[FAM_CHUNK], ub[FAM_CHUNK], wb[FAM_CHUNK], pb[FAM_CHUNK];                          \
        R lb[FAM_CHUNK], gxb[FAM_CHUNK], gyb[FAM_CHUNK];                                                      \
        const R *xp = LD(c->x, c->xdt, off, n, xb), *yp = LD(c->y, c->ydt, off, n, yb), *up;                  \
        if (c->up) up = LD(c->up, c->updt, off, n, ub);                                                       \
        else {                                                                                                \
            for (int64_t j = 0; j < n; j++) ub[j] = (R)c->coef;                                               \
            up = ub;                                                                                          \
        }                                                                                                     \
        if (c->w) {                                                                                           \
            const R *w = (const R *)c->w + row * c->ws0 + c0 * c->ws1;                                        \
            const int64_t st = c->ws1;                                                                        \
            for (int64_t j = 0; j < n; j++) wb[j] = w[j * st];                                                \
        } else                                                                                                \
            for (int64_t j = 0; j < n; j++) wb[j] = 1;                                                        \
        if (c->pw) {                                                                                          \
            const R *pw = (const R *)c->pw + row * c->ps0 + c0 * c->ps1;                                      \
            const int64_t st = c->ps1;                                                                        \
            for (int64_t j = 0; j < n; j++) pb[j] = pw[j * st];                                               \
        } else                                                                                                \
            for (int64_t j = 0; j < n; j++) pb[j] = 1;                                                        \
        const R alpha = (R)c->alpha, gamma = (R)c->gamma;                                                     \
        R total = 0;                                                                                          \
        if (c->focal) total = fam_bloop_##SFX(xp, yp, wb, pb, up, lb, gxb, gyb, n, alpha, gamma, 1, 0);       \
        else if (c->pw) total = fam_bloop_##SFX(xp, yp, wb, pb, up, lb, gxb, gyb, n, alpha, gamma, 0, 1);     \
        else total = fam_bloop_##SFX(xp, yp, wb, pb, up, lb, gxb, gyb, n, alpha, gamma, 0, 0);                \
        if (c->loss) ST(c->loss, c->xdt, off, n, lb);                                                         \
        if (c->gx) ST(c->gx, c->gxdt, off, n, gxb);                                                           \
        if (c->gy) ST(c->gy, c->gydt, off, n, gyb);                                                           \
        return total;                                                                                         \
    }                                                                                                         \
    
    FAM_DEFINE(float, f32, ce_expf, fam_logf, fam_log1p01f, fam_ld_f32, fam_st_f32, CE_F32, CE_CLONES)
    FAM_DEFINE(double, f64, ce_expd, fam_logd, fam_log1p01d, fam_ld_f64, fam_st_f64, CE_F64, )
    """
    ctypedef struct fam_dcfg:
        int64_t V
        int kind, t_is_one
        double inv_T, ws, wh, beta
    ctypedef struct fam_bcfg:
        const void *x
        const void *y
        const void *up
        const void *w
        const void *pw
        void *loss
        void *gx
        void *gy
        int xdt, ydt, updt, gxdt, gydt, focal
        int64_t C, ws0, ws1, ps0, ps1
        double coef, alpha, gamma
    int FAM_CHUNK
    double fam_distill_row_f32(const fam_dcfg *c, const void *s, int sdt, const void *t, int tdt,
                               int64_t y, double coef, void *g, int gdt)
    double fam_distill_row_f64(const fam_dcfg *c, const void *s, int sdt, const void *t, int tdt,
                               int64_t y, double coef, void *g, int gdt)
    void fam_distill_ignored_f32(const fam_dcfg *c, const void *s, int sdt, const void *t, int tdt,
                                 void *g, int gdt)
    void fam_distill_ignored_f64(const fam_dcfg *c, const void *s, int sdt, const void *t, int tdt,
                                 void *g, int gdt)
    double fam_binary_seg_f32(const fam_bcfg *c, int64_t off, int64_t n, int64_t row, int64_t c0)
    double fam_binary_seg_f64(const fam_bcfg *c, int64_t off, int64_t n, int64_t row, int64_t c0)

CHUNK = FAM_CHUNK
KINDS = {"kl": 0, "reverse_kl": 1, "ce": 2, "jsd": 3}

cdef int64_t ITEMSIZE[4]
ITEMSIZE[:] = [4, 8, 2, 2]


cdef check_dtype(int dt):
    if dt < 0 or dt > 3:
        raise ValueError(f"unknown dtype code {dt}")


def distill(int64_t N, int64_t V, size_t s, int sdt, int64_t ss, size_t t, int tdt, int64_t st,
            size_t y, int64_t ignore_index, size_t coef, int64_t scoef, size_t g, int gdt,
            int64_t sg, size_t loss, *, int kind, bint t_is_one, double inv_T, double ws,
            double wh, double beta, bint use_double, int num_threads):
    """Row losses of distillation into ``loss`` (N,); with ``g`` != 0, coef[n * scoef] * dloss/ds
    into g (dtype gdt, row stride sg). ``y`` != 0: int64 targets (rows equal to ignore_index get
    loss 0 and gradient 0, or NaN where the row is poisoned, as PyTorch; with ``wh`` != 0 the others
    add the class term). See the C comment
    for ``kind``, ``ws`` (soft weight alpha T^2) and ``wh`` (class-term weight 1 - alpha)."""
    check_dtype(sdt)
    check_dtype(tdt)
    if g:
        check_dtype(gdt)
    if kind < 0 or kind > 3:
        raise ValueError(f"unknown distillation kind {kind}")
    cdef const int64_t *yp = <const int64_t *>y
    cdef int64_t n, bad = -1
    if y:
        for n in range(N):
            if yp[n] != ignore_index and (yp[n] < 0 or yp[n] >= V):
                bad = n
                break
    if bad >= 0:
        raise IndexError(f"Target {yp[bad]} is out of bounds (row {bad}, {V} classes).")
    cdef fam_dcfg c
    c.V, c.kind, c.t_is_one, c.inv_T, c.ws, c.wh, c.beta = V, kind, t_is_one, inv_T, ws, wh, beta
    cdef int64_t ssz = ITEMSIZE[sdt], tsz = ITEMSIZE[tdt], gsz = ITEMSIZE[gdt] if g else 0
    cdef char *sb = <char *>s
    cdef char *tb = <char *>t
    cdef char *gb = <char *>g
    cdef const float *cp = <const float *>coef
    cdef float *lf = <float *>loss
    cdef double *ld = <double *>loss
    cdef double v
    cdef int64_t cls
    for n in prange(N, nogil=True, schedule="dynamic", chunksize=4, num_threads=num_threads):
        if y and yp[n] == ignore_index:
            v = 0
            if g and use_double:
                fam_distill_ignored_f64(&c, sb + n * ss * ssz, sdt, tb + n * st * tsz, tdt, gb + n * sg * gsz, gdt)
            elif g:
                fam_distill_ignored_f32(&c, sb + n * ss * ssz, sdt, tb + n * st * tsz, tdt, gb + n * sg * gsz, gdt)
        else:
            cls = yp[n] if (y and wh != 0) else -1
            if use_double:
                v = fam_distill_row_f64(&c, sb + n * ss * ssz, sdt, tb + n * st * tsz, tdt, cls,
                                        cp[n * scoef] if g else 1.0,
                                        (gb + n * sg * gsz) if g else NULL, gdt)
            else:
                v = fam_distill_row_f32(&c, sb + n * ss * ssz, sdt, tb + n * st * tsz, tdt, cls,
                                        cp[n * scoef] if g else 1.0,
                                        (gb + n * sg * gsz) if g else NULL, gdt)
        if use_double:
            ld[n] = v
        else:
            lf[n] = <float>v


def binary_segments(int64_t R, int64_t C, bint weighted):
    """Number of partial sums ``binary`` writes: chunks of rows with weights, else of the flat array."""
    if weighted:
        return R * ((C + FAM_CHUNK - 1) // FAM_CHUNK)
    return (R * C + FAM_CHUNK - 1) // FAM_CHUNK


def binary(int64_t R, int64_t C, size_t x, int xdt, size_t y, int ydt, size_t w, int64_t ws0,
           int64_t ws1, size_t pw, int64_t ps0, int64_t ps1, size_t up, int updt, double coef,
           size_t loss, size_t gx, int gxdt, size_t gy, int gydt, size_t partials, *, bint focal,
           double alpha, double gamma, bint use_double, int num_threads):
    """Elementwise BCE-with-logits (focal=False) or sigmoid focal loss over contiguous (R, C) x
    and y. w / pw: accumulation-dtype weight / pos_weight with element (r, c) at r*s0 + c*s1 (0: none).
    Writes the loss per element into ``loss`` (x's dtype) when given, one partial sum per segment
    into ``partials``, and d(loss)/dx, d(loss)/dy times the upstream gradient (``up``, x-shaped, or
    the scalar ``coef``) into gx / gy when given."""
    for dt in (xdt, ydt):
        check_dtype(dt)
    if up:
        check_dtype(updt)
    if gx:
        check_dtype(gxdt)
    if gy:
        check_dtype(gydt)
    cdef fam_bcfg c
    c.x, c.y, c.up, c.w, c.pw = <const void *>x, <const void *>y, <const void *>up, <const void *>w, <const void *>pw
    c.loss, c.gx, c.gy = <void *>loss, <void *>gx, <void *>gy
    c.xdt, c.ydt, c.updt, c.gxdt, c.gydt, c.focal = xdt, ydt, updt, gxdt, gydt, focal
    c.C, c.ws0, c.ws1, c.ps0, c.ps1 = C, ws0, ws1, ps0, ps1
    c.coef, c.alpha, c.gamma = coef, alpha, gamma
    cdef bint weighted = w != 0 or pw != 0
    cdef int64_t nseg = binary_segments(R, C, weighted), total = R * C
    cdef int64_t k, per_row = (C + FAM_CHUNK - 1) // FAM_CHUNK, row, c0, off, n
    cdef float *pf = <float *>partials
    cdef double *pd = <double *>partials
    cdef double v
    for k in prange(nseg, nogil=True, schedule="static", num_threads=num_threads):
        if weighted:
            row = k // per_row
            c0 = (k % per_row) * FAM_CHUNK
            off = row * C + c0
            n = C - c0
        else:
            row = 0
            c0 = 0
            off = k * FAM_CHUNK
            n = total - off
        if n > FAM_CHUNK:
            n = FAM_CHUNK
        if use_double:
            v = fam_binary_seg_f64(&c, off, n, row, c0)
            pd[k] = v
        else:
            v = fam_binary_seg_f32(&c, off, n, row, c0)
            pf[k] = <float>v
