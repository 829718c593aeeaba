"""Every cross-entropy kernel configuration the launchers can choose compiles for sm_80 (A100) and
sm_90a (H100/H200) with Triton's own ptxas, and spills no registers.

No GPU needed: ``tests/kernels/aot.py`` takes each launch plan of the registry ``tests/kernels/plans.py``
(CPU stand-in tensors), specializes it
exactly like a launch would (pointer dtypes, 16-byte divisibility, ints == 1 / None turned into
constexprs), compiles it with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` in fresh
processes (this process may run under TRITON_INTERPRET=1, where nothing can be compiled) and reads
``ptxas -v``.

Configurations: the launchers choose kernel x flags x dtype x (BLOCK, num_warps) x alignment, 2988
plans in all (the split-vocabulary mode at MAX_BLOCK only, rows of one block are never split, and
with all options off or all on: it changes pass 1 and the range of pass 2 alike for every option).
The full product (2856 plans before the split mode) was compiled offline with these helpers (no
spills, at most 128 registers: fp32, unaligned rows, fused with class weights + smoothing) and
runs with CELOSS_AOT_FULL=1. By default, a covering subset (186 plans, both archs):
* every flag combination of every kernel at the largest block (MAX_BLOCK = 4096, 8 warps) in
  fp32 with unaligned rows (odd C and row stride, pointer off the 16-byte grid: unvectorized
  loads, the most registers in the full sweep) and in bf16 with aligned rows (the common case);
* the heaviest flag combination of each kernel at every other (BLOCK, num_warps), each with a
  different (dtype, alignment) pair, so every block, dtype and alignment appears.

Issue 12 C, static performance gates on the same compiles (PTX read by ``aot.ptx_summary``): in
the CE kernels' loops at most 2 block barriers per iteration and 128-bit global loads wherever a
thread holds 16 contiguous bytes; the 16-bit fused linear-CE kernels on tensor cores (``wgmma`` on
sm_90, ``mma`` on sm_80); no global atomics in the kernels the default linear-CE path launches.
Registers, shared memory and occupancy per kernel: benchmarks/kernel_resources.md, written by
``python tests/kernels/aot.py --table benchmarks/kernel_resources.md``.
"""
import os

import aot
import plans
import pytest
from plans import ce

ARCHS = (80, 90)  # A100; H100 / H200 (sm_90a)
DTYPES = ("float32", "float16", "bfloat16")
FULL = os.environ.get("CELOSS_AOT_FULL") == "1"


def _case_id(case):
    flags = "+".join(k for k in ("weight", "smoothing", "softcap", "soft_target", "focal", "split", "exclude_target")
                     if case.get(k))
    grad = f"grad={case['grad']}" if case.get("grad") else ""
    return "-".join(x for x in (case["kernel"], case["dtype"], str(case["block"]),
                                "aligned" if case["aligned"] else "unaligned", flags or "plain", grad) if x)


def _cases():
    cases = []
    blocks = [b for b, _ in ce.BLOCK_CONFIGS]
    variants = [("float32", False), ("float16", True), ("bfloat16", False), ("float16", False),
                ("bfloat16", True), ("float32", True)]
    for kernel in plans.CE_KERNELS:
        if FULL:
            for flags in plans.ce_cases(kernel):
                for dtype in DTYPES:
                    for block in (blocks if not flags.get("split") else [ce.MAX_BLOCK]):
                        for aligned in (True, False):
                            cases.append(dict(kernel=kernel, dtype=dtype, block=block, aligned=aligned, **flags))
            continue
        for flags in plans.ce_cases(kernel):
            cases.append(dict(kernel=kernel, dtype="float32", block=ce.MAX_BLOCK, aligned=False, **flags))
            cases.append(dict(kernel=kernel, dtype="bfloat16", block=ce.MAX_BLOCK, aligned=True, **flags))
        for flags in plans.ce_cases(kernel, heaviest=True):
            for i, block in enumerate(b for b in blocks if b != ce.MAX_BLOCK):
                dtype, aligned = variants[i % len(variants)]
                cases.append(dict(kernel=kernel, dtype=dtype, block=block, aligned=aligned, **flags))
    unique = {}
    for c in cases:
        unique.setdefault(_case_id(c), c)
    return unique


