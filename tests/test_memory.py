"""celoss._memory: the CPU buffer cache recycles large gradient buffers, never one still in use."""
import json
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading
import warnings

import psutil
import pytest
import torch

import celoss
from celoss import _memory
from conftest import backend_params

BIG = (1024, 8192)  # 32 MiB of float32: cached
BIG_BYTES = 1024 * 8192 * 4


@pytest.fixture(autouse=True)
def fresh_cache():
    celoss.empty_cpu_cache()
    celoss.set_cpu_cache_limit(4 * BIG_BYTES)
    yield
    celoss.set_cpu_cache_limit(None)
    celoss.empty_cpu_cache()


def like(shape=BIG, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype)


def test_freed_buffer_is_reused_and_accounted():
    first = _memory.fresh_like(like())
    address = first.data_ptr()
    assert celoss.cpu_cache_bytes() == 0
    del first
    assert celoss.cpu_cache_bytes() == BIG_BYTES
    second = _memory.fresh_like(like())
    assert second.data_ptr() == address and celoss.cpu_cache_bytes() == 0


def test_live_buffers_are_never_shared():
    a = _memory.fresh_like(like())
    a.fill_(1.0)
    b = _memory.fresh_like(like())
    b.fill_(2.0)
    assert a.data_ptr() != b.data_ptr()
    assert torch.all(a == 1.0)
    view = a[3:5]  # a view keeps the buffer alive
    del a
    c = _memory.fresh_like(like())
    c.fill_(3.0)
    assert torch.all(view == 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1024, 8192), (3, 1000, 4099), (8 << 20,)])
def test_shape_dtype_and_layout(shape, dtype):
    src = torch.empty(shape, dtype=dtype)
    out = _memory.fresh_like(src)
    assert out.shape == src.shape and out.dtype == dtype and out.is_contiguous()
    assert not out.requires_grad and out.device.type == "cpu"
    out.fill_(1.5)
    assert out.double().sum().item() == 1.5 * out.numel()


def test_small_buffers_bypass_the_cache():
    small = _memory.fresh_like(torch.empty(100, 100))
    del small
    assert celoss.cpu_cache_bytes() == 0


def test_limit_evicts_least_recently_freed_and_zero_disables():
    celoss.set_cpu_cache_limit(BIG_BYTES)
    a, b = _memory.fresh_like(like()), _memory.fresh_like(like())
    b_address = b.data_ptr()
    del a, b  # b freed last: kept
    assert celoss.cpu_cache_bytes() == BIG_BYTES
    assert _memory.fresh_like(like()).data_ptr() == b_address
    celoss.set_cpu_cache_limit(0)
    assert celoss.cpu_cache_bytes() == 0
    c = _memory.fresh_like(like())
    del c
    assert celoss.cpu_cache_bytes() == 0


def test_a_smaller_request_reuses_a_larger_free_buffer():
    big = _memory.fresh_like(like((1024, 8192)))
    address = big.data_ptr()
    del big
    smaller = _memory.fresh_like(like((700, 8192)))  # fits without wasting more than half
    assert smaller.data_ptr() == address and smaller.shape == (700, 8192)


def test_issue14_a_request_nothing_fits_evicts_only_what_the_cap_needs_oldest_first():
    """One odd-sized request no longer throws away every free buffer: the others of a training
    step are still reused. The cap (4 BIG) holds the free buffers plus the new one."""
    old, young = _memory.fresh_like(like()), _memory.fresh_like(like())
    young_address = young.data_ptr()
    del old, young  # free: [old, young], 2 BIG
    quarter = _memory.fresh_like(like((256, 8192)))  # under half of a free buffer: no fit, room left
    assert celoss.cpu_cache_bytes() == 2 * BIG_BYTES
    del quarter  # free: [old, young, quarter], 2.25 BIG
    larger = _memory.fresh_like(like((2560, 8192)))  # 2.25 + 2.5 > 4: only the oldest, `old`, goes
    assert celoss.cpu_cache_bytes() == BIG_BYTES + BIG_BYTES // 4
    assert _memory.fresh_like(like()).data_ptr() == young_address
    del larger
    assert celoss.cpu_cache_bytes() <= 4 * BIG_BYTES


def test_issue14_fresh_empty_is_fresh_like_without_a_template():
    for shape, dtype in (((1024, 8192), torch.float32), ((3, 4099), torch.bfloat16), ([8 << 20], torch.float16)):
        out = _memory.fresh_empty(shape, dtype, "cpu")
        assert out.shape == tuple(shape) and out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
        out.fill_(1.5)
        assert out.double().sum().item() == 1.5 * out.numel()
    address = out.data_ptr()
    del out  # 16 MiB: cached, and reused by a request of the same size
    assert _memory.fresh_empty((4 << 20,), torch.float32, torch.device("cpu")).data_ptr() == address


