"""celoss.distillation_loss vs float64 PyTorch formulas on every backend: values and gradients."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from celoss.distillation import distillation_loss
import oracle
from conftest import (against_oracle, assert_close_to_oracle, backend_device, backend_params, lowp_against_oracle,
                      lowp_margin, make_data)

ALL = backend_params()
CPU_KERNELS = backend_params("cython", "torch")
KINDS = ("kl", "reverse_kl", "ce", "jsd")
# Triton's interpreter computes masked lanes (-inf - -inf) that the kernels then discard
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# student, teacher, targets over the last dim
distill_data = functools.partial(make_data, teacher=True, class_dim=-1)
# the teacher is a constant input: gradients w.r.t. the student only
student_against_oracle = functools.partial(against_oracle, wrt=(0,))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_kinds_and_temperatures_match_formula(backend, kind, temperature, reduction):
    s, t, _ = distill_data((7, 203), backend_device(backend))
    kw = dict(temperature=temperature, kind=kind, beta=0.3, reduction=reduction)
    a, b, ga, gb = student_against_oracle(lambda u, v: distillation_loss(u, v, backend=backend, **kw),
                                          lambda u, v: oracle.distillation_loss(u, v, **kw), s, t)
    assert a.shape == b.shape and a.dtype == torch.float32
    assert_close_to_oracle(a, b, ga, gb)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("alpha,temperature", [(0.3, 1.0), (0.6, 2.0), (1.0, 2.0), (0.0, 3.0)])
def test_target_term_reductions_and_ignored_rows(backend, reduction, alpha, temperature):
    s, t, y = distill_data((2, 5, 67), backend_device(backend), seed=3)
    kw = dict(temperature=temperature, alpha=alpha, reduction=reduction)
    a, b, ga, gb = student_against_oracle(lambda u, v: distillation_loss(u, v, y, backend=backend, **kw),
                                          lambda u, v: oracle.distillation_loss(u, v, y, **kw), s, t)
    assert a.shape == b.shape
    assert_close_to_oracle(a, b, ga, gb)
    ignored = (y == -100).unsqueeze(-1).expand_as(ga)
    assert ignored.any() and (ga[ignored] == 0).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", ["kl", "jsd", "reverse_kl"])
def test_class_term_and_custom_ignore_index(backend, kind):
    s, t, y = distill_data((9, 130), backend_device(backend), seed=4)
    y = torch.where(y == -100, 7, y)  # class 7 is "ignored" here
    kw = dict(temperature=1.5, alpha=0.4, kind=kind, ignore_index=7)
    a, b, ga, gb = student_against_oracle(lambda u, v: distillation_loss(u, v, y, backend=backend, **kw),
                                          lambda u, v: oracle.distillation_loss(u, v, y, **kw), s, t)
    assert_close_to_oracle(a, b, ga, gb)


@pytest.mark.parametrize("backend", ALL)
def test_jsd_endpoints_are_the_two_kls(backend):
    s, t, _ = distill_data((5, 101), backend_device(backend), seed=5)
    for beta, kind in ((0.0, "kl"), (1.0, "reverse_kl")):
        j = distillation_loss(s, t, kind="jsd", beta=beta, temperature=2.0, backend=backend)
        k = distillation_loss(s, t, kind=kind, temperature=2.0, backend=backend)
        torch.testing.assert_close(j, k, rtol=0, atol=0)
        torch.testing.assert_close(j.double(), oracle.distillation_loss(s.double(), t.double(), kind=kind,
                                                                        temperature=2.0), rtol=1e-5, atol=1e-6)
    # beta = 0.5 is the textbook JSD: (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2
    p, q = F.softmax(t.double() / 2, -1), F.softmax(s.double() / 2, -1)
    m = (p + q) / 2
    jsd = 0.5 * ((p * (p / m).log()).sum(-1) + (q * (q / m).log()).sum(-1))
    torch.testing.assert_close(distillation_loss(s, t, kind="jsd", beta=0.5, temperature=2.0, reduction="none",
                                                 backend=backend).double(), 4 * jsd, rtol=1e-5, atol=1e-6)
    # the mixture formula itself tends to 0 at both ends (the endpoints are defined as the KLs)
    near0 = distillation_loss(s, t, kind="jsd", beta=1e-4, backend=backend)
    torch.testing.assert_close(near0.double(), oracle.distillation_loss(s.double(), t.double(), kind="jsd", beta=1e-4),
                               rtol=1e-4, atol=1e-6)
    assert near0 < 1e-2 * distillation_loss(s, t, kind="kl", backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_temperature_one_vs_four(backend):
    """Softening: T=4 compares flatter distributions; T**2 keeps the gradient scale comparable."""
    s, t, _ = distill_data((6, 97), backend_device(backend), seed=6)
    for T in (1.0, 4.0):
        sa = s.clone().requires_grad_()
        loss = distillation_loss(sa, t, temperature=T, backend=backend)
        loss.backward()
        ref = T * T * F.kl_div(F.log_softmax(s.double() / T, -1), F.log_softmax(t.double() / T, -1),
                               log_target=True, reduction="batchmean")
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        # d/ds of T^2 KL = T (p_S - p_T) / N
        grad = T * (F.softmax(s.double() / T, -1) - F.softmax(t.double() / T, -1)) / s.shape[0]
        torch.testing.assert_close(sa.grad.double(), grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", KINDS)
def test_vocabulary_larger_than_blocks_and_chunks(backend, kind):
    s, t, y = distill_data((3, 8209), backend_device(backend), seed=7, ignore_frac=0.0)
    kw = dict(temperature=2.0, kind=kind, alpha=0.5)
    a, b, ga, gb = student_against_oracle(lambda u, v: distillation_loss(u, v, y, backend=backend, **kw),
                                          lambda u, v: oracle.distillation_loss(u, v, y, **kw), s, t)
    assert_close_to_oracle(a, b, ga, gb, grad_atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", KINDS)
def test_large_logits_fp32(backend, kind):
    """|logits| up to ~1e4 with large, different offsets: no worse than PyTorch's own fp32 result."""
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(8)
    s = (torch.randn(4, 300, generator=g) * 30 + 1e4).to(dev)
    t = (torch.randn(4, 300, generator=g) * 30 - 5e3).to(dev)
    kw = dict(temperature=2.0, kind=kind, beta=0.4, reduction="none")
    ours = lambda u, v: distillation_loss(u, v, backend=backend, **kw)  # noqa: E731
    ref = lambda u, v: oracle.distillation_loss(u, v, **kw)  # noqa: E731
    if kind == "jsd":
        a, b, ga, gb = student_against_oracle(ours, ref, s, t)
        assert_close_to_oracle(a, b, ga, gb, atol=1e-4)
    else:  # the oracle's composition in fp32 is PyTorch's own fp32 result
        a, _, ga, _ = lowp_against_oracle(ours, ref, s, t, margin=3e-6, wrt=(0,))  # fp32 relative
    assert torch.isfinite(a).all() and torch.isfinite(ga).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_low_precision_no_worse_than_pytorch(backend, dtypes, kind):
    sd, td = dtypes
    s, t, y = distill_data((8, 257), backend_device(backend), seed=9)
    s, t = s.to(sd), t.to(td)
    kw = dict(temperature=2.0, kind=kind, alpha=0.5, reduction="none")
    a, _, ga, _ = lowp_against_oracle(lambda u, v: distillation_loss(u, v, y, backend=backend, **kw),
                                      lambda u, v: oracle.distillation_loss(u, v, y, **kw), s, t,
                                      lowp=lambda u, v: oracle_lowp(u, v, y, **kw), wrt=(0,),
                                      margin=lowp_margin(backend, sd, 2e-3))
    assert a.dtype == sd and ga.dtype == sd


