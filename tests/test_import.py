"""``import celoss`` stays light (issue 15): Triton, transformers and torch._dynamo load only when used,
and importing the source folder instead of an installed package warns."""
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import backend_device, backend_params

import celoss
from celoss import _ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("triton", "transformers", "torch._dynamo", "torch._inductor")


def _python(code, **kwargs):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, **kwargs)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_import_loads_neither_triton_nor_transformers_nor_dynamo():
    proc = _python(f"""
        import json, sys
        import celoss
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """)
    assert json.loads(proc.stdout.splitlines()[-1]) == []
    assert "celoss" not in proc.stderr, proc.stderr  # no warning either


def test_importing_the_source_folder_without_its_kernels_warns():
    """As after a plain ``pip install .`` run from the checkout's root: only the standard path finders
    (no editable-install finder mapping celoss.kernels to kernels/), the checkout first on sys.path."""
    proc = _python(f"""
        import sys, warnings
        sys.meta_path[:] = [f for f in sys.meta_path
                            if getattr(f, "__module__", "") in ("_frozen_importlib", "_frozen_importlib_external")]
        sys.path.insert(0, {str(ROOT)!r})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import celoss
        assert celoss.available_backends()["cython"] is not None
        messages = [str(w.message) for w in caught if "source folder" in str(w.message)]
        assert len(messages) == 1 and "pip install -e ." in messages[0], messages
        print("warned")
    """)
    assert "warned" in proc.stdout


@pytest.mark.parametrize("backend", backend_params())
def test_issue15_first_loss_calls_do_not_import_dynamo(backend):
    """Eager calls run the custom ops' implementations directly: torch.library's kernel wrapper
    would import torch._dynamo (about 1.5 s) on the first call of each op."""
    device = backend_device(backend)
    proc = _python(f"""
        import json, sys
        import torch
        import celoss
        kw = dict(backend={backend!r})
        x = torch.randn(6, 10, device={device!r}, requires_grad=True)
        y = torch.randint(0, 10, (6,), device={device!r})
        h = torch.randn(2, 3, 4, device={device!r}, requires_grad=True)
        w = torch.randn(10, 4, device={device!r}, requires_grad=True)
        t = torch.randn(6, 10, device={device!r}, requires_grad=True)
        p = torch.rand(6, 10, device={device!r})
        losses = [
            celoss.cross_entropy(x, y, **kw),
            celoss.cross_entropy(x, y, reduction="none", **kw).sum(),
            celoss.cross_entropy(x * 1, y, inplace_backward=True, **kw),
            celoss.cross_entropy(x, p.softmax(1).requires_grad_(), **kw),
            celoss.linear_cross_entropy(h, w, y.reshape(2, 3), shift=True, **kw),
            celoss.binary_cross_entropy_with_logits(x, p, **kw),
            celoss.sigmoid_focal_loss(x, p, reduction="mean", **kw),
            celoss.distillation_loss(x, t, **kw),
            celoss.token_logprobs(x, y, **kw).sum(),
            celoss.linear_token_logprobs(h, w, y.reshape(2, 3), **kw).sum(),
            celoss.linear_distillation_loss(h, w, h * 2, w, **kw),
        ]
        sum(losses).backward()
        print(json.dumps([m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules]))
    """)
    assert json.loads(proc.stdout.splitlines()[-1]) == []


@pytest.mark.parametrize("backend", backend_params())
def test_issue15_eager_inplace_gradient_bumps_the_version(backend, monkeypatch):
    """The direct eager call of celoss::ce_forward_inplace bumps the overwritten logits' version as the
    dispatcher does, so autograd still refuses a graph that saved them (the compiled kernels write
    through pointers: the bump is all autograd sees)."""
    def dispatcher(*args, **kwargs):
        raise AssertionError("an eager call went through the dispatcher")

    monkeypatch.setattr(_ops.ce_forward_inplace, "_op", dispatcher)
    device = backend_device(backend)
    a = torch.randn(5, 7, device=device, requires_grad=True)
    y = torch.randint(0, 7, (5,), device=device)
    logits = a * 2  # non-leaf
    saved = logits.sin()  # saves the logits for its backward
    before = logits._version
    celoss.cross_entropy(logits, y, inplace_backward=True, backend=backend)
    assert logits._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_issue15_tracing_sees_the_custom_ops():
    """Under a dispatch mode (make_fx here, FakeTensor and torch.compile alike) the calls go through
    torch.ops.celoss: the graph holds the opaque ops, with fake shapes, not their implementations."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, y):
        return celoss.cross_entropy(x * 2, y, inplace_backward=True, backend="torch")

    x, y = torch.randn(4, 9, requires_grad=True), torch.randint(0, 9, (4,))
    for mode in ("real", "fake"):
        graph = make_fx(f, tracing_mode=mode)(x, y)
        targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
        assert "celoss.ce_forward_inplace.default" in targets, targets
        assert not any("log_softmax" in t for t in targets), targets  # not traced through
