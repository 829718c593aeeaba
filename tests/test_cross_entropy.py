"""celoss.cross_entropy vs PyTorch (float64 oracle) on every backend: values and gradients."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import celoss
import oracle
from conftest import (AVAILABLE, against_oracle, assert_close_to_oracle, backend_device, backend_params,
                      lowp_against_oracle, make_data)

ALL = backend_params()
CPU_KERNELS = backend_params("cython", "torch")


OPTIONS = [dict(), dict(weight=True), dict(label_smoothing=0.15), dict(weight=True, label_smoothing=0.3),
           dict(ignore_index=3)]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_index_targets_match_pytorch(backend, reduction, opts):
    dev = backend_device(backend)
    x, t, w = make_data((37, 203), dev, class_weight=True)
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = w
    if "ignore_index" in kw:
        t = torch.where(t == -100, kw["ignore_index"], t)
    a, b, ga, gb = against_oracle(lambda v: celoss.cross_entropy(v, t, reduction=reduction, backend=backend, **kw),
                                  lambda v: F.cross_entropy(v, t, reduction=reduction,
                                                   **{k: (u.double() if torch.is_tensor(u) else u)
                                                      for k, u in kw.items()}), x)
    assert a.shape == b.shape and a.dtype == torch.float32
    assert_close_to_oracle(a, b, ga, gb)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing,weighted", [(0.0, False), (0.2, True)])
def test_probability_targets_match_pytorch(backend, reduction, smoothing, weighted):
    dev = backend_device(backend)
    x, _, w = make_data((19, 77), dev, class_weight=True)
    p = torch.softmax(torch.randn(19, 77, generator=torch.Generator().manual_seed(5)), 1).to(dev)
    kw = dict(weight=w) if weighted else {}
    a, b, ga, gb = against_oracle(
        lambda v: celoss.cross_entropy(v, p, reduction=reduction, label_smoothing=smoothing, backend=backend, **kw),
        lambda v: F.cross_entropy(v, p.double(), reduction=reduction, label_smoothing=smoothing,
                                  **{k: u.double() for k, u in kw.items()}), x)
    assert_close_to_oracle(a, b, ga, gb)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", [(13,), (4, 6, 5), (2, 7, 3, 4)], ids=str)
def test_shapes_one_and_k_dimensional(backend, shape):
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g).to(dev)
    c = shape[0] if len(shape) == 1 else shape[1]
    t_shape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = torch.randint(0, c, t_shape, generator=g).to(dev)
    for reduction in ("mean", "none"):
        a, b, ga, gb = against_oracle(lambda v: celoss.cross_entropy(v, t, reduction=reduction, backend=backend),
                                      lambda v: F.cross_entropy(v, t, reduction=reduction), x)
        assert a.shape == b.shape
        assert_close_to_oracle(a, b, ga, gb)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("c", [1, 3, 1000, 8209])
def test_odd_class_counts(backend, c):
    dev = backend_device(backend)
    n = 3 if c > 5000 else 9
    x, t, w = make_data((n, c), dev, ignore_frac=0.0, class_weight=True)
    a, b, ga, gb = against_oracle(lambda v: celoss.cross_entropy(v, t, weight=w, label_smoothing=0.1, backend=backend),
                                  lambda v: F.cross_entropy(v, t, weight=w.double(), label_smoothing=0.1), x)
    assert_close_to_oracle(a, b, ga, gb)


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_large_prime_vocabulary(backend):
    x, t = make_data((4, 2 ** 17 + 1), ignore_frac=0.0)
    a, b, ga, gb = against_oracle(lambda v: celoss.cross_entropy(v, t, backend=backend),
                                  lambda v: F.cross_entropy(v, t), x)
    assert_close_to_oracle(a, b, ga, gb, grad_atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
def test_non_contiguous_input(backend):
    dev = backend_device(backend)
    base, t = make_data((11, 300), dev)
    for x in (base[:, ::2], base.t().contiguous().t(), base[::2]):
        tt = t[: x.shape[0]] % x.shape[1]
        a, b, ga, gb = against_oracle(lambda v: celoss.cross_entropy(v, tt, reduction="none", backend=backend),
                                      lambda v: F.cross_entropy(v, tt, reduction="none"), x)
        assert_close_to_oracle(a, b, ga, gb)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_pytorch(backend, dtype):
    dev = backend_device(backend)
    x, t, w = make_data((64, 1531), dev, dtype=dtype, class_weight=True)
    for reduction in ("mean", "none"):
        a, _, ga, _ = lowp_against_oracle(
            lambda v: celoss.cross_entropy(v, t, weight=w, reduction=reduction, backend=backend),
            lambda v: F.cross_entropy(v, t, weight=w.to(v.dtype), reduction=reduction), x, margin=2e-3)
        assert a.dtype == dtype and ga.dtype == dtype


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_float64_gradcheck(backend):
    x, t, w = make_data((5, 7), dtype=torch.float64, class_weight=True)
    x.requires_grad_()
    for kw in (dict(), dict(weight=w.double(), label_smoothing=0.2, reduction="none"),
               dict(softcap=2.0, logit_scale=0.7, z_loss=1e-2, reduction="sum")):
        assert torch.autograd.gradcheck(lambda v: celoss.cross_entropy(v, t, backend=backend, **kw), (x,))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scale,cap,zl", [(1.0, 30.0, 0.0), (0.5, None, 1e-3), (2.0, 5.0, 1e-2)])
def test_extras_scale_softcap_zloss(backend, reduction, scale, cap, zl):
    dev = backend_device(backend)
    x, t, w = make_data((23, 301), dev, class_weight=True)
    for weight in (None, w):
        kw = dict(logit_scale=scale, softcap=cap, z_loss=zl, reduction=reduction, label_smoothing=0.1)
        w64 = None if weight is None else weight.double()
        a, b, ga, gb = against_oracle(lambda v: celoss.cross_entropy(v, t, weight=weight, backend=backend, **kw),
                                      lambda v: oracle.cross_entropy(v, t, weight=w64, **kw), x)
        assert_close_to_oracle(a, b, ga, gb)


@pytest.mark.parametrize("backend", ALL)
def test_returned_lse_and_z_loss(backend):
    dev = backend_device(backend)
    x, t = make_data((17, 129), dev)
    out = celoss.cross_entropy(x, t, z_loss=1e-2, softcap=10.0, return_lse=True, return_z_loss=True, backend=backend)
    z = 10.0 * torch.tanh(x.double() / 10.0)
    lse = torch.logsumexp(z, 1)
    torch.testing.assert_close(out.lse.double(), lse, rtol=1e-5, atol=1e-5)
    counted = (t != -100).double()
    torch.testing.assert_close(out.z_loss.double(), (1e-2 * counted * lse ** 2).sum() / counted.sum(), rtol=1e-5, atol=1e-6)
    only_lse = celoss.cross_entropy(x, t, return_lse=True, backend=backend)
    assert only_lse.z_loss is None and only_lse.lse.shape == (17,)


@pytest.mark.parametrize("backend", ALL)
def test_gradient_flows_through_returned_lse(backend):
    """A user-side z-loss computed from the returned lse gets its gradient."""
    dev = backend_device(backend)
    x, t = make_data((9, 65), dev)

    def ours(v):
        out = celoss.cross_entropy(v, t, reduction="sum", return_lse=True, backend=backend)
        return out.loss + 0.1 * (out.lse ** 2).sum()

    a, b, ga, gb = against_oracle(ours, lambda v: F.cross_entropy(v, t, reduction="sum")
                                  + 0.1 * (torch.logsumexp(v, 1) ** 2).sum(), x)
    torch.testing.assert_close(ga.double(), gb, rtol=1e-5, atol=1e-6)
    for reduction in ("mean", "sum", "none"):  # returning the lse (unused) keeps the loss gradient right
        a, b, ga, gb = against_oracle(lambda v: celoss.cross_entropy(v, t, reduction=reduction, return_lse=True,
                                                            backend=backend).loss,
                                      lambda v: F.cross_entropy(v, t, reduction=reduction), x)
        torch.testing.assert_close(ga.double(), gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
def test_loss_times_constant_and_mean_of_all_ignored(backend):
    dev = backend_device(backend)
    x, t = make_data((8, 50), dev)
    a, b, ga, gb = against_oracle(lambda v: 3 * celoss.cross_entropy(v, t, backend=backend),
                                  lambda v: 3 * F.cross_entropy(v, t), x)
    torch.testing.assert_close(ga.double(), gb, rtol=1e-5, atol=1e-6)
    ignored = torch.full_like(t, -100)
    xa = x.clone().requires_grad_()
    loss = celoss.cross_entropy(xa, ignored, backend=backend)
    loss.backward()
    assert torch.isnan(loss) and torch.equal(xa.grad, torch.zeros_like(xa))
    assert celoss.cross_entropy(x, ignored, reduction="sum", backend=backend).item() == 0.0


@pytest.mark.parametrize("backend", ALL)
def test_empty_batch_as_pytorch(backend):
    dev = backend_device(backend)
    x = torch.randn(0, 10, device=dev, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=dev)
    for reduction in ("mean", "sum", "none"):
        a, b = celoss.cross_entropy(x, t, reduction=reduction, backend=backend), F.cross_entropy(x, t, reduction=reduction)
        assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
        if reduction != "mean":
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ALL)
def test_nan_and_inf_propagate_like_pytorch(backend):
    dev = backend_device(backend)
    x, t = make_data((6, 40), dev, ignore_frac=0.0)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3, :] = -float("inf")
    x[3, t[3]] = 0.0
    a = celoss.cross_entropy(x, t, reduction="none", backend=backend)
    b = F.cross_entropy(x, t, reduction="none")
    assert torch.equal(a.isnan(), b.isnan())
    finite = ~b.isnan()
    torch.testing.assert_close(a[finite], b[finite])


@pytest.mark.parametrize("backend", ALL)
def test_inplace_backward_is_correct_and_visible_to_autograd(backend):
    dev = backend_device(backend)
    x, t = make_data((10, 97), dev)
    leaf = x.clone().requires_grad_()
    logits = leaf * 2.0  # mul saves only the scalar: writing into its output is safe
    celoss.cross_entropy(logits, t, inplace_backward=True, backend=backend).backward()
    ref = x.clone().requires_grad_()
    F.cross_entropy(ref * 2.0, t).backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-6)
    # tanh saves its output for backward: overwriting it must raise, not silently corrupt
    saved = torch.tanh(x.clone().requires_grad_())
    loss = celoss.cross_entropy(saved, t, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_torch_compile_fullgraph_cpu():
    x, t, w = make_data((16, 300), class_weight=True)

    def f(v):
        return celoss.cross_entropy(v, t, weight=w, label_smoothing=0.1)

    compiled = torch.compile(f, fullgraph=True)
    a, b, ga, gb = against_oracle(compiled, lambda v: F.cross_entropy(v, t, weight=w.double(), label_smoothing=0.1), x)
    assert_close_to_oracle(a, b, ga, gb)
    none = torch.compile(lambda v: celoss.cross_entropy(v, t, reduction="none"), fullgraph=True)
    a, b, ga, gb = against_oracle(none, lambda v: F.cross_entropy(v, t, reduction="none"), x)
    torch.testing.assert_close(ga.double(), gb, rtol=1e-5, atol=1e-6)


def test_module_mirrors_torch():
    x, t, w = make_data((12, 30), class_weight=True)
    ours = celoss.CrossEntropyLoss(weight=w, ignore_index=-100, reduction="sum", label_smoothing=0.05)
    ref = torch.nn.CrossEntropyLoss(weight=w, reduction="sum", label_smoothing=0.05)
    torch.testing.assert_close(ours(x, t), ref(x, t))
    assert "weight" in dict(ours.named_buffers())


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", [50, -3, 10 ** 12])
def test_out_of_range_target_names_the_value(backend, bad):
    dev = backend_device(backend)
    if dev != "cpu":
        pytest.skip("on CUDA a bad target is a device-side assert, as in PyTorch (test_checks.py); "
                    "it would end this process's CUDA context")
    x, t = make_data((6, 50), dev)
    t[4] = bad
    with pytest.raises(IndexError, match=str(bad)):
        celoss.cross_entropy(x, t, backend=backend)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(target=torch.zeros(4, dtype=torch.int32)), TypeError, "int64"),
    (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, "shape"),
    (dict(weight=torch.ones(6)), ValueError, "weight"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="cuda"), ValueError, "unknown backend"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(input=torch.zeros(4, 7, dtype=torch.long)), TypeError, "float"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(input=torch.randn(4, 7), target=torch.zeros(4, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        celoss.cross_entropy(args.pop("input"), args.pop("target"), **args)


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton can run")
    with pytest.raises(RuntimeError, match="triton"):
        celoss.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), backend="triton")


def test_environment_variable_sets_default_backend(monkeypatch):
    monkeypatch.setenv("CELOSS_BACKEND", "nope")
    with pytest.raises(ValueError, match="nope"):
        celoss.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    monkeypatch.setenv("CELOSS_BACKEND", "torch")
    torch.testing.assert_close(celoss.cross_entropy(torch.ones(2, 3), torch.zeros(2, dtype=torch.long)),
                               torch.tensor(1.0986123))


def test_available_backends_reports_reasons():
    info = celoss.available_backends()
    assert set(info) == {"triton", "cython", "torch"} and info["torch"] is None
    assert all(v is None or isinstance(v, str) and v for v in info.values())


def test_all_option_combinations_reference_vs_kernels():
    """Every combination of options: each CPU-runnable kernel backend equals the reference backend."""
    x, t, w = make_data((13, 257), class_weight=True)
    kernels = [n for n in ("cython", "triton") if celoss.available_backends()[n] is None]
    if not kernels:
        pytest.skip("no kernel backend available")
    for red, use_w, eps, cap, zl in itertools.product(["mean", "sum", "none"], [False, True], [0.0, 0.2],
                                                      [None, 4.0], [0.0, 1e-3]):
        kw = dict(reduction=red, weight=w if use_w else None, label_smoothing=eps, softcap=cap, z_loss=zl)
        ref = _loss_and_grad(lambda v: celoss.cross_entropy(v, t, backend="torch", **kw), x)
        for name in kernels:
            got = _loss_and_grad(lambda v: celoss.cross_entropy(v, t, backend=name, **kw), x)
            torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)


def _loss_and_grad(fn, x):
    v = x.detach().clone().requires_grad_()
    loss = fn(v)
    up = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    return loss.detach(), torch.autograd.grad(loss, v, up)[0]


# ---- issue 11 regressions: one test per item, every backend --------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("weights,targets,smoothing", [
    ([-1.0, -0.5, 2.0], [0, 1], 0.0),          # negative denominator (-1.5)
    ([-1.0, -0.5, 2.0], [0, 1], 0.2),
    ([0.0, 0.0, 0.0], [0, 1], 0.0),            # all-zero target weights: NaN loss, NaN gradients
    ([0.0, 0.0, 1.0], [0, 1], 0.1),            # zero denominator with smoothing: NaN, not inf
    ([0.0, 0.0, 1.0], [0, -100], 0.1),         # ... and the ignored row keeps a zero gradient
    (None, [-100, -100], 0.0),                 # all ignored: NaN loss, zero gradients
    (None, [-100, -100], 0.3),
])
def test_issue11_negative_and_zero_weight_sums_match_pytorch(backend, weights, targets, smoothing):
    dev = backend_device(backend)
    x = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]], device=dev)
    y = torch.tensor(targets, device=dev)
    w = None if weights is None else torch.tensor(weights, device=dev)
    a, b, ga, gb = against_oracle(
        lambda v: celoss.cross_entropy(v, y, w, label_smoothing=smoothing, backend=backend),
        lambda v: F.cross_entropy(v, y, None if w is None else w.double(), label_smoothing=smoothing), x)
    assert_close_to_oracle(a, b, ga, gb, atol=1e-6, equal_nan=True)
    assert ga.abs().sum() > 0 or torch.isnan(gb).any() or (gb == 0).all()


@pytest.mark.parametrize("backend", ALL)
def test_issue11_exactly_cancelling_weights_documented(backend):
    """Mixed-sign target weights summing to exactly 0: the loss is PyTorch's (sum / 0 = +-inf); the
    counted rows' gradients are all NaN (PyTorch mixes NaN and +-inf there, by its internal order)."""
    dev = backend_device(backend)
    x = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [0.1, 0.2, 0.3]], device=dev)
    y = torch.tensor([0, 1, -100], device=dev)
    w = torch.tensor([1.0, -1.0, 3.0], device=dev)
    a, b, ga, gb = against_oracle(lambda v: celoss.cross_entropy(v, y, w, backend=backend),
                                  lambda v: F.cross_entropy(v, y, w.double()), x)
    assert torch.isinf(b) and a.double() == b
    assert torch.isnan(ga[:2]).all() and (ga[2] == 0).all()


