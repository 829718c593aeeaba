"""Ahead-of-time compilation of Triton kernels for NVIDIA targets without a GPU, for tests.

Compiles a ``@triton.jit`` kernel for sm_80 / sm_90 with ``triton.compile`` and runs the ``ptxas``
shipped with the installed Triton (``triton/backends/nvidia/bin``) with ``-v`` on the PTX to read
registers, spills and stack frame -- the failure modes the interpreter cannot see.

In a process that imported triton WITHOUT ``TRITON_INTERPRET=1``::

    from celoss.kernels import _aot, cross_entropy as ce
    kernel, grid, kwargs, options, _ = ce.fused_plan(...)  # CPU tensors stand in for CUDA ones
    sig, consts, attrs = _aot.specialize(kernel, kwargs)   # exactly what a launch would compile
    report = _aot.compile_and_report(kernel, sig, consts, options["num_warps"], attrs=attrs)
    assert all(r.spill_bytes == 0 for r in report.values())

Under the interpreter (every ``@triton.jit`` function, ``tl.max`` included, is then an interpreted
function that can't be compiled) use :func:`compile_many`, which compiles in fresh processes.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

DEFAULT_ARCHS = (80, 90)


@dataclasses.dataclass(frozen=True)
class Usage:
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared: int
    ptxas: str  # which ptxas assembled it
    log: str

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads


class PtxasError(RuntimeError):
    """ptxas rejected the PTX; the message carries the command, its version and its stderr."""


def specialize(fn, kwargs: dict):
    """(signature, constexprs, attrs) that launching ``fn`` with keyword arguments ``kwargs``
    would compile: the JIT's own binder (pointer dtypes, i32/i64, ints == 1 and None turned into
    constexprs, 16-byte divisibility of pointers and ints). Tensors may be CPU stand-ins: only
    their dtype and data_ptr alignment matter."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature, find_paths_if, get_iterable_path

    binder = create_function_from_signature(fn.signature, fn.params, CUDABackend)
    bound_args, specialization, _ = binder(**kwargs)
    sigkeys = [p.name for p in fn.params]
    sigvals = [s[0] for s in specialization]
    signature = dict(zip(sigkeys, sigvals))
    paths = find_paths_if(sigvals, lambda _, v: v == "constexpr")
    constexprs = {path: get_iterable_path(list(bound_args.values()), path) for path in paths}
    attrvals = [s[1] for s in specialization]
    attr_paths = find_paths_if(attrvals, lambda _, v: isinstance(v, str))
    attrs = {p: CUDABackend.parse_attr(get_iterable_path(attrvals, p)) for p in attr_paths}
    return signature, constexprs, attrs


