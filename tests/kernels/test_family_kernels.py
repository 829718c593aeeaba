"""Triton kernels of the loss family (``celoss.kernels.distillation``, ``celoss.kernels.binary``):
launchers against the reference backend on small shapes (Triton's interpreter on CPU tensors, or
CUDA when triton was imported without it), and ahead-of-time compilation of the launch
configurations for sm_80 / sm_90a with Triton's own ptxas: no register spills.

The AOT cases are a selection, to keep the suite fast: every kind at its largest block with the
heaviest flags (class term at T != 1, per-row gradient coefficient), the configurations that
spilled before the block limits of ``kernels/distillation.py``, unaligned rows,
the binary kernel's heaviest variants. Wider sweeps (every flag combination of both kernels at
the largest blocks in bf16; the heaviest flags at every block in fp32 and bf16; every jsd
combination at 2048 in three dtype pairs) were run offline with the same helpers
(``aot.compile_many("plans", "distill_plan", cases)``).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import aot  # noqa: E402
import plans  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from celoss.backends import reference as rb  # noqa: E402
from celoss.kernels import binary as kb  # noqa: E402
from celoss.kernels import distillation as kd  # noqa: E402

INTERPRETED = type(kd._distill_kernel).__name__ == "InterpretedFunction"
DEVICE = "cpu" if INTERPRETED else "cuda"
needs_device = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                  reason="triton was imported without TRITON_INTERPRET=1 and there is no GPU")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
ARCHS = (80, 90)


def _rows(n, v, dtype, seed, scale=3.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale + offset).to(DEVICE, dtype)


# ---------------------------------------------------------------------------------------------
# distillation kernel vs the reference backend
# ---------------------------------------------------------------------------------------------

MODES = ("soft", "target_only", "hard_T1", "hard_T3")
DISTILL_CASES = [(v, kind, mode) for v in (1, 3, 1000) for kind in kd.KINDS for mode in MODES] + \
    [(2 * kd.MAX_BLOCK + 3, kind, "hard_T3") for kind in kd.KINDS]  # three blocks, the last ragged


@needs_device
@pytest.mark.parametrize("v,kind,mode", DISTILL_CASES, ids=[f"{k}-{m}-V{v}" for v, k, m in DISTILL_CASES])
def test_distill_kernel_matches_reference(v, kind, mode):
    n = 5
    s, t = _rows(n, v, torch.float32, 1), _rows(n, v, torch.bfloat16, 2, offset=1.0)
    y = None if mode == "soft" else torch.tensor([0, -100, v - 1, v // 2, 1 % v], device=DEVICE)
    temperature = 3.0 if mode == "hard_T3" else (1.0 if mode == "hard_T1" else 2.0)
    kw = dict(kind=kind, temperature=temperature, beta=0.3, alpha=0.4 if mode.startswith("hard") else 1.0,
              ignore_index=-100)
    coef = torch.rand(n, generator=torch.Generator().manual_seed(3)).to(DEVICE) + 0.5
    g = torch.full((n, v), float("nan"), device=DEVICE)  # every element must be written
    loss = kd.distill(s, t, y, coef, g, **kw)
    g_ref = torch.empty(n, v, dtype=torch.float64, device=DEVICE)
    loss_ref = rb.distill_fused(s.double(), t.double(), y, coef.double(), g_ref, None, **kw)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-7)
    if y is not None:
        assert loss[1] == 0 and (g[1] == 0).all()


@needs_device
def test_distill_kernel_scalar_coef_non_contiguous_grad_and_no_grad():
    s, t = _rows(4, 300, torch.float16, 4), _rows(4, 300, torch.float16, 5)
    loss_only = kd.distill(s, t, None, None, None, kind="jsd", temperature=2.0, beta=0.5)
    buf = torch.zeros(300, 4, dtype=torch.float16, device=DEVICE).t()  # column-major gradient
    loss = kd.distill(s, t, None, torch.full((1,), 0.5, device=DEVICE), buf, kind="jsd", temperature=2.0,
                      beta=0.5)
    torch.testing.assert_close(loss, loss_only, rtol=0, atol=0)
    g = torch.empty(4, 300, dtype=torch.float16, device=DEVICE)
    kd.distill(s, t, None, torch.full((1,), 0.5, device=DEVICE), g, kind="jsd", temperature=2.0, beta=0.5)
    torch.testing.assert_close(buf, g, rtol=0, atol=0)


def test_distill_block_configs():
    seen = {kd.block_config(v) for v in range(0, 20000, 7)} | {kd.block_config(2 ** k) for k in range(20)}
    assert seen == set(kd.BLOCK_CONFIGS)
    assert max(kd.block_config(v, "jsd")[0] for v in range(0, 20000, 7)) == kd.MAX_BLOCK_JSD
    for block, warps in kd.BLOCK_CONFIGS:
        assert block // (32 * warps) <= 8  # elements per thread and tensor


@needs_device
@pytest.mark.parametrize("kind", kd.KINDS)
@pytest.mark.parametrize("mode", ["soft", "hard_T3"])
def test_issue11_distill_kernel_nonfinite_and_ignored_rows(kind, mode):
    """Rows with a NaN / +inf / only -inf (student or teacher): NaN loss (0 if ignored) and NaN
    gradient everywhere in the row, as the reference (PyTorch's composition). Rows span two blocks
    so the flag must survive the online merge."""
    n, v = 6, kd.max_block(kind) + 7
    s, t = _rows(n, v, torch.float32, 11), _rows(n, v, torch.float16, 12)
    t[0, v - 2] = float("nan")
    s[1, 3] = float("inf")
    s[2] = -float("inf")
    t[3, 5] = float("inf")
    s[4, 1] = float("nan")  # row 4 is ignored below
    y = None if mode == "soft" else torch.tensor([0, 1, 2, 3, -100, v - 1], device=DEVICE)
    kw = dict(kind=kind, temperature=3.0 if y is not None else 2.0, beta=0.3, alpha=0.4 if y is not None else 1.0,
              ignore_index=-100)
    coef = torch.rand(n, generator=torch.Generator().manual_seed(3)).to(DEVICE) + 0.5
    g = torch.zeros(n, v, device=DEVICE)
    loss = kd.distill(s, t, y, coef, g, **kw)
    g_ref = torch.empty(n, v, dtype=torch.float64, device=DEVICE)
    loss_ref = rb.distill_fused(s.double(), t.double(), y, coef.double(), g_ref, None, **kw)
    assert loss[:4].isnan().all() and g[:5].isnan().all() and torch.isfinite(g[5]).all()
    assert loss[4].isnan() if y is None else loss[4] == 0
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-7, equal_nan=True)


@needs_device
@pytest.mark.parametrize("with_target", [False, True])
def test_issue11_distill_kernel_zero_classes(with_target):
    s = torch.zeros(3, 0, device=DEVICE)
    y = torch.full((3,), -100, device=DEVICE) if with_target else None
    g = torch.zeros(3, 0, device=DEVICE)
    loss = kd.distill(s, s, y, torch.ones(1, device=DEVICE), g, alpha=0.5 if with_target else 1.0)
    assert loss.shape == (3,) and (loss == 0).all()


# ---------------------------------------------------------------------------------------------
# binary kernel vs the reference backend
# ---------------------------------------------------------------------------------------------

@needs_device
@pytest.mark.parametrize("focal,weights", [(False, "none"), (False, "strided"), (True, "none")])
@pytest.mark.parametrize("upstream", ["scalar", "per_element"])
def test_binary_kernel_matches_reference(focal, weights, upstream):
    r, c = 7, 301  # 2107 elements: three programs, the last one ragged
    x = _rows(r, c, torch.bfloat16, 6, scale=4.0)
    y = torch.rand(r, c, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    w = pw = None
    if weights == "strided":
        w = (torch.rand(c) + 0.5).to(DEVICE).expand(r, c)                     # strides (0, 1)
        pw = (torch.rand(r, 1) * 3).to(DEVICE).expand(r, c)                   # strides (1, 0)
    coef = torch.full((1,), 0.25, device=DEVICE) if upstream == "scalar" else \
        torch.rand(r, c, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.float16)
    kw = dict(per_element=True, grad_input=True, grad_target=not focal, focal_alpha=0.25,
              focal_gamma=1.5 if focal else None)
    loss, partials, gx, gy = kb.binary(x, y, w, pw, coef, **kw)
    loss_ref, gx_ref, gy_ref = rb.binary_fused(x.double(), y.double(), w, pw, coef.double(), **kw)
    torch.testing.assert_close(partials.double().sum(), loss_ref.double().sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-2, atol=1e-2)  # loss stored in bf16
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-2, atol=1e-3)      # (truncated by the
    if gy is not None:                                                         # interpreter)
        torch.testing.assert_close(gy.double(), gy_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation: no spills
# ---------------------------------------------------------------------------------------------

def _distill_cases():
    heavy = {c["kind"]: c for c in plans.distill_cases(heaviest=True)}
    cases = [dict(student="bfloat16", teacher="bfloat16", block=kd.max_block(k), aligned=True, **heavy[k])
             for k in kd.KINDS]
    # configurations that spilled before the block limits (see kernels/distillation.py)
    cases.append(dict(student="bfloat16", teacher="bfloat16", block=kd.MAX_BLOCK_JSD, aligned=True, kind="jsd",
                      target=False, hard=False, t_is_one=True, grad="row"))
    cases.append(dict(student="bfloat16", teacher="bfloat16", block=kd.MAX_BLOCK, aligned=True,
                      **dict(heavy["reverse_kl"], grad="scalar")))
    cases.append(dict(student="float16", teacher="bfloat16", block=kd.MAX_BLOCK_JSD, aligned=False, **heavy["jsd"]))
    return cases


def _binary_cases():
    heavy = plans.binary_cases(heaviest=True)
    cases = [dict(dtype="bfloat16", target_dtype="float32", aligned=True, **heavy[-2])]  # BCE, w, pw, dy
    cases.append(dict(dtype="float16", target_dtype="float16", aligned=False, **heavy[-1]))  # focal
    return cases


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items() if v not in (False, None))


PLANS = {"distillation": "distill_plan", "binary": "binary_plan"}
CASES = [("distillation", c) for c in _distill_cases()] + [("binary", c) for c in _binary_cases()]


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for module, plan in PLANS.items():
        cases = [c for m, c in CASES if m == module]
        for c, res in zip(cases, aot.compile_many("plans", plan, cases, archs=ARCHS)):
            out[(module, _case_id(c))] = res
    return out


@pytest.mark.parametrize("module,case", CASES, ids=[f"{m}-{_case_id(c)}" for m, c in CASES])
def test_compiles_without_spills(compiled, module, case):
    for arch in ARCHS:
        usage = compiled[(module, _case_id(case))][arch]
        assert "error" not in usage, f"sm_{arch}: {usage.get('error')}"
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (arch, usage)
        assert usage["stack_frame"] == 0, (arch, usage)
        assert usage["registers"] <= 128, (arch, usage)
