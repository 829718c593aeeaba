"""celoss.linear_cross_entropy: the LM-head loss ``cross_entropy(input @ W^T + b, target)`` without
ever holding the N x V logits.

Two engines, both built on the per-row statistics of :mod:`celoss.stats`:

* **Chunked (the default, every device and backend).** The counted rows are processed in chunks
  whose logits workspace never exceeds ``chunk_bytes`` (default :data:`DEFAULT_CHUNK_BYTES` =
  256 MB, at most half the whole workspace from 1024 rows on): ``L = X_c W^T (+ b)`` by one
  matrix product (BLAS on CPU, cuBLAS on CUDA) into one reused buffer, then the backend's row
  kernel (``celoss::ce_forward_inplace``: Cython, plain PyTorch or Triton) overwrites ``L`` with
  ``coef * dloss/dlogits``, and ``dX_c = L W``, ``dW += L^T X_c``, ``db += sum_rows L``
  (``addmm``-style products: no atomics; a 16-bit dW summed in place over at most 2 chunks, in
  float32 over more). With reduction
  "mean"/"sum" this runs in forward (three matrix products in all) and backward only rescales the
  saved gradients by ``grad_output``; with reduction "none" (a per-row upstream gradient), a
  returned lse, float64 inputs or ``allow_retain_graph``, forward computes the loss only and
  backward recomputes.
* **Fused (Triton, ``engine="fused"``).** ``lce_stats`` computes partial row statistics of logit
  tiles (``tl.dot``) merged with :func:`celoss.stats.merge_all`; backward recomputes logit tiles and
  accumulates dX, dW, db in float32 from the row coefficients of :func:`celoss.stats.coefficients`,
  with optional gradient filtering (``filter_eps``). No logits workspace at all; its backward has
  one program own each block of dX rows (resp. dW classes) and add every gradient tile into it by
  read-modify-writes (no atomics, bit-reproducible), 4 GEMM-equivalents of ``M x V x D`` for any D
  (logits formed once per kernel). See ``kernels/linear_cross_entropy.py``.

Both engines run inside two custom ops (``celoss::lce_forward`` / ``celoss::lce_backward``), so
``torch.compile`` sees two opaque ops with shape-only fake implementations: the data-dependent
parts (compaction of the ignored rows, the chunk loop, target checks) stay in eager code.

Rows whose target is ``ignore_index`` are compacted away before any matrix product (unless
``return_lse`` asks for every row's lse). ``shift=True`` maps output row ``r`` of a
``(..., T, D)`` input to hidden row ``r + r // (T - 1)`` (index arithmetic: no copy of the hidden
states) and reads its label from ``target[..., 1:]``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _checks, _dispatch, _ops
from . import stats as S
from ._autograd import once_differentiable
from ._dtypes import accum_dtype
from ._memory import fresh_empty, fresh_like
from .cross_entropy import CrossEntropyOutput, counted_weight

DEFAULT_CHUNK_BYTES = 256 << 20  # logits workspace of the chunked engine (bytes)
_LOWP_ACC_BYTES = 16 << 20       # bound of the slice temporary of a float32-accumulated 16-bit dW update
# Up to this many row chunks, a 16-bit dW is accumulated in place (addmm, beta = 1: one rounding a
# chunk) instead of in a float32 V x D copy (twice dW's bytes). Measured (2048 x 512 x 8192 bf16, dW
# vs a float64 oracle, relative norm error): eager PyTorch 1.84e-3; one chunk 1.77e-3; float32
# accumulation of 2-64 chunks 2.1-2.4e-3; in place: 2 chunks 2.13e-3, 4: 2.69e-3, 8: 3.50e-3. The
# largest element's error: within one bf16 ulp of eager's with 2 chunks, up to 2 ulp with 4.
DIRECT_DW_CHUNKS = 2
_MIN_SPLIT_ROWS = 512            # by default, inputs of twice this many rows take at least 2 chunks
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ENGINES = ("chunked", "fused")
_NAME = "celoss.linear_cross_entropy"


class _Rows(NamedTuple):
    """The rows actually processed: ``M`` of them, out of ``n_out`` output rows."""
    src: Optional[Tensor]   # (M,) int64 rows of the flattened hidden states; None: 0..M-1
    tgt: Tensor             # (M,) int64 targets
    proc: Optional[Tensor]  # (M,) int64 output positions; None: all n_out rows, in order
    n_out: int


class _Plan(NamedTuple):
    """The non-tensor arguments of the custom ops (constants to torch.compile), in their order."""
    backend: str
    engine: str             # "chunked" or "fused"
    ignore_index: int
    label_smoothing: float
    logit_scale: float
    softcap: Optional[float]
    z_loss: float
    seq_len: int            # T with shift=True, else 0
    keep_all: bool          # process ignored rows too (return_lse: every row's lse)
    chunk_bytes: int
    chunk_rows: int         # rows per chunk (options.batch_chunk_size); 0: from chunk_bytes
    filter_eps: Optional[float]

    def opts(self) -> dict:
        return dict(ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                    logit_scale=self.logit_scale, softcap=self.softcap, z_loss=self.z_loss, focal_gamma=None)


# ------------------------------------------------------------------------------------------------
# Row coefficients (shared by the recomputing backward passes)
# ------------------------------------------------------------------------------------------------

def _unscaled_row_coefs(lse: Tensor, tgt: Tensor, weight, num_classes: int, opts: dict) -> Tensor:
    """(M, 3) gradient coefficients (A, B, D) of the per-row loss given the full-row lse.

    A, B, D depend on the statistics only through the lse (celoss.stats.coefficients), so the
    statistics are stood in for by (lse, 1, 0, 0)."""
    ones = torch.ones_like(lse)
    zeros = torch.zeros_like(lse)
    stand_in = torch.stack([lse, ones, zeros, zeros], dim=-1)
    return S.coefficients(stand_in, tgt, weight, num_classes=num_classes,
                          ignore_index=opts["ignore_index"], label_smoothing=opts["label_smoothing"],
                          z_loss=opts["z_loss"])[2]


def _scaled_row_coefs(lse, tgt, weight, num_classes, opts, scale, grad_lse):
    """Row coefficients times the per-row upstream scale (already 0 on ignored rows), plus the
    returned lse's gradient (which flows for every row)."""
    row_coefs = _unscaled_row_coefs(lse, tgt, weight, num_classes, opts) * scale.to(lse.dtype).reshape(-1, 1)
    if grad_lse is not None:
        row_coefs[:, 0] += grad_lse.to(lse.dtype)
    return row_coefs


# ------------------------------------------------------------------------------------------------
# Chunked engine: library matrix products + the backend's row kernels
# ------------------------------------------------------------------------------------------------

def row_bytes(x: Tensor, v: int, buffers: int) -> int:
    """Chunk workspace per row of a layer with inputs ``x`` (D features) and ``v`` outputs:
    ``buffers`` logits-sized rows plus the gathered input row and its dX row."""
    return x.element_size() * (buffers * v + 2 * x.shape[-1])


