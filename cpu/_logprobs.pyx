# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""OpenMP row loops over the token log-probability row kernels of logprobs.h (caller:
celoss/logprobs.py).

Arguments are raw addresses (``tensor.data_ptr()``), int64 sizes and row strides in elements, and
a dtype code (0 fp32, 1 fp64, 2 fp16, 3 bf16: _dtypes.pxd). ``out`` (N, 3) (log p, entropy, lse),
``lse``, ``ent``, ``gl`` and ``gh`` are float32 (float64 for fp64 logits) and contiguous; tokens
int64.
Tokens are checked by the caller (IndexError naming the value); the row kernels only guard their
reads (an out-of-range token gives a NaN row).
"""
from cython.parallel cimport prange
from libc.stdint cimport int64_t

from _dtypes cimport acc_itemsize, check_dtype, itemsize

cdef extern from "logprobs.h" nogil:
    void lp_forward_row(int dt, const void *x, int64_t C, int64_t y, int counted, double scale,
                        void *out)
    void lp_backward_row(int dt, const void *x, void *g, int64_t C, int64_t y, int counted,
                         double scale, double lse, double H, double gl, double gh, int entropy)

cdef inline double acc_at(size_t p, int64_t i, bint f64) noexcept nogil:
    return (<const double *>p)[i] if f64 else (<const float *>p)[i]


def forward(int dt, int64_t N, int64_t C, size_t x, int64_t sx, size_t y, int64_t ignore_index,
            double scale, size_t out, int num_threads):
    """Per row (log p_y, entropy, lse) into out (N, 3)."""
    check_dtype(dt)
    cdef const int64_t *yp = <const int64_t *>y
    cdef int64_t n, isz = itemsize(dt), asz = acc_itemsize(dt)
    cdef char *xb = <char *>x
    for n in prange(N, nogil=True, schedule="static", num_threads=num_threads):
        lp_forward_row(dt, xb + n * sx * isz, C, yp[n], yp[n] != ignore_index, scale,
                       <char *>out + 3 * n * asz)


def backward(int dt, int64_t N, int64_t C, size_t x, int64_t sx, size_t g, int64_t sg, size_t y,
             int64_t ignore_index, double scale, size_t lse, size_t ent, size_t gl, size_t gh,
             int num_threads):
    """dx into g (may equal x) from the rows' lse and entropy and the upstream gradients of log p
    (``gl``) and of the entropy (``gh``); an address 0 means zeros (``ent``: no entropy term)."""
    check_dtype(dt)
    cdef const int64_t *yp = <const int64_t *>y
    cdef int64_t n, isz = itemsize(dt)
    cdef bint f64 = dt == 1, has_h = ent != 0 and gh != 0
    cdef char *xb = <char *>x
    cdef char *gb = <char *>g
    for n in prange(N, nogil=True, schedule="static", num_threads=num_threads):
        lp_backward_row(dt, xb + n * sx * isz, gb + n * sg * isz, C, yp[n], yp[n] != ignore_index,
                        scale, acc_at(lse, n, f64), acc_at(ent, n, f64) if has_h else 0.0,
                        acc_at(gl, n, f64) if gl else 0.0, acc_at(gh, n, f64) if has_h else 0.0,
                        has_h)
