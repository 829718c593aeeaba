"""celoss.distributed (vocab-parallel cross-entropy, token log-probs / entropy, linear distillation)
on 2 and 3 Gloo processes on loopback.

One spawn per world size for the whole module (the `ranks` fixture): one process per rank runs
every suite of tests/_distributed_workers.py, which does the checks inside the ranks, against a
float64 PyTorch oracle and single-process celoss on the full vocabulary, for every backend
available here; the tests below read what each rank recorded. Every spawn is bounded by a
timeout: a hang fails the tests and the processes are killed, CI never stalls.
"""
import json
import os
import socket
import time
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import celoss
from celoss import distributed as cd
from celoss.distributed import _common

import _distributed_workers as workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with Gloo is not available")

# the ranks use CPU tensors (Gloo): Triton takes part where it runs on them, in its interpreter
# (no CUDA; tests/conftest.py sets TRITON_INTERPRET=1), on a representative subset of the cases
BACKENDS = [name for name, reason in celoss.available_backends().items()
            if reason is None and not (name == "triton" and torch.cuda.is_available())]
SPAWN_TIMEOUT_S = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, suites, tmp_path, timeout=SPAWN_TIMEOUT_S):
    """Run the worker suites on `world` ranks: (each rank's result or None, what went wrong --
    errors, hangs, missing results, exit codes -- or '' when nothing did)."""
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
    problems = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if res and res["error"]]
    if hung:
        problems.append(f"ranks {hung} did not finish within {timeout} s (hang?)")
    missing = [r for r, res in enumerate(results) if res is None]
    if missing or any(p.exitcode != 0 for p in procs):
        problems.append(f"exit codes {[p.exitcode for p in procs]}"
                        + (f"; ranks {missing} wrote no result" if missing else ""))
    return results, "\n".join(problems)


class Ranks(NamedTuple):
    world: int
    results: list  # each rank's recorded results (None: that rank wrote none)
    problems: str  # what went wrong in the spawn ('' when nothing did)

    def checks(self, rank: int) -> set:
        """The checks `rank` passed (per-rank variants, '(raiser)' / '(others)', left out)."""
        res = self.results[rank]
        return {n for n in res["passed"] if "(raiser)" not in n and "(others)" not in n} if res else set()

    def passed(self) -> set:
        """The checks every rank passed."""
        return set.intersection(*(self.checks(r) for r in range(self.world)))

    def require(self, expected) -> None:
        """Fail unless every rank passed every check in `expected`, with what went wrong if not."""
        missing = set(expected) - self.passed()
        assert not missing, f"not passed on every rank: {sorted(missing)}\n{self.problems}"

    def message(self, rank: int, key: str) -> str:
        res = self.results[rank]
        assert res is not None and key in res["messages"], f"rank {rank} recorded no {key!r}\n{self.problems}"
        return res["messages"][key]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"world{world}")
def ranks(request, tmp_path_factory) -> Ranks:
    """One spawn per world size running every worker suite; each test below reads its own checks,
    so a failing suite fails its tests only."""
    world = request.param
    return Ranks(world, *spawn(world, list(workers.SUITES), tmp_path_factory.mktemp(f"world{world}")))


@pytest.mark.timeout(2 * SPAWN_TIMEOUT_S)
def test_workers_ran_cleanly(ranks):
    """No error, hang or crash on any rank, and every rank ran the same checks."""
    assert not ranks.problems, ranks.problems
    names = [ranks.checks(r) for r in range(ranks.world)]
    assert all(n == names[0] for n in names), "ranks ran different checks"


@pytest.mark.timeout(2 * SPAWN_TIMEOUT_S)
def test_vocab_parallel(ranks):
    """Logits and linear variants, every option, even/uneven/empty/permuted slices, a rank without
    targets, all-ignored and empty batches, mismatched arguments."""
    cases = workers.logits_cases(ranks.world)
    for backend in BACKENDS:
        quick = workers.interpreted(backend)
        expected = {f"logits[{backend}] case {i}" for i, c in enumerate(cases) if not quick or c.get("quick")}
        expected |= {f"linear[{backend}] case {i}" for i in ((2,) if quick else range(8))}
        expected |= {f"errors[{backend}] still in step", f"errors[{backend}] communication"}
        ranks.require(expected)
    # a cross-rank mismatch raises the very same error on every rank
    for name in ("rows", "overlap", "gap", "vocab_size", "options", "targets", "target range"):
        for backend in BACKENDS:
            key = f"errors[{backend}] {name}"
            messages = {ranks.message(r, key) for r in range(ranks.world)}
            assert len(messages) == 1, (key, messages)
    # a local error: the bad rank raises its own error, the others a ValueError naming it
    last = ranks.world - 1
    for backend in BACKENDS:
        assert ranks.message(last, f"errors[{backend}] local error (raiser)").startswith("TypeError")
        for r in range(last):
            assert ranks.message(r, f"errors[{backend}] local error (others)").startswith("ValueError")


