"""Markdown table, CSV and PNG plots of a run (parent process; matplotlib imported only for plots)."""
from __future__ import annotations

import csv
import math
import os

from .methods import METHOD_ORDER, METHODS, OPS

CSV_FIELDS = ["op", "method", "dtype", "N", "D", "V", "status", "fwd_ms", "bwd_ms", "train_ms",
              "train_fwd_ms", "fwd_min_ms", "train_min_ms", "fwd_GBps", "train_GBps", "fwd_TFLOPs",
              "train_TFLOPs", "fwd_pct_floor", "train_pct_floor", "x_matmuls", "x_eager", "mem_fwd_MB",
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
or, for linear CE, the FLOPs (2NDV forward, 6NDV forward+backward) over the matmul FLOP/s measured in
this run. **GB/s** is those bytes over the time (effective bandwidth). **x matmuls** is the time over
the bare products X W^T, G W, G^T X measured in the same run (`matmuls` row). **x eager** is eager's
fwd+bwd time over the method's. **peak MB** is the peak extra memory of a call (CPU: peak resident
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
        if op.name == "linear" and mm and r.get("train_ms") and mm.get("train_ms"):
            r["x_matmuls"] = r["train_ms"] / mm["train_ms"]
        eager = by_key.get((r["op"], "eager") + rest)
        if eager and r.get("train_ms") and eager.get("train_ms") and r["method"] != "matmuls":
            r["x_eager"] = eager["train_ms"] / r["train_ms"]
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


def headline_table(rows: list[dict], ops: list[str]) -> str:
    """Per op, shape and dtype: celoss's best method against the best peer, eager and torch.compile."""
    groups = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("train_ms"):
            groups.setdefault((r["op"], r.get("N"), r.get("D"), r.get("V"), r["dtype"]), []).append(r)
    lines = ["| op | shape | dtype | celoss | fwd+bwd ms | % floor | x eager | x compile | best peer "
             "| x best peer | x matmuls | peak x grad | in place: ms, peak x grad |", "|" + "---|" * 13]
    dt_rank = {"fp32": 0, "bf16": 1, "fp16": 2, "fp64": 3}
    for key in sorted(groups, key=lambda k: (ops.index(k[0]) if k[0] in ops else 99,
                                             (k[1] or 0) * (k[3] or 0) * (k[2] or 1), dt_rank.get(k[4], 9))):
        rs = groups[key]
        ours = [r for r in rs if r["method"].startswith("celoss-") and not r["method"].endswith("-inplace")]
        inplace = [r for r in rs if r["method"].startswith("celoss-") and r["method"].endswith("-inplace")]
        peers = [r for r in rs if not r["method"].startswith("celoss-") and r["method"] != "matmuls"]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["train_ms"])
        by = {r["method"]: r for r in rs}
        peer = min(peers, key=lambda r: r["train_ms"]) if peers else None

        def ratio(other):
            return _fmt(other["train_ms"] / best["train_ms"]) if other else ""
        lines.append("| " + " | ".join([
            key[0], _shape_label(best), key[4], best["method"], _fmt(best["train_ms"]),
            _fmt(best.get("train_pct_floor")), ratio(by.get("eager")), ratio(by.get("compile")),
            peer["method"] if peer else "", ratio(peer), _fmt(best.get("x_matmuls")),
            _fmt(best.get("mem_x_grad")),
            (lambda b: f"{_fmt(b['train_ms'])}, {_fmt(b.get('mem_x_grad'))}" if b else "")(
                min(inplace, key=lambda r: r["train_ms"]) if inplace else None)]) + " |")
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
    out += ["", READING, ""]
    heads = headline_table(rows, meta["ops"])
    if heads:
        out += ["## Headlines", "",
                "celoss's fastest method per case (the in-place variant apart), fwd+bwd; x ... = the other's "
                "time over celoss's (above 1: celoss is faster); x matmuls: over the bare products (linear CE).", "", heads, ""]
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


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["op"],) + _sort_key(r)):
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


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


def plots(rows: list[dict], out_dir: str, device: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    written = []
    for op_name in OPS:
        for kind, fixed, x in plot_groups(rows, op_name):
            sel = [r for r in rows if r["op"] == op_name and r.get("status") == "ok"
                   and all(r.get(k) == v for k, v in fixed.items())]
            dtypes = [d for d in ("fp32", "bf16", "fp16", "fp64") if any(r["dtype"] == d for r in sel)]
            fig, axes = plt.subplots(len(dtypes), 2, figsize=(12, 4.2 * len(dtypes)), squeeze=False)
            for i, dt in enumerate(dtypes):
                for j, (metric, label) in enumerate((("train_ms", "fwd+bwd time (ms)"),
                                                     ("mem_train_MB", "peak extra memory, fwd+bwd (MB; 0 drawn at 0.1)"))):
                    ax = axes[i][j]
                    for k, m in enumerate(METHOD_ORDER):
                        pts = sorted((r[x], r.get(metric)) for r in sel
                                     if r["dtype"] == dt and r["method"] == m and r.get(metric) is not None)
                        if pts:  # one colour per method in every panel; 0 MB is drawn at 0.1 MB
                            ax.plot([p[0] for p in pts], [max(p[1], 0.1) for p in pts], marker="o", label=m,
                                    color=colors[k % len(colors)], linestyle="-" if k < 10 else "--")
                    ax.set_xscale("log")
                    ax.set_yscale("log")
                    ax.set_xlabel({"V": "vocabulary V", "N": "tokens N"}[x])
                    ax.set_ylabel(label)
                    fixed_txt = ", ".join(f"{k}={v}" for k, v in fixed.items())
                    ax.set_title(f"{op_name} {dt} ({fixed_txt}) on {device}", fontsize=10)
                    ax.grid(True, which="both", alpha=0.3)
                    if ax.lines:
                        ax.legend(fontsize=8)
            fig.tight_layout()
            name = f"{op_name}-{kind}-" + "-".join(f"{k}{v}" for k, v in fixed.items()) + ".png"
            fig.savefig(os.path.join(out_dir, name), dpi=90)
            plt.close(fig)
            written.append(name)
    return written
