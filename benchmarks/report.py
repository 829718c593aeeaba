"""A run's reports (parent process; matplotlib imported only for plots): the short terminal summary,
the markdown tables, the CSV (appended cell by cell while the run goes), PNG plots, and the check
that the machine was quiet enough for the numbers to mean something."""
from __future__ import annotations

import csv
import glob
import json
import math
import os
from collections import Counter

from .methods import METHOD_ORDER, METHODS, OPS

CSV_FIELDS = ["op", "method", "dtype", "N", "D", "V", "status", "fwd_ms", "bwd_ms", "train_ms",
              "train_fwd_ms", "fwd_min_ms", "train_min_ms", "fwd_GBps", "train_GBps", "fwd_TFLOPs",
              "train_TFLOPs", "fwd_pct_floor", "train_pct_floor", "x_matmuls", "x_eager", "x_compile", "mem_fwd_MB",
              "mem_train_MB", "mem_x_grad", "first_fwd_s", "first_train_s", "loss", "n_sets", "wall_s",
              "note", "warnings"]

READING = """\
How to read: **fwd** is the loss alone under `torch.no_grad()` (evaluation: the logits or hidden
states are passed detached, as they are when made under no_grad; linear CE's classifier weight still
requires grad, as a parameter does); **fwd+bwd** is one training step
(forward with autograd, then `backward()`), timed as a whole, and **bwd** is its backward part
(synchronized clocks between the two). A fused method forms the gradient during its forward part, so
its bwd is small: compare fwd+bwd. Times are medians of the repeats after warm-up, with the input
sets rotated; each method's own allocations are in its time. **% floor** is the floor time over the
measured time: the floor is the bytes that must move over the copy bandwidth measured in this run
(cross-entropy: logits read, + gradient written for fwd+bwd; distillation and BCE: both inputs read)
or, for the ops from hidden states (linear CE, log-probs, linear distillation), the FLOPs (2NDV
forward, 6NDV forward+backward; distillation: 4NDV and 8NDV, the teacher's product included) over
the matmul FLOP/s measured in this run. **GB/s** is those bytes over the time (effective bandwidth).
**x matmuls** is the time over the bare products X W^T (and the teacher's), G W, G^T X measured in
the same run (`matmuls` row). **x eager** is eager's
fwd+bwd time over the method's (**x compile**: `torch.compile`'s). **peak MB** is the peak extra memory of a call (CPU: peak resident
set of the worker process over its size just before the call; GPU: `max_memory_allocated` over
`memory_allocated` before it), the gradient included for fwd+bwd; **x grad** divides it by the size
of the gradient(s) the step must produce. **1st call s** is the first fwd plus the first fwd+bwd call
(compile / JIT time included)."""


def _fmt(x, digits=3):
    if x is None or x == "" or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, str):
        return x
    if abs(x) < 1e-3:
        return "0" if x == 0 else f"{x:.1g}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits - 1}f}" if abs(x) >= 1 else f"{x:.{digits}g}"


