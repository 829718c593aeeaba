"""Fresh gradient buffers, and a cache that recycles the large CPU ones.

A fresh N x C buffer costs its page faults: the OS zeroes every page on first touch (about 5 GB/s
with 4 KB pages on the reference machine: shared notes on the CPU baseline). Even with huge pages,
a fused cross-entropy forward+backward into a fresh gradient took 1.5-1.7x as long as into a
recycled one (``celoss-cython-nocache`` vs ``celoss-cython`` in benchmarks/results). PyTorch hands
large CPU buffers back to the OS when they are freed, so every training step would pay again.

So large CPU buffers (``MIN_CACHED_BYTES`` and up) come from huge-page-advised anonymous mappings,
and when the last tensor on one is freed (autograd is done with the gradient) the mapping goes
back to a cache instead of the OS, for the next step to reuse, already faulted in. That is what
PyTorch's caching allocator does on CUDA. When the shapes change, the free buffers go back to the
OS. The cache keeps at most ``CELOSS_CPU_CACHE_MB`` of free buffers (default: an eighth of the
physical memory, at most 8 GiB), oldest dropped first; ``CELOSS_CPU_CACHE_MB=0`` turns it off.
``set_cpu_cache_limit(bytes)`` changes the cap, ``empty_cpu_cache()`` releases the free buffers and
``cpu_cache_bytes()`` says how much they hold.
"""
from __future__ import annotations

import collections
import ctypes
import functools
import mmap
import os
import sys
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
MIN_CACHED_BYTES = 4 * _HUGE_PAGE


@functools.lru_cache(maxsize=1)
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def _advise_huge_pages(address: int, nbytes: int) -> None:
    """Advisory: failure (or another OS) just means small pages."""
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start and sys.platform.startswith("linux"):
        _madvise()(start, end - start, _MADV_HUGEPAGE)


class _CpuCache:
    """Free anonymous mappings, oldest first; buffers come back through ``weakref.finalize``.

    A request takes the smallest free mapping that fits it without wasting more than half of it
    (so varying token counts reuse the largest recent buffer). A request that nothing fits means the
    shapes changed: the free mappings are stale and go back to the OS. A finalizer may run in any
    thread, or inside ``take`` itself (a decref there), so it only appends to a deque (atomic);
    ``take`` moves returned mappings into the free list under the lock.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._free: list[mmap.mmap] = []
        self._returned: collections.deque[mmap.mmap] = collections.deque()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` on a recycled or new mapping (pages not zeroed)."""
        size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
        with self._lock:
            self._collect()
            fits = [b for b in self._free if size <= len(b) <= 2 * size]
            block = min(fits, key=len) if fits else None
            if block is None:
                self._free.clear()
            else:
                self._free.remove(block)
        if block is None:
            block = mmap.mmap(-1, size)
            _advise_huge_pages(np.frombuffer(block, dtype=np.uint8).ctypes.data, size)
        array = np.frombuffer(block, dtype=np.uint8, count=nbytes)
        weakref.finalize(array, self._returned.append, block).atexit = False
        return array

    def _collect(self) -> None:
        while self._returned:
            self._free.append(self._returned.popleft())
        while self._free and sum(map(len, self._free)) > self.max_bytes:
            self._free.pop(0)

    def set_limit(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = max_bytes
            self._collect()

    def free_bytes(self) -> int:
        with self._lock:
            self._collect()
            return sum(map(len, self._free))

    def clear(self) -> None:
        with self._lock:
            self._collect()
            self._free.clear()


def _default_cache_bytes() -> int:
    """``CELOSS_CPU_CACHE_MB``, else an eighth of the physical memory, at most 8 GiB."""
    value = os.environ.get("CELOSS_CPU_CACHE_MB")
    if value is not None:
        try:
            megabytes = float(value)
        except ValueError:
            megabytes = -1.0
        if not megabytes >= 0:
            raise ValueError(f"CELOSS_CPU_CACHE_MB must be a number of megabytes >= 0, got {value!r}")
        return int(megabytes * 2 ** 20)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): a fixed 2 GiB
        physical = 16 << 30
    return min(8 << 30, physical // 8)


DEFAULT_CACHE_BYTES = _default_cache_bytes()
_CACHE = _CpuCache(DEFAULT_CACHE_BYTES)


def set_cpu_cache_limit(max_bytes: int | None = None) -> None:
    """Caps the free CPU buffers kept for reuse (0: none; buffers larger than the cap are not
    cached; None: the default, ``CELOSS_CPU_CACHE_MB`` or an eighth of the physical memory)."""
    if max_bytes is None:
        max_bytes = DEFAULT_CACHE_BYTES
    if max_bytes < 0:
        raise ValueError(f"set_cpu_cache_limit: max_bytes must be >= 0, got {max_bytes}")
    _CACHE.set_limit(int(max_bytes))


def cpu_cache_bytes() -> int:
    """Bytes of free CPU buffers the cache holds for reuse (``CELOSS_CPU_CACHE_MB`` caps them)."""
    return _CACHE.free_bytes()


def empty_cpu_cache() -> None:
    """Hands the cache's free CPU buffers back to the OS (like ``torch.cuda.empty_cache``)."""
    _CACHE.clear()


def fresh_like(like: Tensor) -> Tensor:
    """An uninitialized contiguous buffer shaped like ``like``; large CPU ones from the cache."""
    nbytes = like.numel() * like.element_size()
    if like.device.type != "cpu" or nbytes < MIN_CACHED_BYTES or _CACHE.max_bytes < nbytes:
        out = torch.empty_like(like, memory_format=torch.contiguous_format)
        if out.device.type == "cpu" and nbytes >= MIN_CACHED_BYTES:
            _advise_huge_pages(out.data_ptr(), nbytes)
        return out
    return torch.from_numpy(_CACHE.take(nbytes)).view(like.dtype).view(like.shape)
