"""Vocab-parallel cross-entropy (celoss.distributed) on 2 and 3 Gloo processes on loopback.

Each test spawns one process per rank (tests/_distributed_workers.py does the checks inside the
ranks, against a float64 PyTorch oracle and single-process celoss on the full vocabulary, for every
backend available here). Every spawn is bounded by a timeout: a hang fails the test and the
processes are killed, CI never stalls.
"""
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import celoss
from celoss import distributed as cd

import _distributed_workers as workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with Gloo is not available")

# the ranks use CPU tensors (Gloo): Triton takes part where it runs on them, in its interpreter
# (no CUDA; tests/conftest.py sets TRITON_INTERPRET=1), on a representative subset of the cases
BACKENDS = [name for name, reason in celoss.available_backends().items()
            if reason is None and not (name == "triton" and torch.cuda.is_available())]
SPAWN_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, suites, tmp_path, timeout=SPAWN_TIMEOUT_S):
    """Run the worker suites on `world` ranks; return each rank's result (fail on error or hang)."""
    ctx = mp.get_context("spawn")
    out_dir, port = str(tmp_path), _free_port()
    procs = [ctx.Process(target=workers.main, args=(r, world, port, BACKENDS, list(suites), out_dir),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    hung = []
    for r, p in enumerate(procs):
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            hung.append(r)
    for r in hung:
        procs[r].terminate()
        procs[r].join(5)
        if procs[r].is_alive():
            procs[r].kill()
            procs[r].join(5)
    results = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else None)
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if res and res["error"]]
    assert not errors, "\n".join(errors)
    assert not hung, f"ranks {hung} did not finish within {timeout} s (hang?)"
    missing = [r for r, res in enumerate(results) if res is None]
    assert not missing, f"ranks {missing} exited without a result (exit codes " \
                        f"{[p.exitcode for p in procs]})"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


@pytest.mark.timeout(2 * SPAWN_TIMEOUT_S)
@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel(world, tmp_path):
    """Logits and linear variants, every option, even/uneven/empty/permuted slices, a rank without
    targets, all-ignored and empty batches, mismatched arguments, DTensor: one spawn per world size."""
    results = spawn(world, ["logits", "linear", "errors", "dtensor"], tmp_path)
    passed = [{n for n in res["passed"] if "(raiser)" not in n and "(others)" not in n} for res in results]
    assert all(p == passed[0] for p in passed), "ranks ran different checks"
    cases = workers.logits_cases(world)
    for backend in BACKENDS:
        quick = workers.interpreted(backend)
        expected = {f"logits[{backend}] case {i}" for i, c in enumerate(cases) if not quick or c.get("quick")}
        expected |= {f"linear[{backend}] case {i}" for i in ((2,) if quick else range(8))}
        expected |= {f"errors[{backend}] still in step", f"errors[{backend}] communication"}
        assert expected <= passed[0], sorted(expected - passed[0])
    assert "dtensor recipe" in passed[0]
    # a cross-rank mismatch raises the very same error on every rank
    for name in ("rows", "overlap", "gap", "vocab_size", "options", "targets", "target range"):
        for backend in BACKENDS:
            key = f"errors[{backend}] {name}"
            messages = {res["messages"][key] for res in results}
            assert len(messages) == 1, (key, messages)
    # a local error: the bad rank raises its own error, the others a ValueError naming it
    last = results[-1]["messages"]
    for backend in BACKENDS:
        assert last[f"errors[{backend}] local error (raiser)"].startswith("TypeError")
        for res in results[:-1]:
            assert res["messages"][f"errors[{backend}] local error (others)"].startswith("ValueError")


def test_vocab_range():
    assert [cd.vocab_range(50257, r, 4) for r in range(4)] == \
        [(0, 12565), (12565, 25129), (25129, 37693), (37693, 50257)]
    spans = [cd.vocab_range(50257, r, 3) for r in range(3)]
    assert spans[0][0] == 0 and spans[-1][1] == 50257
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert [cd.vocab_range(2, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_needs_an_initialized_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        cd.vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), vocab_start=0, vocab_size=3)