@pytest.mark.timeout(2 * SPAWN_TIMEOUT_S)
def test_issue11_negative_weight_sum_gradients(ranks):
    """Issue 11 items 1 and 6: the weighted mean divides by the sum of the target weights whatever
    its sign (negative: finite gradients with the sign flipped; zero with zero weights: NaN loss and
    NaN gradients; zero with cancelling weights: inf / NaN as PyTorch; with label smoothing NaN);
    all rows ignored: NaN loss, zero gradients. Both functions, every backend, vs float64 PyTorch."""
    names = [case[0] for case in workers.denominator_cases(8 * ranks.world + 3)]
    for backend in BACKENDS:
        ranks.require(f"issue11[{backend}] {n}" for n in names)
        # the cases do reach the edges they name (the oracle's loss and its NaN gradients)
        message = lambda name: ranks.message(0, f"issue11[{backend}] {name}")  # noqa: E731
        assert message("negative sum").endswith("NaN grads 0")
        assert message("zero target weights").startswith("loss nan")
        assert message("cancelling weights").split(",")[0] in ("loss inf", "loss -inf")
        assert message("all ignored") == "loss nan, NaN grads 0"


@pytest.mark.timeout(2 * SPAWN_TIMEOUT_S)
def test_issue11_target_checksum_collision(ranks):
    """Issue 11 item 11: targets [3, 0, ...] on rank 0 and [0, 1, ...] elsewhere (equal under the old
    checksum sum(t_i (2 i + 1))) raise the same ValueError on every rank."""
    for backend in BACKENDS:
        key = f"issue11[{backend}] target collision"
        ranks.require([key])
        messages = {ranks.message(r, key) for r in range(ranks.world)}
        assert len(messages) == 1 and messages.pop().startswith("ValueError"), messages