CASES = _cases()


@pytest.fixture(scope="module")
def compiled():
    ids = list(CASES)
    results = aot.compile_many("plans", "ce_plan", [CASES[i] for i in ids], archs=ARCHS, asm=("ttir",))
    return dict(zip(ids, results))


def test_launcher_configs_are_the_compiled_ones():
    """block_config only returns (BLOCK, num_warps) pairs from BLOCK_CONFIGS, and every plan uses
    the num_warps block_config gives for its BLOCK."""
    seen = {ce.block_config(c) for c in range(0, 70000, 7)} | {ce.block_config(2 ** k) for k in range(22)}
    assert seen == set(ce.BLOCK_CONFIGS)
    for kernel in plans.CE_KERNELS:
        for block, warps in ce.BLOCK_CONFIGS:
            *_, kwargs, options, _ = plans.ce_plan(kernel, block=block)
            assert kwargs["BLOCK"] == block
            # .maxnreg keeps ptxas from its own occupancy-driven register target, which spills
            assert options == dict(num_warps=warps, maxnreg=ce.MAXNREG)


@pytest.mark.parametrize("case_id", list(CASES))
def test_compiles_without_spills(compiled, case_id):
    for arch in ARCHS:
        usage = compiled[case_id][arch]
        assert "error" not in usage, f"sm_{arch}: {usage.get('error')}"
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (arch, usage)
        assert usage["stack_frame"] == 0, (arch, usage)  # no local memory at all
        assert usage["registers"] <= ce.MAXNREG, (arch, usage)


@pytest.mark.parametrize("kernel", plans.CE_KERNELS)
def test_row_offsets_are_int64(compiled, kernel):
    """The row index is widened to int64 before it multiplies a row stride (N x C > 2^31 works)."""
    for case_id, case in CASES.items():
        if case["kernel"] != kernel:
            continue
        res = compiled[case_id][90]
        assert "error" not in res, res.get("error")
        ttir = res["asm"]["ttir"]
        lines = [ln.strip() for ln in ttir.splitlines()]
        pid = next(ln.split("=")[0].strip() for ln in lines if "tt.get_program_id x : i32" in ln)
        widened = next(ln.split("=")[0].strip() for ln in lines if f"arith.extsi {pid} : i32 to i64" in ln)
        muls = [ln for ln in lines if "arith.muli" in ln and widened in ln and ": i64" in ln]
        assert muls, f"{case_id}: no int64 row-offset multiply found"
        assert not any("arith.muli" in ln and pid + "," in ln and ": i32" in ln for ln in lines), case_id


# ----------------------------------------------------------------------------------------------
# Issue 12 C: static performance gates
# ----------------------------------------------------------------------------------------------

MAX_BARRIERS_PER_ITERATION = 2  # one block reduction per row step at most (issue 12 B)
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# The 16-bit fused linear-CE plans (the heaviest flags: the same requests as
# test_linear_cross_entropy_aot.py, so a session compiles them once: aot.compile_many caches).
LCE_CASES = {f"{c['kernel']}-{c['dtype']}-{'aligned' if c['aligned'] else 'unaligned'}": c
             for c in (dict(kernel=kernel, dtype=dtype, aligned=aligned, round_sizes=False, **flags)
                       for kernel in plans.LCE_KERNELS for flags in plans.lce_cases(kernel, heaviest=True)
                       for dtype in ("float16", "bfloat16") for aligned in (True, False))}


@pytest.fixture(scope="module")
def lce_compiled():
    """{case id: {arch: usage}}, each arch compiling the plan a launch on it builds (the backward
    tiles depend on the compute capability)."""
    ids = list(LCE_CASES)
    out = {i: {} for i in ids}
    for arch in ARCHS:
        cases = [dict(LCE_CASES[i], arch=arch) for i in ids]
        for i, res in zip(ids, aot.compile_many("plans", "lce_plan", cases, archs=(arch,))):
            out[i].update(res)
    return out


