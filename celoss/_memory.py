"""Fresh gradient buffers, and a cache that recycles the large CPU ones.

A fresh N x C buffer costs its page faults: the OS zeroes every page on first touch (about 5 GB/s
with 4 KB pages on the reference machine: shared notes on the CPU baseline). Even with huge pages,
a fused cross-entropy forward+backward into a fresh gradient took 1.5-1.7x as long as into a
recycled one (``celoss-cython-nocache`` vs ``celoss-cython`` in benchmarks/results). PyTorch hands
large CPU buffers back to the OS when they are freed, so every training step would pay again.

So large CPU buffers (``MIN_CACHED_BYTES`` and up) come from huge-page-advised anonymous mappings,
and when the last tensor on one is freed (autograd is done with the gradient) the mapping goes
back to a cache instead of the OS, for the next step to reuse, already faulted in. That is what
PyTorch's caching allocator does on CUDA. The cache keeps at most ``CELOSS_CPU_CACHE_MB`` of free
buffers (default: an eighth of the physical memory, at most 8 GiB; a value that is not a finite
number >= 0 warns and gives the default), the oldest released as soon as a returning buffer takes
it over the cap, or as a request that no free buffer fits maps a new one: as far as the free ones
plus the new one must fit the cap, never more;
``CELOSS_CPU_CACHE_MB=0`` turns it off. ``set_cpu_cache_limit(bytes)`` changes the cap,
``empty_cpu_cache()`` releases the free buffers and ``cpu_cache_bytes()`` says how much they hold.
The mappings are private, so a forked child (``multiprocessing`` with fork) writes to its own copy of
a buffer, and it starts with an empty cache.
"""
from __future__ import annotations

import collections
import ctypes
import functools
import math
import mmap
import os
import sys
import threading
import warnings
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