def oracle_lowp(s, t, target, *, temperature, kind, alpha, reduction, beta=0.5, ignore_index=-100):
    """The same formula evaluated in the student's dtype, the teacher cast to it (autocast-style: what a
    plain PyTorch port would do; ``oracle.distillation_loss`` would promote to the wider dtype)."""
    T, dt = temperature, s.dtype
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t.to(dt) / T, -1)
    if kind == "kl":
        d = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log1p(-beta)]), 0)
        d = beta * F.kl_div(lm, lt, log_target=True, reduction="none").sum(-1) \
            + (1 - beta) * F.kl_div(lm, ls, log_target=True, reduction="none").sum(-1)
    counted = target != ignore_index
    ce = F.cross_entropy(s, target.clamp_min(0), reduction="none")
    return torch.where(counted, alpha * T * T * d + (1 - alpha) * ce, torch.zeros_like(d))


@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("kind", KINDS)
def test_float64_gradcheck(backend, kind):
    g = torch.Generator().manual_seed(10)
    s = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, generator=g, dtype=torch.float64)
    y = torch.tensor([3, -100, 6])
    assert torch.autograd.gradcheck(
        lambda u: distillation_loss(u, t, kind=kind, beta=0.3, temperature=2.0, backend=backend), (s,))
    assert torch.autograd.gradcheck(
        lambda u: distillation_loss(u, t, y, kind=kind, beta=0.3, temperature=3.0, alpha=0.3, reduction="none",
                                    backend=backend), (s,))
    if kind in ("kl", "jsd"):  # the (optional) teacher gradient; every kind is checked against the oracle below
        tt = t.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda u, v: distillation_loss(u, v, y, kind=kind, beta=0.3, temperature=1.0, alpha=0.5,
                                           backend=backend), (s, tt))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", KINDS)
