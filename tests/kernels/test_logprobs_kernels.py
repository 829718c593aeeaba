"""The token log-prob row kernels (issue 14 item 2) called directly: the OpenMP kernel of
cpu/logprobs.h and the Triton kernels of kernels/logprobs.py (interpreter here) vs the plain-PyTorch
reference rows of celoss/logprobs.py, which tests/test_logprobs.py checks against the float64
oracle. Online merging across CPU chunks (1024) and Triton blocks (4096), in-place backward,
strided rows, guarded reads, and the Triton kernels' GPU compilation (no spills)."""
import math

import pytest
import torch

from conftest import AVAILABLE, backend_device

import celoss.logprobs as L

try:
    from celoss.cpu import _logprobs as CPU
except ImportError:  # the extension is not built: the CPU cases skip
    CPU = None
import aot
from celoss.kernels import logprobs as K

SKIP = {"cython": pytest.mark.skipif(CPU is None, reason="celoss.cpu._logprobs not built"),
        "triton": pytest.mark.skipif(AVAILABLE["triton"] is not None, reason=str(AVAILABLE["triton"]))}
KERNELS = [pytest.param(k, marks=SKIP[k]) for k in SKIP]
DTYPES = {"cython": [torch.float32, torch.float64, torch.float16, torch.bfloat16],
          "triton": [torch.float32, torch.float16, torch.bfloat16]}  # (float64 runs the reference)
KERNEL_DTYPES = [pytest.param(k, d, marks=SKIP[k], id=f"{k}-{str(d)[6:]}") for k in SKIP for d in DTYPES[k]]


def _rows(kernel, n, v, dtype, seed=0, row_stride=None):
    g = torch.Generator().manual_seed(seed)
    width = row_stride or v
    x = (torch.randn(n, width, generator=g) * 4).to(dtype).to(backend_device(kernel))[:, :v]
    y = torch.randint(0, v, (n,), generator=g).to(x.device)
    return x, y


def _tol(dtype):
    return 1e-12 if dtype == torch.float64 else 3e-6


def _ref_grad(x, y, lse, ent, gl, gh, scale):
    g = torch.empty_like(x, memory_format=torch.contiguous_format)
    L._reference_backward(x, y, lse, ent, gl, gh, g, -100, scale)
    return g


@pytest.mark.parametrize("kernel,dtype", KERNEL_DTYPES)
def test_kernels_match_the_reference_rows(kernel, dtype):
    """Rows spanning several CPU chunks and Triton blocks with the max in the first, a middle and
    the last chunk, a chunk of -inf, an ignored row, strided rows; backward with and without the
    entropy term, with and without the log-prob term."""
    v = 4500
    x, y = _rows(kernel, 5, v, dtype, row_stride=4608)
    x[0, 3] = 16
    x[1, 2500] = 16
    x[2, 4490] = 16
    x[3, 1024:3000] = -math.inf
    y[3] = 10
    y[4] = -100
    scale = 1 / 0.7
    out = L._rows_forward(kernel, x, y, -100, scale)
    ref = L._reference_forward(x, y, -100, scale)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc
    assert (out - ref).abs().max() <= _tol(dtype) * (1 + ref.abs().max())
    assert (out[4] == 0).all()
    lse, ent = out[:, 2].contiguous(), out[:, 1].contiguous()
    gen = torch.Generator().manual_seed(1)
    gl, gh = (torch.randn(5, generator=gen).to(acc).to(x.device) for _ in range(2))
    for a, b in ((gl, gh), (gl, None), (None, gh)):
        g = torch.empty_like(x, memory_format=torch.contiguous_format)
        L._rows_backward(kernel, x, y, lse, ent, a, b, g, -100, scale)
        r = _ref_grad(x, y, lse, ent, a, b, scale)
        assert g.dtype == dtype
        bound = (torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else _tol(dtype)) \
            * (1 + r.double().abs().max())
        assert (g.double() - r.double()).abs().max() <= bound
        assert (g[4] == 0).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_backward_in_place_overwrites_the_logits(kernel):
    x, y = _rows(kernel, 4, 300, torch.float32, seed=2)
    out = L._rows_forward(kernel, x, y, -100, 1.0)
    lse, ent = out[:, 2].contiguous(), out[:, 1].contiguous()
    gl = torch.rand(4, device=x.device)
    gh = torch.rand(4, device=x.device)
    expected = _ref_grad(x, y, lse, ent, gl, gh, 1.0)
    buf = x.clone()
    L._rows_backward(kernel, buf, y, lse, ent, gl, gh, buf, -100, 1.0)
    assert (buf - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("kernel", KERNELS)
def test_out_of_range_token_gives_a_nan_row_not_a_stray_read(kernel):
    """The host check raises first; a kernel called without it (CUDA-graph capture) never reads
    outside the row: NaN log-prob and entropy for that row, the others unaffected."""
    x, y = _rows(kernel, 3, 50, torch.float32, seed=3)
    y[1] = 1 << 40
    out = L._rows_forward(kernel, x, y, -100, 1.0)
    assert out[1, :2].isnan().all()
    ref = L._reference_forward(x[[0, 2]], y[[0, 2]], -100, 1.0)
    assert torch.allclose(out[[0, 2]], ref, atol=1e-5)


def test_cpu_kernel_rejects_an_unknown_dtype_code():
    if CPU is None:
        pytest.skip("celoss.cpu._logprobs not built")
    with pytest.raises(ValueError, match="dtype code"):
        CPU.forward(7, 0, 1, 0, 1, 0, -100, 1.0, 0, 1)


# ------------------------------------------------------------------------------------------------
# GPU compilation of the Triton kernels (sm_80, sm_90a), without a GPU
# ------------------------------------------------------------------------------------------------

AOT_CASES = {
    "forward-bfloat16-4096": dict(kernel="forward", dtype="bfloat16", block=4096),
    "forward-float32-4096": dict(kernel="forward", dtype="float32", block=4096),
    "forward-float16-64": dict(kernel="forward", dtype="float16", block=64),
    "backward-bfloat16-4096-both": dict(kernel="backward", dtype="bfloat16", block=4096),
    "backward-float32-4096-both": dict(kernel="backward", dtype="float32", block=4096),
    "backward-float16-512-entropy-only": dict(kernel="backward", dtype="float16", block=512, has_gl=False),
    "backward-float32-1024-logprobs-only": dict(kernel="backward", dtype="float32", block=1024, has_entropy=False),
}


@pytest.fixture(scope="module")
def compiled():
    ids = list(AOT_CASES)
    return dict(zip(ids, aot.compile_many("plans", "logprobs_plan", [AOT_CASES[i] for i in ids], archs=(80, 90))))


@pytest.mark.parametrize("case_id", list(AOT_CASES))
def test_triton_kernels_compile_without_spills(compiled, case_id):
    for arch in (80, 90):
        usage = compiled[case_id][arch]
        assert "error" not in usage, f"sm_{arch}: {usage.get('error')}"
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0 and usage["stack_frame"] == 0, usage
        assert usage["registers"] <= K.MAXNREG, usage
