"""Triton cross-entropy kernels (``celoss.kernels.cross_entropy`` through ``celoss.backends.triton``)
against the reference backend and a float64 autograd oracle, on small shapes.

Runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is set below, before triton is
imported; tests/conftest.py sets it too when there is no GPU). If triton was already imported
without the interpreter (a GPU machine), the same tests run on CUDA tensors.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from celoss import stats as S  # noqa: E402
from celoss.backends import reference as rb  # noqa: E402
from celoss.backends import triton as tb  # noqa: E402
from celoss.kernels import cross_entropy as ce  # noqa: E402

INTERPRETED = type(ce._ce_fused_kernel).__name__ == "InterpretedFunction"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PRIME_ABOVE_BLOCK = 4099  # > MAX_BLOCK: two blocks, the second one ragged
assert PRIME_ABOVE_BLOCK > ce.MAX_BLOCK
CLASSES = [1, 3, 1000, PRIME_ABOVE_BLOCK]
IGNORE = -100

# Options of ce_fused; keys not given take the defaults below.
DEFAULTS = dict(ignore_index=IGNORE, label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0,
                focal_gamma=None)
OPTIONS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "ignore": dict(ignore=True),
    "smooth": dict(label_smoothing=0.1),
    "smooth_weight_ignore": dict(label_smoothing=0.2, weight=True, ignore=True, per_row=True),
    "scale": dict(logit_scale=0.7),
    "softcap": dict(softcap=4.0, logit_scale=1.5, per_row=True),
    "zloss": dict(z_loss=1e-2, ignore=True),
    "ignore_valid_class": dict(ignore_index=1, ignore=True, label_smoothing=0.1, weight=True),
    "ce_everything": dict(weight=True, ignore=True, label_smoothing=0.1, softcap=6.0, logit_scale=1.2,
                          z_loss=1e-3, per_row=True),
    "focal0": dict(focal_gamma=0.0, ignore=True),
    "focal0.5": dict(focal_gamma=0.5, per_row=True),
    "focal2_weight_ignore": dict(focal_gamma=2.0, weight=True, ignore=True),
    "focal2_softcap": dict(focal_gamma=2.0, softcap=5.0, per_row=True),
    "soft": dict(soft=True),
    "soft_everything": dict(soft=True, weight=True, label_smoothing=0.1, softcap=6.0, z_loss=1e-3,
                            per_row=True),
}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def make_case(n, c, dtype, opts, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed + 7919 * c)
    x = (torch.randn(n, c, generator=g) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    if opts.get("ignore"):
        target[::3] = opts.get("ignore_index", IGNORE)
    soft = None
    if opts.get("soft"):
        soft = torch.softmax(torch.randn(n, c, generator=g) * 2, dim=1).to(dtype)
        target = None
    weight = (torch.rand(c, generator=g) + 0.25) if opts.get("weight") else None
    coef = (torch.rand(n, generator=g) + 0.5) if opts.get("per_row") else torch.tensor([0.75])
    kw = {k: opts.get(k, v) for k, v in DEFAULTS.items()}
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dev(x), dev(target), dev(soft), dev(weight), dev(coef), kw


def transform64(x, logit_scale, softcap):
    z = x.double() * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def oracle(x, target, soft, weight, coef, *, ignore_index, label_smoothing, logit_scale, softcap,
           z_loss, focal_gamma):
    """Per-row loss, lse and coef * dloss/dx in float64, straight from PyTorch semantics + autograd."""
    x64 = x.detach().double().requires_grad_()
    z = transform64(x64, logit_scale, softcap)
    lse = torch.logsumexp(z, dim=1)
    w = None if weight is None else weight.double()
    if soft is not None:
        loss = F.cross_entropy(z, soft.double(), weight=w, label_smoothing=label_smoothing,
                               reduction="none") + z_loss * lse * lse
    else:
        counted = target != ignore_index
        safe = torch.where(counted, target, torch.zeros_like(target))
        w_y = counted.double() if w is None else torch.where(counted, w[safe], torch.zeros_like(lse))
        if focal_gamma is None:
            loss = F.cross_entropy(z, target, weight=w, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing, reduction="none")
            loss = loss + z_loss * w_y * lse * lse
        else:
            lp = torch.log_softmax(z, dim=1).gather(1, safe[:, None])[:, 0]
            loss = torch.where(counted, -w_y * (-torch.expm1(lp)) ** focal_gamma * lp, torch.zeros_like(lp))
    (grad,) = torch.autograd.grad((loss * coef.double()).sum(), x64)
    if x.shape[1] == 1:  # a single class: the loss is constant (0 up to z-loss), d/dx of pow at 0 is NaN
        grad = torch.where(torch.isnan(grad), torch.zeros_like(grad), grad)
    return loss.detach(), lse.detach(), grad


def tolerances(dtype):
    """(rtol, atol floor) of gradients stored in `dtype`: one ulp of the storage format (the float32
    result may round either way), plus fp16's subnormal spacing."""
    return {torch.float32: (2e-5, 0.0), torch.float16: (2.0 ** -10, 6e-8), torch.bfloat16: (2.0 ** -7, 0.0)}[dtype]


