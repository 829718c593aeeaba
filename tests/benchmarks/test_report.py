"""What a person sees after a benchmark run (issue 15): the short terminal summary, where the run is
written, the busy-machine warning, the CSV appended cell by cell, and plots that show every shape.
Fake result sets stand in for measurements: nothing here times anything."""
import csv
import json
import os
import subprocess

import pytest

from benchmarks import report
from benchmarks.methods import OPS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK_SHAPES = [(4096, 32000), (4096, 128256), (1024, 256000)]
# fwd+bwd ms of each method relative to celoss-cython (so the ratios below are known)
SLOWER = {"celoss-cython": 1.0, "celoss-cython-inplace": 0.8, "eager": 15.0, "compile": 6.5}


def fake_rows(shapes=QUICK_SHAPES, dtypes=("fp32", "bf16"), op="ce"):
    rows = [{"op": op, "method": "liger", "dtype": dt, "status": "unavailable", "note": "CUDA only"}
            for dt in dtypes]
    for n, v in shapes:
        for dt in dtypes:
            grad_mb = n * v * (4 if dt == "fp32" else 2) / 2 ** 20
            for method, slower in SLOWER.items():
                rows.append({"op": op, "method": method, "dtype": dt, "N": n, "V": v, "status": "ok",
                             "fwd_ms": 5.0 * slower, "train_ms": 10.0 * slower, "loss": 11.0,
                             "mem_train": (0 if method.endswith("inplace") else grad_mb * slower) * 2 ** 20})
    return rows


def fake_meta(rows, **extra):
    ceilings = {"copy_GBps": 40.0}
    report.derive(rows, ceilings)
    return dict({"device": "cpu", "date": "2026-11-27", "info": {"cpu": "AMD EPYC, 2 logical CPUs"},
                 "ceilings": ceilings, "ops": sorted({r["op"] for r in rows}), "preset": "quick",
                 "elapsed_s": 134.0}, **extra)


def test_issue15_summary_is_short_and_has_every_case():
    rows = fake_rows()
    rows.append({"op": "ce", "method": "compile", "dtype": "fp32", "N": 8192, "V": 256000, "status": "timeout",
                 "note": "timeout after 150 s"})
    text = report.summary(fake_meta(rows, busy="the machine looks busy: ..."), rows, "benchmarks/out/x/results.md")
    lines = text.splitlines()
    assert len(lines) <= 15, text
    head = lines[1].split()
    for col in ("x", "eager", "compile", "speed", "%", "floor", "peak", "extra"):
        assert col in head, text
    for n, v in QUICK_SHAPES:
        for dt in ("fp32", "bf16"):
            line = next((l for l in lines if f"{n} x {v}" in l and f" {dt} " in l), None)
            assert line is not None, (n, v, dt, text)
            # celoss-cython: 15x eager, 6.5x torch.compile; GB/s and % of the 40 GB/s floor; 1x the gradient
            b = next(r for r in rows if r["method"] == "celoss-cython" and r.get("N") == n and r.get("V") == v
                     and r["dtype"] == dt)
            assert " cython " in line and "15.0x" in line and "6.50x" in line, line
            assert f"{report._fmt(b['train_GBps'])} GB/s" in line and f"{b['train_pct_floor']:.0f}%" in line, line
            assert "MB (1.00x grad)" in line, line
    assert "1 timeout" in text and "compile" in lines[-3]
    assert lines[-2] == "warning: the machine looks busy: ..."
    assert lines[-1] == "full report: benchmarks/out/x/results.md"


def test_issue15_summary_of_a_large_run_gives_ranges_per_op_and_dtype():
    shapes = [(1024, v) for v in (8192, 32000, 65536, 128256, 512000)] + QUICK_SHAPES  # 8 shapes
    rows = fake_rows(shapes) + fake_rows([(4096, 32000), (4096, 128256)], op="focal")
    text = report.summary(fake_meta(rows), rows, "r.md")
    lines = text.splitlines()
    assert len(lines) <= 15, text
    ce_fp32 = next(l for l in lines if l.split()[:4] == ["ce", "8", "shapes", "fp32"])
    assert "15.0x" in ce_fp32 and "6.50x" in ce_fp32 and "1.00x grad" in ce_fp32
    gbps = [r["train_GBps"] for r in rows if r["method"] == "celoss-cython" and r["dtype"] == "fp32"
            and r["op"] == "ce"]
    assert f"{report._fmt(min(gbps))}-{report._fmt(max(gbps))} GB/s" in ce_fp32, ce_fp32
    assert any(l.split()[:4] == ["focal", "2", "shapes", "bf16"] for l in lines), text