def test_empty_cpu_cache_and_bad_limits():
    del_me = _memory.fresh_like(like())
    del del_me
    assert celoss.cpu_cache_bytes() == BIG_BYTES
    celoss.empty_cpu_cache()
    assert celoss.cpu_cache_bytes() == 0
    with pytest.raises(ValueError, match="max_bytes"):
        celoss.set_cpu_cache_limit(-1)


def test_issue11_bad_cache_environment_value_does_not_break_import():
    code = textwrap.dedent("""
        import json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import celoss
        from celoss import _memory
        print(json.dumps([_memory._CACHE.max_bytes, [str(w.message) for w in caught if "celoss" in str(w.message)]]))
    """)
    env = dict(os.environ, CELOSS_CPU_CACHE_MB="1e400")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    cap, warned = json.loads(run.stdout.splitlines()[-1])
    assert len(warned) == 1 and "CELOSS_CPU_CACHE_MB" in warned[0] and "'1e400'" in warned[0], warned
    assert cap == _default_without_environment()


def _default_without_environment():
    saved = os.environ.pop("CELOSS_CPU_CACHE_MB", None)
    try:
        return _memory._default_cache_bytes()
    finally:
        if saved is not None:
            os.environ["CELOSS_CPU_CACHE_MB"] = saved


@pytest.mark.parametrize("value", ["inf", "1e400", "abc", "-5", "nan", "-inf", "64MB"])
def test_issue11_bad_cache_environment_value_warns_and_gives_the_default(value, monkeypatch):
    default = _default_without_environment()
    monkeypatch.setenv("CELOSS_CPU_CACHE_MB", value)
    with pytest.warns(RuntimeWarning, match=r"CELOSS_CPU_CACHE_MB .*" + re.escape(repr(value))):
        assert _memory._default_cache_bytes() == default