def test_teacher_gradient_when_it_requires_grad(backend, kind):
    s, t, y = distill_data((5, 64), backend_device(backend), seed=11)
    sa, ta = s.clone().requires_grad_(), t.clone().requires_grad_()
    sb, tb = s.double().requires_grad_(), t.double().requires_grad_()
    kw = dict(kind=kind, temperature=2.0, alpha=0.5, beta=0.3)
    distillation_loss(sa, ta, y, backend=backend, **kw).backward()
    oracle.distillation_loss(sb, tb, y, **kw).backward()
    torch.testing.assert_close(sa.grad.double(), sb.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ta.grad.double(), tb.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
def test_masked_teacher_classes_with_minus_inf(backend):
    """-inf teacher logits (classes the teacher rules out) contribute 0 log 0 = 0, not NaN."""
    s, t, _ = distill_data((4, 50), backend_device(backend), seed=12)
    t[:, 40:] = -float("inf")
    sa = s.clone().requires_grad_()
    loss = distillation_loss(sa, t, temperature=2.0, backend=backend)
    loss.backward()
    lt = F.log_softmax(t.double() / 2, -1)
    ls = F.log_softmax(s.double() / 2, -1)
    ref = 4 * torch.where(lt.exp() > 0, lt.exp() * (lt - ls), 0).sum(-1).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(sa.grad).all()


@pytest.mark.parametrize("backend", ALL)
def test_all_rows_ignored_and_empty(backend):
    s, t, y = distill_data((3, 20), backend_device(backend))
    y[:] = -100
    sa = s.clone().requires_grad_()
    loss = distillation_loss(sa, t, y, alpha=0.5, backend=backend)
    assert torch.isnan(loss)  # 0 / 0, as celoss.cross_entropy (and torch) for an all-ignored mean
    loss.backward()
    assert (sa.grad == 0).all()
    assert distillation_loss(s, t, y, alpha=0.5, reduction="sum", backend=backend) == 0
    e = torch.zeros(0, 20, device=s.device)
    assert distillation_loss(e, e, reduction="sum", backend=backend) == 0
    assert distillation_loss(e, e, reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", ALL)
def test_one_dimensional_and_non_contiguous_input(backend):
    s, t, _ = distill_data((6, 40), backend_device(backend), seed=13)
    one = distillation_loss(s[0], t[0], reduction="none", backend=backend)
    assert one.shape == ()
    torch.testing.assert_close(one.double(), oracle.distillation_loss(s[0].double(), t[0].double(), reduction="none"),
                               rtol=1e-5, atol=1e-6)
    sn, tn = s.t().contiguous().t(), t[:, ::1]  # column-major student
    torch.testing.assert_close(distillation_loss(sn, tn, backend=backend).double(),
                               oracle.distillation_loss(s.double(), t.double()),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
def test_loss_times_constant(backend):
    s, t, y = distill_data((5, 33), backend_device(backend), seed=14)
    sa = s.clone().requires_grad_()
    (3.0 * distillation_loss(sa, t, y, alpha=0.5, backend=backend)).backward()
    sb = s.double().requires_grad_()
    (3.0 * oracle.distillation_loss(sb, t, y, alpha=0.5)).backward()
    torch.testing.assert_close(sa.grad.double(), sb.grad, rtol=1e-5, atol=1e-7)


def test_backends_agree_and_default_backend_runs():
    s, t, y = distill_data((4, 77), seed=15)
    ref = oracle.distillation_loss(s.double(), t.double(), y, alpha=0.5, kind="jsd", temperature=2.0)
    torch.testing.assert_close(distillation_loss(s, t, y, alpha=0.5, kind="jsd", temperature=2.0).double(), ref,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kind="kld"), ValueError, "kind"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(alpha=-0.1, target=True), ValueError, "alpha"),
    (dict(alpha=0.5), ValueError, "target"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(teacher_shape=(3, 9)), ValueError, "same shape"),
    (dict(target_dtype=torch.int32), TypeError, "int64"),
    (dict(target_shape=(4,)), ValueError, "shape"),
    (dict(backend="nope"), ValueError, "unknown backend"),
])
def test_bad_arguments(kwargs, error, match):
    s, t, y = distill_data((3, 10))
    kw = dict(kwargs)
    if kw.pop("target", False):
        kw["target"] = y
    if "teacher_shape" in kw:
        t = torch.zeros(kw.pop("teacher_shape"))
    if "target_dtype" in kw:
        kw["target"] = y.to(kw.pop("target_dtype"))
    if "target_shape" in kw:
        kw["target"] = torch.zeros(kw.pop("target_shape"), dtype=torch.int64)
    with pytest.raises(error, match=match):
        distillation_loss(s, t, **kw)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", [10, -1, 1 << 40])
