"""Parent side: starts worker processes, sends them jobs, enforces timeouts and a run budget.

Isolation (``--isolate``): ``method`` (default) starts a fresh worker for each method, which runs that
method's cells one after another (the peak memory of each call is measured on its own, see
measure.py); ``cell`` starts one per cell; ``none`` runs everything in one worker. A cell that runs
past its timeout, or whose worker dies (killed for memory, crashed), is marked and the worker is
replaced; larger cells of the same method and dtype are then skipped with the reason.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkerDied(Exception):
    pass


class WorkerTimeout(Exception):
    pass


class WorkerProcess:
    def __init__(self, config: dict, log_path: str, start_timeout: float = 180.0):
        env = dict(os.environ)
        threads = config.get("threads")
        if config.get("device") == "cpu" and threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[var] = str(threads)
        env.pop("TRITON_INTERPRET", None)  # benchmarks time compiled kernels, never the interpreter
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.log = open(log_path, "ab", buffering=0)
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     cwd=REPO, env=env, start_new_session=True)
        self.buffer = b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        hello = self._read(start_timeout)
        if hello.get("status") != "ready":
            self.kill()
            raise WorkerDied(hello.get("note", "worker did not start"))
        self.device = hello["device"]

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerTimeout()
            if not self.selector.select(left):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                rc = self.proc.wait()
                raise WorkerDied(describe_exit(rc))
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def call(self, job: dict, timeout: float) -> dict:
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerDied(describe_exit(self.proc.wait()))
        return self._read(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.close()

    def close(self):
        try:
            self.selector.close()
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
        try:
            self.log.close()
        except Exception:
            pass

    def stop(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            pass
        self.kill()


def describe_exit(rc: int) -> str:
    if rc is None:
        return "worker stopped answering"
    if rc < 0:
        sig = -rc
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        hint = " (out of memory?)" if sig == signal.SIGKILL else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with code {rc}"


def probe(config: dict, job: dict, log_path: str, timeout: float) -> dict:
    w = WorkerProcess(config, log_path)
    try:
        res = w.call(dict(job, kind="probe", id="probe"), timeout)
    finally:
        w.stop()
    res["device"] = res.get("device", w.device)
    return res


def run_cells(cells: list[dict], config: dict, log_path: str, *, isolate: str, timeout: float,
              budget: float | None, on_result, size_of, max_workers: int = 1) -> None:
    """Run `cells` (dicts with the job fields) in order; call on_result(cell, result) for each.

    Workers are keyed by isolation group (the method, the cell, or one for all); up to `max_workers`
    idle ones are kept, so cells ordered by size can alternate between methods without restarting
    processes (each call's peak memory is its own: see measure.py)."""
    t_start = time.monotonic()
    failed_at: dict[tuple, tuple] = {}  # (method, op, dtype) -> (size, why)
    pool: dict = {}  # group -> WorkerProcess, least recently used first

    try:
        for cell in cells:
            key = (cell["method"], cell["op"], cell["dtype"])
            group = {"method": cell["method"], "cell": cell["id"], "none": None}[isolate]
            size = size_of(cell)
            if key in failed_at and size >= failed_at[key][0]:
                on_result(cell, {"status": "skipped", "note": f"skipped: {failed_at[key][1]} at a smaller size"})
                continue
            left = None if budget is None else budget - (time.monotonic() - t_start)
            if left is not None and left < 5:
                on_result(cell, {"status": "skipped", "note": "skipped: run time budget spent"})
                continue
            worker = pool.pop(group, None)
            if worker is not None and not worker.alive():
                worker.kill()
                worker = None
            while len(pool) >= max(1, max_workers) or (pool and isolate == "cell"):
                pool.pop(next(iter(pool))).stop()
            cell_timeout = timeout if left is None else max(5.0, min(timeout, left))
            t0 = time.monotonic()
            try:
                if worker is None:  # its start-up (imports, CUDA context) is not the cell's time
                    worker = WorkerProcess(config, log_path, start_timeout=max(cell_timeout, 120))
                res = worker.call(dict(cell, kind="cell"), cell_timeout)
            except WorkerTimeout:
                if worker is not None:
                    worker.kill()
                worker = None
                res = {"status": "timeout", "note": f"timeout after {cell_timeout:.0f} s"}
                failed_at[key] = (size, "timeout")
            except WorkerDied as exc:
                if worker is not None:
                    worker.kill()
                worker = None
                res = {"status": "oom" if "memory" in str(exc) else "crash", "note": str(exc)}
                failed_at[key] = (size, res["status"])
            else:
                if res.get("status") == "oom":
                    failed_at[key] = (size, "oom")
            if worker is not None:
                pool[group] = worker  # most recently used last
            res.setdefault("wall_s", time.monotonic() - t0)
            on_result(cell, res)
    finally:
        for worker in pool.values():
            worker.stop()
