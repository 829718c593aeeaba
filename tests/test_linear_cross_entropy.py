"""celoss.linear_cross_entropy against torch.nn.functional.linear_cross_entropy (PyTorch 2.13) and a
float64 F.linear + F.cross_entropy oracle, on every backend that runs here (Triton through its
interpreter on CPU tensors, small shapes; tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
"""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import celoss
from celoss.linear_cross_entropy import (DEFAULT_CHUNK_BYTES, DIRECT_DW_CHUNKS, ENGINES, default_chunk_bytes,
                                         linear_cross_entropy, plan_chunks)

from conftest import AVAILABLE, backend_device, backend_params, lowp_error_bound

IGNORE = -100
ALL_BACKENDS = backend_params("torch", "cython", "triton")
HAS_F_LCE = hasattr(F, "linear_cross_entropy")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def make(n, d, v, dtype=torch.float32, *, bias=False, ignore=False, seed=0, device="cpu", lead=None):
    g = torch.Generator().manual_seed(seed + 31 * v + 7 * d + n)
    shape = (n,) if lead is None else tuple(lead)
    x = torch.randn(*shape, d, generator=g)
    w = torch.randn(v, d, generator=g) * (1.5 / math.sqrt(d))
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    t = torch.randint(0, v, shape, generator=g)
    if ignore:
        t.view(-1)[::3] = IGNORE
    cw = torch.rand(v, generator=g) + 0.5
    cast = lambda a: None if a is None else a.to(dtype).to(device)  # noqa: E731
    return cast(x), cast(w), cast(b), t.to(device), cw.to(device)


def oracle(x, w, t, b=None, *, weight=None, reduction="mean", ignore_index=IGNORE, label_smoothing=0.0,
           logit_scale=1.0, softcap=None, z_loss=0.0, shift=False, lse_out=False):
    """float64 F.linear + F.cross_entropy with celoss's extras (scale -> softcap -> softmax; z-loss)."""
    x, w = x.double(), w.double()
    b = None if b is None else b.double()
    weight = None if weight is None else weight.double()
    if shift:
        x, t = x[..., :-1, :], t[..., 1:]
    out_shape = t.shape
    z = F.linear(x, w, b).reshape(-1, w.shape[0]) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = t.reshape(-1)
    rows = F.cross_entropy(z, t, weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    counted = t != ignore_index
    w_y = counted.double() if weight is None else torch.where(counted, weight[t.clamp(0)], 0.0)
    lse = torch.logsumexp(z, dim=1)
    rows = rows + z_loss * w_y * lse * lse
    if reduction == "none":
        loss = rows.reshape(out_shape)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / w_y.sum()
    return (loss, lse.reshape(out_shape)) if lse_out else loss


def grads_of(loss_fn, tensors, go):
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in tensors]
    out = loss_fn(*leaves)
    loss = out.loss if isinstance(out, celoss.CrossEntropyOutput) else out
    live = [a for a in leaves if a is not None]
    grads = torch.autograd.grad(loss, live, go.to(loss.dtype))
    it = iter(grads)
    return loss.detach(), [None if a is None else next(it) for a in leaves]


def assert_close(a, b, tol, what=""):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = 1.0 + b.double().abs().max().item() if b.numel() else 1.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


# ------------------------------------------------------------------------------------------------
# parity for every option, every backend
# ------------------------------------------------------------------------------------------------

OPTIONS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "ignore": dict(ignore=True),
    "weight_ignore": dict(weight=True, ignore=True, bias=True),
    "smooth": dict(label_smoothing=0.1),
    "smooth_weight_ignore": dict(label_smoothing=0.2, weight=True, ignore=True),
    "scale_softcap": dict(logit_scale=1.3, softcap=3.0, bias=True),
    "zloss": dict(z_loss=1e-2, ignore=True),
    "everything": dict(bias=True, weight=True, ignore=True, label_smoothing=0.1, logit_scale=0.8,
                       softcap=5.0, z_loss=1e-3),
}


