"""celoss/_autograd.py and the upstream scale (``celoss::scale_``, issue 12 B): gradients formed in
forward are rescaled by the upstream gradient in place when the graph is freed, into new tensors
when it is kept (backward twice gives the same gradients), with PyTorch's rounding and IEEE
NaN / inf products, on the host side (CPU) and the device side (the triton kernel, under Triton's
interpreter here); and the triton path's forward + backward reads no tensor value on the host (what
synchronises a CUDA stream), checked by trapping every such read made from celoss's own code."""
import contextlib
import math
import os
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import celoss
from celoss import _autograd, _checks, _ops
from conftest import AVAILABLE, backend_params

TRITON = pytest.mark.skipif(AVAILABLE["triton"] is not None, reason=str(AVAILABLE["triton"]))
SCALES = [1.0, 0.5, 0.0, -2.0, math.nan, math.inf]
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def no_host_reads():
    """Raise on any read of a tensor's value into Python made by code of this project outside the
    tests (``bool(x == 1)``, ``.item()``, ``int(t[0])``, ...): each one waits for the CUDA stream."""
    def trap(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PROJECT) and not caller.startswith(os.path.join(PROJECT, "tests")):
                raise AssertionError(f"host read of a tensor value: Tensor.{name} from "
                                     f"{caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)
        return read

    with mock.patch.multiple(torch.Tensor, **{name: trap(name) for name in HOST_READS}):
        yield


@pytest.fixture
def device_side(monkeypatch):
    """CPU tensors decided as CUDA ones are (no host read; the triton kernels in the interpreter)."""
    monkeypatch.setattr(_checks, "device_side", lambda t, backend=None: True)


@pytest.fixture
def device_targets(monkeypatch):
    """Class-index targets checked as CUDA ones are (torch._assert_async, no host read), everything
    else by the real _checks.device_side: target_indices takes no backend, so on the CPU it names a
    bad target on the host whatever the backend (the upstream scale follows the loss's backend)."""
    real = _checks.device_side
    monkeypatch.setattr(_checks, "device_side",
                        lambda t, backend=None: real(t, backend) or not t.dtype.is_floating_point)


def _logits(n=6, c=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    y[2] = -100
    return x, y


# ----------------------------------------------------------------------------------------------
# upstream_scaled / celoss::scale_
# ----------------------------------------------------------------------------------------------

def _expected(g, scale):
    return g * torch.tensor(scale).to(g.dtype)


def _same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@pytest.mark.parametrize("backend", [pytest.param(None, id="host"), pytest.param("triton", id="device", marks=TRITON)])
@pytest.mark.parametrize("scale", SCALES, ids=str)
@pytest.mark.parametrize("keep_graph", [False, True], ids=["freed", "kept"])
def test_upstream_scaled(backend, scale, keep_graph):
    """Freed graph: the saved gradients themselves, scaled in place. Kept graph: new tensors (the
    saved ones intact), except the saved ones for a host-side scale of 1."""
    g = torch.randn(5, 4099, generator=torch.Generator().manual_seed(1))
    g[0, :3] = 0
    saved, expected = g.clone(), _expected(g, scale)
    with mock.patch.object(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: keep_graph):
        out, none = _autograd.upstream_scaled((g, None), torch.tensor(scale), backend)
    assert none is None and _same(out, expected)
    if not keep_graph:
        assert out is g
    elif scale == 1.0 and backend is None:
        assert out is g
    else:
        assert out is not g and torch.equal(g, saved)


@pytest.mark.parametrize("backend", [pytest.param(None, id="host"), pytest.param("triton", id="device", marks=TRITON)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])  # (bf16: the interpreter truncates)
def test_scale_op_per_row_and_strided_rows(backend, dtype):
    base = torch.randn(4, 700, generator=torch.Generator().manual_seed(2)).to(dtype)
    g = base[:, 3:603]
    rows = torch.tensor([1.0, 0.5, math.nan, -3.0])
    expected = g * rows.to(dtype)[:, None]
    _ops.scale_(g, rows, backend)
    assert _same(g, expected)


def test_scale_op_is_traceable():
    """celoss::scale_ is an op of its own in a make_fx graph (torch.compile sees the same)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(g, s):
        g = g.clone()
        _ops.scale_(g, s)
        return g

    graph = make_fx(step, tracing_mode="fake")(torch.randn(3, 5), torch.tensor(0.5))
    assert "celoss.scale_" in graph.code
    g = torch.randn(3, 5)
    assert torch.equal(graph(g, torch.tensor(0.5)), g * 0.5)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_cross_entropy_backward_twice_with_retain_graph(backend, scale):
    """The first backward keeps the graph: the second one sees the saved gradient intact; both equal
    the gradient of a plain backward (which scales in place) and, where the scale is finite,
    PyTorch's."""
    x, y = _logits()
    xa = x.clone().requires_grad_()
    loss = celoss.cross_entropy(xa, y, backend=backend)
    up = torch.tensor(scale)
    first, = torch.autograd.grad(loss, xa, up, retain_graph=True)
    second, = torch.autograd.grad(loss, xa, up)
    xb = x.clone().requires_grad_()
    celoss.cross_entropy(xb, y, backend=backend).backward(up)
    assert _same(first, second) and _same(first, xb.grad)
    if math.isfinite(scale):
        xe = x.clone().requires_grad_()
        F.cross_entropy(xe, y).backward(up)
        torch.testing.assert_close(first, xe.grad, rtol=1e-5, atol=1e-7)


@TRITON
@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_cross_entropy_device_side_scale_matches_host_side(scale):
    """The kernel's product (the triton backend scales on the device side, CPU tensors included) is
    PyTorch's (the host side's) bit for bit, NaN / inf included."""
    x, y = _logits()
    grads = []
    for host in (False, True):
        xa = x.clone().requires_grad_()
        with contextlib.ExitStack() as stack:
            if host:
                stack.enter_context(mock.patch.object(_checks, "device_side", lambda t, backend=None: False))
            celoss.cross_entropy(xa, y, backend="triton").backward(torch.tensor(scale))
        grads.append(xa.grad)
    assert _same(*grads)


# ----------------------------------------------------------------------------------------------
# No host synchronisation on the triton path
# ----------------------------------------------------------------------------------------------

def test_the_trap_catches_a_host_read_of_the_scale():
    """The guard below is a real check: celoss's former ``bool(scale == 1)`` fails it."""
    with no_host_reads(), pytest.raises(AssertionError, match="host read of a tensor value"):
        exec(compile("bool(torch.ones(()) == 1)", os.path.join(PROJECT, "celoss", "_autograd.py"), "exec"))


@TRITON
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scale", [1.0, 0.5], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
def test_cross_entropy_triton_path_reads_nothing_on_the_host(device_targets, reduction, scale, inplace):
    """The real path of the upstream scale: cross_entropy's backward passes its backend on (without
    it the host-side ``bool(scale == 1)`` would trip the trap)."""
    x, y = _logits()
    xa = x.clone().requires_grad_()
    with no_host_reads():
        logits = xa * 1.0 if inplace else xa
        loss = celoss.cross_entropy(logits, y, reduction=reduction, backend="triton", inplace_backward=inplace)
        loss.backward(torch.full_like(loss, scale))
    xe = x.clone().requires_grad_()
    F.cross_entropy(xe, y, reduction=reduction).backward(torch.full_like(loss, scale))
    torch.testing.assert_close(xa.grad, xe.grad, rtol=1e-5, atol=1e-7)


@TRITON
@pytest.mark.parametrize("scale", [1.0, 0.5], ids=str)
def test_loss_family_triton_path_reads_nothing_on_the_host(scale):
    """binary CE and distillation rescale through _autograd.loss_backward on ctx.backend."""
    x, y = _logits(c=40)
    t = torch.randn(6, 40)
    bx = (x.clone() / 3).requires_grad_()
    sx = x.clone().requires_grad_()
    with no_host_reads():
        (celoss.binary_cross_entropy_with_logits(bx, torch.sigmoid(t), backend="triton") * scale).backward()
        (celoss.distillation_loss(sx, t, backend="triton") * scale).backward()
    assert bx.grad.isfinite().all() and sx.grad.isfinite().all()


@TRITON
def test_linear_cross_entropy_triton_path_reads_nothing_on_the_host(device_side):
    x, y = _logits(c=300)
    h = torch.randn(6, 16, requires_grad=True)
    w = (torch.randn(300, 16) * 0.1).requires_grad_()
    with no_host_reads():
        (celoss.linear_cross_entropy(h, w, y, backend="triton") * 0.5).backward()
