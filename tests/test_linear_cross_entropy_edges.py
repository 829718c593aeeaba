"""celoss.linear_cross_entropy at PyTorch's edges (issue 11) on every backend and engine, against
``F.cross_entropy(F.linear(x, W, b), y)`` in float64; its options, errors, engine selection and
``torch.compile`` (issue 15; inductor on CPU).
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import celoss
from celoss.linear_cross_entropy import linear_cross_entropy

from conftest import against_oracle, backend_device, backend_params, lowp_against_oracle, lowp_margin

IGNORE = -100
lce_mod = importlib.import_module("celoss.linear_cross_entropy")  # (the package attribute is the function)


def _engine_params():
    """(backend, engine) pairs: the chunked engine on every backend, the fused one on triton."""
    out = [pytest.param(p.values[0], "chunked", marks=p.marks, id=p.id)
           for p in backend_params("torch", "cython", "triton")]
    out += [pytest.param(p.values[0], "fused", marks=p.marks, id="triton-fused") for p in backend_params("triton")]
    return out


ENGINES = _engine_params()


def _data(n, d, v, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(max(d, 1))
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.3
    return x.to(dtype).to(device), w.to(dtype).to(device), b.to(dtype).to(device)


def _torch_lce(x, w, b, y, **kw):
    return F.cross_entropy(F.linear(x, w, b), y, **kw)


def _compare(backend, engine, x, w, b, y, tol, **kw):
    """Loss and gradients (random upstream) of celoss vs the float64 composition; non-finite
    entries must sit in the same places with the same values (NaN, +-inf)."""
    ours = lambda x_, w_, b_: linear_cross_entropy(x_, w_, y, linear_bias=b_, backend=backend, engine=engine,  # noqa: E731
                                                   chunk_bytes=3000, **kw)
    ref_kw = {k: a.double() if isinstance(a, torch.Tensor) else a for k, a in kw.items() if k != "options"}
    ref = lambda x_, w_, b_: _torch_lce(x_, w_, b_, y, **ref_kw)  # noqa: E731
    loss, ref_loss, grads, ref_grads = against_oracle(ours, ref, x, w, b)
    for name, a, r in (("loss", loss, ref_loss),) + tuple(zip(("input", "weight", "bias"), grads, ref_grads)):
        a = a.double().cpu()
        r = r.cpu()
        fin = torch.isfinite(r)
        assert torch.equal(torch.isnan(a), torch.isnan(r)), f"{name}: NaN pattern differs"
        assert torch.equal(a[~fin & ~torch.isnan(r)], r[~fin & ~torch.isnan(r)]), f"{name}: inf pattern differs"
        if fin.any():
            err = (a[fin] - r[fin]).abs().max().item()
            assert err <= tol * (1 + r[fin].abs().max().item()), f"{name}: error {err:.3g}"
    return loss, grads


# ------------------------------------------------------------------------------------------------
# issue 11 item 1 and 6: weighted-mean denominators of any sign, and zero
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,engine", ENGINES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_issue11_negative_weight_sum_gradients(backend, engine, smoothing):
    """A negative weighted-mean denominator divides like PyTorch (gradients were all 0)."""
    dev = backend_device(backend)
    x, w, b = _data(6, 5, 3, device=dev)
    y = torch.tensor([0, 1, IGNORE, 0, 2, 1], device=dev)
    cw = torch.tensor([-1.0, -0.5, 0.25], device=dev)  # target-weight sum -3.25
    loss, grads = _compare(backend, engine, x, w, b, y, 2e-5, weight=cw, label_smoothing=smoothing)
    assert loss.item() != 0 and all(g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("backend,engine", ENGINES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_issue11_zero_denominators(backend, engine, smoothing):
    """All-zero target weights: NaN loss and NaN gradients in the counted rows (zero in ignored
    ones), as PyTorch -- with label smoothing too (item 6: NaN, not +inf). All rows ignored: NaN
    loss, zero gradients."""
    dev = backend_device(backend)
    x, w, b = _data(5, 4, 3, device=dev)
    cw = torch.tensor([0.0, 0.0, 1.5], device=dev)
    y = torch.tensor([0, IGNORE, 1, 0, IGNORE], device=dev)
    loss, grads = _compare(backend, engine, x, w, b, y, 0.0, weight=cw, label_smoothing=smoothing)
    assert math.isnan(loss.item()) and torch.isnan(grads[1]).all()
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))  # an ignored row
    y = torch.full((5,), IGNORE, device=dev)
    loss, grads = _compare(backend, engine, x, w, b, y, 0.0, weight=cw, label_smoothing=smoothing)
    assert math.isnan(loss.item()) and all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("backend,engine", ENGINES)
def test_issue11_zero_denominator_with_returned_lse(backend, engine):
    """The recomputing backward (returned lse) keeps ignored rows at exactly zero too."""
    dev = backend_device(backend)
    x, w, b = _data(4, 3, 5, device=dev)
    y = torch.tensor([1, IGNORE, 1, IGNORE], device=dev)
    cw = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], device=dev)
    xg = x.clone().requires_grad_()
    out = linear_cross_entropy(xg, w, y, linear_bias=b, weight=cw, return_lse=True, backend=backend, engine=engine)
    (out.loss + out.lse.sum()).backward()
    xr = x.double().clone().requires_grad_()
    z = F.linear(xr, w.double(), b.double())
    (F.cross_entropy(z, y, weight=cw.double()) + torch.logsumexp(z, 1).sum()).backward()
    assert torch.equal(torch.isnan(xg.grad), torch.isnan(xr.grad))
    assert torch.isnan(xg.grad[0]).all() and torch.allclose(xg.grad[1].double(), xr.grad[1], atol=1e-5)


@pytest.mark.parametrize("backend,engine", ENGINES)
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_issue11_ignored_row_with_nonfinite_logits(backend, engine, bad):
    """PyTorch's gradient of an ignored row whose logits hold NaN / inf is NaN (softmax times a zero
    upstream), and so are dW and db: such rows are not compacted away."""
    dev = backend_device(backend)
    x, w, b = _data(5, 4, 6, device=dev)
    x[2, 1] = bad
    y = torch.tensor([0, IGNORE, IGNORE, 3, IGNORE], device=dev)
    _, grads = _compare(backend, engine, x, w, b, y, 2e-5)
    assert torch.isnan(grads[0][2]).all() and torch.isnan(grads[1]).all()
    assert torch.equal(grads[0][[1, 4]], torch.zeros_like(grads[0][[1, 4]]))  # finite ignored rows: exact 0


# ------------------------------------------------------------------------------------------------
# issue 11 item 5: large finite logits with a scale
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,engine", ENGINES)
@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e5), (torch.float64, 1e15)], ids=["fp32", "fp64"])
def test_issue11_large_scaled_logits_finite(backend, engine, dtype, big):
    """h = [[1e5, 0]], W = [[1e5, 0], [0, 1]], logit_scale 0.7: logits 7e9 (cython gave NaN)."""
    if engine == "fused" and dtype == torch.float64:
        pytest.skip("the fused kernels take fp32/fp16/bf16")
    dev = backend_device(backend)
    x = torch.tensor([[big, 0.0], [big, 0.0]], dtype=dtype, device=dev)
    w = torch.tensor([[big, 0.0], [0.0, 1.0]], dtype=dtype, device=dev)
    b = torch.zeros(2, dtype=dtype, device=dev)
    for scale in (0.7, 1.1):
        y = torch.tensor([0, 1], device=dev)
        ours = lambda x_, w_, b_: linear_cross_entropy(x_, w_, y, linear_bias=b_, logit_scale=scale,  # noqa: E731
                                                       reduction="none", backend=backend, engine=engine)
        ref = lambda x_, w_, b_: F.cross_entropy(F.linear(x_, w_, b_) * scale, y, reduction="none")  # noqa: E731
        loss, ref_loss, grads, ref_grads = against_oracle(ours, ref, x, w, b)
        assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), r, rtol=1e-6, atol=1e-6 * r.abs().max().item())


# ------------------------------------------------------------------------------------------------
# issue 11 item 7: empty dimensions, options, float64 scale
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,engine", ENGINES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,d,v,ignored", [(3, 0, 5, False), (0, 4, 5, False), (0, 0, 3, False),
                                           (3, 4, 0, True), (0, 4, 0, False)],
                         ids=["D0", "N0", "N0D0", "V0", "N0V0"])
def test_issue11_empty_dims(backend, engine, reduction, n, d, v, ignored):
    """What F.cross_entropy(F.linear(x, W, b), y) returns (was a reshape error for D = 0)."""
    dev = backend_device(backend)
    x, w, b = _data(n, d, v, device=dev)
    y = torch.full((n,), IGNORE, device=dev) if ignored else torch.arange(n, device=dev) % max(v, 1)
    for bias in (b, None):
        xs = [t.clone().requires_grad_() for t in (x, w)] + ([bias.clone().requires_grad_()] if bias is not None else [])
        loss = linear_cross_entropy(xs[0], xs[1], y, linear_bias=xs[2] if bias is not None else None,
                                    reduction=reduction, backend=backend, engine=engine)
        xr = [t.detach().double().requires_grad_() for t in xs]
        ref = _torch_lce(xr[0], xr[1], xr[2] if bias is not None else None, y, reduction=reduction)
        assert loss.shape == ref.shape and loss.dtype == x.dtype
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6, equal_nan=True)
        if ref.numel():
            up = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64, device=dev).reshape(ref.shape)
            g = torch.autograd.grad(loss, xs, up.to(loss.dtype), allow_unused=True)
            gr = torch.autograd.grad(ref, xr, up, allow_unused=True)
            for a, r, leaf in zip(g, gr, xs):
                a = torch.zeros_like(leaf) if a is None else a
                r = torch.zeros_like(leaf, dtype=torch.float64) if r is None else r
                assert a.shape == leaf.shape
                torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", backend_params("torch", "cython"))
def test_issue11_float64_scale_not_rounded_to_float32(backend):
    """float64 gradients of a mean over 3 rows (1/3 is not a float32) agree with the float64
    composition to ~1e-12, for every reduction and a returned lse."""
    x, w, b = _data(7, 5, 11, torch.float64, seed=3)
    y = torch.tensor([1, IGNORE, 4, 10, IGNORE, IGNORE, 0])
    cw = torch.rand(11, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.3
    for reduction in ("mean", "sum", "none"):
        _compare(backend, None, x, w, b, y, 1e-12, weight=cw, reduction=reduction, label_smoothing=0.1)


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyOptions"), reason="PyTorch < 2.13")
@pytest.mark.parametrize("backend", backend_params("torch", "cython", "triton"))
def test_issue11_options(backend, monkeypatch):
    """options=LinearCrossEntropyOptions(...): batch_chunk_size is the rows per chunk,
    allow_retain_graph makes mean/sum recompute in backward (so backward may run twice)."""
    dev = backend_device(backend)
    x, w, b = _data(10, 4, 7, device=dev)
    y = torch.tensor([0, 1, 2, IGNORE, 4, 5, 6, 0, 1, 2], device=dev)
    chunks = []
    real = lce_mod._ops.ce_forward_inplace

    def counting(logits, *args, **kw):
        chunks.append(logits.shape[0])
        return real(logits, *args, **kw)

    monkeypatch.setattr(lce_mod._ops, "ce_forward_inplace", counting)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4)
    _compare(backend, None, x, w, b, y, 2e-5, options=opts)
    # 9 counted rows; on a device (triton: its CPU tensors too) the ignored one is not compacted away
    device_side = celoss._checks.device_side(y, backend)
    assert chunks == ([4, 4, 2] if device_side else [4, 4, 1])
    chunks.clear()
    xg = x.clone().requires_grad_()
    loss = linear_cross_entropy(xg, w, y, backend=backend,
                                options=torch.nn.LinearCrossEntropyOptions(allow_retain_graph=True))
    loss.backward(retain_graph=True)
    first = xg.grad.clone()
    loss.backward()
    torch.testing.assert_close(xg.grad, 2 * first)
    chunks.clear()
    linear_cross_entropy(x, w.clone().requires_grad_(), y, backend=backend,
                         options=torch.nn.LinearCrossEntropyOptions(chunking_method="aspect_ratio:4")).backward()
    assert chunks == [2, 2, 2, 2, 2 if device_side else 1]  # next_pow2(ceil(10 / ceil(7 / 4))) // 4 = 2
    with pytest.raises(TypeError, match="LinearCrossEntropyOptions"):
        linear_cross_entropy(x, w, y, options={"batch_chunk_size": 4})


# ------------------------------------------------------------------------------------------------
# issue 11 items 8 and 9: refused arguments, clear errors, double backward
# ------------------------------------------------------------------------------------------------

def test_issue11_bad_arguments():
    x, w, b = _data(3, 4, 5)
    y = torch.tensor([0, 1, 2])
    cw = torch.rand(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        linear_cross_entropy(x, w, y, weight=cw)
    with torch.no_grad():  # as PyTorch: only refused when a graph is being built
        linear_cross_entropy(x, w, y, weight=cw)
    with pytest.raises(TypeError, match="ignore_index"):
        linear_cross_entropy(x, w, y, ignore_index=1.5)
    with pytest.raises(TypeError, match="ignore_index"):
        linear_cross_entropy(x, w, y, ignore_index=True)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        linear_cross_entropy(x, w, y, ignore_index=2 ** 63)
    with pytest.raises(ValueError, match="engine must be"):
        linear_cross_entropy(x, w, y, engine="tiled")
    with pytest.raises(ValueError, match="engine='fused' needs the triton backend"):
        linear_cross_entropy(x, w, y, engine="fused", backend="torch")
    # ignore_index=None is PyTorch's default (-100); uint8 targets as in F.cross_entropy
    ref = _torch_lce(x, w, None, y)
    torch.testing.assert_close(linear_cross_entropy(x, w, y, ignore_index=None), ref)
    torch.testing.assert_close(linear_cross_entropy(x, w, y.to(torch.uint8)), ref)


@pytest.mark.parametrize("backend,engine", ENGINES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_issue11_double_backward_says_once_differentiable(backend, engine, reduction):
    dev = backend_device(backend)
    x, w, b = _data(4, 3, 5, device=dev)
    x.requires_grad_()
    loss = linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3], device=dev), reduction=reduction,
                                backend=backend, engine=engine).sum()
    gx = torch.autograd.grad(loss, x, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once"):
        gx.sum().backward()


# ------------------------------------------------------------------------------------------------
# issue 12 A: engine selection (the chunked engine is the default everywhere, CUDA included)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params("torch", "cython", "triton"))
def test_issue12_default_engine_is_chunked(backend, monkeypatch):
    """No fused kernel runs unless engine='fused' asks for it; the chunked engine then runs the
    backend's own row kernel."""
    dev = backend_device(backend)
    module = celoss._dispatch.module(backend)
    if hasattr(module, "lce_stats"):
        for name in ("lce_stats", "lce_backward"):
            monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("fused kernel launched"))
    seen = []
    real = lce_mod._ops.ce_forward_inplace
    monkeypatch.setattr(lce_mod._ops, "ce_forward_inplace", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    x, w, b = _data(5, 4, 6, device=dev)
    _compare(backend, None, x, w, b, torch.tensor([0, 1, 2, 3, 4], device=dev), 2e-5)
    assert seen and set(seen) == {backend}
    assert lce_mod._select_engine(backend, torch.float32, None) == "chunked"


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_issue12_fused_engine_on_request(backend):
    assert lce_mod._select_engine(backend, torch.bfloat16, "fused") == "fused"
    with pytest.raises(TypeError, match="engine='fused' takes"):
        lce_mod._select_engine(backend, torch.float64, "fused")


# ------------------------------------------------------------------------------------------------
# issue 15: torch.compile (fullgraph, dynamic shapes) with inductor on CPU
# ------------------------------------------------------------------------------------------------

def _counting_inductor():
    """An inductor backend that counts the graphs it compiles."""
    from torch._inductor.compile_fx import compile_fx
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)
    return backend, graphs


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", backend_params("torch", "cython"))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_issue15_compile_fullgraph_dynamic(backend, reduction):
    """fullgraph=True compiles (no data-dependent guard); ten batch sizes give at most two graphs;
    loss and gradients equal eager's."""
    torch._dynamo.reset()
    compiler, graphs = _counting_inductor()
    d, v = 6, 13
    cw = torch.rand(v, generator=torch.Generator().manual_seed(2)) + 0.5

    def step(x, w, b, y):
        loss = linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction, label_smoothing=0.1,
                                    backend=backend, chunk_bytes=400)
        return loss.sum() if reduction == "none" else loss

    compiled = torch.compile(step, backend=compiler, fullgraph=True, dynamic=True)
    for n in range(2, 12):
        x, w, b = _data(n, d, v, seed=n)
        y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(n))
        y[::3] = IGNORE
        results = []
        for fn in (step, compiled):
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            loss = fn(*leaves, y)
            results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
        (le, ge), (lc, gc) = results
        torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-6)
        for a, r in zip(gc, ge):
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    assert 1 <= len(graphs) <= 2, f"{len(graphs)} graphs for 10 batch sizes"