def _oracle_cases():
    """Every option x reduction x backend (chunked engine) and the Triton fused engine; on the (slow)
    Triton interpreter "sum" only for two option sets (it differs from "mean" by the scale alone)."""
    cases = []
    engines = [(p, None) for p in ALL_BACKENDS] + [(p, "fused") for p in backend_params("triton")]
    for p, engine in engines:
        for reduction in ("mean", "sum", "none"):
            for opt in OPTIONS:
                if p.id == "triton" and reduction == "sum" and opt not in ("plain", "everything"):
                    continue
                cases.append(pytest.param(p.values[0], engine, reduction, opt, marks=p.marks,
                                          id=f"{opt}-{reduction}-{p.id}{'-' + engine if engine else ''}"))
    return cases


@pytest.mark.parametrize("backend,engine,reduction,opt", _oracle_cases())
def test_matches_float64_oracle(backend, engine, reduction, opt):
    o = dict(OPTIONS[opt])
    n, d, v = (37, 21, 101)  # V prime: no block size divides it
    x, w, b, t, cw = make(n, d, v, bias=o.pop("bias", False), ignore=o.pop("ignore", False),
                          device=backend_device(backend))
    weight = cw if o.pop("weight", False) else None
    kw = dict(weight=weight, reduction=reduction, **o)
    go = torch.randn(n) if reduction == "none" else torch.tensor(1.7)

    def ours(x_, w_, b_):
        return linear_cross_entropy(x_, w_, t, linear_bias=b_, backend=backend, engine=engine, chunk_bytes=6000,
                                    **kw)

    loss, grads = grads_of(ours, (x, w, b), go)
    ref_loss, ref_grads = grads_of(lambda x_, w_, b_: oracle(x_, w_, t, b_, **kw), (x, w, b), go.double())
    assert loss.dtype == x.dtype and loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, 2e-5, "loss")
    for name, g, r in zip(("input", "linear_weight", "linear_bias"), grads, ref_grads):
        assert_close(g, r, 2e-5, name)


@pytest.mark.skipif(not HAS_F_LCE, reason="torch.nn.functional.linear_cross_entropy needs PyTorch >= 2.13")
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", ["plain", "bias_weight_ignore_smooth_none", "sum_ignore_index_3"])
def test_matches_torch_linear_cross_entropy(backend, case):
    n, d, v = 29, 16, 67
    bias = case != "plain"
    x, w, b, t, cw = make(n, d, v, bias=bias, ignore=True, device=backend_device(backend))
    kw = dict(reduction="mean")
    if case == "bias_weight_ignore_smooth_none":
        kw = dict(weight=cw, reduction="none", label_smoothing=0.15)
    elif case == "sum_ignore_index_3":
        t = torch.where(t == IGNORE, 3, t)
        kw = dict(reduction="sum", ignore_index=3)
    go = torch.rand(n) + 0.5 if kw["reduction"] == "none" else torch.tensor(0.6)
    loss, grads = grads_of(lambda x_, w_, b_: linear_cross_entropy(x_, w_, t, linear_bias=b_, backend=backend,
                                                                   **kw), (x, w, b), go)
    ref, ref_grads = grads_of(lambda x_, w_, b_: F.linear_cross_entropy(x_, w_, t, linear_bias=b_, **kw),
                              (x, w, b), go)
    assert_close(loss, ref, 1e-5, "loss")
    for name, g, r in zip(("input", "linear_weight", "linear_bias"), grads, ref_grads):
        assert_close(g, r, 1e-5, name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 5), (1, 7, 3), (5, 1, 11), (3, 2, 1), (2, 33, 67)],
                         ids=lambda s: "x".join(map(str, s)))
