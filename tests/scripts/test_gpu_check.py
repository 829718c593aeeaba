"""scripts/gpu-check (issue 12 D) must not rot between GPU loans: its dry run exercises every phase
on the CPU (the pytest phases collect only), and its pieces that matter when a run is cut off on
the GPU (a killed phase keeps its output, benchmark cells are appended as they finish, failures
are named from partial output) are tested directly. Nothing here times anything.
"""
import csv
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "gpu-check")


def _load_script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", SCRIPT)
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


gc = _load_script()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_issue12_dry_run_runs_every_phase(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    log = (out / "gpu-check.log").read_text()
    for phase in ("install", "smoke", "bench", "tests", "graphs"):
        assert re.search(rf"^   {phase}\s+(ok|dry-run)", log, re.M), (phase, log[-3000:])
    assert "--no-install --skip-tests" in log  # the warm-rerun command


def test_issue12_dry_run_outputs_fit_the_device_tool(dry_run):
    """At most 8 files come back from $OUT, none deeper than two folders; each phase has its log;
    the benchmark's complete CSV replaced the per-cell one."""
    _, out = dry_run
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, names in os.walk(out) for f in names]
    assert len(files) <= 8, files
    assert all(f.count(os.sep) <= 2 and re.fullmatch(r"[\w./-]+", f) for f in files), files
    for name in ("gpu-check.log", "smoke.log", "pytest.log", "bench.log", "bench/results.csv"):
        assert (out / name).is_file(), (name, files)
    assert not (out / "bench" / "cells.csv").exists()
    with open(out / "bench" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r["op"] == "ce" and r["method"] == "celoss-cython" and r["status"] == "ok" for r in rows)
    assert any(r["op"] == "linear" and r["method"] == "matmuls" and r["status"] == "ok" for r in rows)


def test_issue12_smoke_selects_every_entry_and_the_rest_excludes_it(dry_run):
    _, out = dry_run
    smoke = [ln for ln in (out / "smoke.log").read_text().splitlines() if "::" in ln]
    assert gc.unmatched_smoke(smoke, cuda=False) == []
    assert len(smoke) == sum(1 for *_, cuda_only in gc.SMOKE if not cuda_only)  # one test per entry
    rest = [ln for ln in (out / "pytest.log").read_text().splitlines() if "::" in ln]
    assert rest and not set(rest) & set(smoke)
    assert not [t for t in rest if "aot" in t or "compiles_without_spills" in t or t.startswith("tests/cpu")]
    assert any("[triton" in t or "-triton" in t for t in rest)
    assert any(t.startswith("tests/kernels/test_cross_entropy_kernels.py") for t in rest)


def test_issue12_graph_phase_collects_the_sync_checks(dry_run):
    """Phase 5 runs tests/test_cuda_graphs.py: the capture / replay checks and the checks that
    forward + backward make no synchronizing call (torch.cuda.set_sync_debug_mode("error"))."""
    _, out = dry_run
    log = (out / "gpu-check.log").read_text()
    for name in ("test_issue12_cross_entropy_graph_replays_new_data",
                 "test_issue12_cross_entropy_makes_no_synchronizing_call[bf16-scale1]",
                 "test_issue12_cross_entropy_makes_no_synchronizing_call[fp32-scale0.5]",
                 "test_issue12_linear_cross_entropy_chunked_makes_no_synchronizing_call[bf16]"):
        assert f"tests/test_cuda_graphs.py::{name}" in log, name


def test_issue12_smoke_names_are_pytest_k_identifiers():
    """-k cannot express spaces, commas or parentheses inside a name (ids such as
    ``kl-(bfloat16, bfloat16)-triton``): such an entry would break the whole smoke phase."""
    for path, name, _ in gc.SMOKE:
        assert os.path.isfile(os.path.join(REPO, path)), path
        assert re.fullmatch(r"[\w:+\-.\[\]\\/]+", name), name


def test_issue12_killed_phase_keeps_its_output(tmp_path):
    log = gc.Transcript(str(tmp_path / "t.log"))
    capture = tmp_path / "phase.log"
    code = "import time; print('first result', flush=True); time.sleep(120)"
    rc, lines = gc.Runner(log).run([sys.executable, "-c", code], timeout=3, env=dict(os.environ),
                                   capture_to=str(capture))
    assert rc == 124 and lines == ["first result"]
    text = capture.read_text()
    assert text.startswith("first result\n") and "killed at the phase limit" in text


def test_issue12_benchmark_cells_are_appended_as_printed(tmp_path):
    cells = gc.CellLog(str(tmp_path / "cells.csv"))
    # as the benchmark prints them (tqdm's carriage returns included)
    cells("\r  0%|  | 0/15 [00:00<?, ?cell/s]\r   ce|celoss-triton|bf16|16384x128256   "
          "fwd 1.25 ms, fwd+bwd 2.5e+00 ms, peak 4096 MB")
    cells("  linear|compile|bf16|8192x4096x128256   TIMEOUT: timeout after 60 s")
    cells("benchmarks: ceilings: copy_GBps 4300")  # not a cell
    with open(tmp_path / "cells.csv") as f:
        rows = list(csv.DictReader(f))
    assert cells.count == 2 and len(rows) == 2
    assert {k: rows[0][k] for k in ("op", "method", "dtype", "shape", "status", "fwd_ms", "train_ms", "peak_MB")} == \
        dict(op="ce", method="celoss-triton", dtype="bf16", shape="16384x128256", status="ok", fwd_ms="1.25",
             train_ms="2.5e+00", peak_MB="4096")
    assert (rows[1]["status"], rows[1]["note"], rows[1]["shape"]) == \
        ("timeout", "timeout after 60 s", "8192x4096x128256")


def test_issue12_failures_are_named_without_the_summary():
    lines = ["[gw3] [ 40%] FAILED tests/test_a.py::test_x[bf16]",
             "tests/test_b.py::test_y PASSED [ 50%]",
             "tests/test_b.py::test_z ERROR [ 60%]",
             "FAILED tests/test_a.py::test_x[bf16] - AssertionError: 1 != 2",
             "========= 1 failed, 1 passed, 1 error in 3.20s ========="]
    assert gc.failed_tests(lines) == ["tests/test_a.py::test_x[bf16]", "tests/test_b.py::test_z"]
    assert gc.pytest_summary(lines) == "1 failed, 1 passed, 1 error in 3.20s"
    assert gc.pytest_summary(lines[:3]) == "tests/test_b.py::test_z ERROR [ 60%]"