def compile_kernel(fn, signature: dict, constexprs: dict | None = None, *, num_warps: int = 4,
                   arch: int = 90, attrs: dict | None = None, **options):
    """``triton.compile`` for ``GPUTarget("cuda", arch, 32)``; returns the CompiledKernel
    (``.asm["ptx"]``, ``.asm["cubin"]``, ...). ``signature`` maps every parameter name to a type
    string ("*fp32", "i32", "fp32", "constexpr", ...); ``constexprs`` maps names (or index
    tuples, as returned by :func:`specialize`) to values; ``options`` are further launch options
    (``num_stages``, ``maxnreg``, ...)."""
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options, num_warps=num_warps))


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (ptxas-blackwell for sm_100+)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def sm_name(arch: int) -> str:
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    return sm_arch_from_capability(arch)


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_usage(ptx: str, arch: int, ptxas: str | None = None) -> Usage:
    """Assemble ``ptx`` with ``ptxas -v --gpu-name=sm_XX(a)`` (Triton's flags) and parse its log."""
    ptxas = ptxas or ptxas_path(arch)
    gpu = sm_name(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip()
        ptx_version = re.search(r"^\.version\s+(\S+)", ptx, re.M)
        raise PtxasError(f"{' '.join(cmd)} failed (rc {proc.returncode}); ptxas: "
                         f"{version.splitlines()[-1] if version else '?'}; PTX ISA "
                         f"{ptx_version.group(1) if ptx_version else '?'}\n{log}")
    used, spill, stack, smem = _USED.search(log), _SPILL.search(log), _STACK.search(log), _SMEM.search(log)
    if used is None or spill is None:
        raise PtxasError(f"could not parse ptxas -v output:\n{log}")
    return Usage(arch=arch, registers=int(used.group(1)), spill_stores=int(spill.group(1)),
                 spill_loads=int(spill.group(2)), stack_frame=int(stack.group(1)) if stack else 0,
                 shared=int(smem.group(1)) if smem else 0, ptxas=os.path.basename(ptxas), log=log)


def compile_and_report(fn, signature: dict, constexprs: dict | None = None, num_warps: int = 4, *,
                       attrs: dict | None = None, archs=DEFAULT_ARCHS) -> dict[int, Usage]:
    """Compile for each arch and return {arch: Usage} (registers / spills from ptxas -v)."""
    out = {}
    for arch in archs:
        k = compile_kernel(fn, signature, constexprs, num_warps=num_warps, arch=arch, attrs=attrs)
        out[arch] = ptxas_usage(k.asm["ptx"], arch)
    return out


# ----------------------------------------------------------------------------------------------
# Many configurations at once, in fresh processes
# ----------------------------------------------------------------------------------------------

def _usage_dict(u: Usage) -> dict:
    d = dataclasses.asdict(u)
    d.pop("log")
    d["spill_bytes"] = u.spill_bytes
    return d


def _compile_job(job):
    """Worker: build a launch plan with ``module.func(**case)`` -> (kernel, grid, kwargs, options,
    ...), specialize it like the JIT would, compile it for each arch and read ptxas -v."""
    import importlib

    module_name, func_name, case, archs, asm = job
    plan = getattr(importlib.import_module(module_name), func_name)(**case)
    kernel, _, kwargs, options = plan[:4]
    signature, constexprs, attrs = specialize(kernel, kwargs)
    out = {}
    for arch in archs:
        try:
            k = compile_kernel(kernel, signature, constexprs, attrs=attrs, arch=arch, **options)
            out[arch] = _usage_dict(ptxas_usage(k.asm["ptx"], arch))
            out[arch]["num_warps"] = options.get("num_warps")
            out[arch]["asm"] = {name: k.asm[name] for name in asm}
        except Exception as exc:  # reported per arch, the caller asserts
            out[arch] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _worker_main() -> None:
    """Entry point of a compile worker: JSON {"jobs": [...]} on stdin, results on stdout."""
    import json

    payload = json.loads(sys.stdin.read())
    results = [_compile_job(tuple(job)) for job in payload["jobs"]]
    sys.stdout.write("\n" + _RESULT_MARK + json.dumps(results))


_RESULT_MARK = "@@celoss-aot-results@@"


def compile_many(module_name: str, func_name: str, cases: list[dict], *, archs=DEFAULT_ARCHS,
                 processes: int | None = None, timeout: float | None = None,
                 asm: tuple = ()) -> list[dict]:
    """Compile many launch plans in parallel, in fresh Python processes started without
    TRITON_INTERPRET (a process that imported triton under the interpreter can't compile: even
    ``tl.max`` is an interpreted function there). ``module_name.func_name(**case)`` must return a
    plan ``(kernel, grid, kwargs, options, ...)`` like the ``*_plan`` launchers; cases must be
    JSON-serialisable. Returns, per case, ``{arch: {"registers", "spill_stores", "spill_loads",
    "spill_bytes", "stack_frame", "num_warps", "asm": {name: text for name in asm}, ...}}`` or
    ``{arch: {"error": message}}``; ``asm`` names compiler stages to return ("ttir", "ptx", ...).
    Set ``processes`` to the number of cores to spare (default: all)."""
    import json

    processes = max(1, min(len(cases), processes or os.cpu_count() or 1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = __name__  # "celoss.kernels._aot" or "kernels._aot"
    code = f"import sys; sys.path[:0] = {list(sys.path)!r}; import {here} as m; m._worker_main()"
    per_proc = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for p in range(processes):
            jobs = [(module_name, func_name, case, list(archs), list(asm)) for case in cases[p::processes]]
            files = [os.path.join(tmp, f"{p}.{ext}") for ext in ("in", "out", "err")]
            with open(files[0], "w") as f:
                json.dump({"jobs": jobs}, f)
            with open(files[0]) as fin, open(files[1], "w") as fout, open(files[2], "w") as ferr:
                procs.append((subprocess.Popen([sys.executable, "-c", code], stdin=fin, stdout=fout,
                                               stderr=ferr, env=env), files))
        for proc, files in procs:
            rc = proc.wait(timeout=timeout)
            out, err = (open(f).read() for f in files[1:])
            if rc != 0 or _RESULT_MARK not in out:
                raise RuntimeError(f"AOT compile worker failed (rc {rc}):\n{err[-4000:]}")
            per_proc.append(json.loads(out.split(_RESULT_MARK, 1)[1]))
    results = [None] * len(cases)
    for p, res in enumerate(per_proc):
        results[p::processes] = res
    # JSON turned the arch keys into strings
    return [{int(a): u for a, u in r.items()} for r in results]