def test_issue12_lowp_dw_without_mixed_gemm_falls_back(monkeypatch):
    """Where a float32-output fp16/bf16 GEMM is missing (here: CPU claimed to have one), the dW
    accumulation falls back to rounded slices, and remembers it."""
    monkeypatch.setitem(lce_mod._MIXED_GEMM, "cpu", True)
    x, w, b = _data(9, 8, 21, torch.bfloat16)
    y = torch.arange(9) % 21
    wg = w.clone().requires_grad_()
    linear_cross_entropy(x, wg, y, backend="torch", chunk_bytes=200).backward()
    assert lce_mod._MIXED_GEMM["cpu"] is False
    wr = w.double().requires_grad_()
    _torch_lce(x.double(), wr, None, y).backward()
    torch.testing.assert_close(wg.grad.double(), wr.grad, rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------------------------------------
# issue 14 item 3: probability targets (read chunk by chunk) and return_z_loss
# ------------------------------------------------------------------------------------------------

LCE_BACKENDS = backend_params("torch", "cython", "triton")


def _soft(shape, v, seed=1, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, v, generator=g, dtype=torch.float64) * 2, -1).to(dtype).to(device)


def _soft_oracle(x, w, b, p, *, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0, shift=False,
                 lse_weights=None):
    """float64 F.cross_entropy(F.linear(x, W, b), p) with probability targets, plus z_loss * lse**2 per
    row (weight 1, as celoss.cross_entropy); optionally + sum(lse * lse_weights)."""
    if shift:
        x, p = x[..., :-1, :], p[..., 1:, :]
    v = w.shape[0]
    z = F.linear(x, w, b).reshape(-1, v)
    pt = p.reshape(-1, v).double()
    rows = F.cross_entropy(z, pt, None if weight is None else weight.double(), reduction="none",
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, 1)
    rows = rows + z_loss * lse * lse
    out = {"none": lambda: rows.reshape(p.shape[:-1]), "sum": rows.sum, "mean": rows.mean}[reduction]()
    if lse_weights is not None:
        out = out + (lse.reshape(p.shape[:-1]) * lse_weights.double()).sum()
    return out


