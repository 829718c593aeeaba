"""Triton kernels for fused linear cross-entropy: the loss of ``X W^T (+ b)`` without N x V logits.

The rows processed are a list of ``M`` rows of the hidden states ``X`` (``(N_in, D)``, any
strides), given by an optional int64 row map ``src`` (compacted counted rows, next-token shift:
index arithmetic done by the caller, no copy of ``X``) and their int64 targets ``tgt``. The
classifier ``W`` (``linear_weight``) is ``(V, D)`` (any strides), ``b`` an optional ``(V,)`` bias;
``weight`` is always the class weights. Logit tiles are
``tl.dot`` products accumulated in float32; nothing of size M x V is ever written to memory.

Kernels
-------
``_lce_stats_kernel``  grid (row blocks, vocabulary splits). Each program walks the vocabulary
                       blocks of its split, computing a ``BLOCK_M x BLOCK_V`` logit tile per block
                       (loop over D), transforming it (logit_scale, softcap) and folding it into
                       per-row online statistics ``(max, sumexp, target_z, weighted_z)``
                       (:mod:`celoss.backends`). Writes ``(n_splits, M, 4)`` partial statistics,
                       merged by the caller with :func:`celoss.stats.merge_all`, and turned into
                       the loss / lse / gradient coefficients by :func:`celoss.stats.coefficients`.
``_lce_backward_kernel`` persistent grid (at most 2 programs per SM), launched twice: the dX
                       kernel (each program owns whole row blocks of dX, ``BLOCK_M`` rows over all
                       of D, and walks the vocabulary for each) and, with ``DW``, the dW kernel
                       (whole class blocks of dW, ``BLOCK_V`` classes over all of D, and their db;
                       it walks all rows for each). See "Backward" below.

Backward
--------
With ``z = transform(X[src] W^T + b)`` (logit_scale, softcap), ``p = exp(z - lse)`` and the row
coefficients ``(A, B, D)`` (already multiplied by the upstream gradient; the returned-lse gradient
is folded into A; see :mod:`celoss.backends`), the gradient of the logits is::

    G_nj = dz_nj/dx_nj * (A_n p_nj - B_n [j == y_n] - D_n w_j)
    dX[src] = G W,   dW = G^T X[src],   db = sum_n G_n

the target element evaluated as ``(A - B) p_y + B expm1(z_y - lse) - D w_y`` (no ``1 - p_y``
cancellation as ``p_y -> 1``). G is never stored whole. For an owned row block, the dX kernel forms
each ``BLOCK_M x BLOCK_V`` gradient tile once (:func:`_grad_tile`: the logits by one pass over D),
stages it in the operand dtype in the program's own slice of a small scratch (``GROUP`` tiles:
``GROUP x BLOCK_M x BLOCK_V`` elements per program), and every GROUP kept tiles :func:`_flush`
adds ``sum_k G_k W[block_k]`` to the owned float32 dX rows, ``BLOCK_N`` columns at a time, by one
plain read-modify-write (a K = GROUP x BLOCK_V product per piece, its A operand streamed from the
scratch, which also keeps it out of the registers). The dW kernel is the mirror image (per owned
class block: G^T tiles of the row blocks staged, ``sum_k G_k^T X[rows_k]`` flushed into its dW
rows, db summed in registers). Each dX / dW / db element has exactly one owner program, which adds
its contributions in a fixed order: no atomics, no contention, bit-reproducible results.

Cost: each kernel forms every gradient tile once (one ``M x V x D`` GEMM of logits) and does one
``M x V x D`` product, so the backward is **4 GEMM-equivalents for any D** (2 logits + dX + dW;
the forward's statistics are a fifth), against 3 for the bare ``X W^T``, ``G W``, ``G^T X``
(the former design of this module recomputed the logits for every BLOCK_N columns of D:
``2 + 2 ceil(D / 128)`` GEMMs, 38 at D = 2304). Extra memory traffic, per kernel:

* the read-modify-writes of the owned float32 blocks, ``8 M D ceil(V / (GROUP BLOCK_V_dx))``
  bytes (dX) and ``8 V D ceil(M / (GROUP BLOCK_M_dw))`` (dW): ``2 / (GROUP BLOCK_V)`` resp.
  ``2 / (GROUP BLOCK_M)`` bytes per flop of the kernel, 1/512 with the 16-bit tiles below (K =
  GROUP x that side = 1024 in both kernels; hence BLOCK_V >= 128 in the dX kernel's tables). At
  (M, D, V) = (8192, 2304, 256000): about 38 GB per kernel (300 GB without staging) against
  9.7 TFLOP per GEMM, i.e. ~8 ms of HBM time against ~10-15 ms of tensor-core time per GEMM on an
  H100/H200 if none of it hits L2; the blocks in flight (one BLOCK_M x D or BLOCK_V x D float32
  block per running program: 590 KB at D = 2304, 1.2 MB for sm_90's 128-row dX blocks) are
  larger than the 50 MB L2, so count on HBM;
* the staged tiles: written once, read ``ceil(D / BLOCK_N)`` times from L2 (128 KB per program
  with the 16-bit tiles, 256 KB for sm_90's 128 x 128 dX tiles: 34 / 68 MB for 264 programs),
  ``1 / BLOCK_N`` bytes per flop, as much as the W / X operand tiles themselves.

Forward + backward is thus 5 GEMM-equivalents against the 3 bare GEMMs: 1.67x by arithmetic alone,
above issue 12's 1.5x target, which needs the logits formed fewer times than once per kernel (both
kernels need every tile, and sharing one between them means atomics or a stored G); the traffic
above should hide behind the products. Not measured on a GPU yet. Parallelism: one program
per owned block up to 2 per SM: ``cdiv(M, BLOCK_M)`` row blocks for dX (a small M fills few SMs:
64-128 rows per block, so M < 128 x #SMs leaves SMs idle in that kernel) and ``cdiv(V, BLOCK_V)``
class blocks for dW. Memory: no logits, not even a chunk; beside the float32 gradients the caller
allocates, the two staging scratches (``2 x #SMs x GROUP x BLOCK_M x BLOCK_V`` elements each). The
chunked engine of :mod:`celoss.linear_cross_entropy` (cuBLAS products on a bounded logits chunk) is
the fast one.

Gradient filtering (``FILTER``): a G tile whose every ``|A p - B onehot - D w|`` is at most the
row's threshold (``eps`` times the row's upstream scale, so the test is on the unscaled
``|softmax - onehot|`` of Cut Cross-Entropy; never a tile holding a NaN) is skipped by the kernel
that formed it (each kernel decides on its own tiles): it is not staged, so it costs no product.

All offsets along rows and vocabulary entries are int64. fp32 inputs use IEEE fp32 ``tl.dot``
(no TF32, matching PyTorch's default), fp16/bf16 inputs use tensor-core dots with fp32
accumulation; the gradient tile is rounded to the input dtype only as the operand of the dX/dW
products (after division by the largest per-row upstream scale, so that a mean over many rows
does not underflow fp16), whose accumulators are float32.

Launchers (``stats``, ``backward``) are thin: ``stats_plan`` / ``backward_plans`` plus
:func:`kernels._host.launch`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._host import SUPPORTED_DTYPES, f32, launch, softcap_args, with_flags
from ._tl import class_weight, expm1, safe_shift, transform


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Launch configurations: (dtype class, alignment) -> tile sizes and warps. "aligned" means every
# pointer is 16-byte aligned, every non-unit stride and D are multiples of 16 elements (Triton then
# vectorizes the loads); anything else gets smaller tiles, since element-wise int64 addresses of a
# row-gathered tile cost registers. Chosen so that no kernel variant spills on sm_80 / sm_90
# (tests/kernels/test_linear_cross_entropy_aot.py compiles every one). Under the interpreter,
# small tiles keep the numpy emulation fast on the small test shapes.
STATS_CONFIGS = {
    ("lowp", True): dict(BLOCK_M=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    ("lowp", False): dict(BLOCK_M=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2),
    ("fp32", True): dict(BLOCK_M=64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3),
    ("fp32", False): dict(BLOCK_M=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2),
}
# Backward, per kernel: BLOCK_M x BLOCK_V gradient tiles (the logits formed over D in BLOCK_D
# steps), BLOCK_N the D columns of one read-modify-write step (backward_configs narrows it for a
# small D), GROUP the gradient tiles staged per read-modify-write; the long side of the tile (x
# GROUP) is the K of the owned block's product (see "Backward"), multiplied BLOCK_K at a time
# (default: the whole side). The epilogue forming a gradient tile (softcap, smoothing, filter)
# keeps several fp32 tiles live: the largest tiles that compile without spills with every flag on
# (measured with tests/kernels/aot.py). On sm_90 the dX kernel takes 128 x 128 tiles with BLOCK_D =
# 32 and BLOCK_K = 16 (HOPPER_BACKWARD_CONFIGS: 254-255 registers, 0 spills; BLOCK_K = 32 spills 32
# bytes when M and V are multiples of 16, as do 4 stages); on sm_80, whose mma.sync
# holds its operand fragments in registers, that tile spills 96-272 bytes at any BLOCK_D / BLOCK_N
# / BLOCK_K of 16-64 or 2-4 stages, and 16 warps (128 registers a thread) spill more. The dW kernel
# spills 0.3-2.9 KB with 128 x 128 tiles on both (its gathered X operand and db cost registers;
# plain flags compile clean); 128 rows x 64 classes with BLOCK_D = BLOCK_K = 32 do not (251-255
# registers; BLOCK_N = 128 spills 68 bytes on sm_90, BLOCK_D = 64 8 bytes on sm_80).
# fp32 dX takes 3 stages: with 2, ptxas (CUDA 12.9) holds it to 128 registers on sm_90 and spills.
BACKWARD_CONFIGS = {
    ("dx", "lowp", True): dict(BLOCK_M=64, BLOCK_V=128, BLOCK_D=64, BLOCK_N=128, GROUP=8, num_warps=8, num_stages=3),
    ("dw", "lowp", True): dict(BLOCK_M=128, BLOCK_V=64, BLOCK_D=32, BLOCK_N=64, BLOCK_K=32, GROUP=8, num_warps=8,
                               num_stages=3),
    ("dx", "lowp", False): dict(BLOCK_M=64, BLOCK_V=64, BLOCK_D=32, BLOCK_N=64, GROUP=8, num_warps=8, num_stages=2),
    ("dw", "lowp", False): dict(BLOCK_M=64, BLOCK_V=64, BLOCK_D=32, BLOCK_N=32, GROUP=8, num_warps=8, num_stages=2),
    ("dx", "fp32", True): dict(BLOCK_M=64, BLOCK_V=64, BLOCK_D=32, BLOCK_N=64, GROUP=8, num_warps=8, num_stages=3),
    ("dw", "fp32", True): dict(BLOCK_M=64, BLOCK_V=32, BLOCK_D=16, BLOCK_N=32, GROUP=8, num_warps=8, num_stages=2),
    ("dx", "fp32", False): dict(BLOCK_M=32, BLOCK_V=32, BLOCK_D=32, BLOCK_N=64, GROUP=8, num_warps=8, num_stages=3),
    ("dw", "fp32", False): dict(BLOCK_M=32, BLOCK_V=32, BLOCK_D=16, BLOCK_N=16, GROUP=8, num_warps=4, num_stages=2),
}
HOPPER_BACKWARD_CONFIGS = {  # sm_90 and later: these entries replace BACKWARD_CONFIGS'
    ("dx", "lowp", True): dict(BLOCK_M=128, BLOCK_V=128, BLOCK_D=32, BLOCK_N=64, BLOCK_K=16, GROUP=8, num_warps=8,
                               num_stages=3),
}
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_D=16, BLOCK_N=32, GROUP=2, num_warps=4, num_stages=1)


def _aligned(*tensors) -> bool:
    """All given tensors 16-byte aligned with unit inner stride and 16-element-multiple row
    strides and widths (what Triton's divisibility specialization looks at)."""
    for t in tensors:
        if t is None:
            continue
        if t.data_ptr() % 16:
            return False
        if t.dim() == 2 and (t.stride(1) != 1 or t.stride(0) % 16 or t.shape[1] % 16):
            return False
    return True


def stats_config(dtype: torch.dtype, aligned: bool = True) -> dict:
    if _interpreting():
        return dict(INTERPRETER_CONFIG)
    return dict(STATS_CONFIGS["fp32" if dtype == torch.float32 else "lowp", bool(aligned)])


def backward_configs(dtype: torch.dtype, d: int, aligned: bool = True, arch: int | None = None) -> dict:
    """``{"dx": tiles, "dw": tiles}`` of the backward kernels for inputs of ``dtype`` and width
    ``d`` on a GPU of compute capability ``arch`` (80, 90, ...; None: not sm_90): the tables',
    keyed on (arch, dtype, alignment), with BLOCK_N narrowed to cover a small D in one block (no
    padded columns computed) and BLOCK_K defaulting to the tile's side along the product's K."""
    out = {}
    for kernel, side in (("dx", "BLOCK_V"), ("dw", "BLOCK_M")):
        key = kernel, "fp32" if dtype == torch.float32 else "lowp", bool(aligned)
        if _interpreting():
            cfg = dict(INTERPRETER_CONFIG)
        elif arch is not None and arch >= 90 and key in HOPPER_BACKWARD_CONFIGS:
            cfg = dict(HOPPER_BACKWARD_CONFIGS[key])
        else:
            cfg = dict(BACKWARD_CONFIGS[key])
        cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], triton.next_power_of_2(max(d, 1))))
        cfg.setdefault("BLOCK_K", cfg[side])
        out[kernel] = cfg
    return out