def test_odd_sizes(backend, shape):
    n, d, v = shape
    x, w, b, t, _ = make(n, d, v, bias=True, device=backend_device(backend))
    go = torch.randn(n)
    kw = dict(reduction="none", label_smoothing=0.1, z_loss=1e-3)
    loss, grads = grads_of(lambda x_, w_, b_: linear_cross_entropy(x_, w_, t, linear_bias=b_, backend=backend,
                                                                   **kw), (x, w, b), go)
    ref, ref_grads = grads_of(lambda x_, w_, b_: oracle(x_, w_, t, b_, **kw), (x, w, b), go.double())
    assert_close(loss, ref, 2e-5, "loss")
    for name, g, r in zip(("input", "linear_weight", "linear_bias"), grads, ref_grads):
        assert_close(g, r, 2e-5, name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch(backend):
    x, w, b, t, _ = make(0, 5, 7, bias=True, device=backend_device(backend))
    x.requires_grad_()
    loss = linear_cross_entropy(x, w, t, linear_bias=b, backend=backend)
    assert math.isnan(loss.item())  # 0 / 0, like F.cross_entropy
    loss.backward()
    assert x.grad.shape == (0, 5)
    assert linear_cross_entropy(x, w, t, reduction="none", backend=backend).shape == (0,)
    assert linear_cross_entropy(x, w, t, reduction="sum", backend=backend).item() == 0.0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_one_dimensional_input(backend):
    x, w, b, t, _ = make(1, 6, 9, bias=True, device=backend_device(backend))
    x1, t1 = x[0], t[0]
    for reduction in ("mean", "none"):
        ours = linear_cross_entropy(x1, w, t1, linear_bias=b, reduction=reduction, backend=backend)
        ref = oracle(x1.unsqueeze(0), w, t1.reshape(1), b, reduction=reduction)
        assert ours.shape == ()
        assert_close(ours, ref.reshape(()), 1e-5, reduction)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_and_shift(backend, reduction):
    bsz, seq, d, v = 3, 7, 10, 53
    x, w, b, t, _ = make(0, d, v, bias=True, ignore=True, lead=(bsz, seq), device=backend_device(backend))
    go = torch.randn(bsz, seq - 1) if reduction == "none" else torch.tensor(1.0)
    for shift in (False, True):
        g_ = go if shift or reduction != "none" else torch.randn(bsz, seq)
        loss, grads = grads_of(lambda x_, w_, b_: linear_cross_entropy(
            x_, w_, t, linear_bias=b_, reduction=reduction, shift=shift, backend=backend, chunk_bytes=2000),
            (x, w, b), g_)
        ref, ref_grads = grads_of(lambda x_, w_, b_: oracle(x_, w_, t, b_, reduction=reduction, shift=shift),
                                  (x, w, b), g_.double())
        assert loss.shape == ref.shape
        assert_close(loss, ref, 2e-5, f"loss shift={shift}")
        for name, g, r in zip(("input", "linear_weight", "linear_bias"), grads, ref_grads):
            assert_close(g, r, 2e-5, f"{name} shift={shift}")
        if shift:  # the last position has no label: zero gradient
            assert grads[0][:, -1].abs().max() == 0


def test_shift_does_not_copy_hidden_states(monkeypatch):
    """shift addresses rows of the (B*T, D) view by index arithmetic: chunk gathers only."""
    bsz, seq, d, v = 2, 5, 4, 7
    x, w, _, t, _ = make(0, d, v, lead=(bsz, seq))
    seen = []
    real = linear_cross_entropy.__globals__["_LinearCrossEntropy"].apply

    def spy(x2d, *args):
        seen.append(x2d)
        return real(x2d, *args)

    monkeypatch.setattr(linear_cross_entropy.__globals__["_LinearCrossEntropy"], "apply", spy)
    linear_cross_entropy(x, w, t, shift=True, backend="torch")
    assert seen[0].data_ptr() == x.data_ptr() and seen[0].shape == (bsz * seq, d)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_return_lse_and_its_gradient(backend):
    n, d, v = 19, 8, 41
    x, w, b, t, _ = make(n, d, v, bias=True, ignore=True, device=backend_device(backend))
    kw = dict(reduction="mean", z_loss=1e-2, logit_scale=1.1, softcap=4.0)
    lse_w = torch.randn(n)

    def ours(x_, w_, b_):
        out = linear_cross_entropy(x_, w_, t, linear_bias=b_, return_lse=True, backend=backend, **kw)
        assert isinstance(out, celoss.CrossEntropyOutput) and out.z_loss is None
        return out.loss + (out.lse * lse_w).sum()

    def ref(x_, w_, b_):
        loss, lse = oracle(x_, w_, t, b_, lse_out=True, **kw)
        return loss + (lse * lse_w.double()).sum()

    loss, grads = grads_of(ours, (x, w, b), torch.tensor(1.0))
    ref_loss, ref_grads = grads_of(ref, (x, w, b), torch.tensor(1.0))
    assert_close(loss, ref_loss, 2e-5, "loss + lse")
    for name, g, r in zip(("input", "linear_weight", "linear_bias"), grads, ref_grads):
        assert_close(g, r, 2e-5, name)
    out = linear_cross_entropy(x, w, t, linear_bias=b, return_lse=True, reduction="none", backend=backend)
    assert out.lse.shape == (n,) and torch.isfinite(out.lse).all()  # ignored rows get their lse too


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_rows_ignored(backend):
    x, w, b, t, _ = make(6, 5, 13, bias=True, device=backend_device(backend))
    t = torch.full_like(t, IGNORE)
    for reduction, expect in (("mean", float("nan")), ("sum", 0.0)):
        leaves = [a.clone().requires_grad_() for a in (x, w, b)]
        loss = linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], reduction=reduction,
                                    backend=backend)
        assert (math.isnan(loss.item()) if math.isnan(expect) else loss.item() == expect)
        loss.backward()
        for a in leaves:
            assert torch.equal(a.grad, torch.zeros_like(a))
    loss = linear_cross_entropy(x, w, t, reduction="none", backend=backend)
    assert torch.equal(loss, torch.zeros(6))


