"""The hand-written AVX-512 cross-entropy row passes (cpu/ce_rows.h: ce_row_sums512, and for bf16
with AVX512-BF16 the recomputing, streaming pass 3 ce_grads_bf16_512) against the float64 oracle,
each case run on them and on the portable passes: chunk and vector tails, rows not aligned to 32
bytes (the streaming stores start at the first boundary), special values, scale, weights."""
import pytest
import torch

import celoss

cy = pytest.importorskip("celoss.backends.cython", reason="the compiled CPU extension is missing")

from conftest import avx512_rows as avx512_rows_of  # noqa: E402
from test_cpu_kernels import LOWP, check_against_composition  # noqa: E402


def avx512_rows(on):
    from celoss.cpu import _kernels
    return avx512_rows_of(_kernels, on)


def tolerances(dtype):
    """gradient (rtol, atol), loss (rtol, atol): a few roundings of the stored dtype"""
    if dtype == torch.float32:
        return (1e-5, 1e-7), (1e-5, 1e-5)
    u = LOWP[dtype]
    return (4 * u, 4 * u / 64), (4 * u, 4 * u)


ROWS = pytest.mark.parametrize("on", [True, False], ids=["avx512", "portable"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)


@ROWS
@DTYPES
@pytest.mark.parametrize("C", [1, 15, 16, 17, 33, 1023, 1025, 4099, 40000])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_rows_against_float64(on, dtype, C, scale):
    gen = torch.Generator().manual_seed(C)
    x = (torch.randn(6, C, generator=gen) * 4).to(dtype)
    y = torch.randint(0, C, (6,), generator=gen)
    y[2] = -100  # ignored row: zero gradient
    tol, loss_tol = tolerances(dtype)
    with avx512_rows(on):
        for reduction in ("none", "mean"):
            check_against_composition("cython", x, y, reduction, tol=tol, loss_tol=loss_tol,
                                      logit_scale=scale)


@ROWS
@DTYPES
@pytest.mark.parametrize("offset", [0, 1, 3, 7])
def test_unaligned_rows_in_place(on, dtype, offset):
    """inplace_backward on a view whose rows start anywhere: the gradient row is the logits row,
    so the streaming stores' head (up to the 32-byte boundary) and tail are both exercised, and
    nothing outside the view is touched."""
    gen = torch.Generator().manual_seed(offset)
    N, C = 5, 2053
    base = (torch.randn(N, C + 8, generator=gen) * 3).to(dtype)
    y = torch.randint(0, C, (N,), generator=gen)
    want = torch.nn.functional.cross_entropy(base[:, offset:offset + C].double(), y, reduction="sum")
    want_g = torch.softmax(base[:, offset:offset + C].double(), 1)
    want_g[torch.arange(N), y] -= 1
    with avx512_rows(on):
        src = base.clone().requires_grad_()
        buf = src * 1  # the logits a model's last op makes; the view's rows start at `offset`
        loss = celoss.cross_entropy(buf[:, offset:offset + C], y, reduction="sum",
                                    inplace_backward=True, backend="cython")
        loss.backward()
    tol, loss_tol = tolerances(dtype)
    torch.testing.assert_close(loss.detach().double(), want, rtol=loss_tol[0], atol=loss_tol[1])
    torch.testing.assert_close(src.grad[:, offset:offset + C].double(), want_g, rtol=tol[0], atol=tol[1])
    outside = torch.ones(N, C + 8, dtype=torch.bool)
    outside[:, offset:offset + C] = False
    assert torch.equal(buf.detach()[outside], base[outside])  # nothing written outside the view
    assert not src.grad[outside].any()


@ROWS
@DTYPES
def test_special_values(on, dtype):
    """NaN, +inf and -inf logits, chunks of -inf only, and logits far above the first chunk's:
    the same NaN pattern and values as PyTorch (float64 oracle)."""
    C = 3000
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, C, generator=gen).to(dtype)
    x[0, 5] = float("nan")
    x[1, 2999] = float("inf")
    x[2, :2048] = float("-inf")  # the first two chunks carry nothing
    x[3, :] = float("-inf")  # all -inf: NaN, as log_softmax
    x[4, 2500] = 200.0  # far above everything before it
    x[5, 0] = -1e30
    y = torch.tensor([1, 2, 2100, 3, 2500, 7, 9])
    tol, loss_tol = tolerances(dtype)
    with avx512_rows(on):
        check_against_composition("cython", x, y, "none", tol=tol, loss_tol=loss_tol)


@ROWS
def test_weights_and_upstream(on):
    gen = torch.Generator().manual_seed(9)
    C = 5000
    x = (torch.randn(8, C, generator=gen) * 2).bfloat16()
    y = torch.randint(0, C, (8,), generator=gen)
    w = torch.rand(C, generator=gen) * 2 - 0.5  # negative and zero class weights too
    w[y[0]] = 0.0
    tol, loss_tol = tolerances(torch.bfloat16)
    with avx512_rows(on):
        check_against_composition("cython", x, y, "none", tol=tol, loss_tol=loss_tol, weight=w)
        check_against_composition("cython", x, y, "sum", tol=tol, loss_tol=loss_tol, weight=w,
                                  logit_scale=1.3)
