"""celoss.binary_cross_entropy_with_logits vs PyTorch (float64) on every backend: values and gradients
for the input and for a target that requires grad."""
import pytest
import torch
import torch.nn.functional as F

from celoss.binary import binary_cross_entropy_with_logits as bce
from celoss.focal import sigmoid_focal_loss
import oracle
from conftest import (against_oracle, assert_close_to_oracle, backend_device, backend_params, lowp_against_oracle,
                      lowp_margin, make_data)

ALL = backend_params()
CPU_KERNELS = backend_params("cython", "torch")
# Triton's interpreter evaluates masked lanes that the kernels then discard
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _weights(kind, shape, device):
    g = torch.Generator().manual_seed(7)
    c = shape[-1]
    return {
        "none": (None, None),
        "weight_c": (torch.rand(c, generator=g) + 0.2, None),
        "weight_row": (torch.rand(*shape[:-1], 1, generator=g) + 0.2, None),
        "weight_full": (torch.rand(shape, generator=g) + 0.2, None),
        "pos_weight_c": (None, torch.rand(c, generator=g) * 3),
        "both": (torch.rand(c, generator=g) + 0.2, torch.rand(c, generator=g) * 3),
        "both_broadcast": (torch.rand(*shape[:-1], 1, generator=g), torch.rand(shape, generator=g) * 2),
    }[kind]


def _dbl(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", ["none", "weight_c", "weight_row", "weight_full", "pos_weight_c", "both",
                                     "both_broadcast"])