def test_issue11_target_digest_properties():
    """Any one changed target changes the digest, and so do permutations of the targets."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(-100, 50257, (4099,), generator=gen)
    digest = _common._target_summary(t, 50257, -100)[0]
    for i, value in [(0, 1), (4098, -100), (2048, 50256), (7, int(t[7]) + 1)]:
        changed = t.clone()
        changed[i] = value if value != int(t[i]) else value + 1
        assert _common._target_summary(changed, 50257, -100)[0] != digest, i
    old_collision = [_common._target_summary(torch.tensor(pair), 5, -100)[0] for pair in ([3, 0], [0, 1])]
    assert old_collision[0] != old_collision[1]
    # swapped, shifted, reversed targets (sum-preserving changes a plain checksum can miss)
    for other in (t.flip(0), t.roll(1), torch.cat([t[1:2], t[:1], t[2:]])):
        assert not torch.equal(other, t) and _common._target_summary(other, 50257, -100)[0] != digest


@pytest.mark.timeout(2 * SPAWN_TIMEOUT_S)
def test_issue11_double_backward(ranks):
    """Issue 11 item 9: differentiating a gradient of either function raises a clear error."""
    for backend in BACKENDS:
        for variant in ("double backward", "linear double backward"):
            key = f"issue11[{backend}] {variant}"
            ranks.require([key])
            message = ranks.message(0, key)
            assert message.startswith("RuntimeError") and "differentiable once" in message, message


@pytest.mark.timeout(2 * SPAWN_TIMEOUT_S)
def test_issue14_dtensor_vocab_sharding(ranks):
    """Issue 14 part 4: DTensor logits Shard(-1) (uneven torch.chunk slices, an empty one on 3 ranks),
    a head Shard(0) with its bias, replicated hidden / target, class weights Shard(0), a 2-D mesh
    (Replicate(), Shard(-1)): loss and DTensor gradients vs float64 PyTorch; other layouts raise the
    same clear error on every rank; plain tensors without vocab_start / vocab_size: even shards."""
    world = ranks.world
    uniform = ("dtensor batch-sharded logits", "dtensor sharded target", "dtensor replicated bias",
               "even-shard defaults, uneven shards", "vocab_start without vocab_size")
    ranks.require({f"dtensor logits V={10 * world + 1}", "dtensor logits V=4", "dtensor linear",
                   "dtensor 2-D mesh", "even-shard defaults", "dtensor contradicting vocab_start", *uniform})
    for name in uniform:
        messages = {ranks.message(r, name) for r in range(world)}
        assert len(messages) == 1 and messages.pop().startswith("ValueError"), (name, messages)
    # explicit vocab_start=0 contradicts the placement on every rank but 0, which names them
    messages = [ranks.message(r, "dtensor contradicting vocab_start") for r in range(world)]
    assert f"rank(s) {list(range(1, world))}" in messages[0], messages[0]
    assert all("contradict the DTensor's placement" in m for m in messages[1:]), messages


@pytest.mark.timeout(2 * SPAWN_TIMEOUT_S)
def test_issue14_vocab_parallel_token_logprobs(ranks):
    """Issue 14 items 2 and 4: vocab_parallel_token_logprobs and vocab_parallel_linear_token_logprobs vs
    single-process celoss and the float64 oracle: both outputs and every gradient under random upstream
    gradients for both outputs, temperature != 1, ignore_index (default and a class id), shift, bias,
    chunking, uneven / permuted / empty slices, even-shard defaults, float64 / bfloat16, -inf classes,
    a rank whose slice of a row is all -inf, NaN / inf rows, all tokens ignored."""
    world = ranks.world
    ranks.require({f"issue14 token_logprobs case {i}" for i in range(len(workers.token_cases(world)))}
                  | {f"issue14 linear_token_logprobs case {i}"
                     for i in range(len(workers.linear_token_cases(world)))})


@pytest.mark.timeout(2 * SPAWN_TIMEOUT_S)
def test_issue14_vocab_parallel_linear_distillation(ranks):
    """Issue 14 items 1 and 4: vocab_parallel_linear_distillation_loss vs single-process
    linear_distillation_loss and the float64 oracle for every kind and reduction, the hard-label term
    (alpha < 1), ignore_index, shift, temperature != 1, teacher gradients, different hidden sizes,
    uneven / permuted / empty slices, even-shard defaults, float64 / bfloat16, all rows ignored."""
    cases = workers.distill_cases(ranks.world)
    assert {c["kind"] for c in cases} == set(workers.KINDS)
    assert {c["reduction"] for c in cases} == {"batchmean", "mean", "sum", "none"}
    ranks.require({f"issue14 linear_distillation case {i}" for i in range(len(cases))})


@pytest.mark.timeout(2 * SPAWN_TIMEOUT_S)
def test_issue14_vocab_parallel_new_functions_dtensor_errors_communication(ranks):
    """The three new functions with DTensor inputs (logits Shard(-1), heads and biases Shard(0)); arguments
    that differ across ranks raise the same ValueError on every rank, a local error raises there and a
    ValueError naming it elsewhere; double backward raises; what goes over the wire."""
    world = ranks.world
    same_everywhere = ("issue14 dtensor teacher layout", "issue14 errors token_logprobs temperature",
                       "issue14 errors linear_token_logprobs shift", "issue14 errors linear_distillation kind",
                       "issue14 errors linear_distillation tokens", "issue14 errors token range")
    double = ("token_logprobs", "linear_token_logprobs", "linear_distillation")
    ranks.require({"issue14 dtensor token_logprobs", "issue14 dtensor linear_token_logprobs",
                   "issue14 dtensor linear_distillation", "issue14 communication", *same_everywhere}
                  | {f"issue14 double backward {name}" for name in double})
    for name in same_everywhere:
        messages = {ranks.message(r, name) for r in range(world)}
        assert len(messages) == 1, (name, messages)
    for name in double:
        message = ranks.message(0, f"issue14 double backward {name}")
        assert message.startswith("RuntimeError") and "differentiable once" in message, message
    last = world - 1
    assert "temperature" in ranks.message(last, "issue14 errors local (raiser)")
    for r in range(last):
        assert ranks.message(r, "issue14 errors local (others)").startswith("ValueError")


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