@pytest.mark.parametrize("backend", ALL)
def test_issue11_inplace_backward_refuses_leaves_and_overlapping_rows(backend):
    dev = backend_device(backend)
    t = torch.zeros(4, dtype=torch.long, device=dev)
    leaf = torch.randn(4, 7, device=dev, requires_grad=True)
    param = torch.nn.Parameter(torch.randn(5, 7, device=dev))
    base = torch.randn(1, 7, device=dev, requires_grad=True) * 1.0
    flat = (torch.randn(40, device=dev, requires_grad=True) * 1.0)
    cases = [(leaf, "leaf"), (param[1:], "leaf"), (base.expand(4, 7), "share memory"),
             (flat.as_strided((4, 7), (3, 1)), "share memory")]
    for logits, match in cases:
        before = logits.detach().clone()
        with pytest.raises(RuntimeError, match=match):
            celoss.cross_entropy(logits, t, inplace_backward=True, backend=backend)
        assert torch.equal(logits.detach(), before)  # nothing was overwritten
    # a non-leaf with its own memory is fine, and its producer gets the right gradient
    h = torch.randn(4, 7, device=dev, requires_grad=True)
    celoss.cross_entropy(h * 2, t, inplace_backward=True, backend=backend).backward()
    h2 = h.detach().clone().requires_grad_()
    F.cross_entropy(h2 * 2, t).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_issue11_probability_target_and_weight_gradients(backend, reduction):
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 9, generator=g)
    t = torch.softmax(torch.randn(6, 9, generator=g), 1)
    w = torch.rand(9, generator=g) + 0.2
    ins = [x.to(dev).requires_grad_(), t.to(dev).requires_grad_(), w.to(dev).requires_grad_()]
    ref = [x.double().requires_grad_(), t.double().requires_grad_(), w.double().requires_grad_()]
    a = celoss.cross_entropy(ins[0], ins[1], weight=ins[2], label_smoothing=0.15, reduction=reduction,
                             backend=backend)
    b = F.cross_entropy(ref[0], ref[1], weight=ref[2], label_smoothing=0.15, reduction=reduction)
    up = torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5
    ga = torch.autograd.grad(a, ins, up.to(dev, a.dtype))
    gb = torch.autograd.grad(b, ref, up)
    torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-6)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u.cpu().double(), v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