def derive(rows: list[dict], ceilings: dict) -> None:
    """Add the roofline and ratio columns to each measured row (in place)."""
    bw = ceilings.get("copy_GBps")
    by_key = {}
    for r in rows:
        if r.get("status") == "ok":
            by_key[(r["op"], r["method"], r["dtype"], r.get("N"), r.get("D"), r.get("V"))] = r
    for r in rows:
        if r.get("status") != "ok":
            continue
        op = OPS[r["op"]]
        shape = {k: r[k] for k in ("N", "D", "V") if r.get(k) not in (None, "")}
        for phase in ("fwd", "train"):
            t = r.get(f"{phase}_ms")
            if not t:
                continue
            floor = op.floor(shape, r["dtype"], phase)
            if op.floor_kind == "bytes":
                gbps = floor / t / 1e6
                r[f"{phase}_GBps"] = gbps
                if bw:
                    r[f"{phase}_pct_floor"] = 100 * gbps / bw
            else:
                tflops = floor / t / 1e9
                r[f"{phase}_TFLOPs"] = tflops
                peak = ceilings.get(f"matmul_TFLOPs_{r['dtype']}")
                if peak:
                    r[f"{phase}_pct_floor"] = 100 * tflops / peak
        rest = (r["dtype"], r.get("N"), r.get("D"), r.get("V"))
        mm = by_key.get((r["op"], "matmuls") + rest)
        if op.floor_kind == "flops" and mm and r.get("train_ms") and mm.get("train_ms"):
            r["x_matmuls"] = r["train_ms"] / mm["train_ms"]
        eager = by_key.get((r["op"], "eager") + rest)
        for name in ("eager", "compile"):
            other = by_key.get((r["op"], name) + rest)
            if other and r.get("train_ms") and other.get("train_ms") and r["method"] != "matmuls":
                r[f"x_{name}"] = other["train_ms"] / r["train_ms"]
        for phase in ("fwd", "train"):
            if r.get(f"mem_{phase}") is not None:
                r[f"mem_{phase}_MB"] = r[f"mem_{phase}"] / 2 ** 20
        if r.get("mem_train") is not None:
            r["mem_x_grad"] = r["mem_train"] / op.grad_bytes(shape, r["dtype"])
        # a fast wrong answer is not a result: flag a loss that disagrees with eager's on the same inputs
        if (eager and r["method"] not in ("eager", "matmuls") and isinstance(r.get("loss"), float)
                and isinstance(eager.get("loss"), float)):
            tol = 1e-3 if r["dtype"] in ("fp32", "fp64") else 3e-2
            ref = eager["loss"]
            if abs(r["loss"] - ref) > tol * max(1.0, abs(ref)):
                r["note"] = (r.get("note") or "") + f" loss {r['loss']:.6g} differs from eager's {ref:.6g}"


def _shape_label(r):
    return OPS[r["op"]].label({k: r[k] for k in ("N", "D", "V") if r.get(k) not in (None, "")})


def _sort_key(r):
    order = METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99
    dt = ["fp32", "bf16", "fp16", "fp64"].index(r["dtype"]) if r["dtype"] in ("fp32", "bf16", "fp16", "fp64") else 9
    return (r.get("N") or 0) * (r.get("V") or 0) * (r.get("D") or 1), r.get("N") or 0, dt, order