def _summaries(results, case_ids):
    for case_id in case_ids:
        for arch in ARCHS:
            usage = results[case_id][arch]
            assert "error" not in usage, f"{case_id} sm_{arch}: {usage['error']}"
            yield case_id, arch, usage["ptx_summary"]


def test_issue12_ptx_summary_reads_loops_barriers_and_load_widths():
    ptx = "\n".join([
        "\tld.global.b64 { %rd1 }, [ %rd2 + 0 ];",
        "$L__BB0_2:",
        "\t@%p4 ld.global.L1::evict_last.L2::cache_hint.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd3 + 0 ], %rd9;",
        "\tld.global.b16 { %rs1 }, [ %rd4 + 0 ];", "\tbar.sync \t0;", "\tbar.warp.sync \t-1;",
        "\t@%p1 bra \t$L__BB0_3;", "\tbarrier.sync.aligned 0;", "\t@%p2 bra \t$L__BB0_2;",
        "$L__BB0_3:", "\tbar.sync \t0;", "\t@%p3 atom.global.gpu.relaxed.add.v4.f32 { %r5 }, [ %rd5 + 0 ], { %r6 };",
        "\tcp.async.cg.shared.global [ %r7 + 0 ], [ %rd6 + 0 ], 0x10, %r8;",
        "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd7, %rd8, 1, 1, 1, 0, 1;",
        "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f2}, {%r9}, {%r10}, {%f3};"])
    assert aot.ptx_summary(ptx) == {"loops": [{"bar_sync": 2, "loads": 2, "loads_128": 1}], "atomics": 1,
                                     "wgmma": 1, "mma": 1}
    assert aot.load_bits("ld.global.v2.b64") == 128 and aot.load_bits("ld.global.nc.b16") == 16


def test_issue12_occupancy_from_registers_warps_and_shared_memory():
    # 8 warps x 128 registers: 32 K registers per block, 2 blocks; 255 registers: one block
    assert aot.occupancy(90, 128, 8, 0) == {"blocks": 2, "warps": 16, "occupancy": 0.25, "limit": "registers"}
    assert aot.occupancy(90, 255, 8, 0)["blocks"] == 1
    assert aot.occupancy(90, 32, 1, 0) == {"blocks": 32, "warps": 32, "occupancy": 0.5, "limit": "blocks"}
    assert aot.occupancy(90, 32, 8, 0) == {"blocks": 8, "warps": 64, "occupancy": 1.0, "limit": "warps"}
    # 100 KiB of shared memory: 2 blocks on sm_90 (228 KiB), 1 on sm_80 (164 KiB)
    assert aot.occupancy(90, 64, 4, 100 * 1024)["blocks"] == 2
    assert aot.occupancy(80, 64, 4, 100 * 1024) == {"blocks": 1, "warps": 4, "occupancy": 4 / 64, "limit": "shared"}


# Issue 12 B: the gradient loops of fp32 rows that are not 16-byte aligned, with class weights, had 8
# bar.sync per iteration (a shared-memory layout conversion between the 4-wide load of the aligned
# weight row and the 1-wide gradient store); the kernels now load such rows in the store's layout.
# Still over the gate with probability targets (measured, Triton 3.6): the first pass sums the target
# mass of each block across the block (3 bar.sync per iteration, every dtype and alignment: a fourth
# per-lane vector spilled on sm_90, commit 6d3ac2d), and their gradient loop keeps the conversion
# (8 bar.sync) for fp32 rows off the 16-byte grid with class weights: loading the target and weight
# rows one element per thread spilled 20 bytes on sm_90.
_SOFT_TARGET_MASS = pytest.mark.xfail(strict=True, reason="probability targets: 3 bar.sync per iteration of the "
                                      "statistics loop (the block sum of the target mass), 8 in the unaligned "
                                      "fp32 weighted gradient loop")


@pytest.mark.parametrize("kernel, soft_target", [
    ("fused", False), pytest.param("fused", True, marks=_SOFT_TARGET_MASS), ("stats", False), ("grad", False)])