@pytest.mark.parametrize("backend", backend_params("torch", "cython"))
def test_chunking_does_not_change_results(backend):
    n, d, v = 50, 12, 97
    x, w, b, t, cw = make(n, d, v, bias=True, ignore=True)
    outs = []
    for chunk in (1, 3000, 20000, None):  # one row per chunk ... one chunk
        loss, grads = grads_of(lambda x_, w_, b_: linear_cross_entropy(
            x_, w_, t, linear_bias=b_, weight=cw, label_smoothing=0.1, backend=backend, chunk_bytes=chunk),
            (x, w, b), torch.tensor(1.0))
        outs.append((loss, grads))
    for loss, grads in outs[1:]:
        assert_close(loss, outs[0][0], 1e-6, "loss")
        for g, r in zip(grads, outs[0][1]):
            assert_close(g, r, 1e-6, "grad")


def test_non_contiguous_operands():
    x, w, b, t, _ = make(12, 9, 31, bias=True)
    xt = x.t().contiguous().t()        # column-major hidden states
    wt = w.t().contiguous().t()        # column-major classifier (e.g. a transposed tied embedding)
    loss, grads = grads_of(lambda x_, w_, b_: linear_cross_entropy(x_, w_, t, linear_bias=b_, backend="torch"),
                           (xt, wt, b), torch.tensor(1.0))
    ref, ref_grads = grads_of(lambda x_, w_, b_: oracle(x_, w_, t, b_), (x, w, b), torch.tensor(1.0))
    assert_close(loss, ref, 1e-5)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, 1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_only_some_inputs_require_grad(backend):
    x, w, b, t, _ = make(10, 6, 23, bias=True, device=backend_device(backend))
    wg = w.clone().requires_grad_()
    loss = linear_cross_entropy(x, wg, t, linear_bias=b, backend=backend)
    loss.backward()
    xd, wd = x.double(), w.double().requires_grad_()
    oracle(xd, wd, t, b).backward()
    assert_close(wg.grad, wd.grad, 2e-5)
    with torch.no_grad():
        assert not linear_cross_entropy(x, wg, t, backend=backend).requires_grad


def test_backward_twice():
    x, w, _, t, _ = make(8, 4, 9)
    x.requires_grad_()
    ref = torch.autograd.grad(oracle(x, w, t), x)[0]
    for scale in (1.0, 3.0):
        x.grad = None
        loss = scale * linear_cross_entropy(x, w, t, backend="torch")
        loss.backward(retain_graph=True)  # gradients formed in forward, handed over (rescaled)
        assert_close(x.grad, scale * ref, 1e-6)
        with pytest.raises(RuntimeError, match="backward ran twice"):  # loudly, never silently wrong
            loss.backward()
    x.grad = None
    loss = 3 * linear_cross_entropy(x, w, t, reduction="none", backend="torch").mean()  # recomputes
    loss.backward(retain_graph=True)
    loss.backward()
    assert_close(x.grad, 6 * ref, 1e-6)
    xd = x.detach().double().requires_grad_()  # float64 (gradcheck's dtype): repeatable
    loss = 3 * linear_cross_entropy(xd, w.double(), t, backend="torch")
    loss.backward(retain_graph=True)
    loss.backward()
    assert_close(xd.grad, 6 * ref, 1e-6)


