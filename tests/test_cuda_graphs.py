"""Issue 12 B/D: celoss's triton path inside a captured CUDA graph (training loops capture the loss
and its backward): capture succeeds (no host synchronisation on the hot path) and every replay
computes the loss and gradients of the data copied into the static inputs, against a float64
PyTorch oracle. Then, under ``torch.cuda.set_sync_debug_mode("error")``, forward + backward make no
synchronizing call at all (an upstream gradient of 1 and of 0.5: the scale is decided on the
device, targets are checked by a device-side assert). Needs a GPU (scripts/gpu-check runs this
module last); skipped elsewhere (tests/test_autograd.py checks the same code path on the CPU).
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import celoss
from conftest import AVAILABLE, lowp_error_bound

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or AVAILABLE["triton"] is not None,
                                reason="CUDA graphs need a GPU and the triton backend")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _capture(step):
    """Warm up ``step`` on a side stream (kernel compiles, allocations), then capture it; returns
    the graph and the static outputs the replays overwrite."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def _targets(n, v, seed, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.2] = ignore_index
    return t.cuda()


def _check(ours, oracle, lowp, margin):
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours.double(), oracle, rtol=1e-4, atol=1e-6)
    else:
        lowp_error_bound(ours, lowp, oracle, margin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_issue12_cross_entropy_graph_replays_new_data(dtype):
    n, v, smoothing, scale = 64, 5003, 0.1, 0.37  # two blocks, ignored rows, an upstream scale != 1
    x = torch.empty(n, v, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.empty(n, device="cuda", dtype=torch.int64)

    def step():
        x.grad = None
        loss = celoss.cross_entropy(x, y, label_smoothing=smoothing, backend="triton")
        (loss * scale).backward()
        return loss.detach(), x.grad

    with torch.no_grad():
        x.copy_(torch.randn(n, v, device="cuda") * 3)
        y.copy_(_targets(n, v, 0))
    graph, (loss, grad) = _capture(step)
    for seed in (1, 2):
        data = (torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3).cuda().to(dtype)
        target = _targets(n, v, seed)
        with torch.no_grad():
            x.copy_(data)
            y.copy_(target)
        graph.replay()
        torch.cuda.synchronize()
        ref_x = data.double().requires_grad_()
        ref = F.cross_entropy(ref_x, target, label_smoothing=smoothing)
        (ref * scale).backward()
        low_x = data.clone().requires_grad_()
        low = F.cross_entropy(low_x, target, label_smoothing=smoothing)
        (low * scale).backward()
        _check(loss, ref.detach(), low.detach(), 1e-2)
        _check(grad, ref_x.grad, low_x.grad, 1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_issue12_linear_cross_entropy_graph_replays_new_data(dtype):
    n, d, v = 96, 64, 3001
    x = torch.empty(n, d, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.empty(v, d, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.empty(n, device="cuda", dtype=torch.int64)

    def step():
        x.grad = w.grad = None
        loss = celoss.linear_cross_entropy(x, w, y, backend="triton")
        loss.backward()
        return loss.detach(), x.grad, w.grad

    with torch.no_grad():
        x.copy_(torch.randn(n, d, device="cuda"))
        w.copy_(torch.randn(v, d, device="cuda") * 0.1)
        y.copy_(_targets(n, v, 0))
    graph, (loss, gx, gw) = _capture(step)
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        xs = torch.randn(n, d, generator=gen).cuda().to(dtype)
        ws = (torch.randn(v, d, generator=gen) * 0.1).cuda().to(dtype)
        target = _targets(n, v, seed)
        with torch.no_grad():
            x.copy_(xs)
            w.copy_(ws)
            y.copy_(target)
        graph.replay()
        torch.cuda.synchronize()
        ref_in = [t.double().requires_grad_() for t in (xs, ws)]
        ref = F.cross_entropy(ref_in[0] @ ref_in[1].T, target)
        ref.backward()
        low_in = [t.clone().requires_grad_() for t in (xs, ws)]
        low = F.cross_entropy(F.linear(*low_in), target)
        low.backward()
        _check(loss, ref.detach(), low.detach(), 1e-2)
        _check(gx, ref_in[0].grad, low_in[0].grad, 2e-3)
        _check(gw, ref_in[1].grad, low_in[1].grad, 2e-3)


@contextlib.contextmanager
def _sync_is_an_error():
    """Any synchronizing CUDA call (``.item()``, ``bool(t)``, ``nonzero``, a blocking copy to the
    host, ...) raises inside the block."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _no_sync_step(step, check):
    """Warm up (kernel compiles, allocations), then run ``step`` with synchronization an error and
    ``check`` its result once the stream is drained."""
    step()
    with _sync_is_an_error():
        out = step()
    torch.cuda.synchronize()
    check(*out)


@pytest.mark.parametrize("scale", [1.0, 0.5], ids=["scale1", "scale0.5"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_issue12_cross_entropy_makes_no_synchronizing_call(dtype, scale):
    n, v, smoothing = 64, 5003, 0.1
    data = (torch.randn(n, v, generator=torch.Generator().manual_seed(3)) * 3).cuda().to(dtype)
    target = _targets(n, v, 3)
    x = data.clone().requires_grad_()

    def step():
        x.grad = None
        loss = celoss.cross_entropy(x, target, label_smoothing=smoothing, backend="triton")
        if scale == 1.0:
            loss.backward()  # the upstream gradient autograd creates: a launch, no pass over x.grad
        else:
            (loss * scale).backward()
        return loss.detach(), x.grad

    def check(loss, grad):
        ref_x = data.double().requires_grad_()
        ref = F.cross_entropy(ref_x, target, label_smoothing=smoothing)
        (ref * scale).backward()
        low_x = data.clone().requires_grad_()
        low = F.cross_entropy(low_x, target, label_smoothing=smoothing)
        (low * scale).backward()
        _check(loss, ref.detach(), low.detach(), 1e-2)
        _check(grad, ref_x.grad, low_x.grad, 1e-3)

    _no_sync_step(step, check)


@pytest.mark.parametrize("dtype", DTYPES)
def test_issue12_linear_cross_entropy_chunked_makes_no_synchronizing_call(dtype):
    n, d, v = 96, 64, 3001
    gen = torch.Generator().manual_seed(4)
    xs = torch.randn(n, d, generator=gen).cuda().to(dtype)
    ws = (torch.randn(v, d, generator=gen) * 0.1).cuda().to(dtype)
    target = _targets(n, v, 4)
    x, w = xs.clone().requires_grad_(), ws.clone().requires_grad_()

    def step():
        x.grad = w.grad = None
        loss = celoss.linear_cross_entropy(x, w, target, backend="triton", engine="chunked")
        (loss * 0.5).backward()
        return loss.detach(), x.grad, w.grad

    def check(loss, gx, gw):
        ref_in = [t.double().requires_grad_() for t in (xs, ws)]
        ref = F.cross_entropy(ref_in[0] @ ref_in[1].T, target)
        (ref * 0.5).backward()
        low_in = [t.clone().requires_grad_() for t in (xs, ws)]
        low = F.cross_entropy(F.linear(*low_in), target)
        (low * 0.5).backward()
        _check(loss, ref.detach(), low.detach(), 1e-2)
        _check(gx, ref_in[0].grad, low_in[0].grad, 2e-3)
        _check(gw, ref_in[1].grad, low_in[1].grad, 2e-3)

    _no_sync_step(step, check)