def test_matches_pytorch(backend, reduction, weights):
    dev = backend_device(backend)
    shape = (2, 9, 37)
    x, y = make_data(shape, dev, targets="labels")
    w, pw = (None if t is None else t.to(dev) for t in _weights(weights, shape, dev))
    a, b, ga, gb = against_oracle(lambda u, v: bce(u, v, w, reduction=reduction, pos_weight=pw, backend=backend),
                                  lambda u, v: F.binary_cross_entropy_with_logits(u, v, _dbl(w), reduction=reduction,
                                                                         pos_weight=_dbl(pw)), x, y)
    assert a.shape == b.shape and a.dtype == torch.float32
    assert_close_to_oracle(a, b, ga, gb, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", [(), (5,), (3, 1), (4, 2500), (1, 3, 1100)], ids=str)
def test_shapes_and_rows_longer_than_a_chunk(backend, shape):
    dev = backend_device(backend)
    x, y = make_data(shape, dev, seed=2, targets="labels")
    pw = torch.rand(shape[-1:]).to(dev) + 0.5  # (C,), or () for a 0-d input
    for kw in (dict(), dict(pos_weight=pw, weight=pw.flip(0))):
        a, b, ga, gb = against_oracle(lambda u, v: bce(u, v, backend=backend, **kw),
                                      lambda u, v: F.binary_cross_entropy_with_logits(
                                 u, v, **{k: t.double() for k, t in kw.items()}), x, y)
        assert_close_to_oracle(a, b, ga, gb, atol=1e-6, grad_atol=1e-8)


@pytest.mark.parametrize("backend", ALL)
def test_stable_for_huge_logits(backend):
    dev = backend_device(backend)
    x = torch.tensor([-1e4, -300.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 300.0, 1e4], device=dev)
    for yv in (0.0, 1.0, 0.3):
        y = torch.full_like(x, yv)
        pw = torch.full_like(x, 2.5)
        a, b, ga, gb = against_oracle(lambda u, v: bce(u, v, reduction="none", pos_weight=pw, backend=backend),
                                      lambda u, v: F.binary_cross_entropy_with_logits(u, v, reduction="none",
                                                                             pos_weight=pw.double()), x, y)
        assert torch.isfinite(a).all() and all(torch.isfinite(g).all() for g in ga)
        assert_close_to_oracle(a, b, ga, gb, rtol=1e-6, atol=1e-6, grad_atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_pytorch(backend, dtype):
    dev = backend_device(backend)
    x, y = make_data((6, 129), dev, dtype=dtype, seed=3, targets="labels")
    w = (torch.rand(129) + 0.5).to(dev, dtype)
    for reduction in ("none", "mean"):
        a = lowp_against_oracle(
            lambda u, v: bce(u, v, w, reduction=reduction, backend=backend),
            lambda u, v: F.binary_cross_entropy_with_logits(u, v, w.to(u.dtype), reduction=reduction), x, y,
            margin=lowp_margin(backend, dtype))[0]
        assert a.dtype == dtype


@pytest.mark.parametrize("backend", ALL)
def test_mixed_dtypes_promote_like_pytorch(backend):
    dev = backend_device(backend)
    x, y = make_data((4, 33), dev, seed=4, targets="labels")
    out = bce(x.bfloat16(), y, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), F.binary_cross_entropy_with_logits(x.bfloat16().double(), y.double()),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_float64_gradcheck(backend):
    x, y = make_data((3, 5), dtype=torch.float64, seed=5, targets="labels")
    x.requires_grad_()
    y.requires_grad_()
    w, pw = torch.rand(3, 1, dtype=torch.float64) + 0.2, torch.rand(5, dtype=torch.float64) * 3
    for kw in (dict(), dict(weight=w, pos_weight=pw, reduction="sum"), dict(pos_weight=pw, reduction="none")):
        assert torch.autograd.gradcheck(lambda u, v: bce(u, v, backend=backend, **kw), (x, y))


@pytest.mark.parametrize("backend", ALL)
def test_empty_and_loss_times_constant(backend):
    dev = backend_device(backend)
    e = torch.zeros(0, 4, device=dev)
    assert torch.isnan(bce(e, e, backend=backend))  # mean of nothing, as PyTorch
    assert bce(e, e, reduction="sum", backend=backend) == 0
    assert bce(e, e, reduction="none", backend=backend).shape == (0, 4)
    x, y = make_data((3, 8), dev, seed=6, targets="labels")
    xa = x.clone().requires_grad_()
    (2.5 * bce(xa, y, backend=backend)).backward()
    xb = x.double().requires_grad_()
    (2.5 * F.binary_cross_entropy_with_logits(xb, y.double())).backward()
    torch.testing.assert_close(xa.grad.double(), xb.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(target_shape=(3, 5)), ValueError, "same as input size"),
    (dict(weight=torch.ones(2, 3, 4)), ValueError, "broadcast"),
    (dict(pos_weight=torch.ones(3)), ValueError, "broadcast"),
    (dict(weight=torch.ones(4, requires_grad=True)), RuntimeError, "not differentiable"),
    (dict(target_dtype=torch.int64), TypeError, "float"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="nope"), ValueError, "unknown backend"),
])
def test_bad_arguments(kwargs, error, match):
    x, y = make_data((3, 4), targets="labels")
    kw = dict(kwargs)
    if "target_shape" in kw:
        y = torch.rand(kw.pop("target_shape"))
    if "target_dtype" in kw:
        y = y.to(kw.pop("target_dtype"))
    with pytest.raises(error, match=match):
        bce(x, y, **kw)


def test_module_mirrors_torch_and_top_level_export():
    import celoss
    x, y = make_data((5, 6), seed=8, targets="labels")
    w, pw = torch.rand(6) + 0.5, torch.rand(6) * 2
    ours = celoss.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction="sum")
    ref = torch.nn.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction="sum")
    torch.testing.assert_close(ours(x, y), ref(x, y), rtol=1e-5, atol=1e-5)
    assert celoss.binary_cross_entropy_with_logits is bce
    assert set(dict(ours.named_buffers())) == {"weight", "pos_weight"}


def test_torch_compile_fullgraph_cpu():
    x, y = make_data((6, 50), seed=9, targets="labels")
    pw = torch.rand(50) + 0.5
    a, b, ga, gb = against_oracle(torch.compile(lambda u, v: bce(u, v, pos_weight=pw), fullgraph=True),
                                  lambda u, v: F.binary_cross_entropy_with_logits(u, v, pos_weight=pw.double()), x, y)
    assert_close_to_oracle(a, b, ga, gb, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# issue 11: non-finite values, empty inputs, double backward (BCE and the sigmoid focal loss,
# which runs on the same elementwise kernels)
# ---------------------------------------------------------------------------------------------

NONFINITE_X = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.5, -2.0]