@pytest.mark.parametrize("value, expected", [("64", 64 << 20), (" 0.5 ", 1 << 19), ("0", 0), ("", None)])
def test_cache_environment_value_sets_the_cap(value, expected, monkeypatch):
    default = _default_without_environment()
    monkeypatch.setenv("CELOSS_CPU_CACHE_MB", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _memory._default_cache_bytes() == (default if expected is None else expected)


def _held_bytes():
    """What the cache holds right now, read without a cache call (a call would file returned buffers)."""
    return sum(map(len, list(_memory._CACHE._free) + list(_memory._CACHE._returned)))


def test_issue11_cache_limit_holds_as_soon_as_buffers_come_back():
    celoss.set_cpu_cache_limit(2 * BIG_BYTES)
    buffers = [_memory.fresh_like(like()).fill_(1.0) for _ in range(8)]  # 256 MiB faulted in
    process = psutil.Process()
    resident = process.memory_info().rss
    del buffers  # no cache call after this: the 6 buffers over the cap must go back to the OS now
    released = resident - process.memory_info().rss
    assert _held_bytes() == 2 * BIG_BYTES
    assert released >= 5 * BIG_BYTES, f"only {released >> 20} MiB released"


def test_issue11_a_buffer_returned_while_the_cache_is_locked_neither_waits_nor_breaks_the_cap():
    celoss.set_cpu_cache_limit(BIG_BYTES)
    buffers = [_memory.fresh_like(like()) for _ in range(3)]

    def release():
        buffers.clear()  # the finalizers run in this thread

    with _memory._CACHE._lock:  # as while another thread is inside a cache call
        releaser = threading.Thread(target=release)
        releaser.start()
        releaser.join(timeout=60)
        assert not releaser.is_alive(), "a returning buffer waited for the cache lock"
    assert celoss.cpu_cache_bytes() == BIG_BYTES and _held_bytes() == BIG_BYTES


def test_threads_never_get_the_same_live_buffer():
    errors, seen = [], []

    def work(k):
        try:
            for _ in range(20):
                t = _memory.fresh_like(like())
                t.fill_(float(k))
                seen.append(t.data_ptr())
                if not torch.all(t == float(k)):
                    errors.append(k)
                del t
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _held_bytes() <= 4 * BIG_BYTES and len(set(seen)) <= 4


@pytest.mark.parametrize("backend", backend_params("cython"))
def test_training_steps_reuse_the_gradient_without_corrupting_a_kept_one(backend):
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(512, 32000, generator=g), torch.randn(512, 32000, generator=g) * 2
    y = torch.randint(0, 32000, (512,), generator=g)

    def grad_of(x):
        x = x.clone().requires_grad_()
        celoss.cross_entropy(x, y, backend=backend).backward()
        return x.grad

    def oracle(x):
        x = x.double().requires_grad_()
        torch.nn.functional.cross_entropy(x, y).backward()
        return x.grad

    kept = grad_of(x1)  # the user keeps this gradient: its buffer must not be recycled
    kept_copy = kept.clone()
    addresses = set()
    for _ in range(3):  # later steps reuse one buffer among themselves
        g2 = grad_of(x2)
        torch.testing.assert_close(g2.double(), oracle(x2), rtol=1e-5, atol=1e-8)
        addresses.add(g2.data_ptr())
        del g2
    assert torch.equal(kept, kept_copy)
    assert len(addresses) == 1 and kept.data_ptr() not in addresses


# Fork: GNU OpenMP (torch's ATen and celoss's CPU kernels) can't start a thread team in a forked
# child of a process that already ran one (it hangs), so a child runs single-threaded, as torch's
# DataLoader workers do.
def _training_step(seed, backend="cython"):
    """A celoss gradient (from the cache) and its error against the float64 PyTorch gradient."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(512, 8192, generator=g) * 3, torch.randint(0, 8192, (512,), generator=g)
    xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
    celoss.cross_entropy(xa, y, backend=backend).backward()
    torch.nn.functional.cross_entropy(xb, y).backward()
    return xa.grad, (xa.grad.double() - xb.grad).abs().max().item()


def _in_forked_child(fn):
    """fn()'s result, computed in an os.fork child (killed after 60 s: a hang fails the test)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            import faulthandler
            faulthandler.dump_traceback_later(60, exit=True)
            torch.set_num_threads(1)
            result = ("ok", fn())
        except BaseException as exc:  # reported to the parent
            result = ("error", repr(exc))
        with os.fdopen(write, "wb") as out:
            pickle.dump(result, out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    assert data, f"the forked child died (wait status {status})"
    kind, result = pickle.loads(data)
    assert kind == "ok", result
    return result


def _kept_gradient_and_a_free_buffer(backend):
    """One training step's gradient, kept, and a free buffer of the same size in the cache."""
    kept, _ = _training_step(0, backend)
    _training_step(1, backend)  # its gradient is freed: the cache holds that buffer at the fork
    assert celoss.cpu_cache_bytes() == kept.numel() * kept.element_size()
    return kept, kept.clone()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork")
@pytest.mark.parametrize("backend", backend_params("cython"))
def test_issue11_a_forked_child_never_writes_the_parents_buffers(backend):
    kept, kept_copy = _kept_gradient_and_a_free_buffer(backend)

    def child():
        cached_at_fork = celoss.cpu_cache_bytes()
        grad, error = _training_step(2, backend)
        kept.fill_(7.0)  # the parent's gradient, written in the child
        grad.fill_(9.0)
        return cached_at_fork, error

    cached_at_fork, error = _in_forked_child(child)
    assert cached_at_fork == 0  # the child dropped the free buffers it inherited
    assert error < 1e-6
    assert torch.equal(kept, kept_copy)
    grad, error = _training_step(3, backend)  # the parent's own next step reuses its free buffer
    assert error < 1e-6 and torch.equal(kept, kept_copy)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork")
def test_issue11_a_child_forked_while_the_cache_is_locked_can_use_it():
    with _memory._CACHE._lock:  # another thread inside a cache call at the fork
        cached, error = _in_forked_child(lambda: (celoss.cpu_cache_bytes(), _training_step(2)[1]))
    assert cached == 0 and error < 1e-6


_POOL_STATE = {}


def _pool_worker_start():
    torch.set_num_threads(1)
    _POOL_STATE["cached_at_fork"] = celoss.cpu_cache_bytes()


def _pool_worker_step(seed, backend):
    grad, error = _training_step(seed, backend)
    _POOL_STATE["kept"].fill_(float(seed))  # the parent's gradient, written in a worker
    return _POOL_STATE["cached_at_fork"], error, grad.sum().item()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork start method")
@pytest.mark.parametrize("backend", backend_params("cython"))
def test_issue11_fork_started_pool_workers_keep_their_gradients_apart(backend):
    kept, kept_copy = _kept_gradient_and_a_free_buffer(backend)
    _POOL_STATE["kept"] = kept
    try:
        with multiprocessing.get_context("fork").Pool(4, initializer=_pool_worker_start) as pool:
            results = pool.starmap(_pool_worker_step, [(seed, backend) for seed in range(10, 18)], chunksize=1)
    finally:
        _POOL_STATE.clear()
    assert [cached for cached, _, _ in results] == [0] * 8
    for seed, (_, error, total) in zip(range(10, 18), results):
        assert error < 1e-6, (seed, error)
        assert abs(total - _training_step(seed, backend)[0].sum().item()) < 1e-3, seed
    assert torch.equal(kept, kept_copy)