# Private mappings: after os.fork the child's writes to a buffer are copy-on-write, never seen by
# the parent (a shared anonymous mapping would hand the parent the child's gradients).
_MAP_FLAGS = ({"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {})


class _CpuCache:
    """Free anonymous mappings, oldest first; buffers come back through ``weakref.finalize``.

    A request takes the smallest free mapping that fits it without wasting more than half of it
    (so varying token counts reuse the largest recent buffer). A request that nothing fits gets a
    new mapping, and the oldest free ones go back to the OS only as far as needed for the free ones
    plus the new one to stay within the cap (so the new one can join them when freed): one odd-sized
    request does not throw away the buffers that the other requests of a training step reuse.

    The cap holds whenever no cache call is running: a returned buffer is filed (and the oldest free
    ones released) at once. A finalizer may run in any thread, or inside a cache call that holds the
    lock (a decref or a garbage collection there), so it never waits: it appends to a deque (atomic)
    and files the deque only if the lock is free; every call that held the lock files it after
    releasing it, so nothing returned while the lock was held stays unfiled.
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
                self._evict(self.max_bytes - size)
            else:
                self._free.remove(block)
        self._file_returned()
        if block is None:
            block = mmap.mmap(-1, size, **_MAP_FLAGS)
            _advise_huge_pages(np.frombuffer(block, dtype=np.uint8).ctypes.data, size)
        array = np.frombuffer(block, dtype=np.uint8, count=nbytes)
        weakref.finalize(array, self._give_back, block).atexit = False
        return array

    def _give_back(self, block: mmap.mmap) -> None:
        self._returned.append(block)
        self._file_returned()

    def _file_returned(self) -> None:
        """Files returned buffers unless another call holds the lock (that one files them after)."""
        while self._returned and self._lock.acquire(blocking=False):
            try:
                self._collect()
            finally:
                self._lock.release()

    def _collect(self) -> None:
        """Under the lock: returned buffers join the free list, the oldest go beyond the cap."""
        while self._returned:
            self._free.append(self._returned.popleft())
        self._evict(self.max_bytes)

    def _evict(self, keep_bytes: int) -> None:
        """Under the lock: the oldest free mappings go until at most ``keep_bytes`` remain."""
        held = sum(map(len, self._free))
        while self._free and held > keep_bytes:
            held -= len(self._free.pop(0))

    def set_limit(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = max_bytes
            self._collect()
        self._file_returned()

    def free_bytes(self) -> int:
        with self._lock:
            self._collect()
            held = sum(map(len, self._free))
        self._file_returned()
        return held

    def clear(self) -> None:
        with self._lock:
            self._collect()
            self._free.clear()
        self._file_returned()

    def after_fork_in_child(self) -> None:
        """A forked child drops the free buffers it inherited (their pages stay the parent's) and
        gets a new lock: another thread of the parent may have held it at the fork."""
        self._lock = threading.Lock()
        self._returned.clear()
        self._free.clear()


def _default_cache_bytes() -> int:
    """``CELOSS_CPU_CACHE_MB``, else an eighth of the physical memory, at most 8 GiB.

    A bad value warns and gives the default: a typo in the environment must not break ``import celoss``.
    """
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): 16 GiB assumed
        physical = 16 << 30
    default = min(8 << 30, physical // 8)
    value = os.environ.get("CELOSS_CPU_CACHE_MB", "").strip()
    if not value:
        return default
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = math.nan
    if not 0 <= megabytes < math.inf:
        warnings.warn(f"celoss: CELOSS_CPU_CACHE_MB must be a finite number of megabytes >= 0, got {value!r}; "
                      f"using the default, {default >> 20} MiB", RuntimeWarning, stacklevel=2)
        return default
    return int(megabytes * 2 ** 20)


DEFAULT_CACHE_BYTES = _default_cache_bytes()
_CACHE = _CpuCache(DEFAULT_CACHE_BYTES)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_CACHE.after_fork_in_child)


def set_cpu_cache_limit(max_bytes: int | None = None) -> None:
    """Caps the free CPU buffers kept for reuse (see :func:`cpu_cache_bytes`).

    Free buffers beyond the cap go back to the OS at once, the oldest first.

    Args:
        max_bytes (int, optional): the cap in bytes, >= 0 (0: none; buffers larger than the cap are
            not cached); None: the default, ``CELOSS_CPU_CACHE_MB`` or an eighth of the physical
            memory (at most 8 GiB). Default: None

    Shape:
        Not applicable: no tensor arguments.

    Returns:
        None

    Example::

        >>> celoss.set_cpu_cache_limit(1 << 30)   # keep at most 1 GiB of free gradient buffers
        >>> celoss.set_cpu_cache_limit(0)         # keep none
        >>> celoss.cpu_cache_bytes()
        0
        >>> celoss.set_cpu_cache_limit()          # back to the default
    """
    if max_bytes is None:
        max_bytes = DEFAULT_CACHE_BYTES
    if max_bytes < 0:
        raise ValueError(f"set_cpu_cache_limit: max_bytes must be >= 0, got {max_bytes}")
    _CACHE.set_limit(int(max_bytes))


def cpu_cache_bytes() -> int:
    """Bytes of free CPU buffers the cache holds for reuse (``CELOSS_CPU_CACHE_MB`` caps them).

    Large CPU gradient buffers (8 MiB and up) come from huge-page-advised mappings that go back to
    this cache, not to the OS, when their last tensor is freed, so the next training step reuses
    them already faulted in (what PyTorch's caching allocator does on CUDA).

    Args:
        None.

    Shape:
        Not applicable: no tensor arguments.

    Returns:
        int: the bytes of the free (not in use) cached buffers.

    Example::

        >>> celoss.set_cpu_cache_limit(1 << 30)
        >>> logits = torch.randn(64, 32768, requires_grad=True)   # an 8 MiB gradient
        >>> celoss.cross_entropy(logits, torch.randint(0, 32768, (64,))).backward()
        >>> logits.grad = None   # the gradient's buffer goes back to the cache
        >>> celoss.cpu_cache_bytes() >= 64 * 32768 * 4
        True
        >>> celoss.empty_cpu_cache()
        >>> celoss.set_cpu_cache_limit()
    """
    return _CACHE.free_bytes()


def empty_cpu_cache() -> None:
    """Hands the cache's free CPU buffers back to the OS (like ``torch.cuda.empty_cache``).

    Buffers still in use (e.g. a ``.grad`` that is alive) are not affected; they return to the cache
    when freed.

    Args:
        None.

    Shape:
        Not applicable: no tensor arguments.

    Returns:
        None

    Example::

        >>> celoss.empty_cpu_cache()
        >>> celoss.cpu_cache_bytes()
        0
    """
    _CACHE.clear()


def fresh_empty(shape, dtype: torch.dtype, device) -> Tensor:
    """An uninitialized contiguous buffer of ``shape``; large CPU ones from the cache."""
    shape = torch.Size(shape)
    device = torch.device(device)
    nbytes = shape.numel() * dtype.itemsize
    if device.type != "cpu" or nbytes < MIN_CACHED_BYTES or _CACHE.max_bytes < nbytes:
        out = torch.empty(shape, dtype=dtype, device=device)
        if device.type == "cpu" and nbytes >= MIN_CACHED_BYTES:
            _advise_huge_pages(out.data_ptr(), nbytes)
        return out
    return torch.from_numpy(_CACHE.take(nbytes)).view(dtype).view(shape)


def fresh_like(like: Tensor) -> Tensor:
    """An uninitialized contiguous buffer shaped like ``like``; large CPU ones from the cache."""
    return fresh_empty(like.shape, like.dtype, like.device)
