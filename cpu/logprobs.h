/* logprobs.h -- row kernels of celoss.token_logprobs on CPU (row loops: _logprobs.pyx).
 *
 * Math (z = x / T; as kernels/logprobs.py, whose docstring derives the gradient):
 *   forward, one read of the row, chunk by chunk (L1-sized chunks, merged online in double):
 *     m = max z, s = sum_j e^(z_j - m), u = sum_j e^(z_j - m) (z_j - m)   (0 log 0 = 0: a -inf
 *     logit adds nothing), lse = m + log s, log p_y = (z_y - m) - log s, H = log s - u / s.
 *   backward, from the saved lse and H and the upstream gradients gl (log p_y) and gh (H):
 *     dz_j = gl [j == y] - p_j (gl + gh (a_j + H)),  a_j = z_j - lse,  p_j = e^a_j,
 *     dx_j = dz_j / T  (the p_j factor is exactly 0 where p_j == 0: no 0 * inf).
 * Rows with a NaN, a +inf z or only -inf logits get NaN log p, H, lse and gradient (as
 * torch.log_softmax); ignored rows (y == ignore_index) are not read: 0 outputs, 0 gradient.
 *
 * Reuses ce_rows.h (exp, 16-bit conversions, max with NaN flag, the rounded z = scale x, per-ISA
 * clones, the chunk length) through its per-dtype instantiations: CE_A(name) is ce_rows.h's
 * function for the accumulation type. Instantiated per storage dtype by per_dtype.h, as ce_rows.h
 * (16-bit chunks are widened to fp32 first).
 */
#ifndef LP_ROW_TEMPLATE
#ifndef CELOSS_LOGPROBS_H
#define CELOSS_LOGPROBS_H

#include "ce_rows.h"

#define LP_ROW_TEMPLATE
#define CE_TEMPLATE "logprobs.h"
#include "per_dtype.h"
#undef LP_ROW_TEMPLATE

/* Pointers are row starts; out (3 values: log p, H, lse) is float (double for fp64). */
static inline void lp_forward_row(int dt, const void *x, int64_t C, int64_t y, int counted,
                                  double scale, void *out) {
    CE_DISPATCH(dt, lp_forward_row, x, C, y, counted, scale, out)
}
/* g may equal x (in place). lse, H, gl, gh: this row's values, in double. */
static inline void lp_backward_row(int dt, const void *x, void *g, int64_t C, int64_t y,
                                   int counted, double scale, double lse, double H, double gl,
                                   double gh, int entropy) {
    CE_DISPATCH(dt, lp_backward_row, x, g, C, y, counted, scale, lse, H, gl, gh, entropy)
}

#endif /* CELOSS_LOGPROBS_H */

#else /* ---- row template: one storage dtype (parameters: see per_dtype.h) ---- */

/* Sums of one chunk relative to its max mk: s = sum e^d, u = sum e^d d (d = z - mk; 0 where
 * z = -inf). */
CE_INLINE void CE_F(lp_sums)(const CE_ACC *xa, int64_t n, CE_A(ce_tr) tr, CE_ACC mk, CE_ACC *s_out,
                             CE_ACC *u_out) {
    CE_ACC s = 0, u = 0;
#pragma omp simd reduction(+ : s, u)
    for (int64_t j = 0; j < n; j++) {
        CE_ACC dz, d = CE_A(ce_z)(xa[j], tr, 0, &dz) - mk, e = ce_exp(d);
        s += e;
        u += d > -(CE_ACC)INFINITY ? e * d : 0;
    }
    *s_out = s, *u_out = u;
}

