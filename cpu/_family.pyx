# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""OpenMP row loops of the loss family (adapter: the "loss family" section of
celoss/backends/cython.py): binary cross-entropy with logits, sigmoid focal loss, distillation.

Arguments are raw addresses (``tensor.data_ptr()``), int64 sizes and strides in elements, and
dtype codes (0 fp32, 1 fp64, 2 fp16, 3 bf16: _dtypes.pxd). ``use_double`` selects the fp64
kernels (every float input is then read as double), else fp32 accumulation (inputs fp32, fp16
or bf16, in any mix). Losses / partial sums are float32 (float64 with ``use_double``).
The C row kernels (family.h, with the math) come in a float and a double instance; the float
one is cloned per ISA (AVX-512 / AVX2 / baseline) by ce_rows.h's CE_CLONES, and its hottest
loops have hand-written AVX-512 versions (``use_avx512_rows``).
"""
from cython.parallel cimport prange
from libc.stdint cimport int64_t

from _dtypes cimport check_dtype, itemsize

cdef extern from "family.h" nogil:
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
    int ce_use_hw_bf16(int on)
    int ce_use_avx512_rows(int on)
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

KINDS = {"kl": 0, "reverse_kl": 1, "ce": 2, "jsd": 3}


def distill(int64_t N, int64_t V, size_t s, int sdt, int64_t ss, size_t t, int tdt, int64_t st,
            size_t y, int64_t ignore_index, size_t coef, int64_t scoef, size_t g, int gdt,
            int64_t sg, size_t loss, *, int kind, bint t_is_one, double inv_T, double ws,
            double wh, double beta, bint use_double, int num_threads):
    """Row losses of distillation into ``loss`` (N,); with ``g`` != 0, coef[n * scoef] * dloss/ds
    into g (dtype gdt, row stride sg; coef float64). ``y`` != 0: int64 targets (rows equal to ignore_index get
    loss 0 and gradient 0, or NaN where the row is poisoned, as PyTorch; with ``wh`` != 0 the others
    add the class term). See family.h
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
    cdef int64_t ssz = itemsize(sdt), tsz = itemsize(tdt), gsz = itemsize(gdt) if g else 0
    cdef char *sb = <char *>s
    cdef char *tb = <char *>t
    cdef char *gb = <char *>g
    cdef const double *cp = <const double *>coef
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


def use_avx512bf16(on=None):
    """As celoss.cpu._kernels.use_avx512bf16, for this module's bf16 stores (its own copy)."""
    return bool(ce_use_hw_bf16(-1 if on is None else int(bool(on))))


def use_avx512_rows(on=None):
    """As celoss.cpu._kernels.use_avx512_rows, for this module's hand-written AVX-512 loops (its
    own copy; CELOSS_NO_AVX512_ROWS=1 at load turns it off): sigmoid focal loss at gamma = 2
    (fp32 / bf16), distillation's pass 1 and the kl / ce bf16 gradient. Returns whether they are used."""
    return bool(ce_use_avx512_rows(-1 if on is None else int(bool(on))))
