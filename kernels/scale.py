"""Triton kernel scaling a gradient in place by an upstream gradient read from device memory.

``grad *= scale`` with ``scale`` one value or one per row, decided on the device: the host never
reads the scale (no synchronisation, capturable in a CUDA graph). Every program loads its scale
first; where it is exactly 1 (a plain ``loss.backward()``) nothing is read or written, so the call
costs one launch of a persistent grid (at most PROGRAMS_PER_SM programs per multiprocessor, each
returning at once); any other scale (gradient accumulation, loss scaling, NaN / inf) costs one read
and one write of the gradient.

Rounding is PyTorch's ``grad * scale.to(grad.dtype)``: the scale is rounded to the gradient's dtype,
then the product of the two is rounded once (exact in float32 for fp16 / bf16 operands). IEEE
products throughout: a NaN or infinite scale makes NaN where the gradient is 0 (inf * 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import SUPPORTED_DTYPES, launch
from .cross_entropy import _multiprocessors

BLOCK = 4096  # 16 elements per thread at 8 warps: 128-bit accesses for 16-bit and 32-bit gradients
NUM_WARPS = 8
PROGRAMS_PER_SM = 8  # resident at once on sm_80 / sm_90 (benchmarks/kernel_resources.md: 8 blocks/SM)
INTERPRETER_PROGRAMS = 3  # CPU (Triton's interpreter): a few programs, so tests cover the grid-stride loop


@triton.jit
def _rounded(s, dtype):
    """The scale as PyTorch's ``scale.to(dtype)`` rounds it (through float32, as c10's Half and
    BFloat16 convert a double), in float32."""
    return s.to(tl.float32).to(dtype).to(tl.float32)


@triton.jit
def _scale_kernel(grad_ptr, stride_r, row_len, tiles_per_row, num_tiles, scale_ptr, stride_s,
                  BLOCK: tl.constexpr, PER_ROW: tl.constexpr):
    """grad[r, j] *= scale[r] (PER_ROW) or scale[0], for the (R, row_len) rows of ``grad`` (row
    stride ``stride_r``, unit column stride), cut into tiles of BLOCK columns; program p takes
    tiles p, p + P, p + 2P, ... (P programs). Rows whose scale is exactly 1 are not touched."""
    pid = tl.program_id(0)
    if not PER_ROW:
        s = _rounded(tl.load(scale_ptr), grad_ptr.dtype.element_ty)
        if s == 1.0:
            return
    offs = tl.arange(0, BLOCK)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        row = tile // tiles_per_row
        start = (tile - row * tiles_per_row).to(tl.int64) * BLOCK  # rows of >= 2^31 elements: int64
        if PER_ROW:
            s = _rounded(tl.load(scale_ptr + row.to(tl.int64) * stride_s), grad_ptr.dtype.element_ty)
        # the tile's columns to touch, none in a row scaled by 1 (an integer bound: the interpreter
        # mis-broadcasts `mask & scalar_float_compare`)
        n_cols = tl.minimum(tl.where(s == 1.0, 0, row_len - start), BLOCK).to(tl.int32)
        mask = offs < n_cols
        ptr = grad_ptr + (row.to(tl.int64) * stride_r + start) + offs
        g = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, (g.to(tl.float32) * s).to(grad_ptr.dtype.element_ty), mask=mask)


def supports(grad: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether :func:`scale_` takes ``grad`` (fp32 / fp16 / bf16, contiguous, or 2-D rows with unit
    column stride) and ``scale`` (one value, or one per row of ``grad``) as they are."""
    if grad.dtype not in SUPPORTED_DTYPES or scale.device != grad.device:
        return False
    if scale.numel() != 1 and (grad.dim() == 0 or scale.numel() != grad.shape[0]):
        return False
    return grad.is_contiguous() or (grad.dim() == 2 and (grad.shape[1] <= 1 or grad.stride(1) == 1))


def scale_plan(grad: torch.Tensor, scale: torch.Tensor):
    """Kernel, grid, keyword arguments, launch options and result (``grad``) of :func:`scale_`."""
    assert supports(grad, scale), (grad.shape, grad.stride(), grad.dtype, scale.shape)
    per_row = scale.numel() != 1
    rows = grad.shape[0] if per_row else 1
    row_len = grad.numel() // rows if rows else 0
    stride_r = grad.stride(0) if grad.dim() == 2 and not grad.is_contiguous() else row_len
    scale = scale.reshape(-1)
    tiles_per_row = max(triton.cdiv(row_len, BLOCK), 1)
    num_tiles = rows * tiles_per_row if row_len else 0
    programs = (PROGRAMS_PER_SM * _multiprocessors(grad.device) if grad.is_cuda else INTERPRETER_PROGRAMS)
    kwargs = dict(grad_ptr=grad, stride_r=stride_r, row_len=row_len, tiles_per_row=tiles_per_row,
                  num_tiles=num_tiles, scale_ptr=scale, stride_s=scale.stride(0), BLOCK=BLOCK, PER_ROW=per_row)
    return _scale_kernel, (min(num_tiles, programs),), kwargs, dict(num_warps=NUM_WARPS), grad


def scale_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad *= scale`` in place (see the module docstring); returns ``grad``."""
    return launch(scale_plan(grad, scale))
