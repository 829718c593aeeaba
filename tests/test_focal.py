"""celoss.focal_loss (softmax) and celoss.sigmoid_focal_loss (torchvision's) vs float64 PyTorch formulas
on every backend: values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from celoss.focal import focal_loss, sigmoid_focal_loss
import oracle
from conftest import (against_oracle, assert_close_to_oracle, backend_device, backend_params, lowp_against_oracle,
                      lowp_margin, make_data)

ALL = backend_params()
CPU_KERNELS = backend_params("cython", "torch")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# ---------------------------------------------------------------------------------------------
# softmax focal loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", ["none", "scalar", "tensor"])
def test_softmax_focal_matches_formula(backend, gamma, alpha):
    dev = backend_device(backend)
    x, t = make_data((23, 41), dev)
    a = {"none": None, "scalar": 0.25,
         "tensor": (torch.rand(41, generator=torch.Generator().manual_seed(3)) + 0.1).to(dev)}[alpha]
    for reduction in ("mean", "sum", "none"):
        ours, ref, ga, gb = against_oracle(lambda v: focal_loss(v, t, gamma, a, reduction=reduction, backend=backend),
                                           lambda v: oracle.focal_loss(v, t, gamma, a, reduction=reduction), x)
        assert ours.shape == ref.shape and ours.dtype == torch.float32
        assert_close_to_oracle(ours, ref, ga, gb, atol=1e-6, grad_atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(13,), (6, 9), (3, 7, 2, 5)], ids=str)
def test_gamma_zero_is_cross_entropy(backend, reduction, shape):
    dev = backend_device(backend)
    x, t = make_data(shape, dev, seed=1)
    if len(shape) == 1:
        reduction = "none" if reduction == "none" else reduction
    ours, ref, ga, gb = against_oracle(lambda v: focal_loss(v, t, gamma=0.0, reduction=reduction, backend=backend),
                                       lambda v: F.cross_entropy(v, t, reduction=reduction), x)
    assert ours.shape == ref.shape
    assert_close_to_oracle(ours, ref, ga, gb, atol=1e-6, grad_atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
def test_softmax_focal_confident_rows(backend, gamma):
    """p_y -> 1 (margins up to 30) with gamma < 1: finite gradient, no NaN from (1 - p_y)**(gamma - 1)
    (float32 statistics can only resolve 1 - p_y to ~1e-7 absolute, like PyTorch's log_softmax)."""
    dev = backend_device(backend)
    x = torch.zeros(4, 10)
    t = torch.tensor([0, 1, 2, 3])
    for i, m in enumerate((5.0, 12.0, 20.0, 30.0)):
        x[i, t[i]] = m
    x, t = x.to(dev), t.to(dev)
    ours, ref, ga, gb = against_oracle(lambda v: focal_loss(v, t, gamma, reduction="none", backend=backend),
                                       lambda v: oracle.focal_loss(v, t, gamma, reduction="none"), x)
    assert torch.isfinite(ga).all()
    assert_close_to_oracle(ours, ref, ga, gb, rtol=1e-4, atol=1e-7, grad_atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softmax_focal_low_precision(backend, dtype):
    dev = backend_device(backend)
    x, t = make_data((16, 300), dev, dtype=dtype, seed=2)

    def plain_formula(v):  # PyTorch's own low-precision formula
        lp = F.log_softmax(v, 1).gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
        return torch.where(t != -100, -0.5 * (1 - lp.exp()) ** 2 * lp, torch.zeros_like(lp))

    ours = lowp_against_oracle(lambda v: focal_loss(v, t, 2.0, 0.5, reduction="none", backend=backend),
                               lambda v: oracle.focal_loss(v, t, 2.0, 0.5, reduction="none"), x,
                               lowp=plain_formula, margin=lowp_margin(backend, dtype))[0]
    assert ours.dtype == dtype


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_softmax_focal_gradcheck(backend):
    x, t = make_data((5, 7), dtype=torch.float64, seed=4)
    x.requires_grad_()
    alpha = torch.rand(7, dtype=torch.float64) + 0.1
    for kw in (dict(gamma=2.0), dict(gamma=0.5, alpha=alpha, reduction="none"), dict(gamma=1.5, alpha=0.3,
                                                                                        reduction="sum")):
        assert torch.autograd.gradcheck(lambda v: focal_loss(v, t, backend=backend, **kw), (x,))


def test_softmax_focal_bad_arguments():
    x, t = make_data((4, 5))
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(x, t, gamma=-1.0)
    with pytest.raises(TypeError, match="class-index"):
        focal_loss(x, torch.rand(4, 5))
    with pytest.raises(ValueError, match="5 elements"):
        focal_loss(x, t, alpha=torch.ones(4))
    with pytest.raises(IndexError, match="out of bounds"):
        focal_loss(x, torch.tensor([0, 1, 9, 2]))


# ---------------------------------------------------------------------------------------------
# sigmoid focal loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("labels", ["hard", "labels"])
def test_sigmoid_focal_matches_torchvision_formula(backend, alpha, gamma, labels):
    dev = backend_device(backend)
    x, y = make_data((3, 5, 29), dev, targets=labels)
    for reduction in ("none", "mean", "sum"):
        ours, ref, ga, gb = against_oracle(
            lambda v: sigmoid_focal_loss(v, y, alpha, gamma, reduction, backend=backend),
            lambda v: oracle.torchvision_sigmoid_focal_loss(v, y.double(), alpha, gamma, reduction), x)
        assert ours.shape == ref.shape
        assert_close_to_oracle(ours, ref, ga, gb, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
def test_sigmoid_focal_gamma_zero_no_alpha_is_bce(backend):
    dev = backend_device(backend)
    x, y = make_data((4, 1500), dev, seed=1, targets="labels")
    ours, ref, ga, gb = against_oracle(lambda v: sigmoid_focal_loss(v, y, -1.0, 0.0, "mean", backend=backend),
                                       lambda v: F.binary_cross_entropy_with_logits(v, y.double()), x)
    assert_close_to_oracle(ours, ref, ga, gb, atol=1e-7, grad_atol=1e-9)


@pytest.mark.parametrize("backend", ALL)
def test_sigmoid_focal_huge_logits(backend):
    """1 - p_t is formed without cancellation: exact tiny losses where torchvision's fp32 rounds to 0."""
    dev = backend_device(backend)
    x = torch.tensor([-1e4, -100.0, -30.0, -10.0, 0.0, 10.0, 30.0, 100.0, 1e4], device=dev)
    for yv in (0.0, 1.0):
        y = torch.full_like(x, yv)
        for gamma in (0.5, 2.0):
            ours, ref, ga, gb = against_oracle(
                lambda v: sigmoid_focal_loss(v, y, 0.25, gamma, backend=backend),
                lambda v: oracle.torchvision_sigmoid_focal_loss(v, y.double(), 0.25, gamma), x)
            assert torch.isfinite(ours).all() and torch.isfinite(ga).all()
            # float64 autograd of q**gamma at q == 0 (|x| = 1e4) is 0 * inf = NaN; the true value is 0
            gb = torch.nan_to_num(gb, nan=0.0)
            assert_close_to_oracle(ours, ref, ga, gb, atol=1e-6, grad_atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sigmoid_focal_low_precision(backend, dtype):
    dev = backend_device(backend)
    x, y = make_data((8, 65), dev, dtype=dtype, seed=2, targets="hard")
    ours = lowp_against_oracle(lambda v: sigmoid_focal_loss(v, y, backend=backend),
                               lambda v: oracle.torchvision_sigmoid_focal_loss(v, y.to(v.dtype)), x,
                               margin=lowp_margin(backend, dtype))[0]
    assert ours.dtype == dtype


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_sigmoid_focal_gradcheck(backend):
    x, y = make_data((3, 6), dtype=torch.float64, seed=3, targets="labels")
    x.requires_grad_()
    for kw in (dict(), dict(alpha=-1, gamma=0.5, reduction="mean"), dict(gamma=0.0, reduction="sum")):
        assert torch.autograd.gradcheck(lambda v: sigmoid_focal_loss(v, y, backend=backend, **kw), (x,))


def test_sigmoid_focal_bad_arguments():
    x, y = make_data((3, 4), targets="hard")
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss(x, y, gamma=-0.5)
    with pytest.raises(ValueError, match="same as input size"):
        sigmoid_focal_loss(x, y[:2])
    with pytest.raises(NotImplementedError, match="targets"):
        sigmoid_focal_loss(x, y.clone().requires_grad_())
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(x, y, reduction="batchmean")


def test_modules_and_top_level_exports():
    import celoss
    x, t = make_data((6, 9), seed=5)
    alpha = torch.rand(9) + 0.1
    mod = celoss.FocalLoss(gamma=1.5, alpha=alpha, reduction="sum")
    assert "alpha" in dict(mod.named_buffers())
    torch.testing.assert_close(mod(x, t).double(), oracle.focal_loss(x.double(), t, 1.5, alpha, reduction="sum"),
                               rtol=1e-5, atol=1e-6)
    xb, yb = make_data((4, 7), seed=6, targets="hard")
    torch.testing.assert_close(celoss.SigmoidFocalLoss(alpha=0.5, gamma=1.0, reduction="mean")(xb, yb).double(),
                               oracle.torchvision_sigmoid_focal_loss(xb.double(), yb.double(), 0.5, 1.0, "mean"),
                               rtol=1e-5, atol=1e-7)
    assert celoss.focal_loss is focal_loss and celoss.sigmoid_focal_loss is sigmoid_focal_loss