def test_issue11_uint8_targets_and_promoted_probability_targets(backend):
    dev = backend_device(backend)
    x = torch.randn(5, 7, device=dev)
    y = torch.tensor([0, 6, 2, 3, 4], dtype=torch.uint8, device=dev)
    torch.testing.assert_close(celoss.cross_entropy(x, y, backend=backend), F.cross_entropy(x, y))
    p = torch.softmax(torch.randn(5, 7, dtype=torch.float64), 1).to(dev)
    out = celoss.cross_entropy(x, p, backend=backend)
    assert out.dtype == F.cross_entropy(x, p).dtype == torch.float64
    torch.testing.assert_close(out, F.cross_entropy(x.double(), p), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_issue11_zero_classes_as_pytorch(backend, reduction):
    dev = backend_device(backend)
    x = torch.randn(3, 0, device=dev, requires_grad=True)
    for target in (torch.randn(3, 0, device=dev), torch.full((3,), -100, device=dev)):
        ours = celoss.cross_entropy(x, target, reduction=reduction, backend=backend)
        theirs = F.cross_entropy(x, target, reduction=reduction)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        (g,) = torch.autograd.grad(ours.sum(), x)
        assert g.shape == x.shape
    with pytest.raises(IndexError):
        celoss.cross_entropy(x, torch.zeros(3, dtype=torch.long, device=dev), backend=backend)


def test_issue11_float64_gradients_carry_an_exact_scale():
    x = torch.randn(3, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    for backend in ("cython", "torch"):
        if AVAILABLE[backend] is not None:
            continue
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        celoss.cross_entropy(a, y, backend=backend).backward()
        F.cross_entropy(b, y).backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(target=torch.softmax(torch.randn(4, 5), 1), ignore_index=3), RuntimeError, "ignore_index"),
    (dict(weight=torch.rand(5, requires_grad=True)), RuntimeError, "weight"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(ignore_index=2 ** 63), ValueError, "int64"),
])
def test_issue11_rejected_like_pytorch(kwargs, error, match):
    kw = dict(input=torch.randn(4, 5, requires_grad=True), target=torch.tensor([0, 1, 2, 3]))
    kw.update(kwargs)
    with pytest.raises(error, match=match):
        celoss.cross_entropy(**kw)