static CE_CLONES void CE_F(lp_forward_row)(const CE_T *x, int64_t C, int64_t y, int counted,
                                           double scale, CE_ACC *out) {
    if (!counted) {
        out[0] = out[1] = out[2] = 0;
        return;
    }
    const CE_A(ce_tr) tr = {(CE_ACC)scale, 0, 0};
    CE_ACC buf[CE_NARROW ? CE_CHUNK : 1], dz;
    double m = -INFINITY, s = 0, u = 0; /* u = sum e^(z - m) (z - m) */
    int bad = y < 0 || y >= C;          /* never read out of bounds (the caller raises) */
    for (int64_t j0 = 0; j0 < C && !bad; j0 += CE_CHUNK) {
        const int64_t n = C - j0 < CE_CHUNK ? C - j0 : CE_CHUNK;
        const CE_ACC *xa = CE_F(ce_widen)(x + j0, n, buf);
        int nan;
        const CE_ACC mk = CE_A(ce_z)(CE_A(ce_max_body)(xa, n, 0, &nan), tr, 0, &dz);
        bad = nan || mk == INFINITY;
        if (bad || mk == -INFINITY)
            continue; /* a chunk of -inf adds nothing */
        CE_ACC sk, uk;
        CE_F(lp_sums)(xa, n, tr, mk, &sk, &uk);
        if (mk > m) { /* rescale the running sums to the new max (m = -inf: nothing to rescale) */
            const double r = m == -INFINITY ? 0 : exp(m - mk), dm = m == -INFINITY ? 0 : m - mk;
            u = r * (u + dm * s) + uk;
            s = r * s + sk;
            m = mk;
        } else {
            const double r = exp(mk - m);
            u += r * (uk + (mk - m) * sk);
            s += r * sk;
        }
    }
    if (bad || m == -INFINITY) {
        out[0] = out[1] = out[2] = NAN;
        return;
    }
    const CE_ACC zy = CE_A(ce_z)(CE_LOAD(x[y]), tr, 0, &dz);
    const double log_s = log(s);
    out[0] = (CE_ACC)(CE_KEEP((double)zy - m) - log_s);
    out[1] = (CE_ACC)(log_s - u / s);
    out[2] = (CE_ACC)(m + log_s);
}

/* g_j = -p_j (c + gh a_j) scale over one chunk, a_j = z_j - lse (gh = 0 without entropy). */
CE_INLINE void CE_F(lp_grads)(const CE_ACC *xa, CE_T *g, int64_t n, CE_A(ce_tr) tr, CE_ACC lse,
                              CE_ACC c, CE_ACC gh) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        CE_ACC dz, a = CE_A(ce_z)(xa[j], tr, 0, &dz) - lse, p = ce_exp(a);
        g[j] = CE_STORE(p == 0 ? (CE_ACC)0 : -p * (c + gh * a) * tr.scale);
    }
}

static CE_CLONES void CE_F(lp_backward_row)(const CE_T *x, CE_T *g, int64_t C, int64_t y,
                                            int counted, double scale, double lse, double H,
                                            double gl, double gh, int entropy) {
    if (!counted || !isfinite(lse)) { /* ignored: 0; NaN row (lse is NaN then): NaN */
        const CE_T v = CE_STORE((CE_ACC)(counted ? NAN : 0));
        for (int64_t j = 0; j < C; j++) g[j] = v;
        return;
    }
    const CE_A(ce_tr) tr = {(CE_ACC)scale, 0, 0};
    CE_ACC buf[CE_NARROW ? CE_CHUNK : 1], dz;
    gh = entropy ? gh : 0;
    const CE_ACC zy = CE_A(ce_z)(CE_LOAD(x[y]), tr, 0, &dz); /* before g may overwrite it */
    for (int64_t j0 = 0; j0 < C; j0 += CE_CHUNK) {
        const int64_t n = C - j0 < CE_CHUNK ? C - j0 : CE_CHUNK;
        CE_F(lp_grads)(CE_F(ce_widen)(x + j0, n, buf), g + j0, n, tr, (CE_ACC)lse,
                       (CE_ACC)(gl + gh * H), (CE_ACC)gh);
    }
    /* the token's element: gl (1 - p_y) - gh p_y (a_y + H), in double */
    const double ay = (double)zy - lse, py = exp(ay);
    g[y] = CE_STORE((CE_ACC)((gl * (1 - py) - (py == 0 ? 0 : gh * py * (ay + H))) * scale));
}

#endif /* LP_ROW_TEMPLATE */
