"""Shared test set-up: every backend that can run here, with the device it runs on.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; the variable must be set
before any module defining @triton.jit kernels is imported, hence here at the top.
"""
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
    up = torch.rand(b.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
    up = (up + 0.5).to(device=b.device, dtype=a.dtype)
    ga = torch.autograd.grad(a, [xa[i] for i in wrt], up)
    gb = torch.autograd.grad(b, [xb[i] for i in wrt], up.double())
    return (a, b) + ((ga[0], gb[0]) if len(ga) == 1 else (ga, gb))