def test_module_wrapper():
    x, w, b, t, cw = make(9, 5, 17, bias=True, ignore=True)
    mod = celoss.LinearCrossEntropyLoss(weight=cw, label_smoothing=0.1, reduction="sum", backend="torch",
                                        z_loss=1e-3)
    ref = oracle(x, w, t, b, weight=cw, label_smoothing=0.1, reduction="sum", z_loss=1e-3)
    assert_close(mod(x, w, t, b), ref, 1e-5)
    assert "linear_cross_entropy" in celoss.__all__ and "LinearCrossEntropyLoss" in celoss.__all__


# ------------------------------------------------------------------------------------------------
# low precision and gradcheck
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,engine,dtype", [
    *[pytest.param(p.values[0], None, torch.bfloat16, marks=p.marks, id=f"{p.id}-bf16")
      for p in backend_params("torch", "cython")],
    *[pytest.param(p.values[0], engine, torch.float16, marks=p.marks, id=f"{p.id}-{engine}-fp16")
      for p in backend_params("triton") for engine in ENGINES],
    # bf16 tl.dot is wrong in Triton's interpreter: bf16 kernels are AOT-checked here, run on a GPU
    *[pytest.param(p.values[0], engine, torch.bfloat16, marks=p.marks, id=f"{p.id}-{engine}-bf16")
      for p in backend_params("triton") for engine in ENGINES if torch.cuda.is_available()],
])
def test_low_precision_no_worse_than_torch(backend, engine, dtype):
    n, d, v = 33, 24, 89
    x, w, b, t, _ = make(n, d, v, dtype, bias=True, ignore=True, device=backend_device(backend))
    go = torch.tensor(1.0)
    loss, grads = grads_of(lambda x_, w_, b_: linear_cross_entropy(x_, w_, t, linear_bias=b_, backend=backend,
                                                                   engine=engine, chunk_bytes=4000), (x, w, b), go)
    t_loss, t_grads = grads_of(lambda x_, w_, b_: F.cross_entropy(F.linear(x_, w_, b_), t), (x, w, b), go)
    o_loss, o_grads = grads_of(lambda x_, w_, b_: oracle(x_, w_, t, b_), (x, w, b), go.double())
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads)
    lowp_error_bound(loss, t_loss, o_loss, 1e-2)
    for g, tg, og in zip(grads, t_grads, o_grads):
        lowp_error_bound(g, tg, og, 2e-3)


@pytest.mark.parametrize("backend", backend_params("torch", "cython"))
@pytest.mark.parametrize("rows,in_place", [(256, True), (128, True), (60, False), (10, False)])
def test_bf16_dw_across_chunks_no_worse_than_torch(backend, rows, in_place):
    """A bf16 dW summed in place (up to DIRECT_DW_CHUNKS chunks: one rounding a chunk) or in float32
    (more chunks) stays within PyTorch's own bf16 error of the float64 oracle, with a non-trivial
    upstream gradient (reduction "none")."""
    n, d, v = 256, 32, 512
    x, w, b, t, _ = make(n, d, v, torch.bfloat16, bias=True, ignore=True)
    go = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    per_row = 2 * (v + 2 * d)  # one logits row plus the gathered x and dX rows
    chunk = rows * per_row
    chunks = plan_chunks(chunk, per_row, int((t != IGNORE).sum()), v * d * 4 + v * d * 2)[1]
    assert (chunks <= DIRECT_DW_CHUNKS) == in_place and chunks >= 1
    loss, grads = grads_of(lambda x_, w_, b_: linear_cross_entropy(x_, w_, t, linear_bias=b_, reduction="none",
                                                                   backend=backend, chunk_bytes=chunk),
                           (x, w, b), go.to(torch.bfloat16))
    t_loss, t_grads = grads_of(lambda x_, w_, b_: F.cross_entropy(F.linear(x_, w_, b_), t, reduction="none"),
                               (x, w, b), go.to(torch.bfloat16))
    o_loss, o_grads = grads_of(lambda x_, w_, b_: oracle(x_, w_, t, b_, reduction="none"), (x, w, b), go)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    # in float32, the CPU rounds each chunk's product to bf16 once before adding it (no mixed-output
    # GEMM): up to 2 ulp at the largest element where eager has 1 -- one bf16 ulp more of margin
    margin = 2e-3 if in_place else torch.finfo(torch.bfloat16).eps
    for g, tg, og in zip(grads, t_grads, o_grads):
        lowp_error_bound(g, tg, og, margin)


