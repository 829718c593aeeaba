"""celoss/_checks.py: class-index targets are validated with a clear IndexError naming the value on
the CPU, and on a device without a host read (``torch._assert_async``, queued on the stream:
issue 12 B), where the triton kernels must never read out of bounds whatever the targets."""
from unittest import mock

import pytest
import torch

import celoss
from celoss import _checks
from conftest import AVAILABLE

TRITON = pytest.mark.skipif(AVAILABLE["triton"] is not None, reason=str(AVAILABLE["triton"]))


@pytest.mark.parametrize("bad", [300, -1, -101])
def test_cpu_targets_out_of_bounds_name_the_value(bad):
    target = torch.tensor([0, -100, bad, 299])
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds: class indices must be in "
                                         r"\[0, 300\) or equal ignore_index=-100"):
        _checks.target_indices(target, 300, -100)
    _checks.target_indices(torch.tensor([0, -100, 299]), 300, -100)
    _checks.target_indices(torch.tensor([], dtype=torch.int64), 300, -100)


def test_device_targets_are_checked_on_the_device():
    """Off the CPU the check is an asynchronous assert on a device boolean: no value is read on the
    host (the CPU's _assert_async stands in for the CUDA one here)."""
    seen = []

    def assert_async(cond, msg):
        seen.append((cond.clone(), msg))

    with mock.patch.object(_checks, "device_side", lambda t, backend=None: True), \
            mock.patch.object(torch, "_assert_async", assert_async), \
            mock.patch.object(torch.Tensor, "__bool__", lambda self: pytest.fail("host read")):
        _checks.target_indices(torch.tensor([0, -100, 5]), 300, -100)
        _checks.target_indices(torch.tensor([0, 300, 5]), 300, -100)
    assert [bool(c) for c, _ in seen] == [True, False]
    assert "[0, 300) or equal ignore_index=-100" in seen[1][1]


def test_device_assert_fails_loudly():
    """The real torch._assert_async (CPU here; on CUDA a device-side assert) raises for a bad target."""
    with mock.patch.object(_checks, "device_side", lambda t, backend=None: True):
        with pytest.raises(RuntimeError, match="out of bounds"):
            _checks.target_indices(torch.tensor([0, 300]), 300, -100)


@TRITON
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("split", [1, 3])
def test_triton_kernels_read_in_bounds_whatever_the_targets(monkeypatch, label_smoothing, split):
    """With the check out of the way (as when an assert has not fired yet), out-of-range targets
    (just past either end, and 2^40 classes away: a wild address the interpreter would fault on)
    read class 0: the row's loss is NaN, the other rows are PyTorch's, in the one-program and the
    split-vocabulary mode, with and without smoothing."""
    from celoss.kernels import cross_entropy as K

    monkeypatch.setattr(_checks, "target_indices", lambda *a: None)
    monkeypatch.setattr(K, "FORCE_SPLITS", split)
    n, c = 5, 4200
    buf = torch.full((n, c + 64), torch.nan)
    buf[:, 32:32 + c] = torch.randn(n, c, generator=torch.Generator().manual_seed(0))
    x = buf[:, 32:32 + c]
    y = torch.tensor([1, c, -5, 1 << 40, 7])
    loss = celoss.cross_entropy(x, y, reduction="none", backend="triton", label_smoothing=label_smoothing)
    assert loss[1:4].isnan().all()
    ref = torch.nn.functional.cross_entropy(x[[0, 4]], y[[0, 4]], reduction="none", label_smoothing=label_smoothing)
    torch.testing.assert_close(loss[[0, 4]], ref, rtol=1e-5, atol=1e-6)


@TRITON
def test_triton_distillation_reads_in_bounds_whatever_the_targets(monkeypatch):
    """The same for distillation with a class term: an out-of-range target reads class 0 and makes
    its row's loss NaN; the other rows are the reference backend's."""
    monkeypatch.setattr(_checks, "target_indices", lambda *a: None)
    n, v = 5, 300
    g = torch.Generator().manual_seed(1)
    pads = [torch.full((n, v + 64), torch.nan) for _ in range(2)]
    for p in pads:
        p[:, 32:32 + v] = torch.randn(n, v, generator=g)
    s, t = (p[:, 32:32 + v] for p in pads)
    y = torch.tensor([1, v, -5, 1 << 40, 7])
    kw = dict(alpha=0.5, temperature=2.0, reduction="none")
    loss = celoss.distillation_loss(s, t, y, backend="triton", **kw)
    assert loss[1:4].isnan().all()
    ref = celoss.distillation_loss(s[[0, 4]], t[[0, 4]], y[[0, 4]], backend="torch", **kw)
    torch.testing.assert_close(loss[[0, 4]], ref, rtol=1e-5, atol=1e-6)