def op_table(rows: list[dict], op_name: str) -> str:
    op = OPS[op_name]
    flops = op.floor_kind == "flops"
    unit = "TFLOP/s" if flops else "GB/s"
    head = ["shape " + "x".join(op.dims), "dtype", "method", "fwd ms", "bwd ms", "fwd+bwd ms",
            f"fwd {unit}", f"fwd+bwd {unit}", "% floor fwd", "% floor fwd+bwd"]
    if flops:
        head.append("x matmuls")
    head += ["x eager", "peak MB fwd", "peak MB fwd+bwd", "x grad", "1st call s", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted((r for r in rows if r["op"] == op_name and r.get("status") != "unavailable"), key=_sort_key):
        ok = r.get("status") == "ok"
        first = (r.get("first_fwd_s") or 0) + (r.get("first_train_s") or 0) if ok else None
        note = r.get("note") or ""
        if not ok:
            note = f"**{r.get('status', '?').upper()}** {note}".strip()
        cells = [_shape_label(r), r["dtype"], r["method"], _fmt(r.get("fwd_ms")), _fmt(r.get("bwd_ms")),
                 _fmt(r.get("train_ms")), _fmt(r.get("fwd_TFLOPs" if flops else "fwd_GBps")),
                 _fmt(r.get("train_TFLOPs" if flops else "train_GBps")),
                 _fmt(r.get("fwd_pct_floor")), _fmt(r.get("train_pct_floor"))]
        if flops:
            cells.append(_fmt(r.get("x_matmuls")))
        cells += [_fmt(r.get("x_eager")), _fmt(r.get("mem_fwd_MB")), _fmt(r.get("mem_train_MB")),
                  _fmt(r.get("mem_x_grad")), _fmt(first), note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


DT_RANK = {"fp32": 0, "bf16": 1, "fp16": 2, "fp64": 3}


def cases(rows: list[dict], ops: list[str]) -> list[dict]:
    """Per op, shape and dtype with a measured celoss method: ``best`` (celoss's fastest fwd+bwd, the
    in-place variant apart), ``inplace`` (its fastest in-place one or None), ``peer`` (the fastest
    other method but the bare products, or None) and ``by`` (method name -> row); ops in `ops`' order,
    then by size and dtype."""
    groups = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("train_ms"):
            groups.setdefault((r["op"], r.get("N"), r.get("D"), r.get("V"), r["dtype"]), []).append(r)
    out = []
    for key in sorted(groups, key=lambda k: (ops.index(k[0]) if k[0] in ops else 99,
                                             (k[1] or 0) * (k[3] or 0) * (k[2] or 1), k[1] or 0,
                                             DT_RANK.get(k[4], 9))):
        rs = groups[key]
        ours = [r for r in rs if r["method"].startswith("celoss-") and not r["method"].endswith("-inplace")]
        if not ours:
            continue
        inplace = [r for r in rs if r["method"].startswith("celoss-") and r["method"].endswith("-inplace")]
        peers = [r for r in rs if not r["method"].startswith("celoss-") and r["method"] != "matmuls"]
        fastest = lambda group: min(group, key=lambda r: r["train_ms"]) if group else None  # noqa: E731
        out.append({"op": key[0], "dtype": key[4], "best": fastest(ours), "inplace": fastest(inplace),
                    "peer": fastest(peers), "by": {r["method"]: r for r in rs}})
    return out


def headline_table(rows: list[dict], ops: list[str]) -> str:
    """Per op, shape and dtype: celoss's best method against the best peer, eager and torch.compile."""
    lines = ["| op | shape | dtype | celoss | fwd+bwd ms | % floor | x eager | x compile | best peer "
             "| x best peer | x matmuls | peak x grad | in place: ms, peak x grad |", "|" + "---|" * 13]
    for c in cases(rows, ops):
        best, peer, inplace = c["best"], c["peer"], c["inplace"]

        def ratio(other):
            return _fmt(other["train_ms"] / best["train_ms"]) if other else ""
        lines.append("| " + " | ".join([
            c["op"], _shape_label(best), c["dtype"], best["method"], _fmt(best["train_ms"]),
            _fmt(best.get("train_pct_floor")), ratio(c["by"].get("eager")), ratio(c["by"].get("compile")),
            peer["method"] if peer else "", ratio(peer), _fmt(best.get("x_matmuls")),
            _fmt(best.get("mem_x_grad")),
            f"{_fmt(inplace['train_ms'])}, {_fmt(inplace.get('mem_x_grad'))}" if inplace else ""]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def unavailable_table(rows: list[dict]) -> str:
    seen = {}
    for r in rows:
        if r.get("status") == "unavailable":
            key = (r["op"], r["method"], r.get("note") or "")
            seen.setdefault(key, []).append(r["dtype"])
    if not seen:
        return ""
    lines = ["| op | method | dtypes | why |", "|---|---|---|---|"]
    for (op, method, note), dts in seen.items():
        lines.append(f"| {op} | {method} | {', '.join(sorted(set(dts)))} | {note.replace('|', '/')} |")
    return "\n".join(lines)


def markdown(meta: dict, rows: list[dict]) -> str:
    info, ceil = meta.get("info", {}), meta.get("ceilings", {})
    device = meta["device"]
    where = info.get("gpu") if device == "cuda" else info.get("cpu")
    out = [f"# celoss benchmarks: {device} ({where}), {meta['date']}", "",
           f"Command: `{meta['command']}` (preset `{meta['preset']}`, warm-up calls after the first "
           f"{'/'.join(map(str, meta['warmup']))}, repeats {'/'.join(map(str, meta['repeats']))}, isolation "
           f"`{meta['isolate']}`); the run took {meta.get('elapsed_s', 0):.0f} s.",
           ""]
    sw = [f"torch {info.get('torch')}", f"triton {info.get('triton')}", f"celoss {info.get('celoss')}",
          f"liger-kernel {info.get('liger-kernel')}", f"cut-cross-entropy {info.get('cut-cross-entropy')}",
          f"Python {info.get('python')}"]
    if device == "cpu":
        sw.append(f"{info.get('threads')} threads, {info.get('ram_GB')} GB RAM")
    else:
        sw.append(f"CUDA {info.get('cuda')}; host {info.get('cpu')}")
    out.append("Software: " + ", ".join(sw) + ".")
    if info.get("celoss_backends"):
        out.append("celoss backends: " + ", ".join(f"{k}: {v}" for k, v in info["celoss_backends"].items()) + ".")
    out.append("")
    if ceil.get("error"):
        out.append(f"Ceilings: measurement failed ({ceil['error']}); no % floor.")
    else:
        parts = [f"copy {_fmt(ceil.get('copy_GBps'))} GB/s (bytes read + written, "
                 f"{(ceil.get('copy_bytes') or 0) / 2 ** 30:.2g} GiB)"]
        if ceil.get("first_touch_GBps"):
            parts.append(f"first-touch writes to fresh pages {_fmt(ceil['first_touch_GBps'])} GB/s")
        for k, v in sorted(ceil.items()):
            if k.startswith("matmul_TFLOPs_"):
                parts.append(f"{k.split('_')[-1]} matmul ({ceil.get('matmul_n')}^3) "
                             f"{_fmt(v * 1e3) + ' GFLOP/s' if v and v < 1 else _fmt(v) + ' TFLOP/s' if v else 'failed'}")
        out.append("Ceilings measured in this run: " + "; ".join(parts) + ".")
    out.append(f"Peak memory: {info.get('memory_measure', '?')}.")
    if meta.get("busy"):
        out += ["", f"**Warning:** {meta['busy']}"]
    out += ["", READING, ""]
    heads = headline_table(rows, meta["ops"])
    if heads:
        out += ["## Headlines", "",
                "celoss's fastest method per case (the in-place variant apart), fwd+bwd; x ... = the other's "
                "time over celoss's (above 1: celoss is faster); x matmuls: over the bare products (the ops "
                "from hidden states).", "", heads, ""]
    for op_name in meta["ops"]:
        if not any(r["op"] == op_name and r.get("status") != "unavailable" for r in rows):
            continue
        out += [f"## {op_name}: {OPS[op_name].title}", "", op_table(rows, op_name), ""]
    un = unavailable_table(rows)
    if un:
        out += ["## Methods not measured", "", un, ""]
    out += ["## Methods", ""]
    used = sorted({r["method"] for r in rows}, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)
    out += [f"- `{m}`: {METHODS[m].doc}" for m in used if m in METHODS]
    if meta.get("plots"):
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in meta["plots"]]
    return "\n".join(out) + "\n"


# ---- the terminal summary ----------------------------------------------------------------------

SUMMARY_CASES = 10  # more cases than this: one line per op and dtype, with ranges over the shapes


def _speed(r: dict) -> str:
    if r.get("train_TFLOPs") is not None:
        t = r["train_TFLOPs"]
        return f"{_fmt(t * 1e3)} GFLOP/s" if t < 1 else f"{_fmt(t)} TFLOP/s"
    return f"{_fmt(r['train_GBps'])} GB/s" if r.get("train_GBps") is not None else ""


def _span(values: list, fmt, num=_fmt) -> str:
    """``fmt(v)``, or ``num(lo)-fmt(hi)`` over several values (the unit written once)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt(lo) if num(lo) == num(hi) else f"{num(lo)}-{fmt(hi)}"


def _mem(r: dict) -> str:
    if r.get("mem_train_MB") is None:
        return "-"
    x = f" ({_fmt(r['mem_x_grad'])}x grad)" if r.get("mem_x_grad") is not None else ""
    return f"{_fmt(r['mem_train_MB'])} MB{x}"


def summary(meta: dict, rows: list[dict], report_path: str) -> str:
    """At most ~15 lines for the terminal: per shape and dtype (or, past SUMMARY_CASES cases, per op
    and dtype with ranges) celoss's fastest fwd+bwd, how many times faster than eager and than
    torch.compile, its effective GB/s (TFLOP/s for the matmul-bound ops) and share of the measured
    floor, its peak extra memory; then what failed, the busy warning and where the full report is."""
    info, ceil = meta.get("info", {}), meta.get("ceilings", {})
    where = info.get("gpu") if meta["device"] == "cuda" else info.get("cpu")
    floor = f"copy {_fmt(ceil['copy_GBps'])} GB/s" if ceil.get("copy_GBps") else "no ceilings"
    lines = [f"celoss benchmarks on {meta['device']} ({where}), preset {meta['preset']}, "
             f"{meta.get('elapsed_s', 0):.0f} s; measured floor: {floor}"]
    cs = cases(rows, meta["ops"])
    fmt_x = lambda v: f"{_fmt(v)}x"  # noqa: E731
    fmt_pct = lambda v: f"{v:.0f}%"  # noqa: E731
    table = [("op", "shape", "dtype", "celoss", "fwd+bwd", "x eager", "x compile", "speed", "% floor",
              "peak extra")]
    if len(cs) <= SUMMARY_CASES:
        for c in cs:
            b = c["best"]
            table.append((c["op"], _shape_label(b), c["dtype"], b["method"].replace("celoss-", ""),
                          f"{_fmt(b['train_ms'])} ms", _span([b.get("x_eager")], fmt_x),
                          _span([b.get("x_compile")], fmt_x), _speed(b) or "-",
                          _span([b.get("train_pct_floor")], fmt_pct), _mem(b)))
    else:
        groups = {}
        for c in cs:
            groups.setdefault((c["op"], c["dtype"]), []).append(c["best"])
        for (op, dtype), bs in groups.items():
            speeds = [b.get("train_TFLOPs") if b.get("train_TFLOPs") is not None else b.get("train_GBps")
                      for b in bs]
            unit = "TFLOP/s" if bs[0].get("train_TFLOPs") is not None else "GB/s"
            table.append((op, f"{len(bs)} shapes", dtype, ",".join(sorted({b["method"].replace("celoss-", "")
                                                                          for b in bs})),
                          _span([b["train_ms"] for b in bs], lambda v: f"{_fmt(v)} ms"),
                          _span([b.get("x_eager") for b in bs], fmt_x),
                          _span([b.get("x_compile") for b in bs], fmt_x),
                          _span(speeds, lambda v: f"{_fmt(v)} {unit}"),
                          _span([b.get("train_pct_floor") for b in bs], fmt_pct, lambda v: f"{v:.0f}"),
                          _span([b.get("mem_x_grad") for b in bs], lambda v: f"{_fmt(v)}x grad")))
    if len(table) > 1:
        widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
        lines += ["  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    else:
        lines.append("  no celoss method measured a fwd+bwd step (see the report)")
    failed = [r for r in rows if r.get("status") not in ("ok", "unavailable")]
    if failed:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(r.get("status", "?") for r in failed).items()))
        lines.append(f"  not measured: {kinds} (cells of {', '.join(sorted({r['method'] for r in failed}))})")
    differs = [r for r in rows if "differs from eager" in (r.get("note") or "")]
    if differs:
        lines.append(f"  loss differs from eager's in {len(differs)} cells: see the notes in the report")
    if meta.get("busy"):
        lines.append(f"warning: {meta['busy']}")
    lines.append(f"full report: {report_path}")
    return "\n".join(lines)


# ---- is the machine quiet? -------------------------------------------------------------------------

BUSY_RATIO = 0.8  # copy bandwidth under this share of the expected one: the machine is busy


def same_machine(info: dict, other: dict) -> bool:
    keys = ("gpu",) if info.get("device") == "cuda" else ("cpu", "threads")
    return info.get("device") == other.get("device") and all(info.get(k) == other.get(k) for k in keys)


def expected_copy(info: dict, folders: list[str], copy_bytes: int | None = None) -> tuple[float, str] | None:
    """The best copy bandwidth an earlier run on this machine (same CPU model and threads, or the same
    GPU) measured with a copy of the same size (a small one may run in cache): ``(GB/s, its
    run.json)`` from the run folders under `folders`, or None."""
    best = None
    for folder in folders:
        for path in glob.glob(os.path.join(folder, "*", "run.json")):
            try:
                with open(path) as f:
                    run = json.load(f)
                bw = float(run["ceilings"]["copy_GBps"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if copy_bytes and run["ceilings"].get("copy_bytes") not in (None, copy_bytes):
                continue
            if same_machine(info, run.get("info", {})) and (best is None or bw > best[0]):
                best = (bw, path)
    return best


def busy_warning(ceilings: dict, expected: tuple[float, str] | None,
                 load: tuple[float, int] | None = None) -> str | None:
    """A sentence when the probe says other work shares the machine: its copy bandwidth below
    BUSY_RATIO of `expected` (an earlier run's on this machine, or --expect-copy-gbps), or its own
    repeats spread (median below BUSY_RATIO of the fastest), or, CPU, `load` = (1-minute load average
    before the run started, logical CPUs) with more runnable tasks than CPUs; None when it looks quiet."""
    bw = ceilings.get("copy_GBps")
    why = []
    if bw and expected and bw < BUSY_RATIO * expected[0]:
        why.append(f"the copy bandwidth measured now, {_fmt(bw)} GB/s, is {100 * bw / expected[0]:.0f}% of "
                   f"the {_fmt(expected[0])} GB/s expected here ({expected[1]})")
    elif bw and ceilings.get("copy_best_GBps") and bw < BUSY_RATIO * ceilings["copy_best_GBps"]:
        why.append(f"the copy bandwidth varied within the probe (median {_fmt(bw)} GB/s, fastest "
                   f"{_fmt(ceilings['copy_best_GBps'])} GB/s)")
    if load and load[0] > load[1]:
        why.append(f"the load average was {load[0]:.1f} on {load[1]} logical CPUs before the run started")
    if not why:
        return None
    return (f"the machine looks busy: {'; '.join(why)}. Times and GB/s drift while other work shares it, "
            f"and so do the ratios between methods (each is measured at a different moment): compare "
            f"with runs on a quiet machine.")


# ---- CSV ---------------------------------------------------------------------------------------------

def _csv_row(r: dict) -> dict:
    return {k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS}


def append_csv(path: str, row: dict) -> None:
    """Append one finished cell (the header only when the file is new): an interrupted run keeps
    what it measured. The final write_csv rewrites the file sorted, with the derived columns."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(_csv_row(row))


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["op"],) + _sort_key(r)):
            w.writerow(_csv_row(r))


# ---- plots ---------------------------------------------------------------------------------------

MARKERS = "os^DvP<X>*ph"
LINESTYLES = ("-", "--", "-.", ":")
MEM_LINTHRESH_MB = 1.0  # the memory axes are symlog: linear below 1 MB, so 0 MB is drawn at 0


def plot_groups(rows: list[dict], op_name: str):
    """(kind, fixed dict, x key) for each scaling series with at least 2 sizes."""
    ok = [r for r in rows if r["op"] == op_name and r.get("status") == "ok"]
    groups = []
    for kind, x, fixed_keys in (("vocab", "V", ("N", "D")), ("tokens", "N", ("V", "D"))):
        series = {}
        for r in ok:
            fixed = tuple((k, r.get(k)) for k in fixed_keys if r.get(k) not in (None, ""))
            series.setdefault(fixed, set()).add(r[x])
        for fixed, xs in sorted(series.items(), key=lambda kv: -len(kv[1])):
            if len(xs) >= 2:
                groups.append((kind, dict(fixed), x))
    return groups


def _style(k: int, colors) -> dict:
    """Method k's look in every panel: colour, marker, line style and filled or hollow markers all
    vary, so lines that coincide stay distinguishable."""
    return dict(color=colors[k % len(colors)], marker=MARKERS[k % len(MARKERS)],
                linestyle=LINESTYLES[k % len(LINESTYLES)], markersize=8 - 2 * (k % 2),
                markerfacecolor="none" if k % 2 else colors[k % len(colors)], linewidth=1.4, alpha=0.9)


def _dtypes(sel):
    return [d for d in ("fp32", "bf16", "fp16", "fp64") if any(r["dtype"] == d for r in sel)]


def _memory_axis(ax):
    ax.set_yscale("symlog", linthresh=MEM_LINTHRESH_MB)
    ax.set_ylim(bottom=-0.2 * MEM_LINTHRESH_MB)  # markers at 0 MB stay above the frame
    ax.set_ylabel(f"peak extra memory, fwd+bwd (MB; linear below {MEM_LINTHRESH_MB:g})")


def _speedup_lines(ax, pts_by_method, colors):
    """Speed-up panel: x faster than eager (solid) and than torch.compile (dashed), per celoss method."""
    from matplotlib.ticker import FuncFormatter

    for k, m in enumerate(METHOD_ORDER):
        if m not in pts_by_method:
            continue
        # vs torch.compile: dashed with hollow markers, so the two stay apart in the legend too
        for peer, ls, fill, label in (("x_eager", "-", None, "eager"), ("x_compile", "--", "none", "torch.compile")):
            pts = [(x, r[peer]) for x, r in pts_by_method[m] if r.get(peer)]
            if pts:
                st = dict(_style(k, colors), linestyle=ls, markerfacecolor=fill or colors[k % len(colors)])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{m} vs {label}", **st)
    ax.axhline(1.0, color="grey", linewidth=1, linestyle=":")
    ax.set_yscale("log")
    times = FuncFormatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_major_formatter(times)
    ax.yaxis.set_minor_formatter(times)
    ax.set_ylabel("x faster (fwd+bwd; above 1: celoss is faster)")


def overview_figure(rows: list[dict], op_name: str, device: str):
    """One row per dtype: celoss's speed-up per shape (bars labelled with the value), fwd+bwd time and
    peak extra memory of every method per shape. Every measured shape is a tick on the x axes."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    sel = [r for r in rows if r["op"] == op_name and r.get("status") == "ok"]
    dtypes = _dtypes(sel)
    shapes = sorted({tuple((k, r.get(k)) for k in OPS[op_name].dims) for r in sel},
                    key=lambda s: (OPS[op_name].size(dict(s)), dict(s)["N"]))
    labels = [OPS[op_name].label(dict(s)) for s in shapes]
    fig, axes = plt.subplots(len(dtypes), 3, figsize=(19, 4.6 * len(dtypes)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1, 1]})
    for i, dt in enumerate(dtypes):
        here = [r for r in sel if r["dtype"] == dt]
        methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in here)]
        at = {(tuple((k, r.get(k)) for k in OPS[op_name].dims), r["method"]): r for r in here}
        ax = axes[i][0]
        # the reference backend (a correctness oracle) and the no-cache diagnostic only where nothing
        # else of celoss ran: more bars per shape would not be readable
        ours = [m for m in methods if m.startswith("celoss-") and m != "celoss-torch" and
                not m.endswith("-nocache")] or [m for m in methods if m.startswith("celoss-")]
        bars = [(m, peer) for m in ours for peer in ("eager", "compile")
                if any(at.get((s, m), {}).get(f"x_{peer}") for s in shapes)]
        width = 0.8 / max(len(bars), 1)
        tallest = 1.0
        for b, (m, peer) in enumerate(bars):
            k = METHOD_ORDER.index(m)
            xs = [j + (b - (len(bars) - 1) / 2) * width for j in range(len(shapes))]
            vals = [at.get((s, m), {}).get(f"x_{peer}") for s in shapes]
            drawn = [(x, v) for x, v in zip(xs, vals) if v]
            tallest = max([tallest] + [v for _, v in drawn])
            rects = ax.bar([x for x, _ in drawn], [v for _, v in drawn], width=width,
                           color=colors[k % len(colors)], alpha=1.0 if peer == "eager" else 0.5,
                           hatch="" if peer == "eager" else "//", edgecolor="black", linewidth=0.5,
                           label=f"{m} vs {'eager' if peer == 'eager' else 'torch.compile'}")
            ax.bar_label(rects, labels=[f"{_fmt(v, 2)}x" for _, v in drawn], fontsize=7, padding=2,
                         rotation=90 if len(shapes) * len(bars) > 12 else 0)
        ax.axhline(1.0, color="grey", linewidth=1, linestyle=":")
        ax.set_ylim(0, 1.5 * tallest)  # the top third for the legend, above the bars and their labels
        ax.set_ylabel("x faster (fwd+bwd; above 1: celoss is faster)")
        ax.set_title(f"{op_name} {dt}: celoss's speed-up on {device}", fontsize=10)
        for j, (metric, ylabel) in enumerate((("train_ms", "fwd+bwd time (ms)"), ("mem_train_MB", None)), 1):
            ax = axes[i][j]
            for n, m in enumerate(methods):
                k = METHOD_ORDER.index(m)
                dodge = 0.04 * (n - (len(methods) - 1) / 2)  # coinciding values stay apart
                pts = [(x + dodge, at[(s, m)][metric]) for x, s in enumerate(shapes)
                       if (s, m) in at and at[(s, m)].get(metric) is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **_style(k, colors))
            if metric == "train_ms":
                ax.set_yscale("log")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{op_name} {dt}: time per training step", fontsize=10)
            else:
                _memory_axis(ax)
                ax.set_title(f"{op_name} {dt}: peak extra memory", fontsize=10)
        for j, ax in enumerate(axes[i]):
            ax.set_xlim(-0.5, len(shapes) - 0.5)
            ax.set_xticks(range(len(shapes)), labels, rotation=15, fontsize=8)
            ax.set_xlabel("shape " + " x ".join(OPS[op_name].dims))
            ax.grid(True, which="both", axis="y", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, **({"loc": "upper left", "ncols": 2} if j == 0 else {}))
    fig.tight_layout()
    return fig


def scaling_figure(rows: list[dict], op_name: str, kind: str, fixed: dict, x: str, device: str):
    """One row per dtype: fwd+bwd time of every method, celoss's speed-up over eager and torch.compile,
    and peak extra memory, against V (or N) with the other sizes fixed."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    sel = [r for r in rows if r["op"] == op_name and r.get("status") == "ok"
           and all(r.get(k) == v for k, v in fixed.items())]
    dtypes = _dtypes(sel)
    fig, axes = plt.subplots(len(dtypes), 3, figsize=(17, 4.4 * len(dtypes)), squeeze=False)
    fixed_txt = ", ".join(f"{k}={v}" for k, v in fixed.items())
    for i, dt in enumerate(dtypes):
        by_method = {}
        for r in sorted((r for r in sel if r["dtype"] == dt), key=lambda r: r[x]):
            by_method.setdefault(r["method"], []).append((r[x], r))
        for j, metric in enumerate(("train_ms", "speedup", "mem_train_MB")):
            ax = axes[i][j]
            if metric == "speedup":
                _speedup_lines(ax, {m: v for m, v in by_method.items() if m.startswith("celoss-")}, colors)
            else:
                for k, m in enumerate(METHOD_ORDER):
                    pts = [(xv, r[metric]) for xv, r in by_method.get(m, []) if r.get(metric) is not None]
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **_style(k, colors))
                if metric == "train_ms":
                    ax.set_yscale("log")
                    ax.set_ylabel("fwd+bwd time (ms)")
                else:
                    _memory_axis(ax)
            ax.set_xscale("log")
            ax.set_xlabel({"V": "vocabulary V", "N": "tokens N"}[x])
            ax.set_title(f"{op_name} {dt} ({fixed_txt}) on {device}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, handlelength=3.5)  # long enough to show the line styles
    fig.tight_layout()
    return fig


def plots(rows: list[dict], out_dir: str, device: str) -> list[str]:
    """PNG files written to out_dir: per op an overview (every shape), and per scaling series of at
    least 2 sizes a figure against V or N."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for op_name in OPS:
        if not any(r["op"] == op_name and r.get("status") == "ok" for r in rows):
            continue
        figures = [(f"{op_name}-overview.png", overview_figure(rows, op_name, device))]
        for kind, fixed, x in plot_groups(rows, op_name):
            name = f"{op_name}-{kind}-" + "-".join(f"{k}{v}" for k, v in fixed.items()) + ".png"
            figures.append((name, scaling_figure(rows, op_name, kind, fixed, x, device)))
        for name, fig in figures:
            fig.savefig(os.path.join(out_dir, name), dpi=90)
            plt.close(fig)
            written.append(name)
    return written
