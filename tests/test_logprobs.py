"""celoss.token_logprobs / linear_token_logprobs (issue 14 item 2) vs a float64 PyTorch oracle on
every backend: both outputs with random upstream gradients at once, temperature, ignore_index,
(B, T, V) inputs, shift, every dtype, NaN/inf rows, bad input."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import oracle
from conftest import backend_device, backend_params, lowp_error_bound, lowp_margin

import celoss
import celoss.logprobs as L
from celoss.logprobs import TokenLogprobsOutput, linear_token_logprobs, token_logprobs

ALL = backend_params()
LOWP = (torch.bfloat16, torch.float16)


def _upstream(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def run_both(fn, ref, inputs, out_shape, seed=0):
    """Outputs of ``fn`` (ours, on ``inputs``) and ``ref`` (float64 copies) and the gradients of
    sum(ga * logprobs + gh * entropy) with the same random upstream gradients for both."""
    xa = [t.detach().clone().requires_grad_() for t in inputs]
    xb = [t.detach().double().requires_grad_() for t in inputs]
    (la, ha), (lb, hb) = fn(*xa), ref(*xb)
    ga, gh = _upstream(out_shape, seed)
    grads_a = torch.autograd.grad((la * ga.to(la)).sum() + (ha * gh.to(ha)).sum(), xa)
    grads_b = torch.autograd.grad((lb * ga.to(lb)).sum() + (hb * gh.to(hb)).sum(), xb)
    return (la, ha, grads_a), (lb, hb, grads_b)


def _tol(dtype):
    return 1e-11 if dtype == torch.float64 else 2e-6


def _close(ours, ref, dtype, scale=1.0):
    err = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= _tol(dtype) * (scale + ref.abs().max().item() if ref.numel() else 1), err


def _case(shape, v, dtype, device, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, v, generator=g) * spread).to(dtype).to(device)
    y = torch.randint(0, v, shape, generator=g).to(device)
    y.view(-1)[::5] = -100  # some ignored positions
    return x, y


# ------------------------------------------------------------------------------------------------
# token_logprobs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_logprobs_and_entropy_match_oracle(backend, temperature, dtype):
    x, y = _case((3, 7), 300, dtype, backend_device(backend))
    x[1, 2, 5] = -math.inf  # a masked vocabulary entry: 0 log 0 = 0 in the entropy
    (la, ha, (ga,)), (lb, hb, (gb,)) = run_both(
        lambda t: token_logprobs(t, y, temperature=temperature, return_entropy=True, backend=backend),
        lambda t: oracle.token_logprobs(t, y, temperature), [x], (3, 7))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert la.dtype == ha.dtype == acc and ga.dtype == dtype and la.shape == (3, 7)
    _close(la, lb, dtype)
    _close(ha, hb, dtype)
    _close(ga, gb, dtype)
    assert (la[y == -100] == 0).all() and (ha[y == -100] == 0).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", LOWP)
def test_token_logprobs_low_precision_no_worse_than_pytorch(backend, dtype):
    x, y = _case((4, 5), 260, dtype, backend_device(backend), seed=1)
    (la, ha, (ga,)), (lb, hb, (gb,)) = run_both(
        lambda t: token_logprobs(t, y, temperature=0.8, return_entropy=True, backend=backend),
        lambda t: oracle.token_logprobs(t, y, 0.8), [x], (4, 5))
    assert la.dtype == ha.dtype == torch.float32 and ga.dtype == dtype
    # the values are float32 computations on the exact 16-bit inputs
    _close(la, lb, torch.float32)
    _close(ha, hb, torch.float32)
    xp = x.detach().clone().requires_grad_()
    lp, hp = oracle.token_logprobs(xp, y, 0.8)  # PyTorch in the 16-bit dtype
    up_l, up_h = _upstream((4, 5), 0)
    (gp,) = torch.autograd.grad((lp * up_l.to(lp)).sum() + (hp * up_h.to(hp)).sum(), xp)
    lowp_error_bound(ga, gp, gb, margin=lowp_margin(backend, dtype))


@pytest.mark.parametrize("backend", ALL)
def test_token_logprobs_without_entropy_is_a_tensor_and_entropy_only_gradient(backend):
    x, y = _case((6,), 130, torch.float32, backend_device(backend), seed=2)
    out = token_logprobs(x, y, backend=backend)
    assert isinstance(out, torch.Tensor) and not isinstance(out, tuple)
    _close(out, oracle.token_logprobs(x.double(), y)[0], torch.float32)
    both = token_logprobs(x, y, return_entropy=True, backend=backend)
    assert isinstance(both, TokenLogprobsOutput) and torch.equal(both.logprobs, out)
    # the entropy alone (log-probs unused) drives the gradient
    (la, ha, (ga,)), (lb, hb, (gb,)) = run_both(
        lambda t: (torch.zeros(6), token_logprobs(t, y, return_entropy=True, backend=backend).entropy),
        lambda t: (torch.zeros(6, dtype=torch.float64), oracle.token_logprobs(t, y)[1]), [x], (6,))
    _close(ga, gb, torch.float32)
    # the log-probs alone
    xa = x.clone().requires_grad_()
    xb = x.double().requires_grad_()
    w = torch.randn(6)
    token_logprobs(xa, y, temperature=1.5, backend=backend).mul(w).sum().backward()
    oracle.token_logprobs(xb, y, 1.5)[0].mul(w.double()).sum().backward()
    _close(xa.grad, xb.grad, torch.float32)


@pytest.mark.parametrize("backend", ALL)
def test_token_logprobs_vocabulary_spanning_blocks_and_chunks(backend):
    """Rows longer than a Triton block (4096) and a CPU chunk (1024), the max in a later block."""
    x, y = _case((3,), 5000, torch.float32, backend_device(backend), seed=3)
    x[0, 4500] = 40.0
    x[1, 10] = 40.0
    x[2, :4100] = -math.inf
    y[2] = 4200
    (la, ha, (ga,)), (lb, hb, (gb,)) = run_both(
        lambda t: token_logprobs(t, y, temperature=0.9, return_entropy=True, backend=backend),
        lambda t: oracle.token_logprobs(t, y, 0.9), [x], (3,))
    _close(la, lb, torch.float32)
    _close(ha, hb, torch.float32)
    _close(ga, gb, torch.float32)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_token_logprobs_nan_and_inf_rows_propagate_like_the_oracle(backend, dtype):
    x, y = _case((6,), 40, torch.float32, "cpu", seed=4)
    y[:] = torch.tensor([3, 3, 3, 3, 7, -100])
    x[0, 11] = math.nan
    x[1, 12] = math.inf
    x[2] = -math.inf
    x[3, 3] = -math.inf  # the token itself masked: log p = -inf, finite gradients
    x[5, 0] = math.nan   # an ignored row is never read
    x = x.to(dtype).to(backend_device(backend))
    (la, ha, (ga,)), (lb, hb, (gb,)) = run_both(
        lambda t: token_logprobs(t, y, return_entropy=True, backend=backend),
        lambda t: oracle.token_logprobs(t, y), [x], (6,))
    for ours, ref in ((la, lb), (ha, hb), (ga, gb)):
        assert torch.equal(ours.isnan(), ref.isnan()), (ours, ref)
        assert torch.equal(ours.isinf(), ref.isinf()), (ours, ref)
        fin = ref.isfinite()
        tol = torch.finfo(ours.dtype).eps if ours.dtype == torch.bfloat16 else 1e-5  # bf16: the gradient
        assert (ours.double()[fin] - ref[fin]).abs().max() <= tol * (1 + ref[fin].abs().max())
    assert la[5] == 0 and ha[5] == 0 and (ga[5] == 0).all()


@pytest.mark.parametrize("backend", ALL)
def test_token_logprobs_custom_ignore_index_and_all_ignored(backend):
    dev = backend_device(backend)
    x, _ = _case((2, 3), 20, torch.float32, dev, seed=5)
    y = torch.full((2, 3), 7, device=dev)
    y[0, 1] = 19
    (la, ha, (ga,)), (lb, hb, (gb,)) = run_both(
        lambda t: token_logprobs(t, y, ignore_index=7, return_entropy=True, backend=backend),
        lambda t: oracle.token_logprobs(t, y, ignore_index=7), [x], (2, 3))
    _close(la, lb, torch.float32)
    _close(ga, gb, torch.float32)
    assert (ga[y == 7] == 0).all() and (ga[0, 1] != 0).all()
    xa = x.clone().requires_grad_()
    out = token_logprobs(xa, torch.full((2, 3), -100, device=dev), return_entropy=True, backend=backend)
    assert (out.logprobs == 0).all() and (out.entropy == 0).all()
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert (xa.grad == 0).all()


@pytest.mark.parametrize("backend", ALL)
def test_token_logprobs_empty_one_dimensional_and_strided(backend):
    dev = backend_device(backend)
    empty = token_logprobs(torch.randn(0, 5, 11, device=dev), torch.zeros(0, 5, dtype=torch.long, device=dev),
                           return_entropy=True, backend=backend)
    assert empty.logprobs.shape == empty.entropy.shape == (0, 5)
    x = torch.randn(17, device=dev)
    one = token_logprobs(x, torch.tensor(4, device=dev), backend=backend)
    assert one.shape == () and abs(one.item() - torch.log_softmax(x.double(), 0)[4].item()) < 1e-6
    big = torch.randn(5, 40, device=dev)
    xs = big[:, ::2]  # class stride 2
    y = torch.randint(0, 20, (5,), device=dev)
    (la, ha, (ga,)), (lb, hb, (gb,)) = run_both(
        lambda t: token_logprobs(t, y, return_entropy=True, backend=backend), lambda t: oracle.token_logprobs(t, y), [xs], (5,))
    _close(la, lb, torch.float32)
    _close(ga, gb, torch.float32)
    # int32 / uint8 token ids are accepted (as int64)
    assert torch.equal(token_logprobs(xs, y.to(torch.int32), backend=backend), la.detach())


@pytest.mark.parametrize("backend", ALL)
def test_token_logprobs_bad_input(backend):
    dev = backend_device(backend)
    x = torch.randn(2, 3, 10, device=dev)
    y = torch.randint(0, 10, (2, 3), device=dev)
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(x, y[:, :2], backend=backend)
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(x, y.reshape(6), backend=backend)
    if dev == "cpu":  # on CUDA a device-side assert, fatal to the process's CUDA context (see below)
        bad = y.clone()
        bad[1, 2] = 10
        with pytest.raises(IndexError, match="token 10 is out of range"):
            token_logprobs(x, bad, backend=backend)
        bad[1, 2] = -3
        with pytest.raises(IndexError, match="token -3"):
            token_logprobs(x, bad, backend=backend)
    with pytest.raises(TypeError, match="integer token ids"):
        token_logprobs(x, y.float(), backend=backend)
    with pytest.raises(TypeError, match="integer token ids"):
        token_logprobs(x, y > 3, backend=backend)
    for t in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(x, y, temperature=t, backend=backend)
    with pytest.raises(TypeError, match="temperature"):
        token_logprobs(x, y, temperature=torch.tensor(1.0), backend=backend)
    with pytest.raises(TypeError, match="logits must be float"):
        token_logprobs(y, y, backend=backend)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        token_logprobs(torch.tensor(1.0, device=dev), torch.tensor(0, device=dev), backend=backend)
    with pytest.raises(TypeError, match="ignore_index"):
        token_logprobs(x, y, ignore_index=1.5, backend=backend)


def test_device_tokens_are_checked_on_the_device(monkeypatch):
    """Off the CPU the token check is an asynchronous assert on a device boolean (no host read, so
    no synchronisation and CUDA-graph capture works); the CPU's _assert_async stands in for CUDA's,
    which fails at the next synchronisation with a device-side assert."""
    seen = []
    monkeypatch.setattr(L._checks, "device_side", lambda t, backend=None: True)
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: seen.append((cond.clone(), msg)))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("host read"))
    L._check_token_values(torch.tensor([0, -100, 9]), 10, -100)
    L._check_token_values(torch.tensor([0, 10, -3]), 10, -100)
    assert [c.item() for c, _ in seen] == [True, False]
    assert "token ids must be in [0, 10) (the vocabulary size) or equal ignore_index=-100" in seen[1][1]


def test_device_token_assert_fails_loudly(monkeypatch):
    monkeypatch.setattr(L._checks, "device_side", lambda t, backend=None: True)
    x = torch.randn(2, 3, 10)
    with pytest.raises(RuntimeError, match="token is out of range"):
        token_logprobs(x, torch.tensor([[0, 1, 2], [3, 10, 5]]), backend="torch")


@pytest.mark.parametrize("backend", ALL)
def test_token_logprobs_double_backward_raises(backend):
    x, y = _case((4,), 30, torch.float32, backend_device(backend), seed=6)
    x.requires_grad_()
    out = token_logprobs(x, y, return_entropy=True, backend=backend)
    (g,) = torch.autograd.grad((out.logprobs + out.entropy).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        g.sum().backward()


def test_token_logprobs_backends_agree_and_default_runs():
    x, y = _case((8, 3), 70, torch.float32, "cpu", seed=7)
    ref = token_logprobs(x, y, return_entropy=True, temperature=0.6, backend="torch")
    default = token_logprobs(x, y, return_entropy=True, temperature=0.6)
    for a, b in zip(default, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_token_logprobs_missing_cpu_extension_falls_back_with_one_warning(monkeypatch):
    import celoss.cpu
    monkeypatch.setitem(sys.modules, "celoss.cpu._logprobs", None)  # import -> ImportError
    monkeypatch.delattr(celoss.cpu, "_logprobs", raising=False)
    L._cpu_module.cache_clear()
    try:
        x, y = _case((3,), 9, torch.float32, "cpu", seed=8)
        with pytest.warns(RuntimeWarning, match="_logprobs is unavailable"):
            out = token_logprobs(x, y, backend="cython")
        _close(out, oracle.token_logprobs(x.double(), y)[0], torch.float32)
    finally:
        L._cpu_module.cache_clear()


@pytest.mark.parametrize("backend", backend_params("cython", "torch"))
def test_token_logprobs_under_torch_compile(backend):
    x, y = _case((2, 4), 50, torch.float32, "cpu", seed=9)

    def loss(t):
        out = token_logprobs(t, y, temperature=0.9, return_entropy=True, backend=backend)
        return (out.logprobs * 2 + 0.1 * out.entropy).sum()

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = loss(xa)
    eager.backward()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(xb)
    compiled.backward()
    assert torch.allclose(compiled, eager) and torch.allclose(xb.grad, xa.grad)


# ------------------------------------------------------------------------------------------------
# linear_token_logprobs
# ------------------------------------------------------------------------------------------------

def _linear_case(b, t, d, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g).to(dtype).to(device)
    w = (torch.randn(v, d, generator=g) / math.sqrt(d) * 3).to(dtype).to(device)
    bias = torch.randn(v, generator=g).to(dtype).to(device)
    y = torch.randint(0, v, (b, t), generator=g).to(device)
    y[0, 2] = y[1, 0] = -100
    return x, w, bias, y


def _linear_oracle(shift, temperature, y):
    def ref(x, w, b=None):
        z = F.linear(x, w, b)
        return oracle.token_logprobs(z[..., :-1, :], y[..., 1:], temperature) if shift else oracle.token_logprobs(z, y, temperature)
    return ref


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_token_logprobs_match_oracle(backend, dtype, shift, bias):
    x, w, b, y = _linear_case(2, 6, 16, 90, dtype, backend_device(backend))
    inputs = [x, w, b] if bias else [x, w]

    def ours(x, w, b=None):
        return linear_token_logprobs(x, w, y, linear_bias=b, temperature=1.3, shift=shift, return_entropy=True,
                                     chunk_bytes=3 * 90 * x.element_size(), backend=backend)  # 2-3 rows a chunk
    out_shape = (2, 5) if shift else (2, 6)
    (la, ha, ga), (lb, hb, gb) = run_both(ours, _linear_oracle(shift, 1.3, y), inputs, out_shape)
    assert la.shape == out_shape
    _close(la, lb, dtype)
    _close(ha, hb, dtype)
    for a, r, t in zip(ga, gb, inputs):
        assert a.dtype == t.dtype
        _close(a, r, dtype)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", LOWP)
def test_linear_token_logprobs_low_precision_no_worse_than_pytorch(backend, dtype):
    x, w, b, y = _linear_case(2, 5, 32, 70, dtype, backend_device(backend), seed=1)

    def ours(x, w, b):
        return linear_token_logprobs(x, w, y, linear_bias=b, temperature=0.8, shift=True, return_entropy=True,
                                     chunk_bytes=4 * 70 * 2, backend=backend)
    ref = _linear_oracle(True, 0.8, y)
    (la, ha, ga), (lb, hb, gb) = run_both(ours, ref, [x, w, b], (2, 4))
    pa = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    lp, hp = ref(*pa)  # PyTorch's composition in the 16-bit dtype
    up_l, up_h = _upstream((2, 4), 0)
    gp = torch.autograd.grad((lp * up_l.to(lp)).sum() + (hp * up_h.to(hp)).sum(), pa)
    margin = lowp_margin(backend, dtype, 2e-3)
    lowp_error_bound(la, lp, lb, margin=margin)
    lowp_error_bound(ha, hp, hb, margin=margin)
    for a, p, r in zip(ga, gp, gb):
        assert a.dtype == dtype
        lowp_error_bound(a, p, r, margin=margin)


@pytest.mark.parametrize("backend", ALL)
def test_linear_token_logprobs_equals_token_logprobs_of_the_logits(backend):
    x, w, b, y = _linear_case(3, 4, 8, 33, torch.float32, backend_device(backend), seed=2)
    ours = linear_token_logprobs(x, w, y, linear_bias=b, temperature=0.5, return_entropy=True, backend=backend)
    ref = token_logprobs(F.linear(x, w, b), y, temperature=0.5, return_entropy=True, backend=backend)
    for a, r in zip(ours, ref):
        assert torch.allclose(a, r, atol=2e-6, rtol=1e-5)
    # only the input requires grad, log-probs only, one chunk (the default bound)
    xa = x.clone().requires_grad_()
    linear_token_logprobs(xa, w, y, backend=backend).sum().backward()
    xb = x.double().requires_grad_()
    oracle.token_logprobs(F.linear(xb, w.double()), y)[0].sum().backward()
    _close(xa.grad, xb.grad, torch.float32)


@pytest.mark.parametrize("backend", ALL)
def test_linear_token_logprobs_all_ignored_and_double_backward(backend):
    x, w, b, y = _linear_case(2, 3, 8, 20, torch.float32, backend_device(backend), seed=3)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = linear_token_logprobs(xa, wa, torch.full_like(y, -100), return_entropy=True, backend=backend)
    assert (out.logprobs == 0).all() and (out.entropy == 0).all()
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert (xa.grad == 0).all() and (wa.grad == 0).all()
    out = linear_token_logprobs(xa, wa, y, return_entropy=True, backend=backend)
    gx, = torch.autograd.grad((out.logprobs + out.entropy).sum(), xa, create_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        gx.sum().backward()


@pytest.mark.parametrize("backend", ALL)
def test_linear_token_logprobs_bad_input(backend):
    x, w, b, y = _linear_case(2, 3, 8, 20, torch.float32, backend_device(backend))
    with pytest.raises(ValueError, match="shape"):
        linear_token_logprobs(x, w, y[:, :2], backend=backend)
    with pytest.raises(TypeError, match="integer token ids"):
        linear_token_logprobs(x, w, y.double(), backend=backend)
    if x.device.type == "cpu":  # on CUDA a device-side assert (see test_device_tokens_...)
        bad = y.clone()
        bad[0, 0] = 20
        with pytest.raises(IndexError, match="token 20 is out of range"):
            linear_token_logprobs(x, w, bad, backend=backend)
    with pytest.raises(ValueError, match="features"):
        linear_token_logprobs(x, w[:, :5], y, backend=backend)
    with pytest.raises(ValueError, match="shift=True needs a time axis"):
        linear_token_logprobs(x[0], w, y[0], shift=True, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logprobs(x, w, y, temperature=-1.0, backend=backend)
    with pytest.raises(ValueError, match="chunk_bytes"):
        linear_token_logprobs(x, w, y, chunk_bytes=0, backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        linear_token_logprobs(x, w.double(), y, backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_issue14_linear_token_logprobs_chunks_split_rows_evenly(backend, monkeypatch):
    """40 rows under a bound of 30 a chunk: two chunks of 20 (not 30 + a 10-row tail, whose extra
    small products cost more than their flops), in forward and backward, results unchanged."""
    x, w, b, y = _linear_case(4, 10, 16, 50, torch.float32, backend_device(backend), seed=4)
    y = y.clamp(min=0)  # every row counted
    seen = {"forward": [], "backward": []}
    for name in seen:
        real = getattr(L, f"_rows_{name}")
        monkeypatch.setattr(L, f"_rows_{name}", lambda be, z, *a, _r=real, _s=seen[name]: _s.append(z.shape[0]) or _r(be, z, *a))
    bound = 30 * x.element_size() * (50 + 2 * 16)  # 30 rows of logits plus gathered rows
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = linear_token_logprobs(xa, wa, y, return_entropy=True, chunk_bytes=bound, backend=backend)
    ga, gh = _upstream((4, 10), 5)
    ((lp * ga.to(lp)).sum() + (ent * gh.to(ent)).sum()).backward()
    assert seen == {"forward": [20, 20], "backward": [20, 20]}
    (lb, hb, gb), (lr, hr, gr) = run_both(lambda x, w: linear_token_logprobs(x, w, y, return_entropy=True, backend=backend),
                                          _linear_oracle(False, 1.0, y), [x, w], (4, 10), seed=5)
    _close(lp, lr, torch.float32)
    _close(ent, hr, torch.float32)
    for a, r in zip((xa.grad, wa.grad), gr):
        _close(a, r, torch.float32)


@pytest.mark.parametrize("backend", backend_params("torch", "cython"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_issue14_linear_token_logprobs_buffers_recycled_through_the_cpu_cache(backend, dtype, monkeypatch):
    """The chunk's logits and the returned dX / dW come from celoss's CPU cache: the first training
    step maps them, the second reuses those mappings (no fresh page faults every step, which cost
    about a fifth of a bf16 step), with the same gradients."""
    import mmap as mmap_module
    n, d, v = 128, 128, 40000  # one chunk: the logits and dW are >= 10 MB each (cached from 8 MB)
    x, w, _, y = _linear_case(2, n // 2, d, v, dtype, "cpu", seed=6)
    celoss.empty_cpu_cache()
    real, made = mmap_module.mmap, []
    monkeypatch.setattr(mmap_module, "mmap", lambda *a, **k: made.append(a[1]) or real(*a, **k))
    smallest = min(n * v, v * d) * dtype.itemsize
    counts, grads = [], []
    for _ in range(2):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = linear_token_logprobs(xa, wa, y, return_entropy=True, backend=backend)
        (out.logprobs.sum() - 0.1 * out.entropy.sum()).backward()
        grads.append((xa.grad.clone(), wa.grad.clone()))  # (copies: the gradients' buffers go back)
        counts.append(sum(1 for size in made if size >= smallest))
        del xa, wa, out
    assert counts[0] >= 2 and counts[1] == counts[0], counts  # the logits, dW: mapped once, then reused
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
