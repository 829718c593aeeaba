# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""OpenMP row loops over the C row kernels of ce_rows.h (adapter: celoss/backends/cython.py).

Arguments are raw addresses (``tensor.data_ptr()``), int64 sizes and row strides in elements,
and a dtype code (0 fp32, 1 fp64, 2 fp16, 3 bf16: _dtypes.pxd). Accumulation-typed arrays
(weight, loss, lse, stats, row coefficients, ``coef``) are float32, or float64 for fp64 logits (a
float64 gradient never carries a float32-rounded upstream scale).
Rows are independent: one static ``prange`` over them. Index targets of ``fused`` are checked
before any row is touched (an in-place gradient never half-overwrites the logits); the row
kernels also guard every read with a target (stats/grad: only targets inside the block are read).
"""
from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
cimport openmp

from _dtypes cimport acc_itemsize, check_dtype, itemsize

cdef extern from "ce_rows.h" nogil:
    ctypedef struct ce_opts:
        int64_t C, class_start, ignore_index
        double scale, softcap, eps, z_loss, gamma, wsum
    void ce_fused_row(int dt, const ce_opts *o, const void *x, void *g, const void *t,
                      int64_t y, const void *w, double coef, void *loss, void *lse, void *scratch)
    void ce_stats_row(int dt, const ce_opts *o, const void *x, int64_t y, const void *w, void *out)
    void ce_grad_row(int dt, const ce_opts *o, const void *x, void *g, int64_t y, const void *w,
                     const void *lse, const void *abd)
    int ce_use_hw_bf16(int on)
    int ce_use_avx512_rows(int on)
    void ce_f2bf_row(const float *src, unsigned short *dst, int64_t n)

cdef inline int64_t first_bad(const int64_t *y, int64_t n, int64_t C,
                              int64_t ignore_index) noexcept nogil:
    """Row of the first target outside [0, C) that is not ignore_index, or -1."""
    cdef int64_t i
    for i in range(n):
        if y[i] != ignore_index and (y[i] < 0 or y[i] >= C):
            return i
    return -1


cdef inline double coef_at(size_t coef, int64_t i, bint f64) noexcept nogil:
    return (<const double *>coef)[i] if f64 else (<const float *>coef)[i]


cdef ce_opts make_opts(int64_t C, int64_t class_start, int64_t ignore_index, double scale,
                       object softcap, double eps, double z_loss, object gamma, double wsum):
    cdef ce_opts o
    o.C, o.class_start, o.ignore_index = C, class_start, ignore_index
    o.scale, o.softcap = scale, (0.0 if softcap is None else softcap)
    o.eps, o.z_loss, o.gamma, o.wsum = eps, z_loss, (-1.0 if gamma is None else gamma), wsum
    return o


def fused(int dt, int64_t N, int64_t C, size_t x, int64_t sx, size_t g, int64_t sg, size_t t,
          int64_t st, size_t y, size_t w, size_t coef, int64_t scoef, size_t loss, size_t lse, *,
          int64_t ignore_index, double label_smoothing, double logit_scale, softcap,
          double z_loss, focal_gamma, double wsum, int num_threads):
    """Per-row loss and lse into ``loss``/``lse``; with ``g`` != 0, coef[n * scoef] * dloss/dx
    into g (which may equal x). ``t`` != 0: probability targets, else int64 targets ``y``."""
    check_dtype(dt)
    cdef ce_opts o = make_opts(C, 0, ignore_index, logit_scale, softcap, label_smoothing, z_loss,
                               focal_gamma, wsum)
    cdef const int64_t *yp = <const int64_t *>y
    cdef int64_t bad = -1 if t else first_bad(yp, N, C, ignore_index)
    if bad >= 0:
        raise IndexError(f"Target {yp[bad]} is out of bounds (row {bad}, {C} classes).")
    cdef int64_t n, isz = itemsize(dt), asz = acc_itemsize(dt)
    cdef char *xb = <char *>x
    cdef char *gb = <char *>g
    cdef char *tb = <char *>t
    # 16-bit gradients: a row of exp(z - max) per thread between passes 2 and 3 (fp32/fp64 use g)
    cdef char *scratch = NULL
    if g and isz == 2:
        scratch = <char *>malloc(max(num_threads, 1) * C * asz)
        if scratch == NULL:
            raise MemoryError()
    try:
        for n in prange(N, nogil=True, schedule="static", num_threads=num_threads):
            ce_fused_row(dt, &o, xb + n * sx * isz, (gb + n * sg * isz) if g else NULL,
                         (tb + n * st * isz) if t else NULL, 0 if t else yp[n], <const void *>w,
                         coef_at(coef, n * scoef, dt == 1) if g else 1.0, <char *>loss + n * asz,
                         <char *>lse + n * asz,
                         (scratch + openmp.omp_get_thread_num() * C * asz) if scratch else NULL)
    finally:
        free(scratch)


def stats(int dt, int64_t N, int64_t C, size_t x, int64_t sx, size_t y, size_t w, size_t out, *,
          int64_t class_start, int64_t ignore_index, double logit_scale, softcap, int num_threads):
    """(N, 4) row statistics (max, sumexp, target_z, weighted_z) of classes [class_start, +C)."""
    check_dtype(dt)
    cdef ce_opts o = make_opts(C, class_start, ignore_index, logit_scale, softcap, 0, 0, None, 0)
    cdef const int64_t *yp = <const int64_t *>y  # any value: read only inside the block
    cdef int64_t n, isz = itemsize(dt), asz = acc_itemsize(dt)
    cdef char *xb = <char *>x
    for n in prange(N, nogil=True, schedule="static", num_threads=num_threads):
        ce_stats_row(dt, &o, xb + n * sx * isz, yp[n], <const void *>w, <char *>out + 4 * n * asz)


def grad(int dt, int64_t N, int64_t C, size_t x, int64_t sx, size_t g, int64_t sg, size_t y,
         size_t w, size_t lse, size_t abd, *, int64_t class_start, double logit_scale, softcap,
         int num_threads):
    """dz/dx (A p - B [j == y] - D w) into g (may equal x) from lse (N,) and abd (N, 3)."""
    check_dtype(dt)
    cdef ce_opts o = make_opts(C, class_start, 0, logit_scale, softcap, 0, 0, None, 0)
    cdef const int64_t *yp = <const int64_t *>y
    cdef int64_t n, isz = itemsize(dt), asz = acc_itemsize(dt)
    cdef char *xb = <char *>x
    cdef char *gb = <char *>g
    for n in prange(N, nogil=True, schedule="static", num_threads=num_threads):
        ce_grad_row(dt, &o, xb + n * sx * isz, gb + n * sg * isz, yp[n], <const void *>w,
                    <char *>lse + n * asz, <char *>abd + 3 * n * asz)


def use_avx512bf16(on=None):
    """Store bf16 gradients with vcvtneps2bf16 (``on`` true, where the CPU has AVX512-BF16; the
    default unless CELOSS_NO_AVX512BF16=1 was set at import) or with the portable integer rounding
    (false); None: no change. Returns whether the instruction is used now. Call it between kernel
    calls only."""
    return bool(ce_use_hw_bf16(-1 if on is None else int(bool(on))))


def use_avx512_rows(on=None):
    """Run the cross-entropy rows' first two passes on the hand-written AVX-512 loops (``on`` true,
    where the CPU has AVX-512; the default unless CELOSS_NO_AVX512_ROWS=1 was set at import) or on
    the portable vectorized ones (false); None: no change. Returns whether the AVX-512 loops are used
    now. Call it between kernel calls only."""
    return bool(ce_use_avx512_rows(-1 if on is None else int(bool(on))))


def to_bf16(size_t src, size_t dst, int64_t n):
    """n float32 values at ``src`` rounded to bfloat16 at ``dst``, as the gradient stores do."""
    with nogil:
        ce_f2bf_row(<const float *>src, <unsigned short *>dst, n)
