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