def test_out_of_range_target_raises_before_any_read(backend, bad):
    if backend_device(backend) != "cpu":
        pytest.skip("on CUDA a bad target is a device-side assert, as in PyTorch (test_checks.py); "
                    "it would end this process's CUDA context")
    s, t, y = distill_data((3, 10), backend_device(backend))
    y[1] = bad
    with pytest.raises(IndexError, match=str(bad)):
        distillation_loss(s, t, y, alpha=0.5, backend=backend)
    with pytest.raises(IndexError, match=str(bad)):  # also when the target only masks rows
        distillation_loss(s, t, y, backend=backend)


def test_integer_logits_rejected():
    with pytest.raises(TypeError, match="float"):
        distillation_loss(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3))


def test_module_and_top_level_export():
    import celoss
    s, t, y = distill_data((2, 3, 40), seed=16)
    mod = celoss.DistillationLoss(temperature=2.0, kind="jsd", beta=0.3, alpha=0.6, reduction="sum")
    torch.testing.assert_close(mod(s, t, y).double(),
                               oracle.distillation_loss(s.double(), t.double(), y, temperature=2.0, kind="jsd", beta=0.3,
                                                        alpha=0.6, reduction="sum"),
                               rtol=1e-5, atol=1e-5)
    assert celoss.distillation_loss is distillation_loss