@pytest.mark.parametrize("backend", ALL)
def test_issue11_double_backward_says_once_differentiable(backend):
    x = torch.randn(4, 5, device=backend_device(backend), requires_grad=True)
    y = torch.tensor([0, 1, 2, 3], device=x.device)
    (g,) = torch.autograd.grad(celoss.cross_entropy(x, y, backend=backend), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        g.sum().backward()


def test_issue11_module_typo_fails_at_construction():
    with pytest.raises(TypeError, match="z_los"):
        celoss.CrossEntropyLoss(z_los=1e-4)
    assert celoss.CrossEntropyLoss(z_loss=1e-4).extras == {"z_loss": 1e-4}


def test_issue15_class_dim_hint_for_sequence_logits():
    with pytest.raises(ValueError, match="transpose"):
        celoss.cross_entropy(torch.randn(2, 3, 11), torch.zeros(2, 3, dtype=torch.long))


def test_issue15_compile_fullgraph_inplace_backward():
    h = torch.randn(8, 33, requires_grad=True)
    y = torch.randint(0, 33, (8,))
    compiled = torch.compile(lambda v: celoss.cross_entropy(v * 2, y, inplace_backward=True), fullgraph=True)
    loss = compiled(h)
    loss.backward()
    h2 = h.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 * 2, y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["kdim", "weight-smoothing-mean"])
