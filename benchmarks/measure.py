"""Timing, peak extra memory and machine ceilings (runs in the worker process; imports torch).

Timing: every call is bracketed by synchronized clocks (``time.perf_counter`` on CPU, CUDA events
on GPU, synchronized after each step), so a training step yields its forward part, its backward part
and the whole. Medians over repeats, after warm-up; the first call (compile / JIT) is timed apart.

Peak extra memory: CPU -- the peak resident set size of the worker process over its resident size
just before the call. The kernel's high-water mark is reset before each measured call
(``/proc/self/clear_refs`` = 5), so every measured call gets its own peak without a new process;
where that file can't be written, a 0.2 ms sampling thread stands in. Freed tensors of this size
are returned to the OS by glibc (mmap'd allocations), so fresh N x V buffers pay their page faults
in the time, as they would in real use; celoss keeps its own freed gradient buffers for reuse
(``celoss._memory``), and what its cache holds before a call is counted in that call's peak.
GPU -- ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` before the call (the caching
allocator's reuse is counted as real use).

Ceilings: a large copy (bandwidth, bytes read + written), first-touch writes to fresh pages (CPU,
informative), a large matmul per dtype (FLOP/s). Measured once per run.
"""
from __future__ import annotations

import ctypes
import os
import statistics
import sys
import threading
import time

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


# ---- clocks --------------------------------------------------------------------------------------

class Clock:
    """start() / mark() / stop() -> (first segment ms, total ms); on CUDA with events."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self):
        if self.cuda:
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            self.events[0].record()
            self.n = 1
        else:
            self.times = [time.perf_counter()]

    def mark(self):
        if self.cuda:
            self.events[self.n].record()
            self.n += 1
        else:
            self.times.append(time.perf_counter())

    def stop(self):
        """Milliseconds of each segment between start, the marks and stop."""
        self.mark()
        if self.cuda:
            self.events[self.n - 1].synchronize()
            return [self.events[i].elapsed_time(self.events[i + 1]) for i in range(self.n - 1)]
        return [(b - a) * 1e3 for a, b in zip(self.times, self.times[1:])]


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def median(xs):
    return statistics.median(xs) if xs else None


# ---- memory --------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap():
    """Give freed heap back to the OS so the next baseline is not inflated by glibc's caches."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _celoss_cached_bytes() -> int:
    celoss = sys.modules.get("celoss")
    return celoss.cpu_cache_bytes() if celoss is not None else 0


class CpuMemory:
    def __init__(self):
        self.hwm = _can_reset_hwm()
        self.how = "peak RSS (VmHWM reset per call)" if self.hwm else "RSS sampled every 0.2 ms"

    def start(self):
        # buffers celoss's CPU cache holds free count as the method's memory (as cached blocks
        # count on CUDA, where max_memory_allocated sees them in use)
        self.base = rss_bytes() - _celoss_cached_bytes()
        if self.hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self.peak, self.running = self.base, True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0002)

    def stop(self) -> int:
        if self.hwm:
            peak = max(hwm_bytes(), rss_bytes())
        else:
            self.running = False
            self.thread.join()
            peak = max(self.peak, rss_bytes())
        return max(0, peak - self.base)


class CudaMemory:
    how = "torch.cuda.max_memory_allocated delta"

    def start(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def stop(self) -> int:
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - self.base)


def memory_tracker(device: str):
    return CudaMemory() if device == "cuda" else CpuMemory()


def available_memory(device: str) -> int:
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def cache_bytes(device: str) -> int:
    """The last-level cache that input rotation must defeat."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        return int(text.rstrip("KMG")) * mult
    except Exception:
        return 32 << 20


# ---- ceilings ------------------------------------------------------------------------------------

def _times_ms(fn, device: str, repeats: int) -> list[float]:
    fn()
    sync(device)
    times = []
    clock = Clock(device)
    for _ in range(repeats):
        clock.start()
        fn()
        times.append(clock.stop()[0])
    return times


def _time_ms(fn, device: str, repeats: int) -> float:
    return median(_times_ms(fn, device, repeats))


def ceilings(device: str, dtypes: list[str], tiny: bool = False) -> dict:
    """Copy bandwidth (GB/s, read + written), CPU first-touch write bandwidth, matmul TFLOP/s."""
    from .methods import torch_dtype
    out = {}
    nbytes = (64 << 20) if tiny else ((2 << 30) if device == "cuda" else (1 << 30))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src).fill_(0.5)
    times = _times_ms(lambda: dst.copy_(src), device, 3 if tiny else 7)
    out["copy_GBps"] = 2 * nbytes / median(times) / 1e6
    out["copy_best_GBps"] = 2 * nbytes / min(times) / 1e6  # a median well below it: a busy machine
    del src, dst
    if device == "cpu":
        half = nbytes // 2

        def first_touch():
            torch.empty(half // 4, dtype=torch.float32).fill_(1.0)
        trim_heap()
        ms = _time_ms(first_touch, device, 3)
        out["first_touch_GBps"] = half / ms / 1e6
    n = 256 if tiny else (8192 if device == "cuda" else 2048)
    gen = torch.Generator(device=device).manual_seed(0)
    for name in dtypes:
        try:
            dt = torch_dtype(name)
            a = torch.randn(n, n, generator=gen, device=device, dtype=dt)
            b = torch.randn(n, n, generator=gen, device=device, dtype=dt)
            ms = _time_ms(lambda: a @ b, device, 3 if tiny or device == "cpu" else 10)
            out[f"matmul_TFLOPs_{name}"] = 2 * n ** 3 / ms / 1e9
            del a, b
        except Exception as exc:  # e.g. a dtype without a matmul kernel on this device
            out[f"matmul_TFLOPs_{name}"] = None
            out[f"matmul_error_{name}"] = f"{type(exc).__name__}: {exc}"[:200]
    out["matmul_n"] = n
    out["copy_bytes"] = nbytes
    return out


def machine_info(device: str, threads: int) -> dict:
    import platform
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "threads": torch.get_num_threads() if device == "cpu" else None}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"unavailable ({type(exc).__name__})"
    try:
        import celoss
        info["celoss"] = getattr(celoss, "__version__", "?")
        info["celoss_backends"] = {k: (v or "available") for k, v in celoss.available_backends().items()}
    except Exception as exc:
        info["celoss"] = f"import failed: {type(exc).__name__}: {exc}"
    for mod, dist in (("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy")):
        try:
            from importlib.metadata import version
            info[dist] = version(dist)
        except Exception:
            info[dist] = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = f"{cpu}, {os.cpu_count()} logical CPUs"
    try:
        with open("/proc/meminfo") as f:
            info["ram_GB"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except Exception:
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, {p.total_memory / 2 ** 30:.0f} GiB, sm_{p.major}{p.minor}"
        info["gpu_name"] = p.name
        info["cuda"] = torch.version.cuda
    return info
