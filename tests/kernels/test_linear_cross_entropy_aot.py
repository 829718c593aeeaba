"""The fused linear cross-entropy kernels compile for sm_80 (A100) and sm_90a (H100/H200) with
Triton's own ptxas, in fp32 / fp16 / bf16 (bf16 ``tl.dot`` can't be checked in the interpreter),
and spill no registers, in every launch configuration the launchers choose.

No GPU needed: ``tests/kernels/aot.py`` takes each launch plan (``plans.lce_plan``) on CPU stand-in tensors,
specializes it exactly like a launch would and compiles it in fresh processes (this process may run
under TRITON_INTERPRET=1, where nothing can be compiled), then reads ``ptxas -v``.

Cases: per kernel (stats, backward dX, backward dW) x dtype x alignment (16-byte aligned operands
with D % 16 == 0 -> the large tiles; anything else -> the small tiles) x size divisibility (M, V
multiples of 16 or not), the flag combination with the most live state; plus, in bf16, the lightest
combination and the dW kernel computing db only. Compiling every flag combination is too slow for
the suite.

Issue 12 A: the backward kernels own their dX / dW / db blocks, updated by plain read-modify-writes
(no ``atom.global``/``red.global`` at all) and, in fp16 / bf16, multiply on tensor cores (``wgmma``
on sm_90, ``mma.sync`` on sm_80).
"""
import aot
import plans
import pytest
import torch
from plans import lce

ARCHS = (80, 90)
DTYPES = ("float32", "float16", "bfloat16")


def _case_id(c):
    flags = "+".join(k for k in sorted(c) if c[k] is True and k not in ("aligned", "round_sizes")) or "plain"
    return "-".join((f"sm{c['arch']}", c["kernel"], c["dtype"], "aligned" if c["aligned"] else "unaligned",
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
        partial = [c for c in plans.lce_cases(kernel) if c.get("no_dw") and c["src"]
                   and c["smoothing"] and c["softcap"] and c["bias"] and c["filter"] and c["weight"]]
        for flags in light + partial:
            for aligned in (True, False):
                cases.append(dict(kernel=kernel, dtype="bfloat16", aligned=aligned, round_sizes=False, **flags))
    # each compiled for its own arch: the launchers pick the tiles by compute capability
    cases = [dict(c, arch=arch) for c in cases for arch in ARCHS]
    return {_case_id(c): c for c in cases}


CASES = _cases()


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for arch in ARCHS:
        ids = [i for i in CASES if CASES[i]["arch"] == arch]
        results = aot.compile_many("plans", "lce_plan", [CASES[i] for i in ids], archs=(arch,), timeout=900)
        out.update(zip(ids, results))
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case_id", list(CASES))
def test_compiles_without_spills(compiled, case_id):
    for arch, usage in compiled[case_id].items():
        assert "error" not in usage, f"sm_{arch}: {usage.get('error')}"
        assert usage["spill_bytes"] == 0, f"sm_{arch}: {usage}"
        assert usage["registers"] <= 255


def test_stand_ins_reach_both_configurations():
    """lce_plan's aligned / unaligned stand-ins select the large / small tiles of each kernel, and
    their D is wide enough for the table's widest BLOCK_N, so the cases above compile what launches
    use."""
    for kernel in plans.LCE_KERNELS:
        for aligned in (True, False):
            kwargs = plans.lce_plan(kernel, "bfloat16", aligned, bias=True)[2]
            operands = [kwargs["x_ptr"], kwargs["lw_ptr"], kwargs["b_ptr"]]
            operands += [kwargs[k] for k in ("dx_ptr", "dw_ptr") if kwargs.get(k) is not None]
            assert lce._aligned(*operands) == aligned
            if kernel != "stats":
                tables = (lce.BACKWARD_CONFIGS, lce.HOPPER_BACKWARD_CONFIGS)
                assert kwargs["D"] >= max(c["BLOCK_N"] for t in tables for c in t.values())


@pytest.mark.parametrize("case_id", list(CASES))
def test_issue12_fused_kernels_have_no_global_atomics(compiled, case_id):
    """Each dX / dW / db block has one owner program (and the statistics one writer per row and
    split): no atomic accumulation anywhere (issue 12 A: the former backward added every 64 x 64
    tile into dX and dW with atom.global)."""
    for arch, usage in compiled[case_id].items():
        assert "error" not in usage, f"sm_{arch}: {usage.get('error')}"
        assert usage["ptx_summary"]["atomics"] == 0, f"sm_{arch}: {usage['ptx_summary']}"


@pytest.mark.parametrize("case_id", [i for i in CASES if CASES[i]["dtype"] != "float32"])
def test_issue12_lowp_fused_kernels_use_tensor_cores(compiled, case_id):
    for arch, usage in compiled[case_id].items():
        ptx = usage["ptx_summary"]
        assert ptx["wgmma" if arch >= 90 else "mma"] > 0, (arch, ptx)


def test_issue12_lowp_backward_tiles(monkeypatch):
    """16-bit aligned tiles: the owned dX / dW blocks are updated >= 64 columns of D at a time, 3
    pipeline stages; gradient tiles of 128 x 128 for dX on sm_90 (64 x 128 on sm_80, where 128 x 128
    spills) and 128 x 64 for dW (128 x 128 spills on both) -- the largest that do not spill with every
    flag on; the read-modify-write of an owned block is amortized over a product whose K (GROUP x
    BLOCK_V for dX, GROUP x BLOCK_M for dW) is >= 1024, so its float32 traffic is <= 1/512 byte per
    flop (see the module's "Backward")."""
    monkeypatch.setattr(lce, "_interpreting", lambda: False)  # the GPU tables, not the interpreter's tiles
    for arch, kernel, k_side, tile in ((90, "dx", "BLOCK_V", 128 * 128), (80, "dx", "BLOCK_V", 64 * 128),
                                       (90, "dw", "BLOCK_M", 128 * 64), (80, "dw", "BLOCK_M", 128 * 64)):
        cfg = lce.backward_configs(torch.bfloat16, 4096, aligned=True, arch=arch)[kernel]
        assert cfg["BLOCK_N"] >= 64 and cfg["num_stages"] >= 3
        assert cfg["BLOCK_M"] * cfg["BLOCK_V"] >= tile
        assert cfg["GROUP"] * cfg[k_side] >= 1024
        assert cfg[k_side] % cfg["BLOCK_K"] == 0


def test_issue12_lowp_stats_tiles():
    """16-bit aligned statistics: 128 x 128 logit tiles, 3 pipeline stages (255 registers, no
    spills on sm_80 / sm_90 with every flag on; see the table in benchmarks/kernel_resources.md)."""
    cfg = lce.STATS_CONFIGS["lowp", True]
    assert cfg["BLOCK_M"] >= 128 and cfg["BLOCK_V"] >= 128 and cfg["num_stages"] >= 3
