#!/usr/bin/env python
"""Train a small decoder-only LM twice -- with celoss.linear_cross_entropy and with logits + F.cross_entropy --
and compare loss curves, time per step and peak memory.

The corpus is the documentation shipped with Python itself (``pydoc_data.topics``, ~470 kB), tokenized
at byte level: no download. Bytes are ids 0..255 of a vocabulary of ``--vocab`` ids; a large synthetic
vocabulary (the ids above 255 never occur, as rare tokens barely do in a real one) gives the LM head the
size of a real LLM's and shows the memory the N x V logits cost::

    python examples/train_lm.py                                   # CPU-sized defaults
    python examples/train_lm.py --vocab 131072 --steps 20         # the memory gap on CPU
    python examples/train_lm.py --device cuda --vocab 262144 --d-model 512 --layers 4 --batch-size 32 --amp

Each loss runs in its own subprocess with the same seed (same initial weights, same batches), so peak
memory is measured cleanly: CUDA ``max_memory_allocated`` on GPU, the process's peak resident set size
(RSS) on CPU. Writes ``losses.png`` (needs matplotlib) and ``results.json`` under ``--out``.
Needs only torch and celoss (matplotlib optional).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("celoss", "torch")


# ---------------------------------------------------------------------------------------------------
# data


def load_corpus() -> torch.Tensor:
    """Python's pydoc topics as one int64 tensor of byte values."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    """Endless random windows of ``seq_len`` tokens; the same seed gives the same sequence of batches."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=gen)
        yield torch.stack([data[s:s + seq_len] for s in starts.tolist()])


# ---------------------------------------------------------------------------------------------------
# model: a GPT-style pre-LN decoder; forward returns hidden states, the head is applied by the loss


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "2.weight"))
                                else 0.02)

    def forward(self, ids):
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)  # (B, T, D) hidden states


def lm_loss(model: TinyLM, ids: torch.Tensor, kind: str, amp: bool = False) -> torch.Tensor:
    """Next-token loss: position t predicts ids[:, t + 1]."""
    hidden = model(ids)
    weight = model.head.weight
    if kind == "celoss":
        import celoss
        if amp:  # what nn.Linear would see under autocast
            hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
        with torch.autocast(ids.device.type, enabled=False):
            return celoss.linear_cross_entropy(hidden, weight, ids, shift=True).float()
    # the usual way: (B, T, V) logits, labels shifted left with a padding -100 at the end
    logits = model.head(hidden)
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


# ---------------------------------------------------------------------------------------------------
# one training run


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def train(kind: str, *, steps: int = 100, d_model: int = 128, layers: int = 2, heads: int = 4, vocab: int = 256,
          seq_len: int = 128, batch_size: int = 8, lr: float = 3e-3, device: str = "cpu", seed: int = 0,
          amp: bool = False, log_every: int = 0) -> dict:
    """Train from ``seed`` with loss ``kind`` ("celoss" or "torch"); returns the loss curve and measurements."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    if vocab < 256:
        raise ValueError("vocab must be >= 256 (byte-level tokens)")
    dev = torch.device(device)
    data = load_corpus()
    torch.manual_seed(seed)
    model = TinyLM(vocab, d_model, layers, heads, seq_len).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))  # 10 warm-up steps
    stream = batches(data, batch_size, seq_len, seed)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    losses, times = [], []
    for step in range(steps):
        ids = next(stream).to(dev, non_blocking=True)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = lm_loss(model, ids, kind, amp)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  [{kind}] step {step:4d}  loss {losses[-1]:.4f}  {times[-1] * 1e3:7.1f} ms", flush=True)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    steady = times[1:] if len(times) > 1 else times  # the first step pays one-time set-up costs
    return dict(loss=kind, losses=losses, step_ms=1e3 * sorted(steady)[len(steady) // 2],
                total_s=sum(times), peak_mem_bytes=peak, peak_mem_above_start_bytes=peak - base_mem,
                memory_kind="cuda max_memory_allocated" if cuda else "peak RSS",
                device=str(dev), torch=torch.__version__)


# ---------------------------------------------------------------------------------------------------
# driver


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary size (bytes are ids 0..255)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", choices=LOSSES + ("both",), default="both")
    p.add_argument("--out", default="train_lm_out", help="directory for losses.png and results.json")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--result-json", help=argparse.SUPPRESS)  # set by the parent process
    return p.parse_args(argv)


def _train_kwargs(args):
    return dict(steps=args.steps, d_model=args.d_model, layers=args.layers, heads=args.heads, vocab=args.vocab,
                seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, device=args.device,
                seed=args.seed, amp=args.amp, log_every=args.log_every)


def _run_child(kind: str, argv) -> dict:
    """Run one loss in a fresh process so that its peak memory is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--loss", kind, "--result-json", path]
        subprocess.run(cmd, check=True)
        with open(path) as f:
            return json.load(f)


def plot(results, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, style in zip(results, ("-", "--")):
        label = (f"{r['loss']}: {r['step_ms']:.0f} ms/step, peak {r['peak_mem_bytes'] / 2**20:.0f} MiB")
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.loss != "both":
        result = train(args.loss, **_train_kwargs(args))
        if args.result_json:
            with open(args.result_json, "w") as f:
                json.dump(result, f)
        else:
            print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))
        return result

    child_argv = [a for a in argv]
    results = []
    for kind in LOSSES:
        print(f"== {kind} ==", flush=True)
        results.append(_run_child(kind, child_argv))
    os.makedirs(args.out, exist_ok=True)
    n_tok = args.batch_size * args.seq_len
    title = (f"d_model={args.d_model} layers={args.layers} vocab={args.vocab} batch={args.batch_size}x{args.seq_len}"
             f" steps={args.steps} device={results[0]['device']}{' amp' if args.amp else ''}")
    print(f"\n{title}")
    unit = results[0]["memory_kind"]
    print(f"{'loss':8s} {'first':>7s} {'last10':>7s} {'ms/step':>8s} {'tok/s':>9s} "
          f"{'peak MiB':>9s} {'+MiB':>7s}   ({unit}; +MiB: above the level at the start of training)")
    for r in results:
        last = r["losses"][-10:]
        print(f"{r['loss']:8s} {r['losses'][0]:7.4f} {sum(last) / len(last):7.4f} {r['step_ms']:8.1f} "
              f"{n_tok / (r['step_ms'] / 1e3):9.0f} {r['peak_mem_bytes'] / 2**20:9.1f} "
              f"{r['peak_mem_above_start_bytes'] / 2**20:7.1f}")
    diff = max(abs(a - b) for a, b in zip(results[0]["losses"], results[1]["losses"]))
    print(f"max |loss difference| over the run: {diff:.2e}")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(args=vars(args), results=results), f, indent=1)
    png = plot(results, os.path.join(args.out, "losses.png"), title)
    print(f"wrote {os.path.join(args.out, 'results.json')}" + (f" and {png}" if png else ""))
    return results


if __name__ == "__main__":
    main()