def test_issue11_uint8_refused_where_pytorch_refuses(case):
    u = torch.tensor([0, 1, 2], dtype=torch.uint8)
    if case == "kdim":
        args, kw = (torch.randn(1, 4, 3), u.reshape(1, 3)), {}
    else:
        args, kw = (torch.randn(3, 4), u), dict(weight=torch.rand(4), label_smoothing=0.1)
    with pytest.raises(RuntimeError):
        F.cross_entropy(*args, **kw)
    with pytest.raises(RuntimeError, match="uint8|Byte"):
        celoss.cross_entropy(*args, **kw)
    torch.testing.assert_close(celoss.cross_entropy(*args, reduction="sum", **kw) if case != "kdim" else
                               celoss.cross_entropy(args[0], args[1].long(), **kw),
                               F.cross_entropy(*args, reduction="sum", **kw) if case != "kdim" else
                               F.cross_entropy(args[0], args[1].long(), **kw))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("focal", [False, True])
def test_issue11_huge_logits_keep_their_differences(backend, focal):
    """|z| ~ 1e30 or 1e6: log p and p come from z - max, not from z - (rounded lse)."""
    for x, y in [([[1e30, 1e30, 0.0]], [0]), ([[1e6, 1e6 - 1, 0.0]], [1]), ([[0.5, float("-inf"), 0.0]], [0])]:
        x, y = torch.tensor(x, device=backend_device(backend)), torch.tensor(y, device=backend_device(backend))
        ours = ((lambda v: celoss.focal_loss(v, y, gamma=0.0, backend=backend)) if focal
                else (lambda v: celoss.cross_entropy(v, y, backend=backend)))
        a, b, ga, gb = against_oracle(ours, lambda v: F.cross_entropy(v, y), x)
        assert_close_to_oracle(a, b, ga, gb, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["plain", "smoothing_weight", "softcap_scale", "probabilities", "none"])