def test_issue15_summary_says_when_nothing_was_measured():
    rows = [{"op": "ce", "method": "celoss-cython", "dtype": "fp32", "N": 8, "V": 10, "status": "error",
             "note": "RuntimeError: boom"}]
    text = report.summary(fake_meta(rows), rows, "r.md")
    assert "no celoss method measured" in text and "1 error" in text


def test_issue15_new_runs_go_to_an_ignored_folder():
    import datetime

    import benchmarks.__main__ as cli
    path = cli.default_out_dir("cpu", "quick", datetime.datetime(2026, 11, 27, 14, 3, 22))
    assert path == os.path.join(REPO, "benchmarks", "out", "2026-11-27-140322-cpu-quick")
    assert cli.parse_args([]).out is None  # committed results only with an explicit --out
    probe = os.path.relpath(os.path.join(path, "results.md"), REPO)
    ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO)
    committed = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/cpu-x/results.md"], cwd=REPO)
    if ignored.returncode == 128 or committed.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0 and committed.returncode == 1


def _run_json(folder, name, cpu, threads, copy, copy_bytes=1 << 30):
    os.makedirs(folder / name)
    (folder / name / "run.json").write_text(json.dumps(
        {"device": "cpu", "info": {"device": "cpu", "cpu": cpu, "threads": threads},
         "ceilings": {"copy_GBps": copy, "copy_bytes": copy_bytes}}))


def test_issue15_expected_copy_bandwidth_comes_from_earlier_runs_on_this_machine(tmp_path):
    here = {"device": "cpu", "cpu": "AMD EPYC, 2 logical CPUs", "threads": 2}
    _run_json(tmp_path / "results", "quiet", here["cpu"], 2, 41.9)
    _run_json(tmp_path / "out", "busier", here["cpu"], 2, 29.9)
    _run_json(tmp_path / "out", "other-threads", here["cpu"], 1, 90.0)
    _run_json(tmp_path / "out", "other-cpu", "Intel Xeon, 2 logical CPUs", 2, 90.0)
    _run_json(tmp_path / "out", "tiny-copy-in-cache", here["cpu"], 2, 90.0, copy_bytes=64 << 20)
    (tmp_path / "out" / "broken").mkdir()
    (tmp_path / "out" / "broken" / "run.json").write_text("{not json")
    bw, path = report.expected_copy(here, [str(tmp_path / "out"), str(tmp_path / "results")], 1 << 30)
    assert bw == 41.9 and path == str(tmp_path / "results" / "quiet" / "run.json")
    assert report.expected_copy(here, [str(tmp_path / "out")], 64 << 20)[0] == 90.0
    assert report.expected_copy(dict(here, cpu="unknown"), [str(tmp_path / "out")]) is None


def test_issue15_busy_warning():
    expected = (41.9, "benchmarks/results/cpu-2026-11-27-ce-full/run.json")
    quiet = {"copy_GBps": 40.0, "copy_best_GBps": 41.0}
    assert report.busy_warning(quiet, expected, load=(1.0, 2)) is None
    assert report.busy_warning(quiet, None) is None
    assert report.busy_warning({}, expected) is None  # the ceilings failed: nothing to say
    slow = report.busy_warning({"copy_GBps": 29.9, "copy_best_GBps": 30.5}, expected)
    assert "busy" in slow and "29.9 GB/s" in slow and "71%" in slow and expected[1] in slow
    assert "ratios" in slow and "drift" in slow
    noisy = report.busy_warning({"copy_GBps": 20.0, "copy_best_GBps": 40.0}, None)
    assert "varied within the probe" in noisy and "ratios" in noisy
    loaded = report.busy_warning(quiet, expected, load=(7.3, 2))
    assert "load average was 7.3 on 2" in loaded
    # the measured floor at exactly the threshold is still quiet
    assert report.busy_warning({"copy_GBps": report.BUSY_RATIO * 41.9}, expected) is None