def test_issue12_ce_loops_have_at_most_two_barriers_per_iteration(compiled, kernel, soft_target):
    """Block-wide reductions cost a ``bar.sync`` each (two per tl.sum / tl.max across warps): the
    row loop must carry per-thread running statistics and reduce once per row, not per block."""
    ids = [i for i in CASES if CASES[i]["kernel"] == kernel and bool(CASES[i].get("soft_target")) == soft_target]
    worst = max(((loop["bar_sync"], case_id, arch) for case_id, arch, summary in _summaries(compiled, ids)
                 for loop in summary["loops"]), default=(0, None, None))
    assert worst[0] <= MAX_BARRIERS_PER_ITERATION, \
        f"{worst[0]} bar.sync in one loop iteration ({worst[1]}, sm_{worst[2]})"


@pytest.mark.parametrize("kernel", plans.CE_KERNELS)
def test_issue12_ce_loop_loads_are_128_bit(compiled, kernel):
    """Aligned rows (16-byte pointers and strides, class count a multiple of 16) where each thread
    holds at least 16 contiguous bytes of a block: every global load in a loop moves 128 bits."""
    checked = 0
    for case_id in (i for i in CASES if CASES[i]["kernel"] == kernel):
        case = CASES[case_id]
        for arch in ARCHS:
            usage = compiled[case_id][arch]
            assert "error" not in usage, usage["error"]
            per_thread = case["block"] // (32 * usage["num_warps"]) * ELEMENT_BYTES[case["dtype"]]
            if not case["aligned"] or per_thread < 16:
                continue
            for loop in usage["ptx_summary"]["loops"]:
                assert loop["loads"] > 0 and loop["loads_128"] == loop["loads"], (case_id, arch, loop)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("case_id", list(LCE_CASES))
def test_issue12_lowp_linear_ce_uses_tensor_cores(lce_compiled, case_id):
    """fp16 / bf16 fused linear-CE tiles: warpgroup MMA (``wgmma``) on sm_90 and ``mma.sync`` on
    sm_80; with aligned operands (the large tiles) every sm_90 product is a wgmma."""
    ptx = {arch: summary for _, arch, summary in _summaries(lce_compiled, [case_id])}
    assert ptx[90]["wgmma"] > 0, ptx[90]
    assert ptx[80]["mma"] > 0, ptx[80]
    if LCE_CASES[case_id]["aligned"]:
        assert ptx[90]["mma"] == 0, ptx[90]


def _launched_kernels(fn) -> set[str]:
    """Names of the @triton.jit kernels ``fn()`` launches (interpreted, or on the GPU)."""
    launched = set()
    cls = type(ce._ce_fused_kernel)
    original = cls.run

    def run(self, *args, **kwargs):
        launched.add(self.fn.__name__)
        return original(self, *args, **kwargs)

    cls.run = run
    try:
        fn()
    finally:
        cls.run = original
    return launched


def test_issue12_default_linear_ce_path_has_no_global_atomics(compiled, lce_compiled):
    """Every kernel celoss.linear_cross_entropy launches by default (triton backend, forward and
    backward, fp32 and bf16) is compiled by the cases above and has no atom/red.global."""
    import torch

    import celoss

    interpreted = type(ce._ce_fused_kernel).__name__ == "InterpretedFunction"
    device = "cpu" if interpreted else "cuda"
    if not interpreted and not torch.cuda.is_available():
        pytest.skip("triton was imported without the interpreter and there is no GPU")

    def step(dtype):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(12, 32, generator=g).to(device, dtype).requires_grad_()
        w = torch.randn(70, 32, generator=g).to(device, dtype).requires_grad_()
        y = torch.randint(0, 70, (12,), generator=g).to(device)
        celoss.linear_cross_entropy(x, w, y, backend="triton").backward()

    launched = _launched_kernels(lambda: [step(dt) for dt in (torch.float32, torch.bfloat16)])
    assert launched
    by_name = {}
    for results in (compiled, lce_compiled):
        for per_arch in results.values():
            for usage in per_arch.values():
                by_name.setdefault(usage["kernel_name"], []).append(usage["ptx_summary"]["atomics"])
    for name in sorted(launched):
        assert name in by_name, f"{name} is launched by linear_cross_entropy but no AOT case here compiles it"
        assert max(by_name[name]) == 0, f"{name}: up to {max(by_name[name])} global atomics"