def test_torch_compile_fullgraph_cpu():
    s, t, y = distill_data((8, 64), seed=17)

    def f(u):
        return distillation_loss(u, t, y, temperature=2.0, alpha=0.5)

    sa = s.clone().requires_grad_()
    a = torch.compile(f, fullgraph=True)(sa)
    a.backward()
    sb = s.double().requires_grad_()
    b = oracle.distillation_loss(sb, t, y, temperature=2.0, alpha=0.5)
    b.backward()
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sa.grad.double(), sb.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# issue 11: non-finite values, empty dimensions, zero denominators, double backward
# ---------------------------------------------------------------------------------------------

NONFINITE = {  # (row, input, value to write; None: the whole row)
    "teacher_nan": (0, 1, float("nan")), "teacher_+inf": (0, 1, float("inf")),
    "student_nan": (1, 0, float("nan")), "student_+inf": (1, 0, float("inf")),
    "student_row_-inf": (2, 0, None), "teacher_row_-inf": (2, 1, None),
}


def _inject(s, t, case):
    row, which, value = NONFINITE[case]
    s, t = s.clone(), t.clone()
    x = (s, t)[which]
    if value is None:
        x[row] = -float("inf")
    else:
        x[row, 3] = value
    return s, t


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(NONFINITE))
@pytest.mark.parametrize("reduction,alpha", [("none", 1.0), ("batchmean", 0.5)])
def test_issue11_nonfinite_rows_propagate_like_pytorch(backend, kind, case, reduction, alpha):
    """A NaN / +inf logit or an all -inf row, in the student or the teacher: that row's loss and
    gradient are NaN, as in PyTorch's log_softmax / kl_div composition; other rows are unaffected."""
    s, t, y = distill_data((4, 37), backend_device(backend), seed=20, ignore_frac=0.0)
    s, t = _inject(s, t, case)
    target = y if alpha != 1.0 else None
    kw = dict(kind=kind, temperature=2.0, beta=0.3, alpha=alpha, reduction=reduction)
    a, b, ga, gb = student_against_oracle(lambda u, v: distillation_loss(u, v, target, backend=backend, **kw),
                                          lambda u, v: oracle.distillation_loss(u, v, target, **kw), s, t)
    row = NONFINITE[case][0]
    assert ga[row].isnan().all() and gb[row].isnan().all()  # the oracle agrees: not vacuous
    assert_close_to_oracle(a, b, ga, gb, equal_nan=True)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", KINDS)
