"""celoss._memory: the CPU buffer cache recycles large gradient buffers, never one still in use."""
import os
import subprocess
import sys
import threading

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


def test_a_new_shape_releases_the_stale_free_buffers():
    celoss.set_cpu_cache_limit(16 * BIG_BYTES)
    stale = [_memory.fresh_like(like()) for _ in range(2)]
    del stale
    assert celoss.cpu_cache_bytes() == 2 * BIG_BYTES
    tiny_enough = _memory.fresh_like(like((256, 8192)))  # under half of a free buffer: no fit
    assert celoss.cpu_cache_bytes() == 0
    del tiny_enough
    assert celoss.cpu_cache_bytes() == BIG_BYTES // 4


def test_empty_cpu_cache_and_bad_limits():
    del_me = _memory.fresh_like(like())
    del del_me
    assert celoss.cpu_cache_bytes() == BIG_BYTES
    celoss.empty_cpu_cache()
    assert celoss.cpu_cache_bytes() == 0
    with pytest.raises(ValueError, match="max_bytes"):
        celoss.set_cpu_cache_limit(-1)


@pytest.mark.parametrize("value", ["lots", "-5", "nan"])
def test_bad_environment_value_names_the_variable(value):
    env = dict(os.environ, CELOSS_CPU_CACHE_MB=value)
    run = subprocess.run([sys.executable, "-c", "import celoss"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "CELOSS_CPU_CACHE_MB" in run.stderr


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
    assert celoss.cpu_cache_bytes() <= 4 * BIG_BYTES and len(set(seen)) <= 4


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
