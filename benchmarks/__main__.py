"""``python -m benchmarks [ce|linear|logprobs|linear_distill|family|all] [options]`` -- the celoss benchmark suite.

With no sub-command: the quick default on the device at hand (CPU: the cross-entropy table of the
core issue, about 3 minutes on 2 cores; CUDA: the lent-GPU subset of cross-entropy and linear CE).

Examples:
  python -m benchmarks                          # quick default
  python -m benchmarks all --full               # everything (the committed CPU results)
  python -m benchmarks ce --vocab 8192,32000,128256 --tokens 4096 --dtype bf16 --methods 'celoss-*,eager'
  python -m benchmarks logprobs                 # RL log-probs + entropy from hidden states
  python -m benchmarks linear_distill           # distillation from the student's and teacher's hidden states
  python -m benchmarks linear --device cuda --preset gpu
  python -m benchmarks --list                   # the methods and what they are
The terminal gets a short summary (celoss against eager and torch.compile per shape and dtype) and
the path of the full report: results.md (every table), results.csv (appended cell by cell) and PNG
plots in benchmarks/out/<date>-<time>-<device>-<preset>/ (git-ignored), or in --out DIR (e.g.
benchmarks/results/... for results meant to be committed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import time
from collections import Counter

from . import report, runner, suites
from .methods import METHODS, OPS, RUN_ORDER, SUBCOMMAND_OPS, canonical_dtype, select_methods

HERE = os.path.dirname(os.path.abspath(__file__))


def _list(text: str | None, cast=str):
    if text is None:
        return None
    return [cast(x) for x in re.split(r"[,\s]+", text.strip()) if x]


def _command(text: str) -> str:
    parts = _list(text)
    bad = [x for x in parts if x not in SUBCOMMAND_OPS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"unknown sub-command {text!r}; expected {', '.join(SUBCOMMAND_OPS)} "
                                         f"or a comma list of them")
    return ",".join(parts)


def _int(text: str) -> int:
    return int(float(text.replace("_", "")))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", type=_command,
                   help="ce, linear, logprobs, linear_distill, family, all, or a comma list such as ce,linear "
                        "(default: the quick default for the device)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="small, fast set (the default)")
    g.add_argument("--full", dest="preset", action="store_const", const="full",
                   help="vocab and token scaling, every method")
    g.add_argument("--preset", choices=["quick", "full", "gpu", "tiny"],
                   help="gpu: the lent-GPU subset; tiny: seconds-long dry run")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", help="comma list: fp32, bf16, fp16 (default: the preset's)")
    p.add_argument("--tokens", help="comma list of N (replaces the preset's shapes)")
    p.add_argument("--vocab", help="comma list of V (replaces the preset's shapes)")
    p.add_argument("--hidden", help="comma list of D for the ops from hidden states: linear CE, log-probs, "
                   "linear distillation (replaces the preset's shapes)")
    p.add_argument("--methods", help="comma list of method names or globs, e.g. 'celoss-*,eager' "
                   "({native} = the device's celoss backend); see --list")
    p.add_argument("--phases", default="fwd,train", help="fwd and/or train (= fwd+bwd step)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--warmup", type=int, help="warm-up calls after the first one")
    p.add_argument("--repeats", type=int, help="measured calls (median reported)")
    p.add_argument("--timeout", type=float, help="seconds per cell before it is marked and killed")
    p.add_argument("--budget", type=float, help="seconds for the whole run; later cells are skipped")
    p.add_argument("--isolate", choices=["method", "cell", "none"], default=None,
                   help="fresh worker process per method (default), per cell, or one for all")
    p.add_argument("--order", choices=["size", "method"],
                   help="size: smallest problems first, all methods on each (default on CPU); method: one "
                        "method after the other, the slow-to-start last (default on CUDA)")
    p.add_argument("--mem-limit-gb", type=float,
                   help="CPU: cap each worker's data segment (default 90%% of the available memory)")
    p.add_argument("--out", help="output folder (default: a new git-ignored benchmarks/out/<date>-<time>-"
                   "<device>-<preset>; committed results go under benchmarks/results/ only through --out)")
    p.add_argument("--expect-copy-gbps", type=float,
                   help="the copy bandwidth (GB/s) this machine reaches when quiet: a probe well below it "
                        "warns that the machine is busy (default: the best of earlier runs on this machine "
                        "found in benchmarks/out and benchmarks/results)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 1 if a method failed with an error")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    return p.parse_args(argv)


def detect_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def device_label(device: str, info: dict) -> str:
    if device != "cuda":
        return "cpu"
    name = (info.get("gpu_name") or "gpu").lower()
    m = re.search(r"\b([abhlt]\d{2,3}s?|b\d{3}|gh\d{3}|rtx\s?\d{4})\b", name)
    return "cuda-" + re.sub(r"[^a-z0-9]+", "", m.group(1) if m else name)[:16]


OUT_ROOT = os.path.join(HERE, "out")  # git-ignored: where runs go without --out
RESULTS_ROOT = os.path.join(HERE, "results")  # committed runs


def default_out_dir(label: str, preset: str, now: datetime.datetime | None = None) -> str:
    stamp = (now or datetime.datetime.now()).strftime("%Y-%m-%d-%H%M%S")
    return os.path.join(OUT_ROOT, f"{stamp}-{label}-{preset}")


def build_cells(args, device: str):
    """(ops, cells, preset values)."""
    command = args.command or ("ce" if device == "cpu" else "ce,linear")
    ops = []
    for part in command.split(","):
        ops += [op for op in SUBCOMMAND_OPS[part] if op not in ops]
    preset_name = args.preset or "quick"
    cells = []
    dtype_override = [canonical_dtype(d) for d in _list(args.dtype)] if args.dtype else None
    for op in ops:
        pre = suites.preset(preset_name, op, device)
        warmup = args.warmup if args.warmup is not None else pre["warmup"]
        repeats = args.repeats if args.repeats is not None else pre["repeats"]
        shapes = pre["shapes"]
        if args.tokens or args.vocab or args.hidden:
            common = lambda k: Counter(s[k] for s in shapes if k in s).most_common(1)[0][0]  # noqa: E731
            ns = _list(args.tokens, _int) or [common("N")]
            vs = _list(args.vocab, _int) or [common("V")]
            ds = (_list(args.hidden, _int) or [common("D")]) if "D" in OPS[op].dims else [None]
            shapes = [{k: v for k, v in (("N", n), ("D", d), ("V", v)) if v is not None}
                      for n in ns for d in ds for v in vs]
        methods = select_methods(op, _list(args.methods) if args.methods else pre["methods"], device)
        for m in methods:
            for dt in dtype_override or pre["dtypes"]:
                for shape in shapes:
                    cells.append({"op": op, "method": m, "dtype": dt, "shape": shape, "warmup": warmup,
                                  "repeats": repeats,
                                  "id": f"{op}|{m}|{dt}|" + "x".join(str(shape[k]) for k in OPS[op].dims)})
    rank = {m: i for i, m in enumerate(RUN_ORDER)}
    dt_rank = {"fp32": 0, "bf16": 1, "fp16": 2, "fp64": 3}
    if (args.order or ("size" if device == "cpu" else "method")) == "size":
        # smallest problems first, every method on each: a budget or a failure cuts the largest sizes
        cells.sort(key=lambda c: (ops.index(c["op"]), OPS[c["op"]].size(c["shape"]), c["shape"]["N"],
                                  dt_rank[c["dtype"]], rank[c["method"]]))
    else:
        # method by method, slow-to-start methods last (a GPU keeps one CUDA context at a time)
        cells.sort(key=lambda c: (rank[c["method"]], ops.index(c["op"]), dt_rank[c["dtype"]],
                                  OPS[c["op"]].size(c["shape"])))
    return ops, cells, preset_name


def list_methods():
    for name in RUN_ORDER:
        m = METHODS[name]
        print(f"{name:22s} {', '.join(m.ops):40s} {m.doc}")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        list_methods()
        return 0
    t_start = time.monotonic()
    # before the probe and the workers add to it: the machine's own load
    load = (os.getloadavg()[0], os.cpu_count() or 1) if hasattr(os, "getloadavg") else None
    device = args.device or detect_device()
    ops, cells, preset_name = build_cells(args, device)
    if not cells:
        print("nothing to run: no method matches", file=sys.stderr)
        return 2
    timeout = args.timeout or {"tiny": 60, "quick": 150 if device == "cpu" else 180, "gpu": 180,
                               "full": 900}[preset_name]
    isolate = args.isolate or ("none" if preset_name == "tiny" else "method")
    date = datetime.date.today().isoformat()

    # a scratch log until the output folder is known (its name needs the probed GPU)
    tmp_log = os.path.join(OUT_ROOT, f".worker-{os.getpid()}.log")
    os.makedirs(os.path.dirname(tmp_log), exist_ok=True)
    config = {"device": device, "threads": args.threads if device == "cpu" else None}
    if device == "cpu":
        limit = args.mem_limit_gb * 2 ** 30 if args.mem_limit_gb else None
        if limit is None:
            try:
                with open("/proc/meminfo") as f:
                    avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
                limit = 0.9 * avail
            except Exception:
                limit = None
        config["mem_limit"] = limit
    combos = sorted({(c["op"], c["method"], c["dtype"]) for c in cells})
    dtypes = sorted({c["dtype"] for c in cells})
    print(f"benchmarks: {len(cells)} cells on {device} (preset {preset_name}); probing the machine and "
          f"measuring its ceilings ...", file=sys.stderr, flush=True)
    try:
        pr = runner.probe(config, {"combos": combos, "dtypes": dtypes, "tiny": preset_name == "tiny"},
                          tmp_log, timeout=600)
    except (runner.WorkerDied, runner.WorkerTimeout) as exc:
        print(f"benchmarks: the probe worker failed: {exc!r}; see {tmp_log}", file=sys.stderr)
        return 3
    if pr.get("status") != "ok":
        print(f"benchmarks: probe failed: {pr.get('note')}; see {tmp_log}", file=sys.stderr)
        return 3
    info, ceil = pr["info"], pr["ceilings"]
    label = device_label(device, info)
    info["device"] = device
    expected = ((args.expect_copy_gbps, "--expect-copy-gbps") if args.expect_copy_gbps
                else report.expected_copy(info, [OUT_ROOT, RESULTS_ROOT], ceil.get("copy_bytes")))
    busy = report.busy_warning(ceil, expected, load if device == "cpu" else None)
    if busy:
        print(f"benchmarks: warning: {busy}", file=sys.stderr, flush=True)
    out_dir = args.out or default_out_dir(label, preset_name)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # a rerun into the same folder must not leave stale plots behind
        if name.endswith(".png") or name in ("results.md", "results.csv", "run.json"):
            os.remove(os.path.join(out_dir, name))
    log_path = os.path.join(out_dir, "worker.log")
    with open(log_path, "wb") as dst, open(tmp_log, "rb") as src:
        dst.write(src.read())
    os.remove(tmp_log)

    rows = []
    unavailable = {k: v for k, v in pr["available"].items() if v}
    for key, why in unavailable.items():
        op, method, dtype = key.split("|")
        rows.append({"op": op, "method": method, "dtype": dtype, "status": "unavailable", "note": why})
    to_run = [c for c in cells if f"{c['op']}|{c['method']}|{c['dtype']}" not in unavailable]
    ceil_txt = ", ".join(f"{k} {v:.3g}" for k, v in ceil.items() if isinstance(v, float))
    print(f"benchmarks: ceilings: {ceil_txt}; {len(to_run)} cells to run, {len(unavailable)} method/dtype "
          f"pairs unavailable; results in {out_dir}", file=sys.stderr, flush=True)

    # on a terminal: a progress bar, and a line only for a cell that failed; otherwise (a log, a test)
    # one line per cell
    bar = None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(to_run), file=sys.stderr, dynamic_ncols=True, unit="cell")
        except ImportError:
            pass
    write = ((lambda s: bar.write(s, file=sys.stderr)) if bar is not None  # noqa: E731
             else (lambda s: print(s, file=sys.stderr, flush=True)))
    csv_path = os.path.join(out_dir, "results.csv")
    for row in rows:
        report.append_csv(csv_path, row)

    def on_result(cell, res):
        row = {"op": cell["op"], "method": cell["method"], "dtype": cell["dtype"], **cell["shape"], **res}
        rows.append(row)
        report.append_csv(csv_path, row)
        if bar is not None:
            bar.set_description(cell["id"], refresh=False)
            bar.update(1)
            if res.get("status") == "ok":
                return
        if res.get("status") == "ok":
            parts = [f"fwd {res['fwd_ms']:.4g} ms" if res.get("fwd_ms") else "",
                     f"fwd+bwd {res['train_ms']:.4g} ms" if res.get("train_ms") else "",
                     f"peak {res['mem_train'] / 2 ** 20:.0f} MB" if res.get("mem_train") is not None else ""]
            text = ", ".join(p for p in parts if p)
        else:
            text = f"{res.get('status', '?').upper()}: {res.get('note', '')}"
        write(f"  {cell['id']:45s} {text}")

    jobs = [dict(c, phases=_list(args.phases)) for c in to_run]
    budget = None
    if args.budget:
        budget = args.budget - (time.monotonic() - t_start) - 10  # leave time for the report
    runner.run_cells(jobs, config, log_path, isolate=isolate, timeout=timeout, budget=budget,
                     on_result=on_result, size_of=lambda c: OPS[c["op"]].size(c["shape"]),
                     max_workers=len(METHODS) if device == "cpu" else 1)
    if bar is not None:
        bar.close()

    report.derive(rows, ceil)
    meta = {"device": device, "date": date, "info": info, "ceilings": ceil, "ops": ops,
            "preset": preset_name, "isolate": isolate, "busy": busy,
            "warmup": sorted({c["warmup"] for c in cells}), "repeats": sorted({c["repeats"] for c in cells}),
            "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in
                                                         (sys.argv[1:] if argv is None else argv))}
    plots = []
    if not args.no_plots:
        try:
            plots = report.plots(rows, out_dir, label)
        except Exception as exc:
            print(f"benchmarks: plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    meta["plots"] = plots
    meta["elapsed_s"] = time.monotonic() - t_start
    report_path = os.path.join(out_dir, "results.md")
    with open(report_path, "w") as f:
        f.write(report.markdown(meta, rows))
    report.write_csv(csv_path, rows)
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    rel = os.path.relpath(report_path)
    print(report.summary(meta, rows, report_path if rel.startswith("..") else rel))
    if plots:
        print(f"plots next to it: {', '.join(plots) if len(plots) <= 4 else f'{len(plots)} PNG files'}")
    if args.strict and any(r.get("status") in ("error", "crash") for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
