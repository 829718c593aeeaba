"""The benchmark suite must not rot between GPU loans: run it small, check outputs (the GPU check's
dry run is tests/scripts/test_gpu_check.py).

Nothing here times anything or asserts on a speed; the runs only have to produce their rows.
"""
import csv
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the kernel tests; the suite clears it anyway
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _bench(args, out, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", *args, "--out", str(out), "--threads", "2"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _rows(out):
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


def _row(rows, **match):
    found = [r for r in rows if all(r[k] == str(v) for k, v in match.items())]
    assert found, f"no row {match} in {[(r['op'], r['method'], r['dtype'], r['N'], r['V']) for r in rows]}"
    return found[0]


def test_quick_smoke_ce(tmp_path):
    """The default sub-command's path (quick preset, method isolation) at tiny sizes, compile included."""
    out = tmp_path / "ce"
    proc = _bench(["ce", "--quick", "--tokens", "64", "--vocab", "500,1000", "--dtype", "fp32",
                   "--methods", "celoss-{native}*,eager,compile", "--repeats", "2"], out)
    lines = proc.stdout.strip().splitlines()  # the short summary, not the whole report
    assert len(lines) <= 15 and "x eager" in lines[1] and "x compile" in lines[1], proc.stdout
    assert any(l.split()[:3] == ["ce", "64", "x"] and "500" in l for l in lines), proc.stdout
    assert f"full report: {out / 'results.md'}" in proc.stdout
    rows = _rows(out)
    for v in (500, 1000):
        for method in ("eager", "compile"):
            r = _row(rows, op="ce", method=method, dtype="fp32", N=64, V=v)
            assert r["status"] == "ok", r
            assert float(r["first_fwd_s"]) > 0 and r["fwd_pct_floor"] != ""
    assert any(r["method"] == "celoss-cython" for r in rows)
    assert (out / "ce-vocab-N64.png").is_file() and (out / "ce-overview.png").is_file()
    md = (out / "results.md").read_text()
    assert "| 64 x 500 | fp32 | eager |" in md


def test_family_smoke(tmp_path):
    out = tmp_path / "family"
    _bench(["family", "--quick", "--tokens", "32", "--vocab", "300", "--dtype", "fp32",
            "--methods", "celoss-{native},eager", "--repeats", "1", "--isolate", "none"], out)
    rows = _rows(out)
    for op in ("focal", "sigmoid_focal", "bce", "distill"):
        assert _row(rows, op=op, method="eager", dtype="fp32")["status"] == "ok"
        assert any(r["op"] == op and r["method"] == "celoss-cython" for r in rows)


def test_oom_is_a_row_and_larger_sizes_are_skipped(tmp_path):
    """A cell that runs out of memory is marked and the run goes on (here: a 1.5 GB data cap)."""
    out = tmp_path / "oom"
    _bench(["ce", "--tokens", "4096", "--vocab", "1000,65536,131072", "--dtype", "fp32", "--methods", "eager",
            "--repeats", "1", "--mem-limit-gb", "1.5", "--no-plots"], out)
    rows = _rows(out)
    assert _row(rows, V=1000)["status"] == "ok"
    assert _row(rows, V=65536)["status"] in ("oom", "crash"), _row(rows, V=65536)
    assert _row(rows, V=131072)["status"] == "skipped"


def test_timeout_is_a_row(tmp_path):
    from benchmarks import runner
    from benchmarks.methods import OPS
    results = []
    cells = [{"id": f"ce|eager|fp32|{n}", "op": "ce", "method": "eager", "dtype": "fp32",
              "shape": {"N": n, "V": 65536}, "warmup": 5, "repeats": 50} for n in (4096, 8192)]
    runner.run_cells(cells, {"device": "cpu", "threads": 1}, str(tmp_path / "log"), isolate="method",
                     timeout=1.0, budget=None, on_result=lambda c, r: results.append(r),
                     size_of=lambda c: OPS[c["op"]].size(c["shape"]))
    assert [r["status"] for r in results] == ["timeout", "skipped"], results


@pytest.mark.parametrize("op,phase,expected", [
    ("ce", "train", 2 * 8 * 10 * 4), ("distill", "fwd", 2 * 8 * 10 * 4), ("linear", "train", 6 * 8 * 3 * 10)])
def test_floors(op, phase, expected):
    from benchmarks.methods import OPS
    assert OPS[op].floor({"N": 8, "V": 10, "D": 3}, "fp32", phase) == expected


def test_report_ratios():
    from benchmarks import report
    rows = [
        {"op": "linear", "method": "matmuls", "dtype": "bf16", "N": 4, "D": 2, "V": 8, "status": "ok",
         "train_ms": 2.0, "fwd_ms": 1.0},
        {"op": "linear", "method": "eager", "dtype": "bf16", "N": 4, "D": 2, "V": 8, "status": "ok",
         "train_ms": 8.0, "fwd_ms": 3.0, "mem_train": 2 ** 20, "loss": 2.0},
        {"op": "linear", "method": "celoss-cython", "dtype": "bf16", "N": 4, "D": 2, "V": 8, "status": "ok",
         "train_ms": 2.2, "fwd_ms": 1.0, "loss": 2.5},
    ]
    report.derive(rows, {"copy_GBps": 10.0, "matmul_TFLOPs_bf16": 1.0})
    ours = rows[2]
    assert ours["x_matmuls"] == pytest.approx(1.1)
    assert ours["x_eager"] == pytest.approx(8.0 / 2.2)
    assert ours["train_pct_floor"] == pytest.approx(100 * (6 * 4 * 2 * 8 / 2.2e-3 / 1e12) / 1.0)
    assert "differs from eager" in ours["note"]
    assert rows[1]["mem_x_grad"] == pytest.approx(2 ** 20 / ((4 + 8) * 2 * 2))
    md = report.op_table(rows, "linear")
    assert "| 4 x 2 x 8 | bf16 | celoss-cython |" in md


def test_issue15_a_run_without_out_goes_to_a_new_ignored_folder(tmp_path, monkeypatch, capsys):
    """Without --out a run writes to benchmarks/out/<date>-<time>-<device>-<preset> (git-ignored: see
    test_report.py), prints the short summary and the path of the full report."""
    import re

    import benchmarks.__main__ as cli
    monkeypatch.setattr(cli, "OUT_ROOT", str(tmp_path / "out"))
    rc = cli.main(["ce", "--preset", "tiny", "--tokens", "32", "--vocab", "300", "--dtype", "fp32",
                   "--methods", "celoss-{native},eager", "--no-plots", "--threads", "2"])
    assert rc == 0
    runs = os.listdir(tmp_path / "out")
    assert len(runs) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d-\d{6}-cpu-tiny", runs[0]), runs
    folder = tmp_path / "out" / runs[0]
    assert _row(_rows(folder), method="eager", N=32, V=300)["status"] == "ok"
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(f"full report: {folder / 'results.md'}")
    assert len(printed.strip().splitlines()) <= 15


def test_issue14_hidden_state_ops_smoke(tmp_path):
    """linear_distill and logprobs rows from a run (tiny preset): celoss, eager and the bare products
    measured, and celoss's time over the products' (x_matmuls) reported for both."""
    out = tmp_path / "hidden"
    _bench(["linear_distill,logprobs", "--preset", "tiny", "--methods", "celoss-{native},eager,matmuls",
            "--repeats", "1", "--isolate", "none", "--no-plots"], out)
    rows = _rows(out)
    for op in ("linear_distill", "logprobs"):
        for method in ("eager", "matmuls", "celoss-cython"):
            assert _row(rows, op=op, method=method, dtype="fp32", N=128, D=64, V=1000)["status"] == "ok"
        assert float(_row(rows, op=op, method="celoss-cython")["x_matmuls"]) > 0
    assert "## linear_distill:" in (out / "results.md").read_text()
