"""Worker process: ``python -m benchmarks.worker '<config json>'``.

Reads one job per line (JSON) on stdin and answers one JSON line per job on its original stdout;
anything else printed (warnings, compiler chatter) goes to stderr, which the parent logs. Jobs:
``probe`` (device, machine, ceilings, which methods can run) and ``cell`` (one method on one shape
and dtype: all phases timed, peak extra memory measured). A failing cell answers with its error and
the worker carries on; an out-of-memory answers ``oom``. The parent kills the worker on a timeout.
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
import traceback
import warnings


def _set_memory_limit(limit: int | None):
    """Cap the worker's data segment so an allocation past it fails cleanly (-> an 'oom' cell) instead
    of waking the kernel's OOM killer on a machine that others share."""
    if not limit:
        return
    import resource
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (int(limit), int(limit)))
    except (ValueError, OSError) as exc:
        print(f"benchmarks.worker: could not set RLIMIT_DATA: {exc}", file=sys.stderr)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc).lower()
    return name == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text \
        or "cannot allocate memory" in text


def short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Worker:
    def __init__(self, config: dict):
        import torch
        self.torch = torch
        self.config = config
        device = config.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        if device == "cpu" and config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
            torch.cuda.init()
        from . import measure
        self.measure = measure

    # ---- probe ---------------------------------------------------------------------------------
    def probe(self, job: dict) -> dict:
        from .methods import METHODS, OPS
        info = self.measure.machine_info(self.device, self.config.get("threads"))
        info["memory_measure"] = (self.measure.CudaMemory.how if self.device == "cuda"
                                  else self.measure.CpuMemory().how)
        info["cache_bytes"] = self.measure.cache_bytes(self.device)
        avail = {}
        for op, method, dtype in job.get("combos", []):
            avail[f"{op}|{method}|{dtype}"] = METHODS[method].unavailable(OPS[op], self.device, dtype)
        ceil = {}
        if job.get("ceilings", True):
            try:
                ceil = self.measure.ceilings(self.device, job.get("dtypes", ["fp32"]), job.get("tiny", False))
            except Exception as exc:
                ceil = {"error": short(exc)}
        return {"status": "ok", "device": self.device, "info": info, "available": avail, "ceilings": ceil}

    # ---- one cell ------------------------------------------------------------------------------
    def cell(self, job: dict) -> dict:
        torch, measure = self.torch, self.measure
        from .methods import METHODS, OPS, make_inputs
        op, method, dtype, shape = OPS[job["op"]], METHODS[job["method"]], job["dtype"], job["shape"]
        device = self.device
        reason = method.unavailable(op, device, dtype)
        if reason:
            return {"status": "unavailable", "note": reason}
        phases = job.get("phases", ["fwd", "train"])
        warmup, repeats = int(job.get("warmup", 1)), max(1, int(job.get("repeats", 3)))
        if "celoss" in sys.modules:  # each cell starts as a fresh process would: no cached buffers
            sys.modules["celoss"].empty_cpu_cache()

        # rotate through enough input sets that together they exceed 4x the last-level cache (so no
        # call finds its inputs in cache); a set that is alone that large is used by itself
        set_bytes = op.input_bytes(shape, dtype)
        rotate = int(job.get("rotate_bytes") or 4 * measure.cache_bytes(device))
        n_sets = min(8, max(1, math.ceil(rotate / max(set_bytes, 1))))
        sets = [make_inputs(op, shape, dtype, device, seed=int(job.get("seed", 0)) * 1000 + i)
                for i in range(n_sets)]
        pristine = None
        if method.destroys:
            with torch.no_grad():
                pristine = [{k: t.detach().clone() for k, t in s.items() if t.is_floating_point()}
                            for s in sets]
        if method.compiles:
            torch._dynamo.reset()
        impl = method.build(op, device, dtype, shape)
        mem = measure.memory_tracker(device)
        clock = measure.Clock(device)
        result = {"status": "ok", "n_sets": n_sets}
        caught = []

        def one(phase: str, i: int, timed: bool):
            inp = sets[i % n_sets]
            if pristine is not None and phase in method.destroys:
                with torch.no_grad():
                    for k, t in pristine[i % n_sets].items():
                        inp[k].copy_(t)
            if phase == "fwd":  # evaluation: activations made under no_grad don't require grad,
                # parameters (the classifier weight) still do
                args = {k: (t if k in op.param_keys else t.detach()) for k, t in inp.items()}
            else:
                args = impl.prepare(inp)  # untimed set-up of the step's inputs (NonLeafImpl)
            measure.sync(device)
            if timed:
                mem.start()
            clock.start()
            if phase == "fwd":
                with torch.no_grad():
                    out = impl.forward(args)
            else:
                out = impl.train(args, clock.mark)
            segs = clock.stop()
            extra = mem.stop() if timed else None
            if phase == "train":  # a training loop releases the gradients every step
                for k in op.grad_keys:
                    inp[k].grad = None
            loss = out
            del out, args
            return segs, extra, loss

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for phase in ("fwd", "train"):
                if phase not in phases:
                    continue
                t0 = time.perf_counter()
                _segs, _extra, loss = one(phase, 0, False)
                measure.sync(device)
                result[f"first_{phase}_s"] = time.perf_counter() - t0
                if "loss" not in result:
                    try:
                        val = loss.detach().float().sum().item() if hasattr(loss, "detach") else None
                        result["loss"] = val if val is None or math.isfinite(val) else str(val)
                    except Exception:
                        pass
                del loss
                for i in range(warmup):
                    one(phase, 1 + i, False)
                segs_all, extras = [], []
                for r in range(repeats):
                    segs, extra, loss = one(phase, 1 + warmup + r, True)
                    del loss
                    segs_all.append(segs)
                    extras.append(extra)
                if phase == "fwd":
                    result["fwd_ms"] = measure.median([s[0] for s in segs_all])
                    result["fwd_min_ms"] = min(s[0] for s in segs_all)
                    result["mem_fwd"] = max(extras)
                else:
                    result["train_ms"] = measure.median([sum(s) for s in segs_all])
                    result["train_min_ms"] = min(sum(s) for s in segs_all)
                    result["train_fwd_ms"] = measure.median([s[0] for s in segs_all])
                    result["bwd_ms"] = measure.median([s[1] for s in segs_all if len(s) > 1])
                    result["mem_train"] = max(extras)
        msgs = []
        for w in caught:
            text = f"{w.category.__name__}: {w.message}".replace("\n", " ")
            if text not in msgs and "TF32" not in text:
                msgs.append(text)
        if msgs:
            result["warnings"] = " | ".join(m[:200] for m in msgs[:3])
        return result

    def handle(self, job: dict) -> dict:
        kind = job.get("kind")
        t0 = time.perf_counter()
        try:
            res = self.probe(job) if kind == "probe" else self.cell(job)
        except BaseException as exc:  # noqa: a failing method is a row, never a crash of the suite
            if isinstance(exc, KeyboardInterrupt):
                raise
            traceback.print_exc(file=sys.stderr)
            res = {"status": "oom" if is_oom(exc) else "error", "note": short(exc)}
        finally:
            gc.collect()
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
            else:
                self.measure.trim_heap()
        res["wall_s"] = time.perf_counter() - t0
        res["id"] = job.get("id")
        return res


def _die_with_parent():
    """A worker must not outlive the suite (it runs in its own session, so a kill of the parent's
    process group would miss it)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:
        pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    config = json.loads(argv[0]) if argv else {}
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to the log, not into the protocol
    sys.stdout = sys.stderr
    _set_memory_limit(config.get("mem_limit"))
    try:
        worker = Worker(config)
    except BaseException as exc:
        traceback.print_exc(file=sys.stderr)
        proto.write(json.dumps({"status": "error", "note": f"worker start failed: {short(exc)}",
                                "fatal": True}) + "\n")
        return 1
    proto.write(json.dumps({"status": "ready", "device": worker.device}) + "\n")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        job = json.loads(line)
        print(f"--- job {job.get('id')}: {job.get('kind')} {job.get('op', '')} {job.get('method', '')} "
              f"{job.get('dtype', '')} {job.get('shape', '')}", file=sys.stderr, flush=True)
        proto.write(json.dumps(worker.handle(job), default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