def check(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def check_grad(grad, expected, dtype, what):
    rtol, floor = tolerances(dtype)
    # float32 cancellation in A p_j - D w_j (smoothing) is absolute: ~1e-7 of the row's scale
    # (A ~ w_y coef ~ 1 in these tests, even where the exact gradient is 0, e.g. C = 1)
    check(grad, expected, rtol, 1e-6 * max(expected.abs().max().item(), 1.0) + floor, what)


def fused(*args, **kw):
    return (tb.ce_fused if tb is not None else ce.fused)(*args, **kw)


# ------------------------------------------------------------------------------------------------
# fused kernel
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_fused_matches_oracle_and_reference(name, dtype, c):
    opts = OPTIONS[name]
    n = 3 if c == PRIME_ABOVE_BLOCK else 7
    x, target, soft, weight, coef, kw = make_case(n, c, dtype, opts)
    grad = torch.full_like(x, float("nan"))  # every element must be written
    loss, lse = fused(x, target, soft, weight, coef, grad, **kw)
    assert loss.dtype == lse.dtype == torch.float32 and loss.shape == lse.shape == (n,)
    o_loss, o_lse, o_grad = oracle(x, target, soft, weight, coef, **kw)
    check(lse, o_lse, 2e-6, 2e-6, "lse")
    check(loss, o_loss, 2e-5, 2e-5, "loss")
    assert torch.isfinite(grad).all()
    check_grad(grad, o_grad, dtype, "grad")
    if target is not None:
        ignored = (target == kw["ignore_index"]).cpu()
        assert (loss.cpu()[ignored] == 0).all() and (grad.cpu()[ignored] == 0).all()

    # loss-only launch gives the same loss/lse
    loss2, lse2 = fused(x, target, soft, weight, coef, None, **kw)
    assert torch.equal(loss2, loss) and torch.equal(lse2, lse)

    if rb is not None:
        r_grad = torch.empty_like(x)
        r_loss, r_lse = rb.ce_fused(x, target, soft, weight, coef, r_grad, **kw)
        check(lse, r_lse, 2e-6, 2e-6, "lse vs reference")
        check(loss, r_loss, 2e-5, 2e-5, "loss vs reference")
        check_grad(grad, r_grad.double(), dtype, "grad vs reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["ce_everything", "focal2_weight_ignore", "soft_everything"])
def test_fused_in_place(name, dtype):
    x, target, soft, weight, coef, kw = make_case(5, 1000, dtype, OPTIONS[name], seed=3)
    grad = torch.empty_like(x)
    loss, lse = fused(x, target, soft, weight, coef, grad, **kw)
    y = x.clone()
    loss2, lse2 = fused(y, target, soft, weight, coef, y, **kw)  # gradient written over the logits
    assert torch.equal(loss2, loss) and torch.equal(lse2, lse)
    assert torch.equal(y, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["ce_everything", "soft_everything", "focal0.5"])
def test_fused_strided_rows(name, dtype):
    """Rows of logits, soft targets and gradient with row strides larger than C (column slices),
    and a gradient with a non-unit class stride (written through a temporary)."""
    n, c = 5, 300
    x, target, soft, weight, coef, kw = make_case(n, c, dtype, OPTIONS[name], seed=5)
    wide = torch.zeros(n, c + 37, dtype=dtype, device=DEVICE)
    wide[:, 11:11 + c] = x
    xs = wide[:, 11:11 + c]
    ss = None
    if soft is not None:
        wide_t = torch.zeros(n, c + 5, dtype=dtype, device=DEVICE)
        wide_t[:, 3:3 + c] = soft
        ss = wide_t[:, 3:3 + c]
    g_wide = torch.full((n, c + 64), float("nan"), dtype=dtype, device=DEVICE)
    gs = g_wide[:, 1:1 + c]
    loss, lse = fused(xs, target, ss, weight, coef, gs, **kw)
    ref_grad = torch.empty_like(x)
    loss_c, lse_c = fused(x, target, soft, weight, coef, ref_grad, **kw)
    assert torch.equal(loss, loss_c) and torch.equal(lse, lse_c) and torch.equal(gs, ref_grad)
    assert torch.isnan(g_wide[:, 0]).all() and torch.isnan(g_wide[:, 1 + c:]).all()  # nothing outside
    gt = torch.empty(c, n, dtype=dtype, device=DEVICE).t()  # class stride n
    fused(x, target, soft, weight, coef, gt, **kw)
    assert torch.equal(gt, ref_grad)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the garbage rows
@pytest.mark.parametrize("name", ["ce_everything", "focal2_weight_ignore"])
def test_ignored_rows_with_garbage_logits(name):
    """Ignored (padding) rows get loss 0 and PyTorch's gradient 0 * softmax: exact zeros, or NaN
    where the row's softmax is NaN (a NaN or +inf transformed logit); counted rows are unaffected."""
    x, target, _, weight, coef, kw = make_case(6, 40, torch.float32, OPTIONS[name], seed=9)
    target[1], target[4] = IGNORE, IGNORE
    x[1, 3], x[4, :] = float("nan"), float("inf")
    grad = torch.full_like(x, float("nan"))
    loss, lse = fused(x, target, None, weight, coef, grad, **kw)
    assert (loss[[1, 4]] == 0).all()
    for r in (1, 4):
        expected = torch.zeros_like(grad[r]) if torch.isfinite(lse[r]) else torch.full_like(grad[r], float("nan"))
        torch.testing.assert_close(grad[r], expected, equal_nan=True)
    assert torch.isnan(grad[1]).all()  # a NaN logit survives any softcap
    keep = torch.tensor([0, 2, 3, 5])
    o_loss, _, o_grad = oracle(x[keep], target[keep], None, weight, coef[keep] if coef.numel() > 1 else coef, **kw)
    check(loss[keep], o_loss, 2e-5, 2e-5, "loss")
    check_grad(grad[keep], o_grad, torch.float32, "grad")
    # ce_grad: zero coefficients -> zero gradient without reading the row
    row_coefs = torch.zeros(6, 3, device=DEVICE)
    row_coefs[0] = torch.tensor([1.0, 1.0, 0.0])
    out = torch.full_like(x, float("nan"))
    _grad(x, target, weight, torch.full((6,), float("nan"), device=DEVICE), row_coefs, out, class_start=0,
          logit_scale=1.0, softcap=None)
    assert (out[1:] == 0).all() and torch.isnan(out[0]).all()  # row 0: lse NaN -> NaN, as asked


def test_all_rows_ignored_and_empty():
    x, target, _, weight, coef, kw = make_case(6, 50, torch.float32, dict(weight=True))
    target[:] = IGNORE
    grad = torch.full_like(x, float("nan"))
    loss, lse = fused(x, target, None, weight, coef, grad, **dict(kw, label_smoothing=0.1, z_loss=1e-2))
    assert (loss == 0).all() and (grad == 0).all()
    check(lse, torch.logsumexp(x.double(), 1), 2e-6, 2e-6, "lse of ignored rows")
    e = torch.empty(0, 50, device=DEVICE)
    loss, lse = fused(e, target[:0], None, None, coef, torch.empty_like(e), **kw)
    assert loss.shape == lse.shape == (0,)


def near_one_oracle(x, target, gamma):
    """Loss and gradient of unweighted CE / focal in float64 with 1 - p_y summed from the other
    classes (autograd's p_y - 1 cancels: ~1e-16 absolute, useless once 1 - p_y < 1e-10)."""
    z = x.double()
    rows = torch.arange(z.shape[0], device=z.device)
    zy = z[rows, target]
    e = torch.exp(z - zy[:, None])
    e[rows, target] = 0
    other = e.sum(1)                        # sum_{j != y} exp(z_j - z_y)
    p_other = other / (1 + other)           # 1 - p_y
    p = e / (1 + other)[:, None]            # p_j, j != y
    lp = -torch.log1p(other)                # log p_y
    if gamma is None:
        g, loss = torch.ones_like(lp), -lp
    else:
        g = p_other ** gamma * (1 + gamma * (1 - p_other) * torch.log1p(other) / p_other)
        loss = -(p_other ** gamma) * lp
    grad = g[:, None] * p
    grad[rows, target] = -g * p_other
    return loss, grad


@pytest.mark.parametrize("gamma", [None, 0.0, 0.5, 2.0])
def test_true_class_gradient_as_p_goes_to_one(gamma):
    """p_y -> 1: the target element -(1 - p_y) keeps float32 relative accuracy (float32 p_y - 1
    would round to 0), the loss stays relatively accurate, focal's g stays finite (gamma < 1)."""
    n, c = 6, 40
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, c, generator=g)
    target = torch.arange(n) % c
    margins = torch.tensor([2.0, 8.0, 14.0, 20.0, 30.0, 60.0])
    x[torch.arange(n), target] += margins
    x, target = x.to(DEVICE), target.to(DEVICE)
    coef = torch.ones(1, device=DEVICE)
    kw = dict(DEFAULTS, focal_gamma=gamma)
    grad = torch.empty_like(x)
    loss, _ = fused(x, target, None, None, coef, grad, **kw)
    assert torch.isfinite(grad).all() and torch.isfinite(loss).all()
    o_loss, o_grad = near_one_oracle(x, target, gamma)
    # the accurate oracle agrees with autograd where float64 autograd is still accurate
    a_loss, _, a_grad = oracle(x[:3], target[:3], None, None, coef, **kw)
    check(o_loss[:3], a_loss, 1e-9, 0, "oracle loss")
    check(o_grad[:3], a_grad, 1e-9, 1e-15, "oracle grad")
    rows = torch.arange(n, device=DEVICE)
    check(grad[rows, target], o_grad[rows, target], 1e-5, 1e-37, "true-class gradient")
    check(grad, o_grad, 1e-5, 1e-37, "gradient")
    check(loss, o_loss, 1e-5, 1e-37, "loss")  # relative, down to ~1e-25


@pytest.mark.parametrize("gamma", [None, 0.5])
def test_true_class_gradient_with_tiny_lse(gamma):
    """Target logit 0, the others near -20: lse ~ 1e-7 and 1 - p_y ~ 1e-7. The fused kernel gets
    1 - p_y from the other classes' sum; ce_grad, given an accurate lse, from expm1(z_y - lse)
    (exp(lp) - 1 would be off by ~50% there)."""
    n, c = 5, 30
    g = torch.Generator().manual_seed(5)
    target = torch.arange(n) % c
    x = torch.randn(n, c, generator=g) * 0.5 - 20
    x[torch.arange(n), target] = 0.0
    x, target = x.to(DEVICE), target.to(DEVICE)
    o_loss, o_grad = near_one_oracle(x, target, gamma)
    rows = torch.arange(n, device=DEVICE)
    kw = dict(DEFAULTS, focal_gamma=gamma)
    grad = torch.empty_like(x)
    loss, _ = fused(x, target, None, None, torch.ones(1, device=DEVICE), grad, **kw)
    check(loss, o_loss, 1e-5, 0, "fused loss")
    check(grad, o_grad, 1e-5, 1e-37, "fused grad")
    lse = torch.logsumexp(x.double(), 1)
    st = torch.stack([lse, torch.ones_like(lse), x.double()[rows, target], x.double().sum(1)], 1)
    _, _, rc = S.coefficients(st, target, None, num_classes=c, ignore_index=IGNORE, focal_gamma=gamma)
    out = torch.empty_like(x)
    _grad(x, target, None, lse.float(), rc.float(), out, class_start=0, logit_scale=1.0, softcap=None)
    check(out[rows, target], o_grad[rows, target], 1e-4, 0, "ce_grad true class")
    check(out, o_grad, 1e-4, 1e-37, "ce_grad")


def test_focal_gamma_below_one_at_p_one_exactly():
    x = torch.tensor([[0.0, -200.0, -200.0], [5.0, 5.0, 5.0]], device=DEVICE)
    target = torch.tensor([0, 1], device=DEVICE)
    grad = torch.empty_like(x)
    loss, _ = fused(x, target, None, None, torch.ones(1, device=DEVICE), grad,
                    **dict(DEFAULTS, focal_gamma=0.3))
    assert torch.isfinite(grad).all() and torch.isfinite(loss).all()
    assert loss[0].item() == 0.0 and (grad[0] == 0).all()


def test_extreme_logits_are_finite():
    """Large-magnitude rows (fp16 max, bf16 +-1e30) keep finite loss/lse/gradient."""
    for dtype, big in [(torch.float16, 65504.0), (torch.bfloat16, 1e30), (torch.float32, 1e30)]:
        x = torch.tensor([[big, -big, 0.0, 1.0], [-big, -big, -big, big]], dtype=dtype, device=DEVICE)
        target = torch.tensor([1, 3], device=DEVICE)
        grad = torch.empty_like(x)
        loss, lse = fused(x, target, None, None, torch.ones(1, device=DEVICE), grad, **DEFAULTS)
        o_loss, o_lse, o_grad = oracle(x, target, None, None, torch.ones(1, device=DEVICE), **DEFAULTS)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        check(lse, o_lse, 1e-6, 0, f"lse {dtype}")
        check(loss, o_loss, 1e-6, 0, f"loss {dtype}")
        check(grad, o_grad, 0, 0, f"grad {dtype}")


# ------------------------------------------------------------------------------------------------
# stats and grad kernels (class blocks)
# ------------------------------------------------------------------------------------------------

def _stats(*a, **k):
    return (tb.ce_stats if tb is not None else ce.stats)(*a, **k)


def _grad(*a, **k):
    return (tb.ce_grad if tb is not None else ce.grad)(*a, **k)


def stats64(x, target, weight, class_start, ignore_index, logit_scale, softcap):
    z = transform64(x, logit_scale, softcap)
    c = x.shape[1]
    m = z.amax(1) if c else torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    s = torch.exp(z - m[:, None]).sum(1) if c else torch.zeros_like(m)
    local = target - class_start
    here = (local >= 0) & (local < c) & (target != ignore_index)
    zy = z.gather(1, torch.where(here, local, 0)[:, None])[:, 0] if c else torch.zeros_like(m)
    w = torch.ones(c, dtype=torch.float64, device=x.device) if weight is None else weight.double()
    return torch.stack([m, s, torch.where(here, zy, torch.zeros_like(zy)), z @ w], 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted,softcap,ignore_index", [(False, None, IGNORE), (True, 5.0, 4100)])
def test_stats_blocks(dtype, weighted, softcap, ignore_index):
    n, c = 9, PRIME_ABOVE_BLOCK + 11
    x, target, _, weight, _, _ = make_case(n, c, dtype, dict(weight=weighted, ignore=True,
                                                              ignore_index=ignore_index), seed=2)
    target[1] = 2                   # first block
    target[2] = 4100                # second block (ignored with ignore_index=4100)
    target[3] = 4101
    target[4] = c - 1               # last class
    cuts = [0, 3, 3, 4100, c]       # includes an empty block
    blocks = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        w = None if weight is None else weight[lo:hi]
        st = _stats(x[:, lo:hi], target, w, class_start=lo, ignore_index=ignore_index, logit_scale=1.3,
                    softcap=softcap)
        assert st.shape == (n, 4) and st.dtype == torch.float32
        exp = stats64(x[:, lo:hi], target, w, lo, ignore_index, 1.3, softcap)
        check(st[:, 0], exp[:, 0], 1e-6, 1e-6, "max")
        check(st[:, 1], exp[:, 1], 1e-5, 1e-6, "sumexp")
        check(st[:, 2], exp[:, 2], 1e-6, 1e-6, "target_z")
        check(st[:, 3], exp[:, 3], 1e-5, 1e-3, "weighted_z")
        if rb is not None:
            r = rb.ce_stats(x[:, lo:hi], target, w, class_start=lo, ignore_index=ignore_index,
                            logit_scale=1.3, softcap=softcap)
            check(st, r, 1e-5, 1e-3, "stats vs reference")
        blocks.append(st)
    if S is not None:
        merged = S.merge_all(torch.stack(blocks))
        full = stats64(x, target, weight, 0, ignore_index, 1.3, softcap)
        check(S.lse_of(merged), torch.logsumexp(transform64(x, 1.3, softcap), 1), 2e-6, 2e-6, "merged lse")
        check(merged[:, 2], full[:, 2], 1e-6, 1e-6, "merged target_z")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["ce_everything", "focal0.5", "zloss"])
def test_grad_blocks_match_fused(dtype, name):
    """ce_grad over class blocks, from merged block statistics and celoss.stats.coefficients, equals
    the fused kernel's gradient and the reference ce_grad; also in place."""
    opts = OPTIONS[name]
    n, c = 6, PRIME_ABOVE_BLOCK
    x, target, _, weight, coef, kw = make_case(n, c, dtype, opts, seed=4)
    fused_grad = torch.empty_like(x)
    fused(x, target, None, weight, coef, fused_grad, **kw)
    cuts = [0, 2500, c]
    sl = lambda t, lo, hi: None if t is None else t[lo:hi]  # noqa: E731
    st = S.merge_all(torch.stack([
        _stats(x[:, lo:hi], target, sl(weight, lo, hi), class_start=lo, ignore_index=IGNORE,
               logit_scale=kw["logit_scale"], softcap=kw["softcap"]) for lo, hi in zip(cuts[:-1], cuts[1:])]))
    _, lse, rc = S.coefficients(st, target, weight, num_classes=c, ignore_index=IGNORE,
                                label_smoothing=kw["label_smoothing"], z_loss=kw["z_loss"],
                                focal_gamma=kw["focal_gamma"])
    rc = rc * coef[:, None] if coef.numel() > 1 else rc * coef
    out = torch.full_like(x, float("nan"))
    inplace = x.clone()
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        _grad(x[:, lo:hi], target, sl(weight, lo, hi), lse, rc, out[:, lo:hi], class_start=lo,
              logit_scale=kw["logit_scale"], softcap=kw["softcap"])
        _grad(inplace[:, lo:hi], target, sl(weight, lo, hi), lse, rc, inplace[:, lo:hi], class_start=lo,
              logit_scale=kw["logit_scale"], softcap=kw["softcap"])
        r = torch.empty_like(x[:, lo:hi])
        rb.ce_grad(x[:, lo:hi], target, sl(weight, lo, hi), lse, rc, r, class_start=lo,
                   logit_scale=kw["logit_scale"], softcap=kw["softcap"])
        check_grad(out[:, lo:hi], r.double(), dtype, "grad vs reference")
    assert torch.equal(inplace, out)
    check_grad(out, fused_grad.double(), dtype, "block grads vs fused")
    ignored = target == IGNORE
    assert (out[ignored] == 0).all()


# ------------------------------------------------------------------------------------------------
# launcher details
# ------------------------------------------------------------------------------------------------

def test_block_config_stays_in_the_compiled_set():
    for c in list(range(0, 70)) + [100, 255, 256, 257, 1000, 4095, 4096, 4097, 8193, 32000, 50257, 262144]:
        blk, nw = ce.block_config(c)
        assert (blk, nw) in ce.BLOCK_CONFIGS
        assert blk >= min(max(c, 1), ce.MAX_BLOCK) and blk <= max(ce.MIN_BLOCK, 2 * c)


def test_float64_goes_to_reference():
    x, target, _, weight, coef, kw = make_case(4, 10, torch.float64, dict(weight=True))
    g1, g2 = torch.empty_like(x), torch.empty_like(x)
    l1, s1 = tb.ce_fused(x, target, None, weight, coef, g1, **kw)
    l2, s2 = rb.ce_fused(x, target, None, weight, coef, g2, **kw)
    assert l1.dtype == torch.float64 and torch.equal(l1, l2) and torch.equal(g1, g2)


def test_rejects_unsupported_dtype():
    with pytest.raises(TypeError):
        ce.fused(torch.zeros(2, 3, dtype=torch.float64, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE),
                 None, None, None, None)


def test_out_of_range_target_gives_nan_not_an_out_of_bounds_read():
    """The host-side target check is skipped under CUDA-graph capture: the kernel must stay in bounds."""
    x = torch.randn(3, 37, device=DEVICE)
    y = torch.tensor([5, 37, -7], device=DEVICE)  # row 1 and 2 out of range
    grad = torch.empty_like(x)
    loss, _ = ce.fused(x, y, None, None, torch.ones(1, device=DEVICE), grad)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()


# ------------------------------------------------------------------------------------------------
# issue 12 B: split-vocabulary mode (several programs per row, merged statistics)
# ------------------------------------------------------------------------------------------------

SPLIT_CLASSES = 3 * ce.MAX_BLOCK + 5  # four blocks: four splits of one block, the last one ragged
INDEX_OPTIONS = [name for name, opts in OPTIONS.items() if not opts.get("soft")]


@pytest.fixture
def forced_splits(monkeypatch):
    """``forced_splits(k)`` forces k splits (the interpreter has no multiprocessors to count) and
    returns the list of split counts the launches used (a spy on the range-statistics launch)."""
    used = []
    plan = ce.stats_plan

    def spy(*args, **kwargs):
        out = plan(*args, **kwargs)
        used.append(out[1][1])  # the grid's splits
        return out

    def force(k):
        monkeypatch.setattr(ce, "FORCE_SPLITS", k)
        monkeypatch.setattr(ce, "stats_plan", spy)
        return used
    return force


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", INDEX_OPTIONS)
def test_issue12_split_vocabulary_matches_unsplit_and_oracle(name, dtype, forced_splits):
    """Every index-target option of ce_fused gives the same loss, lse and gradient with the vocabulary
    split over four programs per row as with one, and the float64 oracle's; the targets fall in
    different splits, including the ragged last one."""
    opts = OPTIONS[name]
    n, c = 4, SPLIT_CLASSES
    x, target, _, weight, coef, kw = make_case(n, c, dtype, opts, seed=12)
    target[1], target[2] = 5, c - 1  # first and last (ragged) split
    if opts.get("ignore"):
        target[0] = kw["ignore_index"]
    unsplit = torch.empty_like(x)
    u_loss, u_lse = fused(x, target, None, weight, coef, unsplit, **kw)
    used = forced_splits(4)
    grad = torch.full_like(x, float("nan"))  # every element must be written
    loss, lse = fused(x, target, None, weight, coef, grad, **kw)
    assert used == [4]
    o_loss, o_lse, o_grad = oracle(x, target, None, weight, coef, **kw)
    check(lse, o_lse, 2e-6, 2e-6, "lse")
    check(loss, o_loss, 2e-5, 2e-5, "loss")
    check_grad(grad, o_grad, dtype, "grad")
    check(lse, u_lse, 2e-6, 2e-6, "lse vs unsplit")
    check(loss, u_loss, 2e-5, 2e-5, "loss vs unsplit")
    check_grad(grad, unsplit.double(), dtype, "grad vs unsplit")
    ignored = target == kw["ignore_index"]
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()
    loss2, lse2 = fused(x, target, None, weight, coef, None, **kw)  # loss only
    assert torch.equal(loss2, loss) and torch.equal(lse2, lse)
    y = x.clone()
    fused(y, target, None, weight, coef, y, **kw)  # in place
    assert torch.equal(y, grad)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the garbage rows
def test_issue12_split_vocabulary_edge_rows(forced_splits):
    """Split path, rows the fused kernel treats specially: an ignored row with a NaN logit (NaN
    gradient, loss 0), a counted row with +inf (NaN loss and gradient whatever the upstream
    gradient), an out-of-range target (NaN loss, no out-of-bounds read), a zero upstream gradient."""
    n, c = 5, SPLIT_CLASSES
    x, target, _, weight, _, kw = make_case(n, c, torch.float32, dict(weight=True, label_smoothing=0.1), seed=3)
    coef = torch.tensor([1.0, 0.0, 1.5, 2.0, 0.5], device=DEVICE)
    target[0] = IGNORE
    x[0, 7000] = float("nan")
    x[1, 9000] = float("inf")
    target[2] = c + 3
    expected = [fused(x, target, None, weight, coef, torch.empty_like(x), **kw)]
    used = forced_splits(3)
    grad = torch.empty_like(x)
    loss, lse = fused(x, target, None, weight, coef, grad, **kw)
    assert used == [2]  # four blocks in three splits: two of two blocks
    assert loss[0] == 0 and torch.isnan(grad[0]).all()
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isnan(loss[2])
    o_loss, _, o_grad = oracle(x[3:], target[3:], None, weight, coef[3:], **kw)
    check(loss[3:], o_loss, 2e-5, 2e-5, "loss")
    check_grad(grad[3:], o_grad, torch.float32, "grad")
    e_loss, e_lse = expected[0]
    torch.testing.assert_close(loss, e_loss, equal_nan=True)
    torch.testing.assert_close(lse, e_lse, equal_nan=True)


def test_issue12_split_vocabulary_not_for_probability_targets(forced_splits):
    """Probability targets have no split statistics: they stay on one program per row, unchanged."""
    x, _, soft, weight, coef, kw = make_case(3, SPLIT_CLASSES, torch.float32, OPTIONS["soft_everything"], seed=1)
    g1, g2 = torch.empty_like(x), torch.empty_like(x)
    l1, s1 = fused(x, None, soft, weight, coef, g1, **kw)
    used = forced_splits(4)
    l2, s2 = fused(x, None, soft, weight, coef, g2, **kw)
    assert used == [] and torch.equal(l1, l2) and torch.equal(s1, s2) and torch.equal(g1, g2)


def test_issue12_split_count_rule(monkeypatch):
    """Split only when the rows leave multiprocessors idle, never into pieces below SPLIT_MIN_BLOCKS
    blocks, and never off CUDA (the interpreter) unless forced."""
    monkeypatch.setattr(ce, "_multiprocessors", lambda device: 132)
    cuda = torch.device("cuda", 0)
    per_split = ce.SPLIT_MIN_BLOCKS * ce.MAX_BLOCK
    assert ce.split_count(8, 128256, cuda) == 128256 // per_split  # capped by the split size
    assert ce.split_count(132, 262144, cuda) == 2  # 2 programs per SM
    assert ce.split_count(16384, 128256, cuda) == 1  # rows fill the device
    assert ce.split_count(8, 4096, cuda) == 1  # one block: nothing to split
    assert ce.split_count(1, 1 << 24, cuda) == ce.MAX_SPLITS.value  # what the fused kernel merges
    assert ce.split_count(8, 128256, torch.device("cpu")) == 1
    monkeypatch.setattr(ce, "FORCE_SPLITS", 3)
    assert ce.split_count(16384, 128256, torch.device("cpu")) == 3
    assert ce.split_span(SPLIT_CLASSES, 4, ce.MAX_BLOCK) == (ce.MAX_BLOCK, 4)
    for c, k in [(1, 4), (4096, 2), (4097, 2), (4097, 7), (SPLIT_CLASSES, 3), (10 * 4096, 3)]:
        block = ce.block_config(c)[0]
        span, count = ce.split_span(c, k, block)
        assert span % block == 0 and 1 <= count <= k and (count - 1) * span < c <= count * span


def test_issue12_split_stats_merge_to_the_row(forced_splits):
    """ce_stats with splits: (K, N, 4) range statistics that merge to the whole row's."""
    n, c = 3, SPLIT_CLASSES
    x, target, _, weight, _, _ = make_case(n, c, torch.bfloat16, dict(weight=True), seed=8)
    target[0] = 4096  # first column of the second split
    parts = ce.stats(x, target, weight, ignore_index=IGNORE, logit_scale=1.0, softcap=None, splits=4)
    assert parts.shape == (4, n, 4)
    assert ((parts[:, :, 2] != 0).sum(0) == 1).all()  # each target counted by one split
    full = stats64(x, target, weight, 0, IGNORE, 1.0, None)
    merged = S.merge_all(parts)
    check(S.lse_of(merged), torch.logsumexp(x.double(), 1), 2e-6, 2e-6, "merged lse")
    check(merged[:, 2], full[:, 2], 1e-6, 1e-6, "target_z")
    check(merged[:, 3], full[:, 3], 1e-5, 1e-3, "weighted_z")


@pytest.mark.parametrize("gamma", [None, 2.0])
def test_issue12_split_true_class_gradient_as_p_goes_to_one(gamma, forced_splits):
    """The split statistics leave the target out of (max, sumexp) like the fused kernel's pass 1, so
    1 - p_y keeps float32 relative accuracy as p_y -> 1 in split mode too (targets in every split)."""
    n, c = 4, SPLIT_CLASSES
    g = torch.Generator().manual_seed(13)
    x = torch.randn(n, c, generator=g)
    target = torch.tensor([3, 4100, 8300, c - 2])
    x[torch.arange(n), target] += torch.tensor([14.0, 20.0, 30.0, 60.0])
    x, target = x.to(DEVICE), target.to(DEVICE)
    used = forced_splits(4)
    grad = torch.empty_like(x)
    loss, _ = fused(x, target, None, None, torch.ones(1, device=DEVICE), grad, **dict(DEFAULTS, focal_gamma=gamma))
    assert used == [4]
    o_loss, o_grad = near_one_oracle(x, target, gamma)
    rows = torch.arange(n, device=DEVICE)
    check(grad[rows, target], o_grad[rows, target], 1e-5, 1e-37, "true-class gradient")
    check(grad, o_grad, 1e-5, 1e-37, "gradient")
    check(loss, o_loss, 1e-5, 1e-37, "loss")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_issue12_split_vocabulary_through_cross_entropy(reduction, forced_splits):
    """celoss.cross_entropy on the triton backend in split mode, backward with a non-trivial upstream
    gradient (a scalar for the mean, one per row for 'none'), against float64 PyTorch."""
    import celoss

    n, c = 3, SPLIT_CLASSES
    x, target, _, weight, _, _ = make_case(n, c, torch.bfloat16, dict(weight=True, ignore=True), seed=21)
    used = forced_splits(4)
    xs = x.clone().requires_grad_()
    loss = celoss.cross_entropy(xs, target, weight, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                                backend="triton")
    per_row = torch.rand(n, generator=torch.Generator().manual_seed(2)).to(DEVICE) + 0.5
    up = torch.tensor(0.37, device=DEVICE) if reduction == "mean" else per_row
    loss.backward(up)
    assert used  # the forward and/or the backward's recompute ran split
    x64 = x.double().requires_grad_()
    w64 = weight.double()
    ref = F.cross_entropy(x64, target, w64, reduction=reduction, label_smoothing=0.1)
    lse = torch.logsumexp(x64, 1)
    counted = target != IGNORE
    w_y = torch.where(counted, w64[target.clamp(min=0)], torch.zeros_like(lse))
    z = 1e-3 * w_y * lse * lse
    ref = ref + (z.sum() / w_y.sum() if reduction == "mean" else z)
    ref.backward(up.double())
    check(loss, ref, 2.0 ** -8, 0, "loss")  # returned in the input's dtype (bf16)
    if reduction == "none":  # recomputed in backward with the upstream gradient as the kernel's coef
        check_grad(xs.grad, x64.grad, torch.bfloat16, "grad")
    else:  # formed in forward for an upstream gradient of 1, then rescaled: two bf16 roundings
        check(xs.grad, x64.grad, 2.0 ** -6, 1e-6, "grad")