def test_issue11_nonfinite_teacher_gradient(backend, kind):
    """The (rare) teacher gradient: NaN rows too, for both inputs."""
    s, t, y = distill_data((4, 21), backend_device(backend), seed=21, ignore_frac=0.0)
    s, t = _inject(s, t, "teacher_nan")
    s[1, 2] = float("inf")
    kw = dict(kind=kind, temperature=1.5, beta=0.3, alpha=0.5)
    a, b, ga, gb = against_oracle(lambda u, v: distillation_loss(u, v, y, backend=backend, **kw),
                                  lambda u, v: oracle.distillation_loss(u, v, y, **kw), s, t)
    gta = ga[1]
    assert gta[:2].isnan().all() and torch.isfinite(gta[2:]).all()
    assert_close_to_oracle(a, b, ga, gb, equal_nan=True)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_issue11_student_minus_inf_where_teacher_has_mass(backend, kind):
    """A single -inf student logit under teacher mass: +inf loss with a finite gradient (PyTorch's too)."""
    s, t, _ = distill_data((3, 16), backend_device(backend), seed=22)
    s[0, 5] = -float("inf")
    kw = dict(kind=kind, reduction="none")
    a, b, ga, gb = student_against_oracle(lambda u, v: distillation_loss(u, v, backend=backend, **kw),
                                          lambda u, v: oracle.distillation_loss(u, v, **kw), s, t)
    assert a[0] == float("inf") and torch.isfinite(ga).all()
    assert_close_to_oracle(a, b, ga, gb, equal_nan=True)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_issue11_ignored_rows_like_pytorch(backend, alpha):
    """An ignored row: loss 0 and 0 times its gradient, as the composition (and F.cross_entropy):
    NaN over the row when it holds a NaN / +inf (student or teacher), zeros otherwise."""
    s, t, y = distill_data((5, 30), backend_device(backend), seed=23, ignore_frac=0.0)
    y[1] = y[2] = y[3] = -100
    s[1, 4] = float("nan")
    t[2, 7] = float("inf")
    s[3, 0] = -float("inf")  # a masked class only: still zeros
    kw = dict(temperature=2.0, alpha=alpha, reduction="none")
    a, b, ga, gb = student_against_oracle(lambda u, v: distillation_loss(u, v, y, backend=backend, **kw),
                                          lambda u, v: oracle.distillation_loss(u, v, y, **kw), s, t)
    assert (a[1:4] == 0).all() and ga[1:3].isnan().all() and (ga[3] == 0).all()
    assert_close_to_oracle(a, b, ga, gb, equal_nan=True)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", [(3, 0), (2, 3, 0), (0, 0), (0,), (0, 5), (2, 0, 4)], ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("with_target", [False, True])
def test_issue11_zero_classes_and_empty_rows(backend, shape, reduction, with_target):
    """V = 0 or no row: what the PyTorch composition returns (V = 0: every row loss is 0, so
    batchmean = 0 and mean = 0 / 0), with gradients of the input's shape."""
    dev = backend_device(backend)
    s, t = torch.zeros(shape, device=dev), torch.zeros(shape, device=dev)
    y = torch.full(shape[:-1], -100, device=dev) if with_target else None  # V = 0: no valid class
    kw = dict(reduction=reduction, alpha=0.5 if with_target else 1.0)
    a, b, ga, gb = student_against_oracle(lambda u, v: distillation_loss(u, v, y, backend=backend, **kw),
                                          lambda u, v: oracle.distillation_loss(u, v, y, **kw), s, t)
    assert a.shape == b.shape and ga.shape == s.shape and a.dtype == s.dtype
    assert_close_to_oracle(a, b, ga, gb, rtol=1e-7, atol=1e-7, grad_atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("backend", ALL)
def test_issue11_zero_classes_target_out_of_range(backend):
    s = torch.zeros(2, 0, device=backend_device(backend))
    with pytest.raises(IndexError, match="out of bounds"):
        distillation_loss(s, s, torch.tensor([0, -100], device=s.device), alpha=0.5, backend=backend)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_issue11_all_rows_ignored_zero_denominator(backend, reduction, alpha):
    """Counted rows are the denominator (never a weight sum, so never negative); with none counted
    the loss is 0 / 0 = NaN and the gradient that of the composition (zero: no row contributes)."""
    s, t, y = distill_data((3, 20), backend_device(backend), seed=24)
    y[:] = -100
    kw = dict(reduction=reduction, alpha=alpha, temperature=2.0)
    a, b, ga, gb = student_against_oracle(lambda u, v: distillation_loss(u, v, y, backend=backend, **kw),
                                          lambda u, v: oracle.distillation_loss(u, v, y, **kw), s, t)
    assert a.isnan() and b.isnan()
    torch.testing.assert_close(ga.double(), gb, equal_nan=True)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_issue11_double_backward_raises(backend, reduction):
    s, t, y = distill_data((3, 12), backend_device(backend), seed=25)
    sa = s.clone().requires_grad_()
    loss = distillation_loss(sa, t, y, alpha=0.5, reduction=reduction, backend=backend).sum()
    g, = torch.autograd.grad(loss, sa, create_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        g.sum().backward()