def test_issue16_reference_chunks_match_one_chunk(monkeypatch, dtype, case):
    """The reference backend's fused pass over several chunks of its reused buffer (a short last
    one included) equals one chunk bit for bit, non-finite and ignored rows included."""
    from celoss.backends import reference
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 50, generator=g) * 4).to(dtype)
    x[3, 7], x[5], x[8, 2] = float("inf"), float("-inf"), float("nan")
    target = torch.randint(0, 50, (37,), generator=g)
    target[::5] = -100
    kwargs, reduction = {}, "none" if case == "none" else "mean"
    if case == "smoothing_weight":
        kwargs = dict(label_smoothing=0.1, weight=torch.rand(50, generator=g).to(dtype))
    elif case == "softcap_scale":
        kwargs = dict(softcap=5.0, logit_scale=0.7)
    elif case == "probabilities":
        target = torch.softmax(torch.randn(37, 50, generator=g), 1).to(dtype)
    upstream = torch.rand(37, generator=g) + 0.5 if reduction == "none" else None

    def run():
        logits = x.clone().requires_grad_()
        loss = celoss.cross_entropy(logits, target, reduction=reduction, backend="torch", **kwargs)
        loss.backward(upstream.to(loss.dtype) if upstream is not None else None)
        return loss, logits.grad

    one = run()
    monkeypatch.setattr(reference, "CE_CHUNK_ELEMENTS", 50 * 6)  # 6 rows a chunk, 1 in the last
    many = run()
    assert one[1].isnan().any()  # the non-finite rows are in play
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
