"""The fused linear cross-entropy kernels compile for sm_80 (A100) and sm_90a (H100/H200) with
Triton's own ptxas, in fp32 / fp16 / bf16 (bf16 ``tl.dot`` can't be checked in the interpreter),
and spill no registers, in every launch configuration the launchers choose.

No GPU needed: ``tests/kernels/aot.py`` takes each launch plan (``plans.lce_plan``) on CPU stand-in tensors,
specializes it exactly like a launch would and compiles it in fresh processes (this process may run
under TRITON_INTERPRET=1, where nothing can be compiled), then reads ``ptxas -v``.

Cases: per dtype x alignment (16-byte aligned operands with D % 16 == 0 -> the large tiles;
anything else -> the small tiles) x size divisibility (M, V multiples of 16 or not), the flag
combination with the most live state; plus, in bf16, the lightest combination and the partial
gradient variants (dX only / dW only). Compiling every flag combination is too slow for the
suite; a sweep of all of them in bf16 (all 24 of the stats kernel, the 72 of the backward kernel
with a row map, aligned and unaligned: 192 plans, Triton 3.6.0) was run once with the same helpers
(``aot.compile_many("plans", "lce_plan", cases)``): no spills, at most 255 registers.
"""
import aot
import plans
import pytest
from plans import lce

ARCHS = (80, 90)
DTYPES = ("float32", "float16", "bfloat16")


def _case_id(c):
    flags = "+".join(k for k in sorted(c) if c[k] is True and k not in ("aligned", "round_sizes")) or "plain"
    return "-".join((c["kernel"], c["dtype"], "aligned" if c["aligned"] else "unaligned",
                     "round" if c["round_sizes"] else "odd", flags))


def _cases():
    cases = []
    for kernel in plans.LCE_KERNELS:
        heaviest = plans.lce_cases(kernel, heaviest=True)
        for dtype in DTYPES:
            for aligned in (True, False):
                for round_sizes in ((False,) if dtype == "float16" else (False, True)):
                    for flags in heaviest:
                        cases.append(dict(kernel=kernel, dtype=dtype, aligned=aligned, round_sizes=round_sizes,
                                          **flags))
        light = [c for c in plans.lce_cases(kernel) if not any(c.values())]
        partial = [c for c in plans.lce_cases(kernel) if (c.get("no_dx") or c.get("no_dw")) and c["src"]
                   and c["smoothing"] and c["softcap"] and c["bias"] and c["filter"] and c["weight"]]
        for flags in light + partial:
            for aligned in (True, False):
                cases.append(dict(kernel=kernel, dtype="bfloat16", aligned=aligned, round_sizes=False, **flags))
    return {_case_id(c): c for c in cases}


CASES = _cases()


@pytest.fixture(scope="module")
def compiled():
    ids = list(CASES)
    results = aot.compile_many("plans", "lce_plan", [CASES[i] for i in ids], archs=ARCHS, timeout=900)
    return dict(zip(ids, results))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case_id", list(CASES))
def test_compiles_without_spills(compiled, case_id):
    for arch, usage in compiled[case_id].items():
        assert "error" not in usage, f"sm_{arch}: {usage.get('error')}"
        assert usage["spill_bytes"] == 0, f"sm_{arch}: {usage}"
        assert usage["registers"] <= 255


def test_stand_ins_reach_both_configurations():
    """lce_plan's aligned / unaligned stand-ins select the large / small tiles of each kernel, so
    the cases above compile what launches use."""
    for kernel in plans.LCE_KERNELS:
        for aligned in (True, False):
            kwargs = plans.lce_plan(kernel, "bfloat16", aligned, bias=True)[2]
            operands = [kwargs["x_ptr"], kwargs["lw_ptr"], kwargs["b_ptr"]]
            if kernel == "backward":
                operands += [kwargs["dx_ptr"], kwargs["dw_ptr"]]
            assert lce._aligned(*operands) == aligned