def test_issue15_csv_is_appended_cell_by_cell(tmp_path):
    path = str(tmp_path / "results.csv")
    rows = fake_rows([(8, 10)], dtypes=("fp32",))[::-1]  # as they finish: not in the report's order
    for r in rows:
        report.append_csv(path, r)
    with open(path) as f:
        text = f.read()
    assert text.count("op,method,dtype") == 1
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert [(r["method"], r["status"]) for r in got] == [(r["method"], r["status"]) for r in rows]
    assert got[-2]["train_ms"] == "10.0" and got[-1]["note"] == "CUDA only"
    report.derive(rows, {"copy_GBps": 40.0})
    report.write_csv(path, rows)  # the final rewrite: sorted, with the derived columns
    with open(path) as f:
        final = list(csv.DictReader(f))
    assert [r["method"] for r in final] == ["liger", "celoss-cython", "celoss-cython-inplace", "eager", "compile"]
    assert final[1]["x_eager"] == "15.0" and final[1]["x_compile"] == "6.5"


@pytest.fixture(scope="module")
def plt():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    yield plt
    plt.close("all")


def test_issue15_overview_plot_shows_every_shape_and_speedups(plt):
    rows = fake_rows()
    report.derive(rows, {"copy_GBps": 40.0})
    fig = report.overview_figure(rows, "ce", "cpu")
    labels = [OPS["ce"].label({"N": n, "V": v}) for n, v in sorted(QUICK_SHAPES, key=lambda s: s[0] * s[1])]
    assert len(fig.axes) == 2 * 3  # fp32 and bf16 rows: speed-up, time, memory
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
    speedup, time_ax, mem_ax = fig.axes[:3]
    bar_labels = [t.get_text() for t in speedup.texts]
    assert "15.0x" in bar_labels and "6.5x" in bar_labels  # x faster than eager / torch.compile, written out
    assert {t.get_label() for t in speedup.containers} >= {"celoss-cython vs eager", "celoss-cython vs torch.compile"}
    assert time_ax.get_yscale() == "log"
    # memory: symlog, so the in-place method's 0 MB is drawn at 0, not at a made-up 0.1
    assert mem_ax.get_yscale() == "symlog"
    inplace = next(l for l in mem_ax.get_lines() if l.get_label() == "celoss-cython-inplace")
    assert list(inplace.get_ydata()) == [0, 0, 0] and mem_ax.get_ylim()[0] < 0
    # lines that coincide stay distinguishable: no two methods share marker, line style and fill
    looks = [(l.get_marker(), l.get_linestyle(), l.get_markerfacecolor() == "none") for l in time_ax.get_lines()]
    assert len(set(looks)) == len(looks) == len(SLOWER)


def test_issue15_plots_write_an_overview_and_scaling_figures_with_a_speedup_panel(plt, tmp_path):
    rows = fake_rows()
    report.derive(rows, {"copy_GBps": 40.0})
    written = report.plots(rows, str(tmp_path), "cpu")
    assert written == ["ce-overview.png", "ce-vocab-N4096.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in written)
    fig = report.scaling_figure(rows, "ce", "vocab", {"N": 4096}, "V", "cpu")
    speedup = fig.axes[1]
    assert {l.get_label() for l in speedup.get_lines()} >= {"celoss-cython vs eager",
                                                            "celoss-cython vs torch.compile"}
    assert fig.axes[2].get_yscale() == "symlog"
    # the two speed-ups of one method differ in line style and marker fill, in the legend too; the
    # log axis says "x" on its ticks
    lines = {l.get_label(): l for l in speedup.get_lines()}
    eager, compiled = lines["celoss-cython vs eager"], lines["celoss-cython vs torch.compile"]
    assert eager.get_linestyle() != compiled.get_linestyle()
    assert compiled.get_markerfacecolor() == "none" != eager.get_markerfacecolor()
    assert speedup.get_legend().handlelength >= 3
    fig.canvas.draw()
    assert all(t.get_text().endswith("x") for t in speedup.get_yticklabels() if t.get_text())
