"""The in-place upstream-scale kernel (kernels/scale.py; issue 12 B) called directly, against
PyTorch's ``grad * scale.to(grad.dtype)``: one scale (1, 0.5, 0, -2, NaN, inf, and one that rounds
in the gradient's dtype) and one per row, contiguous gradients and rows with a row stride (in-place
logits), several tiles per program (the grid-stride loop), gradients of one row and of none; and
its GPU compilation (sm_80 / sm_90, no spills, 128-bit accesses on aligned rows)."""
import math

import pytest
import torch

from conftest import AVAILABLE, backend_device

import aot
from celoss.kernels import scale as K

pytestmark = pytest.mark.skipif(AVAILABLE["triton"] is not None, reason=str(AVAILABLE["triton"]))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALES = [1.0, 0.5, 0.0, -2.0, math.nan, math.inf, -math.inf, 1 / 3]
DEVICE = backend_device("triton")


def _grad(dtype, shape=(3, 2 * K.BLOCK + 5), seed=0):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    g.view(-1)[:7] = 0  # inf * 0 and NaN * 0 are NaN
    return g.to(DEVICE)


def _assert_same(ours, expected, dtype):
    assert torch.equal(ours.isnan(), expected.isnan())
    ours, expected = ours.nan_to_num(0.0), expected.nan_to_num(0.0)
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        # Triton's interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest): one ulp
        # for the scale's cast and one for the product
        torch.testing.assert_close(ours, expected, rtol=2 * torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(ours, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_one_scale_matches_eager(dtype, scale):
    g = _grad(dtype)
    s = torch.tensor(scale, device=DEVICE)  # float32, as a float32 loss's upstream gradient
    expected = g * s.to(dtype)
    assert K.scale_(g, s) is g
    _assert_same(g, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_scale_of_one_leaves_the_gradient_untouched(dtype):
    """Bit for bit, NaN payloads and negative zeros included: nothing is read or written."""
    g = _grad(dtype)
    g.view(-1)[8] = -0.0
    g.view(-1)[9] = math.nan
    before = g.clone()
    K.scale_(g, torch.ones((), dtype=torch.float64, device=DEVICE))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(g.view(bits), before.view(bits))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "row_stride", "expanded_scale"])
def test_per_row_scales_match_eager(dtype, layout):
    rows = torch.tensor([1.0, 0.5, math.nan, -2.0, 0.0, math.inf, 1.0], device=DEVICE)
    n, c = rows.numel(), K.BLOCK + 3
    base = _grad(dtype, (n, c + 6), seed=1)
    g = base[:, 2:c + 2] if layout == "row_stride" else base[:, :c].contiguous()
    scale = torch.full((), 0.25, device=DEVICE).expand(n) if layout == "expanded_scale" else rows
    expected = g * scale.to(dtype)[:, None]
    untouched = base.clone()
    K.scale_(g, scale)
    _assert_same(g, expected, dtype)
    if layout == "row_stride":  # the columns around the rows are not written
        assert torch.equal(base[:, :2], untouched[:, :2]) and torch.equal(base[:, c + 2:], untouched[:, c + 2:])


@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (5,), (2, 3, 4)], ids=str)
def test_small_and_empty_gradients(shape):
    g = _grad(torch.float32, shape)
    expected = g * 3.0
    K.scale_(g, torch.tensor([3.0], device=DEVICE))
    assert torch.equal(g, expected)


def test_supports_only_what_the_kernel_takes():
    s = torch.ones((), device=DEVICE)
    assert K.supports(torch.empty(4, 6, device=DEVICE), s)
    assert not K.supports(torch.empty(4, 6, dtype=torch.float64, device=DEVICE), s)
    assert not K.supports(torch.empty(6, 4, device=DEVICE).T, s)  # column stride != 1
    assert not K.supports(torch.empty(4, 6, device=DEVICE), torch.ones(3, device=DEVICE))  # 3 scales, 4 rows
    assert K.supports(torch.empty(4, 6, device=DEVICE), torch.ones(4, device=DEVICE))


AOT_CASES = {f"{dtype}-{'row' if per_row else 'one'}-{'aligned' if aligned else 'unaligned'}":
             dict(dtype=dtype, per_row=per_row, aligned=aligned)
             for dtype in ("float32", "float16", "bfloat16") for per_row in (False, True) for aligned in (True, False)}


@pytest.fixture(scope="module")
def compiled():
    ids = list(AOT_CASES)
    return dict(zip(ids, aot.compile_many("plans", "scale_plan", [AOT_CASES[i] for i in ids], archs=(80, 90))))


@pytest.mark.parametrize("case_id", list(AOT_CASES))
def test_compiles_without_spills(compiled, case_id):
    for arch in (80, 90):
        usage = compiled[case_id][arch]
        assert "error" not in usage, f"sm_{arch}: {usage.get('error')}"
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0 and usage["stack_frame"] == 0, usage
        loops = usage["ptx_summary"]["loops"]
        assert loops and all(lp["bar_sync"] == 0 for lp in loops), loops  # the grid-stride loop, no barrier
        if AOT_CASES[case_id]["aligned"]:
            assert all(lp["loads_128"] >= 1 for lp in loops), loops  # 16 contiguous bytes per access