def rows_per_chunk(chunk_bytes: int, per_row: int, rows: int) -> int:
    """Rows per chunk when ``rows`` rows (0: none) are split evenly into the fewest chunks whose
    workspace (``per_row`` bytes a row) fits ``chunk_bytes``; at least one row a chunk. Even chunks
    (4096 rows under a bound of 3942: 2 x 2048, not 3942 + a 154-row tail whose thin products run
    far below the BLAS rate); only the last may be shorter, by fewer rows than there are chunks."""
    cap = max(1, chunk_bytes // max(per_row, 1))
    if rows <= cap:
        return rows
    return -(-rows // -(-rows // cap))


def default_chunk_bytes(rows: int, per_row: int) -> int:
    """The default workspace bound of ``rows`` rows of ``per_row`` bytes: :data:`DEFAULT_CHUNK_BYTES`,
    and at most half of the whole workspace once there are ``2 * _MIN_SPLIT_ROWS`` rows, so that the
    peak (a chunk's workspace plus dW) stays below the N x V logits an unchunked composition holds,
    while each product keeps at least ``_MIN_SPLIT_ROWS`` rows (BLAS rate)."""
    if rows >= 2 * _MIN_SPLIT_ROWS:
        return min(DEFAULT_CHUNK_BYTES, max(1, rows * per_row // 2))
    return DEFAULT_CHUNK_BYTES


def plan_chunks(chunk_bytes: int, per_row: int, rows: int, acc_bytes: int) -> tuple[int, int]:
    """(rows per chunk, chunks) of ``rows`` rows of ``per_row`` workspace bytes under ``chunk_bytes``.
    ``acc_bytes``: bytes of the float32 dW accumulators (and their slice temporaries) that 16-bit
    weights need beyond :data:`DIRECT_DW_CHUNKS` chunks (0: none); they then count towards
    ``chunk_bytes`` as far as they leave half of it for the logits (smaller chunks, not a higher peak)."""
    step = rows_per_chunk(chunk_bytes, per_row, rows)
    chunks = -(-rows // step) if rows else 0
    if chunks > DIRECT_DW_CHUNKS and acc_bytes:
        step = rows_per_chunk(max(chunk_bytes - acc_bytes, chunk_bytes // 2), per_row, rows)
        chunks = -(-rows // step)
    return step, chunks


def dw_acc_bytes(w: Tensor, need_dw: bool) -> int:
    """Bytes of the float32 accumulator of a 16-bit ``w``'s dW and its slice temporary (0: none needed)."""
    if not need_dw or accum_dtype(w.dtype) == w.dtype:
        return 0
    return w.numel() * 4 + min(_LOWP_ACC_BYTES, w.numel() * w.element_size())


def workspace(shape, dtype: torch.dtype, device) -> Tensor:
    """An uninitialised contiguous buffer; a large CPU one is recycled through celoss's CPU cache, so
    a training step does not pay the page faults of fresh chunk buffers every time."""
    return fresh_empty(shape, dtype, device)


class GradSink:
    """dX, dW, db of one linear layer ``x2d @ w^T + b``, accumulated from the dloss/dlogits of row
    chunks by matrix products (no atomics): dX rows written, dW and db summed over ``chunks`` chunks
    (a 16-bit dW in place up to :data:`DIRECT_DW_CHUNKS` chunks, else in float32). ``need``:
    (dX, dW, db) wanted; ``m`` processed rows (``every_row``: they are all rows of x2d, in order, so
    dX needs no zero fill). The gradients come from the CPU cache (see :func:`workspace`)."""

    def __init__(self, x2d: Tensor, w: Tensor, b: Optional[Tensor], need, m: int, every_row: bool,
                 chunks: int):
        dtype = x2d.dtype
        acc = accum_dtype(dtype)
        self.w, self.b, self.acc = w, b, acc
        need_dx, need_dw, need_db = need
        # dx rows outside the processed set stay 0; dw is written (not accumulated) by the first
        # chunk, unless there is no chunk
        self.dx = None
        if need_dx:
            self.dx = fresh_like(x2d) if every_row else fresh_like(x2d).zero_()
        self.dw = self.part = None
        if need_dw:
            self.dw = workspace(w.shape, dtype if chunks <= DIRECT_DW_CHUNKS else acc, w.device)
            if not m:
                self.dw.zero_()
            elif self.dw.dtype != dtype and not _MIXED_GEMM.get(w.device.type, False):
                self.part = _dw_part(w)
        self.db = torch.zeros(w.shape[0], dtype=acc, device=w.device) if (need_db and b is not None) else None

    def add(self, g: Tensor, sel, xc: Tensor, first: bool) -> None:
        """Adds the chunk whose dloss/dlogits is ``g``, rows ``sel`` (slice or index) of x2d, ``xc``
        those rows; ``first``: the first chunk."""
        if self.dx is not None:
            if isinstance(sel, slice):
                torch.mm(g, self.w, out=self.dx[sel])
            else:
                self.dx.index_copy_(0, sel, g @ self.w)
        if self.dw is not None:
            self._add_dw(g, xc, first)
        if self.db is not None:
            self.db += g.sum(0, dtype=self.acc)

    def _add_dw(self, g: Tensor, xc: Tensor, first: bool) -> None:
        """dw (+)= g^T xc (``first``: dw is uninitialised); a float32 dw of fp16/bf16 products
        accumulates across chunks in float32. On CUDA one cuBLAS GEMM accumulates in float32
        straight into it (``addmm`` with ``out_dtype``, beta = 1); elsewhere the product of one chunk
        is rounded once, in vocabulary slices written to the reused temporary ``part``, and added."""
        dw = self.dw
        if dw.dtype == g.dtype:
            if first:
                torch.mm(g.t(), xc, out=dw)
            else:
                dw.addmm_(g.t(), xc)
            return
        if self.part is None:  # a mixed-output GEMM
            try:
                if first:
                    torch.mm(g.t(), xc, out_dtype=dw.dtype, out=dw)
                else:
                    torch.addmm(dw, g.t(), xc, out_dtype=dw.dtype, out=dw)
                return
            except (RuntimeError, TypeError, NotImplementedError):  # an older torch: no mixed-output GEMM
                _MIXED_GEMM[dw.device.type] = False
                self.part = _dw_part(self.w)
        step = self.part.shape[0]
        for s in range(0, dw.shape[0], step):
            gs = g[:, s:s + step]
            p = torch.mm(gs.t(), xc, out=self.part[: gs.shape[1]])
            if first:
                dw[s:s + step].copy_(p)
            else:
                dw[s:s + step] += p

    def grads(self) -> tuple:
        """(dx, dw, db) in the parameters' dtypes (None where not asked for)."""
        return _finish((self.dx, self.dw, self.db), self.w, self.b)


def gather_rows(x2d: Tensor, sel) -> Tensor:
    return x2d[sel] if isinstance(sel, slice) else x2d.index_select(0, sel)


class _ChunkedEngine:
    """Row chunks bounded by ``chunk_bytes`` (or of ``chunk_rows`` rows); products by torch (BLAS /
    cuBLAS), rows by ``backend``'s row kernel. With probability targets, ``soft`` holds them as
    rows of the flattened target, row ``r + soft_offset`` belonging to hidden row ``r`` (1 with
    shift); they are read chunk by chunk, in the logits' dtype."""

    def __init__(self, backend: str, weight, opts: dict, chunk_bytes: int, chunk_rows: int = 0,
                 soft: Optional[Tensor] = None, soft_offset: int = 0):
        self.backend, self.weight, self.opts = backend, weight, opts
        self.chunk_bytes, self.chunk_rows = chunk_bytes, chunk_rows
        self.soft, self.soft_offset = soft, soft_offset

    def _step(self, x2d, w, buffers: int, m: int, need_dw: bool) -> tuple[int, int]:
        """(rows per chunk, chunks) of ``m`` rows: ``chunk_rows`` if set, else an even split into
        chunks of `buffers` logits-sized buffers plus the gathered rows (and a float32 dW
        accumulator, see :func:`plan_chunks`) within chunk_bytes."""
        if self.chunk_rows:
            step = min(self.chunk_rows, m)
            return step, -(-m // step) if m else 0
        return plan_chunks(self.chunk_bytes, row_bytes(x2d, w.shape[0], buffers), m, dw_acc_bytes(w, need_dw))

    def _soft_sel(self, rows: _Rows, s: int, e: int):
        """Rows of the flattened probability targets read by processed rows [s, e) (slice or index)."""
        sel = _contiguous_rows(rows.src, s, e)
        off = self.soft_offset
        return slice(sel.start + off, sel.stop + off) if isinstance(sel, slice) else sel + off

    def _targets(self, rows: _Rows, s: int, e: int, dtype: torch.dtype):
        """(class indices, probability targets) of processed rows [s, e): one of them is None."""
        if self.soft is None:
            return rows.tgt[s:e], None
        soft = gather_rows(self.soft, self._soft_sel(rows, s, e)).to(dtype)
        return None, (soft if soft.stride(-1) == 1 else soft.contiguous())

    def _pass(self, x2d, w, b, rows: _Rows, need, make_grad, buffers=1):
        """Run the chunks: ``make_grad(L, s, e)`` turns the logits chunk ``L`` of rows [s, e) into
        dloss/dlogits (in place or a new tensor; None: no gradient) and records what it wants.
        Returns the (dx, dw, db) accumulated from those gradients (None where not needed)."""
        m = rows.tgt.shape[0]
        step, chunks = self._step(x2d, w, buffers, m, need[1])
        sink = GradSink(x2d, w, b, need, m, every_row=rows.src is None and m == x2d.shape[0], chunks=chunks)
        if m == 0:
            return sink.grads()
        buf = workspace((step, w.shape[0]), x2d.dtype, x2d.device)
        wt = w.t()
        for s in range(0, m, step):
            e = min(m, s + step)
            sel = _contiguous_rows(rows.src, s, e)
            xc = gather_rows(x2d, sel)
            logits = buf[: e - s]
            if b is None:
                torch.mm(xc, wt, out=logits)
            else:
                torch.addmm(b, xc, wt, out=logits)
            g = make_grad(logits, s, e)
            if g is not None:
                sink.add(g, sel, xc, first=s == 0)
        return sink.grads()

    def forward(self, x2d, w, b, rows: _Rows, coef=None, need=(False, False, False)):
        """Per-row loss and lse of the processed rows; with ``coef`` also the gradients of
        ``coef * sum(loss)`` (as (dx, dw, db) in the parameter dtypes)."""
        m = rows.tgt.shape[0]
        acc = accum_dtype(x2d.dtype)
        loss = torch.zeros(m, dtype=acc, device=x2d.device)
        lse = torch.zeros(m, dtype=acc, device=x2d.device)
        grads = coef is not None and any(need)

        def make_grad(logits, s, e):
            t, soft = self._targets(rows, s, e, logits.dtype)
            if grads:
                loss[s:e], lse[s:e] = _ops.ce_forward_inplace(logits, t, soft, self.weight, coef,
                                                              self.backend, **self.opts)
                return logits
            loss[s:e], lse[s:e], _ = _ops.ce_forward(logits, t, soft, self.weight, None, self.backend,
                                                     **self.opts)
            return None

        out = self._pass(x2d, w, b, rows, need if grads else (False, False, False), make_grad)
        return loss, lse, (out if grads else None)

    def backward(self, x2d, w, b, rows: _Rows, lse, scale, grad_lse, need, targets=None):
        """Gradients of ``sum_n scale_n loss_n + grad_lse_n lse_n`` (``scale`` (M,)) by recomputing
        the logits; ``targets`` (a :class:`TargetGrads`, probability targets only) also collects
        those of the targets and the class weight."""
        opts = self.opts
        v = w.shape[0]
        if self.soft is not None:
            # the row kernel in place (its coef is applied in float64 for float64 logits), plus
            # grad_lse * dlse/dlogits (ce_grad with coefficients (grad_lse, 0, 0))
            lse_coefs = None if grad_lse is None else \
                torch.stack([grad_lse.to(lse.dtype), torch.zeros_like(lse), torch.zeros_like(lse)], dim=1)

            def make_grad_soft(logits, s, e):
                if targets is not None:  # before the row kernel overwrites the logits
                    targets.add(logits, self.soft, self._soft_sel(rows, s, e), lse[s:e], scale[s:e])
                if not any(need):
                    return None
                t, soft = self._targets(rows, s, e, logits.dtype)
                extra = None if lse_coefs is None else _ops.ce_grad(
                    logits, rows.tgt[s:e], self.weight, lse[s:e], lse_coefs[s:e], self.backend, 0,
                    opts["logit_scale"], opts["softcap"])
                _ops.ce_forward_inplace(logits, t, soft, self.weight, scale[s:e].contiguous(), self.backend,
                                        **opts)
                return logits if extra is None else logits.add_(extra)
            return self._pass(x2d, w, b, rows, need, make_grad_soft, buffers=1 if grad_lse is None else 2)

        if grad_lse is None:  # the fused row kernel: p from z - max, exact where z - (rounded lse) is not
            def make_grad(logits, s, e):
                _ops.ce_forward_inplace(logits, rows.tgt[s:e], None, self.weight, scale[s:e].contiguous(),
                                        self.backend, **opts)
                return logits
            return self._pass(x2d, w, b, rows, need, make_grad)

        row_coefs = _scaled_row_coefs(lse, rows.tgt, self.weight, v, opts, scale, grad_lse)

        def make_grad_lse(logits, s, e):
            return _ops.ce_grad(logits, rows.tgt[s:e], self.weight, lse[s:e], row_coefs[s:e], self.backend,
                                0, opts["logit_scale"], opts["softcap"])
        return self._pass(x2d, w, b, rows, need, make_grad_lse, buffers=2)


class TargetGrads:
    """Gradients of probability targets (rows of the flattened target, ``soft``) and of the class
    weight, collected chunk by chunk from each chunk's logits and lse by ``celoss::ce_target_grads``
    (``-log p = lse - z`` is all they need). ``every_row``: every target row is read, so the target
    gradient needs no zero fill."""

    def __init__(self, soft: Tensor, weight: Optional[Tensor], need_soft: bool, need_weight: bool,
                 every_row: bool, opts: dict):
        self.weight, self.opts = weight, opts
        self.dsoft = ((torch.empty if every_row else torch.zeros)(soft.shape, dtype=soft.dtype, device=soft.device)
                      if need_soft else None)
        self.dweight = torch.zeros_like(weight) if need_weight else None

    def add(self, logits: Tensor, soft: Tensor, sel, lse: Tensor, scale: Tensor) -> None:
        """Adds a chunk: ``logits`` of target rows ``sel`` of ``soft``, their ``lse`` and upstream ``scale``."""
        o = self.opts
        gt, gw = _ops.ce_target_grads(logits, gather_rows(soft, sel), self.weight, lse, scale,
                                      self.dsoft is not None, self.dweight is not None, o["label_smoothing"],
                                      o["logit_scale"], o["softcap"])
        if self.dsoft is not None:
            if isinstance(sel, slice):
                self.dsoft[sel] = gt
            else:
                self.dsoft.index_copy_(0, sel, gt)
        if self.dweight is not None:
            self.dweight += gw


def _contiguous_rows(src, s, e):
    """Rows [s, e) of the processed set as a slice of the hidden states when they are one
    contiguous run (always without a row map), else the int64 index tensor. Off the CPU a row map
    is always gathered: asking whether the run is contiguous would stop the host every chunk."""
    if src is None:
        return slice(s, e)
    if src.device.type != "cpu":
        return src[s:e]
    idx = src[s:e]
    first, last = int(idx[0]), int(idx[-1])
    if last - first == e - s - 1:  # src is strictly increasing
        return slice(first, last + 1)
    return idx


_MIXED_GEMM = {"cuda": True}  # device types whose fp16/bf16 GEMMs may write float32 (torch >= 2.8 on CUDA)


def _dw_part(w: Tensor) -> Tensor:
    """The reused product slice (at most ``_LOWP_ACC_BYTES``) of a float32-accumulated 16-bit dW."""
    v, d = w.shape
    return workspace((max(1, min(v, _LOWP_ACC_BYTES // max(d * w.element_size(), 1))), d), w.dtype, w.device)


def _finish(grads, w, b):
    dx, dw, db = grads
    if dw is not None and dw.dtype != w.dtype:
        dw = fresh_like(w).copy_(dw)  # the returned gradient from the CPU cache too
    return dx, dw, None if (db is None or b is None) else db.to(b.dtype)


# ------------------------------------------------------------------------------------------------
# Fused engine: backends with linear cross-entropy kernels (``lce_stats`` / ``lce_backward``)
# ------------------------------------------------------------------------------------------------

class _KernelEngine:
    """Logit tiles never leave the kernels (Triton); backward: owned dX / dW blocks, no atomics."""

    def __init__(self, module, weight, opts: dict, filter_eps):
        self.k, self.weight, self.opts, self.filter_eps = module, weight, opts, filter_eps

    def forward(self, x2d, w, b, rows: _Rows, coef=None, need=None):
        o = self.opts
        partial = self.k.lce_stats(x2d, w, b, rows.src, rows.tgt, self.weight, logit_scale=o["logit_scale"],
                                   softcap=o["softcap"], need_wz=o["label_smoothing"] != 0.0)
        merged = S.merge_all(partial)
        loss, lse, _ = S.coefficients(merged, rows.tgt, self.weight, num_classes=w.shape[0],
                                      ignore_index=o["ignore_index"], label_smoothing=o["label_smoothing"],
                                      z_loss=o["z_loss"])
        return loss, lse, None

    def backward(self, x2d, w, b, rows: _Rows, lse, scale, grad_lse, need):
        o = self.opts
        m = rows.tgt.shape[0]
        v, d = w.shape
        scale = scale.to(torch.float32).contiguous()
        row_coefs = _scaled_row_coefs(lse, rows.tgt, self.weight, v, o, scale, grad_lse).contiguous()
        thresholds = None
        if self.filter_eps is not None:
            thresholds = (self.filter_eps * scale.abs()).contiguous()
        need_dx, need_dw, need_db = need
        f32 = dict(dtype=torch.float32, device=x2d.device)
        dx = torch.zeros(x2d.shape, **f32) if need_dx else None
        dw = torch.zeros(v, d, **f32) if need_dw else None
        db = torch.zeros(v, **f32) if (need_db and b is not None) else None
        if m > 0 and (dx is not None or dw is not None or db is not None):
            # largest per-row scale: fp16/bf16 gradient tiles are normalized by it before rounding
            unit = scale.abs().amax()
            if grad_lse is not None:
                unit = torch.maximum(unit, grad_lse.abs().amax().to(unit.dtype))
            unit = torch.where(unit > 0, unit, 1.0).reshape(1).to(torch.float32)
            self.k.lce_backward(x2d, w, b, rows.src, rows.tgt, self.weight, lse.contiguous(), row_coefs,
                                thresholds, dx, dw, db, logit_scale=o["logit_scale"], softcap=o["softcap"],
                                has_d=o["label_smoothing"] != 0.0, unit=unit)
        return (None if dx is None else dx.to(x2d.dtype), None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(b.dtype))


# ------------------------------------------------------------------------------------------------
# Custom ops: the engines behind opaque ops (eager inside, shapes only to torch.compile)
# ------------------------------------------------------------------------------------------------

def _hidden_rows(pos: Tensor, seq_len: int) -> Tensor:
    """Rows of the flattened hidden states that output rows ``pos`` read."""
    return pos + pos // (seq_len - 1) if seq_len else pos


def _may_be_nonfinite(x: Tensor, w: Tensor, b: Optional[Tensor], logit_scale: float, seq_len: int,
                      n_out: int) -> Tensor:
    """(n_out,) bool: output rows whose logits may hold NaN or +-inf, by the bound
    ``|scale| (|x_r|_1 max|W| + max|b|)`` (NaN / inf inputs make it NaN / inf)."""
    f64 = dict(dtype=torch.float64)
    w_max = w.abs().amax().to(**f64) if w.numel() else torch.zeros((), device=w.device, **f64)
    b_max = b.abs().amax().to(**f64) if b is not None else 0.0
    bound = x.abs().sum(1, **f64) * w_max + b_max
    risky = ~(bound < torch.finfo(x.dtype).max) | ~(bound * abs(logit_scale) < torch.finfo(accum_dtype(x.dtype)).max)
    return risky[_hidden_rows(torch.arange(n_out, device=x.device), seq_len)]


def _plan_rows(labels: Tensor, seq_len: int, ignore_index: int, keep_all: bool, x: Tensor, w: Tensor,
               b: Optional[Tensor], logit_scale: float, backend: str) -> _Rows:
    """The processed rows of the output rows ``labels`` (already shifted when ``seq_len``).

    On the CPU, ignored rows are skipped unless their logits may be non-finite: PyTorch's gradient
    of such a row is NaN (softmax of NaN / inf times a zero upstream), and the row kernels reproduce
    it. On a device (:func:`celoss._checks.device_side`) every row is processed: compaction reads
    the targets on the host (a stream synchronisation, impossible under CUDA-graph capture), and an
    ignored row's coefficients are zero anyway."""
    n_out = labels.shape[0]
    proc = None
    if not keep_all and n_out and not _checks.device_side(labels, backend):
        counted = labels != ignore_index
        if not bool(counted.all()):
            counted |= _may_be_nonfinite(x, w, b, logit_scale, seq_len, n_out)
            proc = counted.nonzero().squeeze(1)
    tgt = labels if proc is None else labels[proc]
    src = proc  # rows of the flattened hidden states
    if seq_len and n_out:
        src = _hidden_rows(proc if proc is not None else torch.arange(n_out, device=labels.device), seq_len)
    return _Rows(src, tgt, proc, n_out)


def _engine(plan: _Plan, weight, soft: Optional[Tensor]):
    """``soft``: the probability targets as rows of the flattened target (row ``r + 1`` scores hidden
    row ``r`` with shift), or None."""
    if plan.engine == "fused":
        return _KernelEngine(_dispatch.module(plan.backend), weight, plan.opts(), plan.filter_eps)
    return _ChunkedEngine(plan.backend, weight, plan.opts(), plan.chunk_bytes, plan.chunk_rows, soft,
                          1 if plan.seq_len else 0)


def _output_rows(values: Tensor, rows: _Rows) -> Tensor:
    """Per processed row -> per output row (0 for rows not processed)."""
    if rows.proc is None:
        return values
    return values.new_zeros(rows.n_out).index_copy_(0, rows.proc, values)


def _or_empty(g: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if g is None else g


def _zero_grads(x, w, b, need):
    return tuple(torch.zeros_like(t) if n and t is not None else None for t, n in zip((x, w, b), need))


@_ops.custom_op("celoss::lce_forward", mutates_args=())
def _lce_forward(x: Tensor, w: Tensor, b: Optional[Tensor], labels: Tensor, soft: Optional[Tensor],
                 weight: Optional[Tensor], coef: Optional[Tensor], need_dx: bool, need_dw: bool, need_db: bool, backend: str,
                 engine: str, ignore_index: int, label_smoothing: float, logit_scale: float,
                 softcap: Optional[float], z_loss: float, seq_len: int, keep_all: bool, chunk_bytes: int,
                 chunk_rows: int, filter_eps: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-output-row loss and lse (0 where not processed; -inf lse without classes) and, with
    ``coef`` (chunked engine), the gradients of ``coef * sum(loss)`` (empty where not asked for).
    With probability targets ``soft`` (see ``_engine``), ``labels`` are placeholder zeros."""
    plan = _Plan(backend, engine, ignore_index, label_smoothing, logit_scale, softcap, z_loss, seq_len,
                 keep_all, chunk_bytes, chunk_rows, filter_eps)
    v = w.shape[0]
    if soft is None:
        _checks.target_indices(labels, v, ignore_index)
    need = (need_dx, need_dw, need_db and b is not None)
    acc = accum_dtype(x.dtype)
    if v == 0:  # every row is ignored (checked above) or sums nothing: only an lse of -inf to report
        n = labels.shape[0]
        grads = _zero_grads(x, w, b, need) if coef is not None else (None,) * 3
        return (x.new_zeros(n, dtype=acc), x.new_full((n,), -math.inf, dtype=acc),
                *(_or_empty(g, x) for g in grads))
    rows = _plan_rows(labels, seq_len, ignore_index, keep_all, x, w, b, logit_scale, backend)
    loss, lse, grads = _engine(plan, weight, soft).forward(x, w, b, rows, coef=coef, need=need)
    grads = grads or (None,) * 3
    return (_output_rows(loss, rows), _output_rows(lse, rows), *(_or_empty(g, x) for g in grads))


@_lce_forward.register_fake
def _(x, w, b, labels, soft, weight, coef, need_dx, need_dw, need_db, *plan):
    n = labels.shape[0]
    acc = accum_dtype(x.dtype)
    grads = coef is not None

    def grad_like(t, needed):
        return torch.empty_like(t) if grads and needed and t is not None else x.new_empty(0)

    return (x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc), grad_like(x, need_dx), grad_like(w, need_dw),
            grad_like(b, need_db))


@_ops.custom_op("celoss::lce_backward", mutates_args=())
def _lce_backward(x: Tensor, w: Tensor, b: Optional[Tensor], labels: Tensor, soft: Optional[Tensor],
                  weight: Optional[Tensor], lse: Tensor, scale: Tensor, grad_lse: Optional[Tensor], need_dx: bool, need_dw: bool,
                  need_db: bool, need_dsoft: bool, need_dweight: bool, backend: str, engine: str, ignore_index: int,
                  label_smoothing: float, logit_scale: float, softcap: Optional[float], z_loss: float, seq_len: int,
                  keep_all: bool, chunk_bytes: int, chunk_rows: int,
                  filter_eps: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``sum_n scale_n loss_n + grad_lse_n lse_n`` over the output rows (``scale``: one
    value or one per output row; ``lse`` as returned by ``lce_forward``) by recomputing the logits:
    those of x, w, b, then (chunked engine, probability targets) of ``soft`` and the class ``weight``."""
    plan = _Plan(backend, engine, ignore_index, label_smoothing, logit_scale, softcap, z_loss, seq_len,
                 keep_all, chunk_bytes, chunk_rows, filter_eps)
    need = (need_dx, need_dw, need_db and b is not None)
    if w.shape[0] == 0:  # no classes: no logits, and the targets and the class weight are empty
        grads = _zero_grads(x, w, b, need) + _zero_grads(soft, weight, None, (need_dsoft, need_dweight, False))[:2]
        return tuple(_or_empty(g, x) for g in grads)
    rows = _plan_rows(labels, seq_len, ignore_index, keep_all, x, w, b, logit_scale, backend)
    targets = None
    if soft is not None and (need_dsoft or need_dweight):
        targets = TargetGrads(soft, weight, need_dsoft, need_dweight,
                              rows.src is None and rows.tgt.shape[0] == soft.shape[0], plan.opts())
    target_grads = (None, None) if targets is None else (targets.dsoft, targets.dweight)
    m = rows.tgt.shape[0]

    def processed(t):
        return t if rows.proc is None else t[rows.proc]

    scale = scale.expand(m) if scale.numel() == 1 else processed(scale)
    # an ignored row's gradient is 0 whatever its upstream gradient or the mean's coefficient (NaN
    # for a zero denominator), as in PyTorch
    scale = torch.where(rows.tgt != ignore_index, scale, 0.0).contiguous()
    gl = None if grad_lse is None else processed(grad_lse).contiguous()
    args = (x, w, b, rows, processed(lse).contiguous(), scale, gl, need)
    engine = _engine(plan, weight, soft)  # target gradients: probability targets, so the chunked engine
    grads = engine.backward(*args) if targets is None else engine.backward(*args, targets=targets)
    return tuple(_or_empty(g, x) for g in grads + target_grads)


@_lce_backward.register_fake
def _(x, w, b, labels, soft, weight, lse, scale, grad_lse, need_dx, need_dw, need_db, need_dsoft, need_dweight,
      *plan):
    return tuple(torch.empty_like(t) if n and t is not None else x.new_empty(0)
                 for t, n in zip((x, w, b, soft, weight), (need_dx, need_dw, need_db, need_dsoft, need_dweight)))


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------

def hand_over(ctx, grad_loss: Optional[Tensor], name: str, remedy: str) -> tuple:
    """Backward of a loss whose forward formed its gradients (saved in ``ctx``): they are rescaled
    by ``grad_loss`` in place and returned, so no second gradient-sized buffer exists; a second
    backward through the same graph raises (the first one handed the tensors over), naming
    ``remedy``. Sets ``ctx.consumed`` (initialise it to False in forward)."""
    compiling = torch.compiler.is_compiling()  # a traced graph can't keep the `consumed` guard
    if ctx.consumed and not compiling:  # (before saved_tensors: its version check says less)
        raise RuntimeError(
            f"{name}: backward ran twice through a loss (a scalar reduction) whose gradients were formed "
            f"in forward and handed over (rescaled in place) by the first backward; {remedy} to "
            "backpropagate through the same graph several times")
    grads = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * len(grads)
    if compiling:
        return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
    ctx.consumed = True
    for g in grads:
        if g is not None:
            _ops.scale_(g, grad_loss)  # skipped when the scale is 1 (plain loss.backward())
    return tuple(grads)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, w, b, labels, soft, weight, coef, plan, reduction, denom, return_lse, grad_enabled,
                retain):
        ctx.set_materialize_grads(False)
        need = tuple(bool(grad_enabled and n) for n in ctx.needs_input_grad[:3])
        # probability targets and the class weight (with probability targets): gradients from the
        # recomputed logits in backward
        need_targets = tuple(bool(grad_enabled and soft is not None and n) for n in ctx.needs_input_grad[4:6])
        # gradients formed in forward unless backward must recompute anyway (per-row upstream
        # gradient, returned lse, target gradients), may run twice (retain), or float64 wants a float64 scale
        grad_in_forward = (any(need) and plan.engine == "chunked" and reduction != "none" and not return_lse
                 and not retain and x2d.dtype != torch.float64 and not any(need_targets))
        if grad_in_forward:
            loss_rows, lse, *grads = _lce_forward(x2d, w, b, labels, soft, weight,
                                                  coef.reshape(1).to(torch.float32), *need, *plan)
            # saved (not kept on ctx): without retain_graph autograd releases them right after
            # backward, so AccumulateGrad can adopt the returned tensors without a copy
            ctx.save_for_backward(*(g if n else None for g, n in zip(grads, need)))
        else:
            loss_rows, lse, *_ = _lce_forward(x2d, w, b, labels, soft, weight, None, False, False, False, *plan)
            if any(need) or any(need_targets):
                ctx.save_for_backward(x2d, w, b, labels, soft, weight, lse, coef)
        ctx.grad_in_forward, ctx.plan, ctx.need, ctx.reduction, ctx.consumed = grad_in_forward, plan, need, reduction, False
        ctx.need_targets = need_targets
        if reduction == "none":
            loss = loss_rows
        elif reduction == "sum":
            loss = loss_rows.sum()
        else:
            loss = loss_rows.sum() / denom
            if plan.label_smoothing > 0:  # PyTorch sums two 0/0 terms: NaN, not the +-inf of one
                loss = torch.where(denom == 0, torch.nan, loss)
        if not return_lse:
            ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    @once_differentiable(_NAME)
    def backward(ctx, grad_loss, grad_lse):
        nothing = (None,) * 10
        if ctx.grad_in_forward:
            return hand_over(ctx, grad_loss, _NAME, "use reduction='none' or options=torch.nn."
                             "LinearCrossEntropyOptions(allow_retain_graph=True) (both recompute in backward)") \
                + nothing
        # the targets and the class weight reach the loss only (not the lse)
        need_targets = ctx.need_targets if grad_loss is not None else (False, False)
        if not (any(ctx.need) or any(need_targets)) or (grad_loss is None and grad_lse is None):
            return (None, None, None) + nothing
        x2d, w, b, labels, soft, weight, lse, coef = ctx.saved_tensors
        acc = accum_dtype(x2d.dtype)
        if grad_loss is None:
            scale = torch.zeros(1, dtype=acc, device=x2d.device)
        elif ctx.reduction == "none":
            scale = grad_loss.reshape(-1).to(acc)
        else:  # coef: 1 for "sum", d(mean)/d(row loss) for "mean"
            scale = (grad_loss.to(acc) * coef).reshape(1)
        gl = None if grad_lse is None else grad_lse.reshape(-1)
        grads = _lce_backward(x2d, w, b, labels, soft, weight, lse, scale, gl, *ctx.need, *need_targets, *ctx.plan)
        dx, dw, db, dsoft, dweight = (g if n else None for g, n in zip(grads, ctx.need + need_targets))
        return (dx, dw, db, None, dsoft, dweight) + (None,) * 7


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

_INDEX_DTYPES = (torch.int64, torch.uint8)  # what torch.nn.functional.cross_entropy accepts


def check_layer(input, linear_weight, linear_bias, names=("input", "linear_weight", "linear_bias")):
    """Checks one linear layer ``input @ linear_weight^T + linear_bias`` (named ``names`` in errors)."""
    xn, wn, bn = names
    _checks.floating(xn, input)
    _checks.floating(wn, linear_weight)
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"{xn} ({input.dtype}) and {wn} ({linear_weight.dtype}) must have the same dtype")
    if linear_weight.dim() != 2:
        raise ValueError(f"{wn} must be 2-D (num_classes, in_features), got shape {tuple(linear_weight.shape)}")
    if input.dim() == 0:
        raise ValueError(f"{xn} must have at least 1 dimension (the features)")
    v, d = linear_weight.shape
    if input.shape[-1] != d:
        raise ValueError(f"{xn} has {input.shape[-1]} features (last dimension of shape "
                         f"{tuple(input.shape)}) but {wn} expects {d} (shape {tuple(linear_weight.shape)})")
    if linear_weight.device != input.device:
        raise ValueError(f"{wn} is on {linear_weight.device} but {xn} is on {input.device}")
    if linear_bias is not None:
        _checks.floating(bn, linear_bias)
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"{bn} ({linear_bias.dtype}) must have the dtype of {xn} ({input.dtype})")
        if linear_bias.dim() != 1 or linear_bias.shape[0] != v:
            raise ValueError(f"{bn} must have shape ({v},) (one entry per class), got "
                             f"{tuple(linear_bias.shape)}")
        if linear_bias.device != input.device:
            raise ValueError(f"{bn} is on {linear_bias.device} but {xn} is on {input.device}")


def check_shift(input, shift, name="input"):
    if shift and input.dim() < 3:
        raise ValueError(f"shift=True needs a time axis: {name} (..., T, D) with at least 3 dimensions and "
                         f"target (..., T); got {name} of shape {tuple(input.shape)}")


def _check_args(input, linear_weight, target, linear_bias, shift):
    check_layer(input, linear_weight, linear_bias)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    check_shift(input, shift)
    if target.dtype.is_floating_point:  # class probabilities, one row per input row
        expected = tuple(input.shape[:-1]) + (linear_weight.shape[0],)
        if tuple(target.shape) != expected:
            raise ValueError(f"probability targets must have shape {expected} (the input's rows times "
                             f"num_classes) for input of shape {tuple(input.shape)}, got {tuple(target.shape)}")
        return
    if target.dtype not in _INDEX_DTYPES:
        raise TypeError(f"class-index targets must be int64 (torch.long) or uint8, got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"expected target of shape {tuple(input.shape[:-1])} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")


def _read_options(options, n: int, d: int, v: int) -> tuple[int, bool]:
    """(rows per chunk, 0 for the chunk_bytes bound; allow_retain_graph) of a
    ``torch.nn.LinearCrossEntropyOptions``."""
    if options is None:
        return 0, False
    cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if cls is None or not isinstance(options, cls):
        raise TypeError(f"options must be None or a torch.nn.LinearCrossEntropyOptions (PyTorch >= 2.13), got "
                        f"{type(options).__name__}")
    rows = options.batch_chunk_size or 0
    method = options.chunking_method
    if not rows and method not in (None, "auto") and n:
        # PyTorch's "aspect_ratio[:k]": a chunk's logits about as large as the input, over k
        factor = int(method.partition(":")[2] or 1)
        target = -(-n // -(-v // max(d, 1)))
        rows = max(1, min((1 << (target - 1).bit_length()) // factor, n))
    return rows, bool(options.allow_retain_graph)


def _select_engine(backend: str, dtype: torch.dtype, engine: Optional[str]) -> str:
    if engine is None or engine == "chunked":
        return "chunked"
    if engine != "fused":
        raise ValueError(f"engine must be None, 'chunked' or 'fused', got {engine!r}")
    if not _dispatch.module(backend).LINEAR_CE_KERNELS:
        raise ValueError(f"engine='fused' needs the triton backend's fused kernels; backend {backend!r} has "
                         f"none (use engine='chunked')")
    if dtype not in _FUSED_DTYPES:
        raise TypeError(f"engine='fused' takes float32, float16 or bfloat16 inputs, got {dtype} "
                        f"(use engine='chunked')")
    return "fused"


def _mean_coef(labels: Tensor, denom: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """d(reduced loss)/d(row loss): 1 for "sum"; for "mean" 1/denom whatever its sign, NaN for a zero
    denominator with counted rows (PyTorch: 0/0 in every counted row) and 0 when every row is
    ignored (PyTorch: zero gradients)."""
    one = torch.ones((), dtype=denom.dtype, device=denom.device)
    if reduction != "mean":
        return one
    counted = (labels != ignore_index).any()
    return torch.where(denom != 0, one / denom, torch.where(counted, torch.nan, 0.0))


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         reduction: str = "mean", ignore_index: Optional[int] = -100, label_smoothing: float = 0.0,
                         options=None, logit_scale: float = 1.0, softcap: Optional[float] = None,
                         z_loss: float = 0.0, shift: bool = False, return_lse: bool = False,
                         return_z_loss: bool = False, filter_eps: Optional[float] = None,
                         chunk_bytes: Optional[int] = None, engine: Optional[str] = None,
                         backend: Optional[str] = None):
    """``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without the N x V logits.

    Matches ``torch.nn.functional.linear_cross_entropy`` (PyTorch 2.13) for the arguments they share
    (class-index targets, int64 or uint8; values and gradients for ``input``, ``linear_weight``,
    ``linear_bias``; ``ignore_index=None`` means -100), edges included: class weights of any sign
    (a "mean" divides by the counted rows' target-weight sum whatever its sign; a zero sum gives
    NaN gradients in the counted rows, as PyTorch's 0/0; an all-ignored "mean" is NaN with zero
    gradients), D = 0 (logits = bias), N = 0, V = 0 (every row then must be ignored). It also
    accepts ``input (..., D)`` with ``target (...)`` (e.g. ``(B, T, D)`` / ``(B, T)``). A class
    ``weight`` that requires grad is refused (as PyTorch: the loss is not differentiable in it).

    Probability targets: a floating ``target`` of shape ``input.shape[:-1] + (V,)`` holds class
    probabilities, as in ``F.linear_cross_entropy`` / ``F.cross_entropy``: per row
    ``-sum_j w_j t'_j log p_j`` (``t'`` smoothed), "mean" divides by the number of rows,
    ``ignore_index`` must stay -100, the loss dtype is ``input``'s promoted with the target's. The
    targets are read chunk by chunk (in the input's dtype; ``target.reshape(-1, V)`` must be a
    view to avoid one copy); no N x V logits exist. Gradients of the targets or of the class
    weight are not implemented (NotImplementedError: pass ``.detach()``); the fused engine takes
    class indices only.

    Rows whose target is ``ignore_index`` cost no matrix-product work (they are compacted away;
    with ``return_lse`` every row is computed, since every row's lse is returned).

    Gradients: with reduction "mean"/"sum" (and no ``return_lse``) the chunked engine forms them
    during forward and backward only rescales them, so a second backward through the same graph
    raises (except in float64, or with ``allow_retain_graph``); reduction "none" recomputes in
    backward and supports any per-row upstream gradient and repeated backward. celoss losses are
    differentiable once (double backward raises; use the plain PyTorch composition for that).
    Under ``torch.compile`` (``fullgraph=True`` works) the engines are two opaque custom ops.

    Args:
        input (Tensor): hidden states ``(..., D)``.
        linear_weight (Tensor): classifier weight ``(V, D)``, in ``input``'s dtype.
        target (Tensor): class indices (int64 or uint8) of shape ``input.shape[:-1]``, or class
            probabilities of shape ``input.shape[:-1] + (V,)`` (see above).
        linear_bias (Tensor, optional, keyword-only): classifier bias ``(V)``, in ``input``'s dtype.
            Default: None
        weight (Tensor, optional, keyword-only): ``(V)`` class weights (any sign). Default: None
        reduction (str, optional, keyword-only): ``"mean"`` (weighted), ``"sum"`` or ``"none"``.
            Default: ``"mean"``
        ignore_index (int, optional, keyword-only): target value that is skipped (index targets
            only); None means -100. Default: -100
        label_smoothing (float, optional, keyword-only): in [0, 1]. Default: 0.0
        options (torch.nn.LinearCrossEntropyOptions, optional, keyword-only): as in
            ``torch.nn.functional.linear_cross_entropy`` (PyTorch >= 2.13). Here:
            ``batch_chunk_size`` sets the rows per chunk of the chunked engine (overriding
            ``chunk_bytes``); ``chunking_method="aspect_ratio[:k]"`` (without ``batch_chunk_size``)
            picks it by PyTorch's formula, ``"auto"``/None leave it to ``chunk_bytes``;
            ``allow_retain_graph=True`` makes "mean"/"sum" recompute in backward, so the graph can be
            backpropagated several times; ``acc_policy`` and ``acc_dtype`` are ignored: celoss
            accumulates products in float32 (float64 for float64 inputs); a 16-bit dW is summed in
            its own dtype over at most ``DIRECT_DW_CHUNKS`` (2) chunks (one rounding a chunk), in
            float32 over more. The fused engine has no chunks and ignores ``batch_chunk_size`` /
            ``chunking_method``. Default: None
        logit_scale (float, keyword-only): multiplies the logits first (as in
            :func:`celoss.cross_entropy`). Default: 1.0
        softcap (float, optional, keyword-only): then applies ``softcap * tanh(x / softcap)``, then
            the softmax. Default: None
        z_loss (float, keyword-only): adds ``z_loss * lse**2`` per counted row (weighted by the
            target's class weight; by 1 with probability targets). Default: 0.0
        shift (bool, keyword-only): next-token prediction on ``input (..., T, D)`` /
            ``target (..., T)``: position t is scored against label t + 1 and the last position is
            dropped; the hidden states are addressed by index arithmetic, never copied (as long as
            ``input.reshape(-1, D)`` is a view, e.g. any contiguous input). Default: False
        return_lse (bool, keyword-only): also return the (differentiable) lse of every row.
            Default: False
        return_z_loss (bool, keyword-only): also return the z-loss part of the loss (reduced like
            the loss, for logging). Default: False
        filter_eps (float, optional, keyword-only): fused engine only (the chunked engine ignores it
            and stays exact). None computes exact gradients. A float enables gradient filtering: a
            (rows x vocabulary) tile whose every ``|dloss/dz|`` (before the upstream / mean scaling;
            ``|softmax - onehot|`` for plain cross-entropy) is at most ``filter_eps`` contributes
            nothing to the gradients. Each skipped element changes a gradient by at most
            ``filter_eps`` times the row's scale times ``|W|`` (or ``|X|``); a tile holding a NaN is
            never skipped. Cut Cross-Entropy's default, ``2**-12`` (bf16's epsilon / 32), is below
            the rounding of a bf16 gradient element; for a confident model most tiles are skipped
            and the backward cost falls towards the recomputation of the logit tiles -- so runtime
            then depends on the data. Not measured on a GPU here yet. Default: None
        chunk_bytes (int, optional, keyword-only): bound of the chunked engine's workspace (the
            logits of a chunk of rows plus their gathered hidden states), None for
            :data:`DEFAULT_CHUNK_BYTES` (256 MB), and at most half of the whole workspace from 1024
            rows on (so the peak, a chunk plus dW, stays below the N x V logits); at least one row.
            Larger chunks amortise the dW accumulation, smaller ones bound memory. fp16/bf16 inputs
            in more than 2 chunks accumulate dW in float32: that V x D x 4 bytes copy (plus a slice
            of at most 16 MB) counts towards ``chunk_bytes``, as far as it leaves half of it for the
            logits. Default: None
        engine (str, optional, keyword-only): None or ``"chunked"`` (the default on every device:
            logits of a chunk of rows by one matrix product, the backend's row kernel in place on
            them, dX and dW by matrix products), or ``"fused"`` (triton backend only: the Triton
            kernels that never write logits; smallest memory; their backward is deterministic,
            without atomics, 4 GEMM-equivalents, but slower than cuBLAS products). Default: None
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None (auto:
            CUDA -> triton, CPU -> cython): the row kernel of the chunked engine. Default: None

    Shape:
        - Input: ``(D)``, ``(N, D)`` or ``(..., D)``; with ``shift``, ``(..., T, D)`` (at least 3
          dimensions).
        - Linear_weight: ``(V, D)``; linear_bias: ``(V)``; weight: ``(V)``.
        - Target: ``input.shape[:-1]`` (class indices) or ``input.shape[:-1] + (V,)``
          (probabilities).
        - Output: ``()``; with ``reduction="none"``, ``input.shape[:-1]`` (with ``shift``,
          ``(..., T - 1)``). The lse has that unreduced shape.

    Returns:
        Tensor: the loss, in ``input``'s dtype (promoted with the target's for probability targets).
        With ``return_lse`` or ``return_z_loss``: a :class:`CrossEntropyOutput` ``(loss, lse, z_loss)``
        whose unset fields are None.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> hidden = torch.randn(2, 16, 64, requires_grad=True)   # (B, T, D)
        >>> lm_head = torch.randn(1000, 64, requires_grad=True)   # (V, D)
        >>> labels = torch.randint(0, 1000, (2, 16))              # (B, T)
        >>> loss = celoss.linear_cross_entropy(hidden, lm_head, labels, shift=True)
        >>> ref = F.cross_entropy((hidden[:, :-1] @ lm_head.T).flatten(0, 1), labels[:, 1:].flatten())
        >>> torch.allclose(loss, ref, rtol=1e-4)
        True
        >>> loss.backward()
        >>> hidden.grad.shape, lm_head.grad.shape
        (torch.Size([2, 16, 64]), torch.Size([1000, 64]))
    """
    _checks.reduction(reduction)
    _check_args(input, linear_weight, target, linear_bias, shift)
    softcap = _checks.positive_or_none("softcap", softcap)
    label_smoothing = _checks.probability("label_smoothing", label_smoothing)
    ignore_index = _checks.index_value("ignore_index", -100 if ignore_index is None else ignore_index)
    if float(z_loss) < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if filter_eps is not None and not float(filter_eps) >= 0:
        raise ValueError(f"filter_eps must be None or >= 0, got {filter_eps}")
    if chunk_bytes is not None and int(chunk_bytes) <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    soft = target.dtype.is_floating_point
    grad_on = torch.is_grad_enabled()
    if soft:
        if ignore_index != -100:
            raise RuntimeError(f"ignore_index is not supported for probability (floating point) targets (got "
                               f"ignore_index={ignore_index}), as in torch.nn.functional.cross_entropy")
    elif weight is not None and weight.requires_grad and grad_on:
        # PyTorch's nll_loss_forward refuses it in the same words
        raise RuntimeError(f"{_NAME}: the function is not differentiable with respect to argument 'weight' (the "
                           f"class weight) with class-index targets. This input cannot have requires_grad True, "
                           f"as in torch.nn.functional.cross_entropy; pass weight.detach()")
    v, d = linear_weight.shape
    weight = _checks.class_weight(weight, v, input, differentiable=soft)
    x2d = input.flatten(0, -2) if input.dim() > 1 else input.unsqueeze(0)
    chunk_rows, retain = _read_options(options, x2d.shape[0], d, v)
    chunk_bytes = (default_chunk_bytes(x2d.shape[0], row_bytes(x2d, v, 1)) if chunk_bytes is None
                   else int(chunk_bytes))
    name = _dispatch.resolve(input.device, backend)
    kind = _select_engine(name, input.dtype, engine)
    if soft and kind == "fused":
        raise ValueError("engine='fused' takes class-index targets only; probability targets need "
                         "engine='chunked' (the default)")

    seq_len = target.shape[input.dim() - 2] if shift else 0
    out_shape = tuple(input.shape[:-2]) + (max(seq_len - 1, 0),) if shift else tuple(input.shape[:-1])
    n_out = math.prod(out_shape)
    acc = accum_dtype(input.dtype)
    if soft:
        # rows of the flattened target, read chunk by chunk (row r + 1 scores hidden row r with shift);
        # placeholder labels: every row counts, with weight 1 in the mean and the z-loss
        soft_rows = target.flatten(0, -2) if target.dim() > 1 else target.unsqueeze(0)
        labels = torch.zeros(n_out, dtype=torch.int64, device=input.device)
        per_row = torch.ones(n_out, dtype=acc, device=input.device)
    else:
        soft_rows = None
        labels = (target[..., 1:] if shift else target).reshape(-1).to(torch.int64).contiguous()
        per_row = counted_weight(labels, weight, ignore_index)
    denom = per_row.to(acc).sum()
    if soft and v == 0:  # PyTorch's probability-target mean divides by numel / V: 0 / 0 without classes
        denom = torch.full_like(denom, math.nan)
    coef = _mean_coef(labels, denom, ignore_index, reduction)
    plan = _Plan(name, kind, ignore_index, label_smoothing, float(logit_scale), softcap, float(z_loss), seq_len,
                 bool(return_lse), chunk_bytes, chunk_rows, None if filter_eps is None else float(filter_eps))
    loss, lse = _LinearCrossEntropy.apply(x2d, linear_weight, linear_bias, labels, soft_rows, weight, coef, plan,
                                          reduction, denom, return_lse, grad_on, retain)
    if reduction == "none":
        loss = loss.reshape(out_shape)
    loss = loss.to(torch.promote_types(input.dtype, target.dtype) if soft else input.dtype)
    if not (return_lse or return_z_loss):
        return loss
    z_term = None
    if return_z_loss:  # as celoss.cross_entropy: the z-loss part of the loss, reduced like it
        lse_d = lse.detach()
        z_rows = torch.where(per_row != 0, float(z_loss) * per_row.to(lse_d.dtype) * lse_d * lse_d, 0.0)
        z_term = {"none": lambda: z_rows.reshape(out_shape), "sum": z_rows.sum,
                  "mean": lambda: z_rows.sum() / denom}[reduction]().to(loss.dtype)
    return CrossEntropyOutput(loss, lse.reshape(out_shape) if return_lse else None, z_term)