def test_plan_chunks_counts_the_float32_accumulator():
    # up to DIRECT_DW_CHUNKS chunks the (unneeded) accumulator is not counted
    assert plan_chunks(600, 10, 100, 10 ** 6) == (50, 2)
    # beyond: it shrinks the chunks, down to half the bound
    assert plan_chunks(1000, 10, 1000, 400) == (59, 17)
    assert plan_chunks(1000, 10, 1000, 10 ** 6) == (50, 20)
    assert plan_chunks(1000, 10, 1000, 0) == (100, 10)
    assert plan_chunks(1000, 10, 0, 400) == (0, 0)


def test_default_chunk_bytes_splits_large_inputs():
    # from 2 * 512 rows on, at most half the whole workspace (2 chunks at least), else the default
    assert default_chunk_bytes(1023, 1000) == DEFAULT_CHUNK_BYTES
    assert default_chunk_bytes(2048, 1000) == 1024 * 1000
    assert default_chunk_bytes(1 << 20, 1000) == DEFAULT_CHUNK_BYTES


@pytest.mark.parametrize("backend", backend_params("torch", "cython"))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(backend, reduction):
    n, d, v = 6, 4, 9
    x, w, b, t, cw = make(n, d, v, torch.float64, bias=True, ignore=True)
    for leaf in (x, w, b):
        leaf.requires_grad_()

    def fn(x_, w_, b_):
        return linear_cross_entropy(x_, w_, t, linear_bias=b_, weight=cw.double(), reduction=reduction,
                                    label_smoothing=0.1, z_loss=1e-2, softcap=3.0, logit_scale=1.2,
                                    backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Triton fused engine specifics
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_filter_eps(backend):
    n, d, v = 24, 16, 67
    dev = backend_device(backend)
    x, w, b, t, _ = make(n, d, v, bias=True, device=dev)
    go = torch.tensor(1.0)

    def run(eps):
        return grads_of(lambda x_, w_, b_: linear_cross_entropy(x_, w_, t, linear_bias=b_, backend=backend,
                                                                engine="fused", filter_eps=eps), (x, w, b), go)

    exact_loss, exact = run(None)
    loss0, g0 = run(0.0)  # threshold 0 skips only all-zero tiles: exact
    assert torch.equal(loss0, exact_loss)
    for g, r in zip(g0, exact):
        assert_close(g, r, 1e-6)
    loss_all, g_all = run(2.0)  # |softmax - onehot| <= 1 < 2: every tile skipped
    assert torch.equal(loss_all, exact_loss)  # filtering never touches the loss
    assert all(torch.count_nonzero(g) == 0 for g in g_all)
    eps = 1e-3
    _, g_eps = run(eps)
    # each skipped element moves a gradient by at most eps * scale (1/n) * |operand| per element
    wmax, xmax = w.abs().max().item(), x.abs().max().item()
    assert_close(g_eps[0], exact[0], eps / n * v * wmax)
    assert_close(g_eps[1], exact[1], eps / n * n * xmax)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def test_bad_inputs():
    x, w, b, t, _ = make(4, 6, 10, bias=True)
    with pytest.raises(ValueError, match="features"):
        linear_cross_entropy(x[:, :5], w, t)
    with pytest.raises(ValueError, match="linear_bias must have shape"):
        linear_cross_entropy(x, w, t, linear_bias=b[:7])
    bad = t.clone()
    bad[2] = 1234
    with pytest.raises(IndexError, match="1234"):
        linear_cross_entropy(x, w, bad)
    bad[2] = -7
    with pytest.raises(IndexError, match="-7"):
        linear_cross_entropy(x, w, bad, backend="torch")
    with pytest.raises(TypeError, match="float"):
        linear_cross_entropy(x.long(), w, t)
    with pytest.raises(TypeError, match="float"):
        linear_cross_entropy(x, w.int(), t)
    with pytest.raises(TypeError, match="same dtype"):
        linear_cross_entropy(x, w.double(), t)
    with pytest.raises(ValueError, match="shift=True needs a time axis"):
        linear_cross_entropy(x, w, t, shift=True)
    with pytest.raises(ValueError, match="shift=True needs a time axis"):
        linear_cross_entropy(x[0], w, t[0], shift=True)
    with pytest.raises(ValueError, match="target of shape"):
        linear_cross_entropy(x, w, t[:3])
    with pytest.raises(TypeError, match="int64"):
        linear_cross_entropy(x, w, t.int())
    with pytest.raises(ValueError, match="probability targets must have shape"):
        linear_cross_entropy(x, w, torch.rand(4, 9))
    with pytest.raises(ValueError, match="2-D"):
        linear_cross_entropy(x, w.unsqueeze(0), t)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="chunk_bytes"):
        linear_cross_entropy(x, w, t, chunk_bytes=0)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(x, w, t, weight=torch.ones(3))
    # the ignored label is never range-checked; the label of a shifted-out position neither
    tt = t.clone()
    tt[0] = IGNORE
    linear_cross_entropy(x, w, tt)
    x3, t3 = x.reshape(2, 2, 6), t.reshape(2, 2).clone()
    t3[:, 0] = 999
    linear_cross_entropy(x3, w, t3, shift=True)