def _arch(device: torch.device) -> int | None:
    """Compute capability as 80, 90, ... (None off CUDA)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return None


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _row_block(pid_m, M, src_ptr, tgt_ptr, BLOCK_M: tl.constexpr, HAS_SRC: tl.constexpr):
    """The rows of block ``pid_m``: indices, mask, the hidden-state row each reads (``src``, for
    a shift without a copy) and its target (-1 past the end)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    if HAS_SRC:
        src = tl.load(src_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    y = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    return rows, row_mask, src, y


@triton.jit
def _logit_tile(x_ptr, stride_xn, stride_xd, lw_ptr, stride_lwv, stride_lwd, b_ptr, src, row_mask,
                cols, col_mask, D, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """float32 (BLOCK_M, BLOCK_V) tile of X[src] W[cols]^T (+ b[cols]); 0 on masked lanes."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    x_rows = x_ptr + src[:, None] * stride_xn
    w_cols = lw_ptr + cols.to(tl.int64)[None, :] * stride_lwv
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        k_mask = ks < D
        xt = tl.load(x_rows + ks[None, :] * stride_xd, mask=row_mask[:, None] & k_mask[None, :],
                     other=0.0)
        wt = tl.load(w_cols + ks[:, None] * stride_lwd, mask=k_mask[:, None] & col_mask[None, :],
                     other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lce_stats_kernel(
    x_ptr, stride_xn, stride_xd, src_ptr, lw_ptr, stride_lwv, stride_lwd, b_ptr, tgt_ptr, weight_ptr,
    out_ptr, M, V, D, blocks_per_split, scale, softcap, inv_softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SRC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, NEED_WZ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partial row statistics of the vocabulary split ``program_id(1)`` for a block of rows.

    out[split, row] = (max_j z, sum_j exp(z - max), z_y if y in the split else 0,
    sum_j w_j z_j if NEED_WZ else 0) over the split's columns j, z = transformed logits.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows, row_mask, src, y = _row_block(pid_m, M, src_ptr, tgt_ptr, BLOCK_M, HAS_SRC)

    m_i = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    wz = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_begin = pid_s.to(tl.int64) * blocks_per_split * BLOCK_V
    for vb in range(0, blocks_per_split):
        cols = v_begin + vb * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        acc = _logit_tile(x_ptr, stride_xn, stride_xd, lw_ptr, stride_lwv, stride_lwd, b_ptr, src,
                          row_mask, cols, col_mask, D, BLOCK_M, BLOCK_V, BLOCK_D, HAS_BIAS,
                          DOT_PRECISION)
        z, _ = transform(acc, scale, softcap, inv_softcap, HAS_SOFTCAP)
        zm = tl.where(col_mask[None, :], z, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(zm, axis=1))
        m_safe = safe_shift(m_new)
        s_i = s_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(zm - m_safe[:, None]), axis=1)
        m_i = m_new
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        if NEED_WZ:
            wz += tl.sum(z * class_weight(weight_ptr, cols, col_mask, HAS_WEIGHT)[None, :], axis=1)
    o = out_ptr + (pid_s.to(tl.int64) * M + rows.to(tl.int64)) * 4
    tl.store(o, m_i, mask=row_mask)
    tl.store(o + 1, s_i, mask=row_mask)
    tl.store(o + 2, zy, mask=row_mask)
    tl.store(o + 3, wz, mask=row_mask)


@triton.jit
def _row_coefs(rows, row_mask, lse_ptr, row_coefs_ptr, thr_ptr, HAS_D: tl.constexpr, FILTER: tl.constexpr):
    """Per-row backward inputs of a row block: lse, (A, B, D) and the filter threshold."""
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    c_ptr = row_coefs_ptr + rows.to(tl.int64) * 3
    a = tl.load(c_ptr, mask=row_mask, other=0.0).to(tl.float32)
    b = tl.load(c_ptr + 1, mask=row_mask, other=0.0).to(tl.float32)
    d = tl.zeros_like(a)
    if HAS_D:
        d = tl.load(c_ptr + 2, mask=row_mask, other=0.0).to(tl.float32)
    thr = a  # unused without FILTER
    if FILTER:
        thr = tl.load(thr_ptr + rows, mask=row_mask, other=float("inf"))
    return lse, a, b, d, thr


@triton.jit
def _grad_tile(x_ptr, stride_xn, stride_xd, lw_ptr, stride_lwv, stride_lwd, b_ptr, weight_ptr, src, y, row_mask,
               cols, col_mask, lse, a, b, d, thr, D, scale, softcap, inv_softcap,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_D: tl.constexpr, FILTER: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """The float32 gradient tile ``dloss/dx_nj`` of rows x cols (0 on masked lanes), recomputed from
    the logits, and whether it is kept (``FILTER``: not every ``|A p - B onehot - D w|`` is at most
    the row's threshold; a NaN keeps it)."""
    acc = _logit_tile(x_ptr, stride_xn, stride_xd, lw_ptr, stride_lwv, stride_lwd, b_ptr, src, row_mask,
                      cols, col_mask, D, BLOCK_M, BLOCK_V, BLOCK_D, HAS_BIAS, DOT_PRECISION)
    z, dz = transform(acc, scale, softcap, inv_softcap, HAS_SOFTCAP)
    p = tl.exp(z - lse[:, None])
    is_t = cols[None, :] == y[:, None]
    # target element, per row (0 when y is not in this block: unused then)
    lp_y = tl.sum(tl.where(is_t, z, 0.0), axis=1) - lse
    g_y = (a - b) * tl.exp(lp_y) + b * expm1(lp_y)
    g = tl.where(is_t, g_y[:, None], a[:, None] * p)
    if HAS_D:
        g -= d[:, None] * class_weight(weight_ptr, cols, col_mask, HAS_WEIGHT)[None, :]
    g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
    keep = True
    if FILTER:
        # "not <=" rather than ">": a NaN element (or threshold) keeps the tile, so NaN propagates
        keep = tl.max(tl.max(tl.where(tl.abs(g) <= thr[:, None], 0, 1), axis=1), axis=0) > 0
    return g * dz, keep


# Triton 3.9 removed block pointers; before it they address a staged tile without per-element
# offsets held in registers (what keeps the backward kernels spill-free there)
BLOCK_PTRS = tl.constexpr(tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9))


@triton.jit
def _tile_ptr(base, ROWS: tl.constexpr, COLS: tl.constexpr, STRIDE_R: tl.constexpr, STRIDE_C: tl.constexpr):
    """Pointer(s) to a ROWS x COLS tile at `base` with the given element strides (one of them 1)."""
    if BLOCK_PTRS:
        if STRIDE_C == 1:
            ptr = tl.make_block_ptr(base, (ROWS, COLS), (STRIDE_R, 1), (0, 0), (ROWS, COLS), (1, 0))
        else:
            ptr = tl.make_block_ptr(base, (ROWS, COLS), (1, STRIDE_C), (0, 0), (ROWS, COLS), (0, 1))
    else:
        ptr = base + tl.arange(0, ROWS)[:, None] * STRIDE_R + tl.arange(0, COLS)[None, :] * STRIDE_C
    return ptr


@triton.jit
def _flush(stage, ids, n_kept, b_ptr, b_src_ptr, stride_bk, stride_bd, b_limit, out_rows, out_row_mask, unit_ptr, D,
           R: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, B_HAS_SRC: tl.constexpr,
           NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``out[r, :] += sum_k A_k @ B_k`` over all D columns, BLOCK_N at a time, for the ``n_kept``
    staged (R, K) operands ``A_k`` (``stage[k]``, gradient tiles already in the operand dtype; BLOCK_K
    of their columns per product) and
    ``B_k[i, n] = b_ptr[row_i * stride_bk + n * stride_bd]`` with ``row_i = ids[k] * K + i`` (mapped
    through ``b_src_ptr`` if B_HAS_SRC; masked from ``b_limit`` on), into the float32
    ``out[r, n] = out_rows[r] + n`` rows owned by the calling program: one plain read-modify-write
    of the owned rows per call. NORMALIZE: the tiles were divided by ``unit``, the sum is multiplied
    back. The barriers order the stage's writes before these reads (other threads wrote them) and
    these reads before the next writes; a program's successive calls touch its own rows only."""
    tl.debug_barrier()
    for n in range(0, D, BLOCK_N):
        ns = n + tl.arange(0, BLOCK_N)
        n_mask = ns < D
        acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)
        for c in range(0, n_kept * (K // BLOCK_K)):
            # BLOCK_K of the K columns of staged operand k per product (registers)
            k = c // (K // BLOCK_K)
            j = c % (K // BLOCK_K)
            idx = tl.load(ids + k).to(tl.int64) * K + j * BLOCK_K + tl.arange(0, BLOCK_K)
            i_mask = idx < b_limit
            b_rows = idx
            if B_HAS_SRC:
                b_rows = tl.load(b_src_ptr + idx, mask=i_mask, other=0).to(tl.int64)
            bt = tl.load(b_ptr + b_rows[:, None] * stride_bk + ns[None, :] * stride_bd,
                         mask=i_mask[:, None] & n_mask[None, :], other=0.0)
            a = tl.load(_tile_ptr(stage + k * (R * K) + j * BLOCK_K, R, BLOCK_K, K, 1))
            acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
        if NORMALIZE:
            acc = acc * tl.load(unit_ptr)
        out = out_rows + ns[None, :]
        mask = out_row_mask[:, None] & n_mask[None, :]
        tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)
    tl.debug_barrier()


@triton.jit
def _flush_owned(owned, stage, ids, n_kept, x_ptr, stride_xn, stride_xd, src_ptr, lw_ptr, stride_lwv, stride_lwd,
                 tgt_ptr, out_ptr, stride_out, unit_ptr, M, V, D, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SRC: tl.constexpr, DW: tl.constexpr,
                 NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """:func:`_flush` of the staged tiles into the owned block ``owned``: dX rows ``src[rows]``
    += G_k W[classes_k] (A_k = G tiles, BLOCK_M x BLOCK_V), or with ``DW`` dW rows ``cols`` +=
    G_k^T X[src[rows_k]] (A_k = G^T tiles, BLOCK_V x BLOCK_M)."""
    if DW:
        cols = (owned * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        _flush(stage, ids, n_kept, x_ptr, src_ptr, stride_xn, stride_xd, M, out_ptr + cols[:, None] * stride_out,
               cols < V, unit_ptr, D, BLOCK_V, BLOCK_M, BLOCK_N, BLOCK_K, HAS_SRC, NORMALIZE, DOT_PRECISION)
    else:
        _, row_mask, src, _ = _row_block(owned, M, src_ptr, tgt_ptr, BLOCK_M, HAS_SRC)
        _flush(stage, ids, n_kept, lw_ptr, src_ptr, stride_lwv, stride_lwd, V, out_ptr + src[:, None] * stride_out,
               row_mask, unit_ptr, D, BLOCK_M, BLOCK_V, BLOCK_N, BLOCK_K, False, NORMALIZE, DOT_PRECISION)


@triton.jit
def _lce_backward_kernel(
    x_ptr, stride_xn, stride_xd, src_ptr, lw_ptr, stride_lwv, stride_lwd, b_ptr, tgt_ptr, weight_ptr,
    lse_ptr, row_coefs_ptr, thr_ptr, unit_ptr, out_ptr, stride_out, db_ptr, stage_ptr, ids_ptr,
    M, V, D, scale, softcap, inv_softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_SRC: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_D: tl.constexpr, FILTER: tl.constexpr, DW: tl.constexpr,
    NEED_OUT: tl.constexpr, NEED_DB: tl.constexpr, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The dX kernel (``DW`` False) or the dW / db kernel (``DW``) of "Backward". Persistent:
    program ``p`` owns the blocks ``p, p + num_programs, ...`` of its output over all of D -- row
    blocks of dX (``out``), or class blocks of dW (``out``) and db -- and walks the other axis
    (vocabulary blocks, resp. row blocks) for each. Per walked block it forms the gradient tile once
    (:func:`_grad_tile`, one pass over D) and stages it (operand dtype, in its own slice of
    ``stage``; transposed for dW); every GROUP kept tiles (and at the end) :func:`_flush_owned` adds
    them to the owned rows; db is summed in registers. No other program touches these rows."""
    pid = tl.program_id(0)
    stage = stage_ptr + pid.to(tl.int64) * (GROUP * BLOCK_M * BLOCK_V)
    ids = ids_ptr + pid * GROUP
    inv_unit = 1.0
    if NORMALIZE:
        inv_unit = 1.0 / tl.load(unit_ptr)
    n_owned = tl.cdiv(V, BLOCK_V) if DW else tl.cdiv(M, BLOCK_M)
    n_walk = tl.cdiv(M, BLOCK_M) if DW else tl.cdiv(V, BLOCK_V)
    for owned in range(pid, n_owned, tl.num_programs(0)):
        db_acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
        n_kept = 0
        for walk in range(0, n_walk):
            mb = walk if DW else owned
            vb = owned if DW else walk
            # the owned block's row data are reloaded (L1 hits) rather than held across the loop: registers
            rows, row_mask, src, y = _row_block(mb, M, src_ptr, tgt_ptr, BLOCK_M, HAS_SRC)
            lse, a, b, d, thr = _row_coefs(rows, row_mask, lse_ptr, row_coefs_ptr, thr_ptr, HAS_D, FILTER)
            cols = (vb * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_mask = cols < V
            g, keep = _grad_tile(x_ptr, stride_xn, stride_xd, lw_ptr, stride_lwv, stride_lwd, b_ptr, weight_ptr,
                                 src, y, row_mask, cols, col_mask, lse, a, b, d, thr, D, scale, softcap, inv_softcap,
                                 BLOCK_M, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_WEIGHT, HAS_SOFTCAP, HAS_D, FILTER,
                                 DOT_PRECISION)
            if keep:
                if NEED_DB:
                    db_acc += tl.sum(g, axis=0)
                if NEED_OUT:
                    slot = stage + n_kept * (BLOCK_M * BLOCK_V)
                    if DW:  # G^T row-major
                        slot = _tile_ptr(slot, BLOCK_M, BLOCK_V, 1, BLOCK_M)
                    else:
                        slot = _tile_ptr(slot, BLOCK_M, BLOCK_V, BLOCK_V, 1)
                    tl.store(slot, (g * inv_unit).to(x_ptr.dtype.element_ty))
                    tl.store(ids + n_kept, walk)
                    n_kept += 1
                    if n_kept == GROUP:
                        _flush_owned(owned, stage, ids, n_kept, x_ptr, stride_xn, stride_xd, src_ptr, lw_ptr,
                                     stride_lwv, stride_lwd, tgt_ptr, out_ptr, stride_out, unit_ptr, M, V, D,
                                     BLOCK_M, BLOCK_V, BLOCK_N, BLOCK_K, HAS_SRC, DW, NORMALIZE, DOT_PRECISION)
                        n_kept = 0
        if NEED_OUT:
            if n_kept > 0:
                _flush_owned(owned, stage, ids, n_kept, x_ptr, stride_xn, stride_xd, src_ptr, lw_ptr,
                             stride_lwv, stride_lwd, tgt_ptr, out_ptr, stride_out, unit_ptr, M, V, D,
                             BLOCK_M, BLOCK_V, BLOCK_N, BLOCK_K, HAS_SRC, DW, NORMALIZE, DOT_PRECISION)
        if NEED_DB:
            cols = (owned * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_mask = cols < V
            tl.store(db_ptr + cols, tl.load(db_ptr + cols, mask=col_mask, other=0.0) + db_acc, mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 operands


def _check(x, linear_weight, b):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton linear cross-entropy kernels take fp32/fp16/bf16, got {x.dtype}")
    if linear_weight.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise TypeError("input, linear_weight and linear_bias must share one dtype")
    if x.dim() != 2 or linear_weight.dim() != 2 or x.shape[1] != linear_weight.shape[1]:
        raise ValueError("expected input (N, D) and linear_weight (V, D)")


def _common_args(x, linear_weight, b, src, tgt, weight, cfg, logit_scale, softcap) -> dict:
    """Arguments both kernels take (operands, tile sizes, logit transform)."""
    scale, cap, inv_cap = softcap_args(logit_scale, softcap)
    v, d = linear_weight.shape
    return dict(
        x_ptr=x, stride_xn=x.stride(0), stride_xd=x.stride(1), src_ptr=src,
        lw_ptr=linear_weight, stride_lwv=linear_weight.stride(0), stride_lwd=linear_weight.stride(1),
        b_ptr=b, tgt_ptr=tgt, weight_ptr=weight, M=tgt.shape[0], V=v, D=d,
        scale=scale, softcap=cap, inv_softcap=inv_cap,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION=cfg.get("DOT_PRECISION", _dot_precision(x.dtype)),
    )


def stats_plan(x, linear_weight, b, src, tgt, weight, *, logit_scale=1.0, softcap=None, need_wz=False,
               config=None, num_splits=None):
    """Plan of :func:`stats`: ``(kernel, grid, kwargs, options, partial_stats (S, M, 4))``."""
    _check(x, linear_weight, b)
    m = tgt.shape[0]
    v = linear_weight.shape[0]
    cfg = dict(config or stats_config(x.dtype, _aligned(x, linear_weight, b)))
    n_m = triton.cdiv(m, cfg["BLOCK_M"])
    n_vb = triton.cdiv(v, cfg["BLOCK_V"])
    if num_splits is None:
        # enough programs for ~4 waves over the SMs, at least 8 vocabulary blocks per program
        want = max(1, (4 * _num_sms(x.device)) // max(n_m, 1))
        num_splits = max(1, min(want, n_vb // 8 if n_vb >= 8 else 1))
    num_splits = max(1, min(int(num_splits), n_vb))
    per_split = triton.cdiv(n_vb, num_splits)
    num_splits = triton.cdiv(n_vb, per_split)  # every split starts on a real column
    out = torch.empty(num_splits, m, 4, dtype=torch.float32, device=x.device)
    kwargs = with_flags(dict(
        _common_args(x, linear_weight, b, src, tgt, f32(weight) if need_wz else None, cfg, logit_scale, softcap),
        out_ptr=out, blocks_per_split=per_split, NEED_WZ=bool(need_wz),
    ), HAS_SRC="src_ptr", HAS_BIAS="b_ptr", HAS_WEIGHT="weight_ptr")
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return _lce_stats_kernel, (n_m, num_splits), kwargs, options, out


def backward_plans(x, linear_weight, b, src, tgt, weight, lse, row_coefs, thresholds, dx, dw, db, *,
                   logit_scale=1.0, softcap=None, has_d=False, unit=None, config=None, arch=None) -> dict:
    """Plans of :func:`backward`: ``{"dx": plan, "dw": plan}`` for the kernels the requested
    gradients need (``"dw"`` also computes db), each accumulating into the float32 ``dx``/``dw``/``db``.
    ``config``: one tile configuration for both kernels (default: :func:`backward_configs` for
    ``arch``, by default the device's compute capability)."""
    _check(x, linear_weight, b)
    v, d = linear_weight.shape
    m = tgt.shape[0]
    for t in (dx, dw, db):
        assert t is None or (t.dtype == torch.float32 and t.stride(-1) == 1)
    if config:
        cfgs = {k: dict(config, BLOCK_K=config.get("BLOCK_K", config[side]))
                for k, side in (("dx", "BLOCK_V"), ("dw", "BLOCK_M"))}
    else:
        cfgs = backward_configs(x.dtype, d, _aligned(x, linear_weight, b, dx, dw),
                                _arch(x.device) if arch is None else arch)
    if d == 0:
        dx = dw = None  # nothing to accumulate (db still has its bias terms)

    def args(cfg, **extra):
        return dict(with_flags(dict(
            _common_args(x, linear_weight, b, src, tgt, f32(weight) if has_d else None, cfg, logit_scale, softcap),
            lse_ptr=lse, row_coefs_ptr=row_coefs, thr_ptr=thresholds, unit_ptr=unit, BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            HAS_D=bool(has_d), **extra,
        ), HAS_SRC="src_ptr", HAS_BIAS="b_ptr", HAS_WEIGHT="weight_ptr", FILTER="thr_ptr", NORMALIZE="unit_ptr"))

    def options(cfg):
        return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    def staging(cfg, n_blocks, need):
        """Persistent grid (at most ``MAX_PROGRAMS``, default 2 per SM) and each program's slice of
        GROUP staged gradient tiles in the operand dtype, plus their block ids."""
        n = min(n_blocks, cfg.get("MAX_PROGRAMS", 2 * _num_sms(x.device)))
        size = n * cfg["GROUP"] if need else 1
        return (n,), dict(stage_ptr=torch.empty(size * cfg["BLOCK_M"] * cfg["BLOCK_V"], dtype=x.dtype, device=x.device),
                          ids_ptr=torch.empty(size, dtype=torch.int32, device=x.device), GROUP=cfg["GROUP"])

    plans = {}
    if dx is not None:
        cfg = cfgs["dx"]
        grid, stage = staging(cfg, triton.cdiv(m, cfg["BLOCK_M"]), True)
        kwargs = args(cfg, out_ptr=dx, stride_out=dx.stride(0), db_ptr=None, DW=False, NEED_OUT=True, NEED_DB=False,
                      **stage)
        plans["dx"] = (_lce_backward_kernel, grid, kwargs, options(cfg), dx)
    if dw is not None or db is not None:
        cfg = cfgs["dw"]
        grid, stage = staging(cfg, triton.cdiv(v, cfg["BLOCK_V"]), dw is not None)
        kwargs = with_flags(args(cfg, out_ptr=dw, stride_out=dw.stride(0) if dw is not None else 0, db_ptr=db, DW=True,
                                 **stage), NEED_OUT="out_ptr", NEED_DB="db_ptr")
        plans["dw"] = (_lce_backward_kernel, grid, kwargs, options(cfg), (dw, db))
    return plans


def stats(x, linear_weight, b, src, tgt, weight=None, *, logit_scale=1.0, softcap=None, need_wz=False,
          config=None, num_splits=None):
    """Partial row statistics ``(S, M, 4)`` float32 of ``X[src] W^T + b`` over S vocabulary splits.

    ``x`` (N_in, D), ``linear_weight`` W (V, D), ``b`` (V,) or None, one dtype (fp32/fp16/bf16);
    ``src`` (M,) int64 rows of ``x`` or None (rows 0..M-1); ``tgt`` (M,) int64 (any value outside
    [0, V) for "no target"); ``weight`` the class weights (only used with ``need_wz``, for label
    smoothing). Merge over the first dimension with :func:`celoss.stats.merge_all`.
    """
    return launch(stats_plan(x, linear_weight, b, src, tgt, weight, logit_scale=logit_scale, softcap=softcap,
                             need_wz=need_wz, config=config, num_splits=num_splits))


def backward(x, linear_weight, b, src, tgt, weight, lse, row_coefs, thresholds, dx, dw, db, *, logit_scale=1.0,
             softcap=None, has_d=False, unit=None, config=None):
    """Accumulate the gradients of ``sum_n loss_n`` into float32 ``dx`` (N_in, D), ``dw`` (V, D),
    ``db`` (V,) (each may be None: not computed).

    ``lse`` (M,) float32 full-row log-sum-exp; ``row_coefs`` (M, 3) float32 (A, B, D) already
    scaled by the upstream gradient (see :mod:`celoss.backends`); ``thresholds`` (M,) float32 or
    None: gradient filtering (skip tiles whose |A p - B onehot - D w| never exceeds the row's
    threshold). ``has_d`` must be True when any D coefficient is non-zero (label smoothing).
    ``unit``: None, or a (1,) float32 tensor > 0, the magnitude of the largest row coefficient
    scale; fp16/bf16 tiles are normalized by it before rounding (see the kernel). The entries of
    ``src`` must be distinct (each dX row has one owner; the caller's row maps are injective).
    """
    if unit is not None and x.dtype == torch.float32:
        unit = None  # fp32 operands are not rounded
    plans = backward_plans(x, linear_weight, b, src, tgt, weight, lse, row_coefs, thresholds, dx, dw, db,
                           logit_scale=logit_scale, softcap=softcap, has_d=has_d, unit=unit, config=config)
    for plan in plans.values():
        launch(plan)
    return dx, dw, db
