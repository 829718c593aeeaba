"""Fresh gradient buffers: on Linux CPU, large ones are advised to use huge pages before first touch."""
from __future__ import annotations

import ctypes
import functools
import sys

import torch
from torch import Tensor

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def fresh_like(logits: Tensor) -> Tensor:
    """A fresh contiguous buffer like `logits`. On Linux CPU, large buffers are advised to use huge
    pages before first touch: first-touch faults of 4 KB pages run at ~5 GB/s on the reference
    machine, slower than the kernel writing the gradient (see shared notes on the CPU baseline)."""
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    nbytes = out.numel() * out.element_size()
    if out.device.type == "cpu" and nbytes >= 4 * _HUGE_PAGE and sys.platform.startswith("linux"):
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _madvise()(start, end - start, _MADV_HUGEPAGE)  # advisory: failure just means small pages
    return out