@pytest.mark.parametrize("backend", LCE_BACKENDS)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_issue14_probability_targets(backend, reduction):
    """(N, V) probability targets with class weights, label smoothing, z-loss and bias, several chunks,
    against float64 F.cross_entropy(F.linear(...)) with a random upstream gradient."""
    dev = backend_device(backend)
    n, d, v = 13, 7, 29
    x, w, b = _data(n, d, v, device=dev)
    p = _soft((n,), v, device=dev)
    cw = (torch.rand(v, generator=torch.Generator().manual_seed(3)) + 0.5).to(dev)
    kw = dict(weight=cw, reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    a, o, ga, go = against_oracle(
        lambda x_, w_, b_: linear_cross_entropy(x_, w_, p, linear_bias=b_, chunk_bytes=4 * (v + 2 * d) * 4,
                                                backend=backend, **kw),
        lambda x_, w_, b_: _soft_oracle(x_, w_, b_, p, **kw), x, w, b)
    assert a.dtype == torch.float32 and a.shape == o.shape
    torch.testing.assert_close(a.double(), o.detach(), rtol=2e-5, atol=2e-6)
    for g1, g2 in zip(ga, go):
        torch.testing.assert_close(g1.double(), g2, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", LCE_BACKENDS)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_issue14_probability_targets_shift(backend, reduction):
    """shift=True with (B, T, V) probability targets: position t is scored against the row of t + 1 (read
    by index, never copied); 'none' has shape (B, T - 1)."""
    dev = backend_device(backend)
    bsz, seq, d, v = 3, 5, 6, 17
    x, w, _ = _data(bsz * seq, d, v, device=dev)
    x = x.reshape(bsz, seq, d)
    p = _soft((bsz, seq), v, device=dev)
    kw = dict(reduction=reduction, z_loss=1e-3, shift=True)
    a, o, ga, go = against_oracle(
        lambda x_, w_: linear_cross_entropy(x_, w_, p, chunk_bytes=500, backend=backend, **kw),
        lambda x_, w_: _soft_oracle(x_, w_, None, p, **kw), x, w)
    assert a.shape == o.shape == ((bsz, seq - 1) if reduction == "none" else ())
    torch.testing.assert_close(a.double(), o.detach(), rtol=2e-5, atol=2e-6)
    for g1, g2 in zip(ga, go):
        torch.testing.assert_close(g1.double(), g2, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", backend_params("torch", "cython"))
def test_issue14_probability_targets_float64_and_lse_gradient(backend):
    """float64 (backward recomputes, float64 scale) and the returned lse's gradient with probability targets."""
    n, d, v = 9, 5, 11
    x, w, b = _data(n, d, v, dtype=torch.float64)
    p = _soft((n,), v, dtype=torch.float64)
    lse_w = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def ours(x_, w_, b_):
        out = linear_cross_entropy(x_, w_, p, linear_bias=b_, return_lse=True, z_loss=1e-2, chunk_bytes=300,
                                   backend=backend)
        return out.loss + (out.lse * lse_w).sum()

    a, o, ga, go = against_oracle(ours, lambda x_, w_, b_: _soft_oracle(x_, w_, b_, p, z_loss=1e-2, lse_weights=lse_w),
                                  x, w, b)
    torch.testing.assert_close(a, o, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(ga, go):
        torch.testing.assert_close(g1, g2, rtol=1e-11, atol=1e-12)


def _capped_soft_oracle(x, w, b, p, cw, *, logit_scale=1.0, softcap=None, **kw):
    """``_soft_oracle`` of the logits ``softcap * tanh(logit_scale * z / softcap)`` (as celoss transforms
    them), written as one more linear layer when there is no softcap."""
    if softcap is None:
        return _soft_oracle(x, w * logit_scale, None if b is None else b * logit_scale, p, weight=cw, **kw)
    capped = lambda z: softcap * torch.tanh(logit_scale * z / softcap)  # noqa: E731
    v = w.shape[0]
    z = capped(F.linear(x[..., :-1, :] if kw.get("shift") else x, w, b)).reshape(-1, v)
    eye = torch.eye(v, dtype=z.dtype)
    sub = dict(kw, shift=False)
    pp = p[..., 1:, :] if kw.get("shift") else p
    return _soft_oracle(z, eye, None, pp.reshape(-1, v), weight=cw, **sub).reshape(
        pp.shape[:-1] if kw.get("reduction") == "none" else ())


@pytest.mark.parametrize("backend", LCE_BACKENDS)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("shift", (False, True), ids=("rows", "shift"))
def test_issue14_probability_target_and_weight_gradients(backend, reduction, shift):
    """Gradients of the probability targets and of the class weight (besides x, W, b), as PyTorch's
    F.cross_entropy(F.linear(x, W, b), p, weight=w): label smoothing, z-loss, several chunks, random
    upstream gradients; with shift the target rows of position 0 (never read) get a zero gradient."""
    dev = backend_device(backend)
    bsz, seq, d, v = 3, 5, 7, 23
    x, w, b = _data(bsz * seq, d, v, device=dev)
    x = x.reshape(bsz, seq, d)
    p = _soft((bsz, seq), v, device=dev)
    cw = (torch.rand(v, generator=torch.Generator().manual_seed(3)) + 0.5).to(dev)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, shift=shift)
    a, o, ga, go = against_oracle(
        lambda x_, w_, b_, p_, cw_: linear_cross_entropy(x_, w_, p_, linear_bias=b_, weight=cw_, chunk_bytes=700,
                                                          backend=backend, **kw),
        lambda x_, w_, b_, p_, cw_: _soft_oracle(x_, w_, b_, p_, weight=cw_, **kw), x, w, b, p, cw)
    torch.testing.assert_close(a.double(), o.detach(), rtol=2e-5, atol=2e-6)
    for name, g1, g2 in zip(("x", "W", "b", "target", "weight"), ga, go):
        assert g1.dtype == torch.float32 and g1.shape == g2.shape, name
        torch.testing.assert_close(g1.double(), g2, rtol=2e-5, atol=2e-6, msg=name)
    assert ga[3].abs().amin(-1).gt(0).sum() == (bsz * (seq - 1) if shift else bsz * seq)
    if shift:
        assert torch.count_nonzero(ga[3][:, 0]) == 0


@pytest.mark.parametrize("backend", LCE_BACKENDS)
@pytest.mark.parametrize("softcap", (None, 2.0))
def test_issue14_probability_target_gradients_alone(backend, softcap):
    """Only the targets and the class weight require grad (no x / W gradient: the row kernel is
    skipped), with logit_scale and softcap (the gradient is w_j (1 - eps) (lse - z_j) of the
    transformed logits)."""
    dev = backend_device(backend)
    n, d, v = 11, 5, 17
    x, w, b = _data(n, d, v, device=dev)
    p = _soft((n,), v, device=dev)
    cw = (torch.rand(v, generator=torch.Generator().manual_seed(4)) - 0.3).to(dev)  # signs of both kinds
    kw = dict(reduction="sum", label_smoothing=0.05, logit_scale=0.7, softcap=softcap)
    a, o, ga, go = against_oracle(
        lambda p_, cw_: linear_cross_entropy(x, w, p_, linear_bias=b, weight=cw_, chunk_bytes=300,
                                             backend=backend, **kw),
        lambda p_, cw_: _capped_soft_oracle(x.double(), w.double(), b.double(), p_, cw_, **kw), p, cw)
    torch.testing.assert_close(a.double(), o.detach(), rtol=2e-5, atol=2e-6)
    for g1, g2 in zip(ga, go):
        torch.testing.assert_close(g1.double(), g2, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", LCE_BACKENDS)
def test_issue14_probability_target_gradients_bf16(backend):
    """bf16 hidden states, head, targets and class weight: every gradient within PyTorch's own bf16 error
    of the float64 value (plus a margin)."""
    dev = backend_device(backend)
    n, d, v = 12, 16, 40
    x, w, b = _data(n, d, v, dtype=torch.bfloat16, device=dev)
    p = _soft((n,), v, device=dev, dtype=torch.bfloat16)
    cw = (torch.rand(v, generator=torch.Generator().manual_seed(3)) + 0.5).to(dev, torch.bfloat16)
    kw = dict(label_smoothing=0.1)
    lowp_against_oracle(
        lambda x_, w_, p_, cw_: linear_cross_entropy(x_, w_, p_, weight=cw_, chunk_bytes=600, backend=backend, **kw),
        lambda x_, w_, p_, cw_: F.cross_entropy(F.linear(x_, w_), p_, weight=cw_, **kw),
        x, w, p, cw, margin=lowp_margin(backend, torch.bfloat16, 2e-3))


@pytest.mark.parametrize("backend", backend_params("torch", "cython"))
def test_issue14_probability_target_gradients_float64_with_lse(backend):
    """float64 (tight), a returned lse that carries its own gradient (it reaches x, W, not the targets),
    and float32 targets with float64 hidden states (the target gradient keeps the target's dtype)."""
    n, d, v = 9, 4, 13
    x, w, b = _data(n, d, v, dtype=torch.float64)
    p = _soft((n,), v, dtype=torch.float32)
    cw = torch.rand(v, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) + 0.2
    lse_w = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def ours(x_, w_, p_, cw_):
        out = linear_cross_entropy(x_, w_, p_, linear_bias=b, weight=cw_, return_lse=True, z_loss=1e-2,
                                   label_smoothing=0.2, chunk_bytes=250, backend=backend)
        return out.loss + (out.lse * lse_w).sum()

    a, o, ga, go = against_oracle(
        ours, lambda x_, w_, p_, cw_: _soft_oracle(x_, w_, b, p_, weight=cw_, z_loss=1e-2, label_smoothing=0.2,
                                                   lse_weights=lse_w), x, w, p, cw)
    assert ga[2].dtype == torch.float32 and ga[3].dtype == torch.float64
    torch.testing.assert_close(a, o, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(ga, go):
        torch.testing.assert_close(g1.double(), g2, rtol=1e-6 if g1.dtype == torch.float32 else 1e-11,
                                   atol=1e-7 if g1.dtype == torch.float32 else 1e-12)


def test_issue14_probability_target_gradients_refusals():
    """The fused engine takes class indices only; double backward says the loss is differentiable once;
    the compiled graph (fake implementations) gives eager's target gradients."""
    x, w, b = _data(6, 4, 9)
    p = _soft((6,), 9).requires_grad_()
    if celoss.available_backends()["triton"] is None:
        with pytest.raises(ValueError, match="engine='fused' takes class-index targets"):
            linear_cross_entropy(x, w, p, engine="fused", backend="triton")
    loss = linear_cross_entropy(x, w, p, backend="torch")
    g, = torch.autograd.grad(loss, p, create_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        g.sum().backward()

    cw = torch.rand(9, generator=torch.Generator().manual_seed(2)) + 0.5

    def step(p_, cw_):
        return linear_cross_entropy(x, w, p_, linear_bias=b, weight=cw_, label_smoothing=0.1, backend="torch")

    torch._dynamo.reset()
    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        leaves = (p.detach().clone().requires_grad_(), cw.clone().requires_grad_())
        grads.append(torch.autograd.grad(fn(*leaves), leaves))
    torch.testing.assert_close(grads[1], grads[0])
    assert all(g.abs().max() > 0 for g in grads[1])


@pytest.mark.parametrize("backend", LCE_BACKENDS)
def test_issue14_index_target_weight_requiring_grad_refused_as_pytorch(backend):
    """With class-index targets a class weight that requires grad is refused as PyTorch refuses it
    (RuntimeError, the same words), and accepted under no_grad."""
    dev = backend_device(backend)
    x, w, b = _data(4, 3, 5, device=dev)
    y = torch.tensor([0, 4, IGNORE, 2], device=dev)
    cw = torch.rand(5, device=dev, requires_grad=True)
    with pytest.raises(RuntimeError) as theirs:
        F.linear_cross_entropy(x, w, y, weight=cw)
    words = "not differentiable with respect to argument 'weight'"
    assert words in str(theirs.value)
    with pytest.raises(RuntimeError, match=words):
        linear_cross_entropy(x, w, y, weight=cw, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, y, weight=cw, backend=backend),
                                   F.cross_entropy(F.linear(x, w), y, weight=cw))


@pytest.mark.parametrize("backend", LCE_BACKENDS)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("n,v", [(4, 0), (0, 5)], ids=("V0", "N0"))
def test_issue14_probability_target_gradients_empty_dims(backend, reduction, n, v):
    """No classes or no rows with probability targets that require grad: PyTorch's values (a "mean"
    without classes is 0 / 0 = NaN) and its gradients (zeros, empty where a dimension is 0)."""
    dev = backend_device(backend)
    x, w, b = _data(n, 3, v, device=dev)
    p = _soft((n,), v, device=dev) if v else torch.zeros(n, 0, device=dev)
    cw = torch.rand(v, generator=torch.Generator().manual_seed(2)).to(dev)
    a, o, ga, go = against_oracle(
        lambda x_, w_, p_, cw_: linear_cross_entropy(x_, w_, p_, weight=cw_, reduction=reduction, backend=backend),
        lambda x_, w_, p_, cw_: F.cross_entropy(F.linear(x_, w_), p_, weight=cw_, reduction=reduction),
        x, w, p, cw)
    torch.testing.assert_close(a.double(), o.detach(), equal_nan=True)
    for g1, g2 in zip(ga, go):
        assert g1.shape == g2.shape
        torch.testing.assert_close(g1.double(), g2)


@pytest.mark.parametrize("backend", LCE_BACKENDS)
def test_issue14_probability_targets_dtype_promotion(backend):
    """fp16 hidden states with float32 targets: the loss is float32 (as celoss.cross_entropy), within
    PyTorch's own fp16 error of the float64 value."""
    dev = backend_device(backend)
    n, d, v = 12, 16, 24
    x, w, b = _data(n, d, v, dtype=torch.float16, device=dev)
    p = _soft((n,), v, device=dev)
    loss = linear_cross_entropy(x, w, p, linear_bias=b, backend=backend)
    ref = _soft_oracle(x.double(), w.double(), b.double(), p)
    half = F.cross_entropy(F.linear(x, w, b), p.half()).double()
    assert loss.dtype == torch.float32
    assert (loss.double() - ref).abs() <= (half - ref).abs() + 1e-3 * (1 + ref.abs())


@pytest.mark.parametrize("backend", LCE_BACKENDS)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("soft", (False, True), ids=("index", "probability"))
def test_issue14_return_z_loss(backend, reduction, soft):
    """return_z_loss as celoss.cross_entropy: the z-loss part z * w_y * lse**2 per counted row (weight 1
    per row with probability targets), reduced like the loss; the loss itself includes it."""
    dev = backend_device(backend)
    n, d, v, z = 10, 6, 15, 3e-2
    x, w, b = _data(n, d, v, device=dev)
    cw = (torch.rand(v, generator=torch.Generator().manual_seed(7)) + 0.5).to(dev)
    if soft:
        target = _soft((n,), v, device=dev)
    else:
        target = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(2)).to(dev)
        target[::4] = IGNORE
    out = linear_cross_entropy(x, w, target, linear_bias=b, weight=cw, reduction=reduction, z_loss=z,
                               return_z_loss=True, chunk_bytes=400, backend=backend)
    assert isinstance(out, celoss.CrossEntropyOutput) and out.lse is None
    z64 = F.linear(x.double(), w.double(), b.double())
    lse = torch.logsumexp(z64, 1)
    if soft:
        per_row = torch.ones(n, dtype=torch.float64)
        loss_ref = _soft_oracle(x.double(), w.double(), b.double(), target, weight=cw, reduction=reduction, z_loss=z)
    else:
        counted = target != IGNORE
        per_row = torch.where(counted, cw.double()[target.clamp(min=0)], 0.0)
        rows = F.cross_entropy(z64, target, cw.double(), reduction="none") + z * per_row * lse * lse
        loss_ref = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / per_row.sum()}[reduction]
    z_rows = z * per_row * lse * lse
    z_ref = {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / per_row.sum()}[reduction]
    assert out.z_loss.dtype == torch.float32 and out.z_loss.shape == z_ref.shape
    torch.testing.assert_close(out.z_loss.double(), z_ref, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(out.loss.double(), loss_ref, rtol=2e-5, atol=1e-6)
    # the same as celoss.cross_entropy on the logits
    ce = celoss.cross_entropy(F.linear(x, w, b), target, cw, reduction=reduction, z_loss=z, return_z_loss=True,
                              backend=backend)
    torch.testing.assert_close(out.z_loss, ce.z_loss, rtol=2e-5, atol=1e-7)


def test_issue14_probability_target_errors():
    x, w, b = _data(4, 3, 5)
    p = _soft((4,), 5)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for probability"):
        linear_cross_entropy(x, w, p, ignore_index=1)
    with pytest.raises(ValueError, match="probability targets must have shape"):
        linear_cross_entropy(x, w, p[:, :4])
    if celoss.available_backends()["triton"] is None:
        with pytest.raises(ValueError, match="engine='fused' takes class-index targets"):
            linear_cross_entropy(x, w, p, engine="fused", backend="triton")
