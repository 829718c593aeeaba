"""Presets: which shapes, dtypes and methods each sub-command runs.

``quick`` is what ``python -m benchmarks`` runs (the cross-entropy table of the core issue on CPU: it
fits in about 3 minutes on a 2-core machine; on a GPU the lent-GPU subset). ``full`` adds the vocab
and token scaling and every method (its CPU results are the committed ones). ``gpu`` is the subset
the one-shot GPU check runs (scripts/gpu-check). ``tiny`` is for dry runs and CI (seconds).

Shapes are dicts with N (tokens), V (vocabulary) and, for the ops from hidden states (linear,
logprobs, linear_distill), D (hidden size).
"""
from __future__ import annotations

VOCABS = (8192, 32000, 65536, 128256, 256000, 512000)

# method patterns ({native} = triton on CUDA, cython on CPU); unavailable ones become rows that say why
QUICK_METHODS = {
    "ce": ["celoss-{native}", "celoss-{native}-inplace", "eager", "compile", "liger"],
    "linear": ["celoss-{native}", "eager", "compile", "torch-lce", "torch-lce-chunked", "liger", "cce",
               "cce-exact", "matmuls"],
    "logprobs": ["celoss-{native}", "eager", "compile", "matmuls"],
    "linear_distill": ["celoss-{native}", "eager", "compile", "matmuls"],
    "family": ["celoss-{native}", "eager", "compile"],
}
# full: everything, except the reference backend on linear CE (a correctness oracle, and at a few
# seconds a step on 2 cores it would add minutes without telling anything the eager row doesn't)
FULL_METHODS = {"ce": ["*"], "linear": ["celoss-triton", "celoss-cython", "eager", "compile", "torch-lce*",
                                        "liger", "cce*", "matmuls"],
                "logprobs": ["celoss-triton", "celoss-cython", "eager", "compile", "matmuls"],
                "linear_distill": ["celoss-triton", "celoss-cython", "eager", "compile", "matmuls"],
                "family": ["*"]}
HIDDEN = ("linear", "logprobs", "linear_distill")  # ops from hidden states (shapes N x D x V)


def _nv(pairs):
    return [{"N": n, "V": v} for n, v in pairs]


def _ndv(triples):
    return [{"N": n, "D": d, "V": v} for n, d, v in triples]


def _dedupe(shapes):
    out, seen = [], set()
    for s in shapes:
        key = tuple(sorted(s.items()))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def preset(name: str, op: str, device: str) -> dict:
    """{'shapes': [...], 'dtypes': [...], 'methods': [...patterns], 'warmup': k, 'repeats': k}."""
    kind = op if op in ("ce",) + HIDDEN else "family"
    gpu = device == "cuda"
    if name == "tiny":
        shapes = _nv([(256, 1000), (256, 3000)]) if kind == "ce" else \
            _ndv([(128, 64, 1000)]) if kind in HIDDEN else _nv([(128, 1000)])
        dtypes = ["fp32", "bf16"] if kind == "ce" else ["fp32"]
        return dict(shapes=shapes, dtypes=dtypes, methods=["*"], warmup=0, repeats=2)
    if name == "gpu" or (name == "quick" and gpu):
        shapes = {"ce": _nv([(16384, v) for v in (32000, 128256, 256000)]),
                  "linear": _ndv([(8192, 2304, 256000), (8192, 4096, 128256)]),
                  "logprobs": _ndv([(8192, 4096, 151936)]), "linear_distill": _ndv([(8192, 4096, 128256)]),
                  "family": _nv([(16384, 32000), (16384, 128256)])}[kind]
        dtypes = ["bf16", "fp32"] if kind == "ce" else ["bf16"]
        return dict(shapes=shapes, dtypes=dtypes, methods=QUICK_METHODS[kind], warmup=3, repeats=10)
    if name == "quick":
        shapes = {"ce": _nv([(4096, 32000), (4096, 128256), (1024, 256000)]),
                  "family": _nv([(4096, 32000)])}.get(kind) or _ndv([(2048, 512, 32000)])
        dtypes = ["fp32"] if kind == "family" else ["fp32", "bf16"]
        return dict(shapes=shapes, dtypes=dtypes, methods=QUICK_METHODS[kind], warmup=0, repeats=3)
    if name == "full":
        if gpu:
            shapes = {"ce": _nv([(16384, v) for v in VOCABS] + [(n, 128256) for n in (4096, 65536)]),
                      "linear": _ndv([(8192, 2304, 256000)] + [(8192, 4096, v) for v in VOCABS]),
                      "logprobs": _ndv([(8192, 4096, v) for v in (32000, 151936)]),
                      "linear_distill": _ndv([(8192, 4096, v) for v in (32000, 128256)]),
                      "family": _nv([(16384, 32000), (16384, 128256)])}[kind]
            return dict(shapes=_dedupe(shapes), dtypes=["bf16", "fp32"], methods=FULL_METHODS[kind],
                        warmup=3, repeats=20)
        if op == "ce":  # the core issue's table, vocab scaling at 1024 tokens, token scaling at V = 32000
            shapes = _nv([(4096, 32000), (4096, 128256), (1024, 256000)] + [(1024, v) for v in VOCABS]
                         + [(n, 32000) for n in (1024, 16384)])
            return dict(shapes=_dedupe(shapes), dtypes=["fp32", "bf16"], methods=FULL_METHODS[kind],
                        warmup=1, repeats=5)
        if op in HIDDEN:  # compute-bound: a few seconds a step on 2 cores, so fewer repeats
            shapes = _ndv([(2048, 512, 32000), (2048, 1024, 128256)] + [(2048, 512, v) for v in (8192, 65536)])
            return dict(shapes=_dedupe(shapes), dtypes=["fp32", "bf16"], methods=FULL_METHODS[kind],
                        warmup=0, repeats=3)
        # the loss family: the core issue's sizes for the softmax losses; the multi-label ones (BCE,
        # sigmoid focal: several N x V temporaries in eager) at 32000 and 8192 classes
        vs = (32000, 128256) if op in ("distill", "focal") else (8192, 32000)
        return dict(shapes=_nv([(4096, v) for v in vs]), dtypes=["fp32", "bf16"], methods=FULL_METHODS[kind],
                    warmup=1, repeats=3)
    raise ValueError(f"unknown preset {name!r}")