def _nonfinite_data(dev, *, nan_target=False):
    """Every special logit against hard, soft (and NaN) targets: a (targets, logits) grid."""
    ys = [0.0, 1.0, 0.3] + ([float("nan")] if nan_target else [])
    x = torch.tensor(NONFINITE_X).repeat(len(ys), 1)
    y = torch.tensor(ys).unsqueeze(1).expand_as(x).contiguous()
    return x.to(dev), y.to(dev)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("weights", ["none", "pos_weight_c", "both"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_issue11_bce_nonfinite_logits_propagate_like_pytorch(backend, weights, reduction):
    """NaN / +-inf / +-1e30 logits and NaN targets: NaN and inf in the loss and both gradients exactly
    where PyTorch puts them (a NaN logit gave the gradient -1 or 0 on cython)."""
    dev = backend_device(backend)
    x, y = _nonfinite_data(dev, nan_target=True)
    w, pw = (None if t is None else t.to(dev) for t in _weights(weights, x.shape, dev))
    a, b, ga, gb = against_oracle(lambda u, v: bce(u, v, w, reduction=reduction, pos_weight=pw, backend=backend),
                                  lambda u, v: F.binary_cross_entropy_with_logits(u, v, _dbl(w), reduction=reduction,
                                                                         pos_weight=_dbl(pw)), x, y)
    assert ga[0].isnan().any() and gb[0].isnan().any()  # a NaN logit reaches the gradient
    assert_close_to_oracle(a, b, ga, gb, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_issue11_sigmoid_focal_nonfinite_like_torchvision(backend, alpha, gamma):
    """NaN / +-inf / +-1e30 logits: the pattern of NaN and inf of torchvision's composition (gamma = 0
    gave NaN gradients at +-inf, where the composition is alpha-weighted BCE with finite ones)."""
    x, y = _nonfinite_data(backend_device(backend))
    a, b, ga, gb = against_oracle(
        lambda u: sigmoid_focal_loss(u, y, alpha=alpha, gamma=gamma, backend=backend),
        lambda u: oracle.torchvision_sigmoid_focal_loss(u, y.double(), alpha, gamma), x)
    assert ga[:, 0].isnan().all()
    assert_close_to_oracle(a, b, ga, gb, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", ALL)
def test_issue11_sigmoid_focal_underflow_gradient_is_the_limit(backend):
    """Decision: for finite logits with 0 < gamma < 1 where 1 - p_t underflows to 0, torchvision's
    composition differentiates q**gamma at q = 0 (inf * 0 = NaN); celoss returns the exact limit 0
    (loss ~ e^{-|x| (1 + gamma)})."""
    dev = backend_device(backend)
    x = torch.tensor([-1e30, 1e30, -200.0], device=dev)
    y = torch.tensor([0.0, 1.0, 0.0], device=dev)
    xa = x.clone().requires_grad_()
    sigmoid_focal_loss(xa, y, gamma=0.5, reduction="sum", backend=backend).backward()
    xb = x.double().requires_grad_()
    oracle.torchvision_sigmoid_focal_loss(xb, y.double(), 0.25, 0.5).sum().backward()
    assert xb.grad[:2].isnan().all()  # the composition's artefact
    assert (xa.grad == 0).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", [(3, 0), (0,), (2, 0, 5), (0, 4)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_issue11_bce_empty_inputs(backend, shape, reduction):
    dev = backend_device(backend)
    x, y = torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)
    pw = torch.ones(shape[-1:], device=dev)
    a, b, ga, gb = against_oracle(lambda u, v: bce(u, v, reduction=reduction, pos_weight=pw, backend=backend),
                                  lambda u, v: F.binary_cross_entropy_with_logits(u, v, reduction=reduction,
                                                                         pos_weight=pw.double()), x, y)
    assert a.shape == b.shape and ga[0].shape == x.shape and ga[1].shape == y.shape
    torch.testing.assert_close(a.double(), b, equal_nan=True)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("focal", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_issue11_double_backward_raises(backend, focal, reduction):
    x, y = make_data((3, 7), backend_device(backend), seed=10, targets="labels")
    xa = x.clone().requires_grad_()
    loss = (sigmoid_focal_loss(xa, y, reduction=reduction, backend=backend) if focal
            else bce(xa, y, reduction=reduction, backend=backend)).sum()
    g, = torch.autograd.grad(loss, xa, create_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        g.sum().backward()