# ------------------------------------------------------------------------------------------------
# memory: never an N x V buffer
# ------------------------------------------------------------------------------------------------

_MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    import celoss
    n, d, v, chunk = map(int, sys.argv[1:5])
    backend, dtype = sys.argv[5], getattr(torch, sys.argv[6])
    torch.manual_seed(0)
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, d) * 0.1).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,))
    t[::5] = -100
    # warm up allocator and kernels on a small problem, then take the baseline
    celoss.linear_cross_entropy(x[:8], w[:64], t[:8] % 64, backend=backend).backward()
    x.grad = w.grad = None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = celoss.linear_cross_entropy(x, w, t, backend=backend, chunk_bytes=chunk or None)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra": peak - base, "loss": loss.item(), "finite": bool(torch.isfinite(x.grad).all())}))
""")


def _peak_of_child(n, d, v, chunk, backend, dtype):
    """The child's extra peak RSS of one forward + backward (chunk 0: the default chunk_bytes)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(n), str(d), str(v), str(chunk), backend, dtype],
                          capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_bf16_default_peak_below_the_logits():
    """With the default chunk_bytes, a bf16 forward + backward whose logits (64 MiB) would fit one
    chunk peaks well below those logits alone (what an unchunked composition holds on top of the
    same gradients): the default splits it into two chunks (half the logits, plus dW = an eighth of
    them, summed in place: no float32 copy); one chunk peaks at about the logits."""
    if AVAILABLE["cython"] is not None:
        pytest.skip("the cython backend is not built")
    n, d, v = 2048, 256, 16384
    res = _peak_of_child(n, d, v, 0, "cython", "bfloat16")
    assert res["finite"] and math.isfinite(res["loss"])
    logits_bytes = n * v * 2
    assert res["extra"] < logits_bytes * 3 // 4, f"peak RSS grew by {res['extra'] / 2**20:.0f} MiB"


@pytest.mark.timeout(300)
def test_peak_memory_bounded_without_logits():
    n, d, v = 8192, 32, 32768          # fp32 logits: 1 GiB; the gradient would be another
    chunk = 32 << 20
    logits_bytes = n * v * 4
    grads_bytes = (n * d + v * d) * 4
    backend = "cython" if AVAILABLE["cython"] is None else "torch"
    res = _peak_of_child(n, d, v, chunk, backend, "float32")
    assert res["finite"] and math.isfinite(res["loss"])
    # gradients + workspace + slack; the reference backend's row kernel adds its own bounded
    # temporaries (a few 16 MB row blocks), the cython one none
    limit = grads_bytes + 2 * chunk + (64 << 20) if backend == "cython" else logits_bytes // 4
    assert limit <= logits_bytes // 4
    assert res["extra"] < limit, f"peak RSS grew by {res['extra'] / 2**20:.0f} MiB (limit {limit / 2**20:.0f})"
