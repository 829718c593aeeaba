"""Shared test set-up: every backend that can run here, with the device it runs on.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; the variable must be set
before any module defining @triton.jit kernels is imported, hence here at the top.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import celoss  # noqa: E402

AVAILABLE = celoss.available_backends()


def backend_device(name: str) -> str:
    return "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"


def backend_params(*names):
    """pytest params for the given backends (all by default), skipped with the reason if unavailable."""
    return [pytest.param(n, marks=pytest.mark.skipif(AVAILABLE[n] is not None, reason=str(AVAILABLE[n])), id=n)
            for n in (names or tuple(AVAILABLE))]


def lowp_error_bound(ours: torch.Tensor, torch_lowp: torch.Tensor, oracle: torch.Tensor, margin: float):
    """A low-precision result must be no worse than PyTorch's own low-precision result plus a margin."""
    err = (ours.double() - oracle).abs().max().item()
    ref = (torch_lowp.double() - oracle).abs().max().item()
    assert err <= ref + margin * (1 + oracle.abs().max().item()), (err, ref)


def lowp_margin(backend: str, dtype: torch.dtype, margin: float = 1e-3) -> float:
    """The margin of ``lowp_error_bound``. Triton's interpreter truncates float32 -> bfloat16 stores
    (a GPU rounds to nearest): allow one bf16 ulp there instead of the usual margin."""
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        return max(margin, torch.finfo(dtype).eps)
    return margin


def against_oracle(ours, oracle, *inputs, wrt=None, upstream_seed=1):
    """Run ``ours`` on ``inputs`` and ``oracle`` on float64 copies of those in ``wrt`` (indices; all by
    default; the others are passed to both unchanged), then backpropagate the same non-trivial upstream
    gradient (uniform in [0.5, 1.5), rounded to the loss dtype) through both.

    Returns (loss, oracle loss, grads, oracle grads); the grads are w.r.t. the inputs in ``wrt``, a
    tensor each when there is one such input, else tuples.
    """
    wrt = range(len(inputs)) if wrt is None else wrt
    xa, xb = list(inputs), list(inputs)
    for i in wrt:
        xa[i] = inputs[i].detach().clone().requires_grad_()
        xb[i] = inputs[i].detach().double().requires_grad_()
    a, b = ours(*xa), oracle(*xb)
    up = _upstream(b, a.dtype, upstream_seed)
    ga = torch.autograd.grad(a, [xa[i] for i in wrt], up)
    gb = torch.autograd.grad(b, [xb[i] for i in wrt], up.double())
    return (a, b) + ((ga[0], gb[0]) if len(ga) == 1 else (ga, gb))


def _upstream(like, dtype, seed):
    up = torch.rand(like.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (up + 0.5).to(device=like.device, dtype=dtype)


def lowp_against_oracle(ours, oracle, *inputs, margin, lowp=None, wrt=None):
    """``against_oracle``, then ``lowp_error_bound`` on the loss and every gradient: the bar is ``lowp``
    (default ``oracle``) run on the inputs in their own dtypes (PyTorch's own low-precision result)
    with the same upstream gradient. Returns what ``against_oracle`` returns."""
    result = against_oracle(ours, oracle, *inputs, wrt=wrt)
    a, b, ga, gb = result
    wrt = range(len(inputs)) if wrt is None else wrt
    xs = list(inputs)
    for i in wrt:
        xs[i] = inputs[i].detach().clone().requires_grad_()
    lp = (lowp or oracle)(*xs)
    gp = torch.autograd.grad(lp, [xs[i] for i in wrt], _upstream(lp, lp.dtype, 1))
    lowp_error_bound(a, lp, b, margin)
    for u, p, v in zip(ga if isinstance(ga, tuple) else (ga,), gp, gb if isinstance(gb, tuple) else (gb,)):
        lowp_error_bound(u, p, v, margin)
    return result


def assert_close_to_oracle(a, b, ga, gb, *, rtol=1e-5, atol=1e-5, grad_atol=1e-6, equal_nan=False):
    """The loss ``a`` and gradients ``ga`` of ``against_oracle`` against the oracle's ``b`` / ``gb``: the
    loss within (rtol, atol), every gradient (a tensor or a tuple of them) within (rtol, grad_atol)."""
    torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, equal_nan=equal_nan)
    for u, v in zip(*((ga, gb) if isinstance(ga, tuple) else ((ga,), (gb,)))):
        torch.testing.assert_close(u.double(), v, rtol=rtol, atol=grad_atol, equal_nan=equal_nan)


def make_data(shape, device="cpu", dtype=torch.float32, *, seed=0, scale=3.0, targets="class", class_dim=1,
              ignore_frac=0.25, teacher=False, class_weight=False):
    """Seeded inputs of the loss tests: logits ~ N(0, scale**2) of ``shape`` in ``dtype`` on ``device``;
    with ``teacher`` a second set shifted by 0.5 (a teacher that differs from its student); then the
    targets; then, with ``class_weight``, class weights in [0.1, 1.1).

    ``targets``: "class", indices over ``class_dim`` with a fraction ``ignore_frac`` of them -100 (at least
    one when ``ignore_frac`` > 0 and there are several: the ignored path always runs); "labels", binary
    labels in [0, 1] of the logits' shape and dtype, every third one along the last dim hard; "hard",
    labels 0 or 1.
    """
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)]
    if teacher:
        out.append((torch.randn(shape, generator=g) * scale + 0.5).to(device=device, dtype=dtype))
    dim = class_dim % len(shape) if shape else 0
    c = shape[dim] if shape else 1
    if targets == "class":
        t = torch.randint(0, c, shape[:dim] + shape[dim + 1:], generator=g)
        if ignore_frac > 0 and t.numel() > 1:
            t.view(-1)[torch.rand(t.numel(), generator=g) < ignore_frac] = -100
            t.view(-1)[0] = -100
        out.append(t.to(device))
    elif targets in ("labels", "hard"):
        y = torch.rand(shape, generator=g)
        if targets == "hard":
            y = (y > 0.7).float()
        elif y.dim():
            y[..., ::3] = (y[..., ::3] > 0.5).float()
        out.append(y.to(device=device, dtype=dtype))
    if class_weight:
        out.append((torch.rand(c, generator=g) + 0.1).to(device))
    return tuple(out) if len(out) > 1 else out[0]


@contextlib.contextmanager
def avx512_rows(module, on):
    """A compiled CPU module's hand-written AVX-512 loops (on) or its portable ones (each extension
    module has its own switch, ``use_avx512_rows``); skips when on is asked for and the CPU lacks
    AVX-512 (F, BW, DQ, VL)."""
    before = module.use_avx512_rows()
    try:
        if module.use_avx512_rows(on) != on:
            pytest.skip("this CPU has no AVX-512 (F, BW, DQ, VL)")
        yield
    finally:
        module.use_avx512_rows(before)
