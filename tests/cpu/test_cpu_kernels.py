"""The OpenMP/Cython row kernels (celoss.backends.cython) against the reference backend and a
float64 PyTorch oracle (F.cross_entropy / log_softmax on the transformed logits, autograd)."""
import contextlib
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

# A CELOSS_NO_EXT=1 build has no compiled kernels: skip this module instead of failing collection.
cy = pytest.importorskip("celoss.backends.cython", reason="the compiled CPU extension is missing")

import celoss  # noqa: E402
from celoss import stats as S  # noqa: E402
from celoss.backends import reference as ref  # noqa: E402
from conftest import against_oracle  # noqa: E402

LOWP = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # unit roundoff of the stored gradient
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BASE = dict(ignore_index=-100, label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0,
            focal_gamma=None)
OPTIONS = {
    "plain": {},
    "smooth": dict(label_smoothing=0.1),
    "scale_softcap": dict(logit_scale=0.7, softcap=5.0),
    "zloss": dict(z_loss=1e-3),
    "all": dict(label_smoothing=0.05, logit_scale=1.3, softcap=8.0, z_loss=1e-2, ignore_index=1),
    "focal2": dict(focal_gamma=2.0),
}


def opts(**kw):
    return {**BASE, **kw}


def transform64(x, logit_scale, softcap):
    z = x.double() * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def oracle(x, target, soft, weight, coef, *, ignore_index, label_smoothing, logit_scale, softcap,
           z_loss, focal_gamma):
    """float64 (loss, lse, coef * dloss/dx) with PyTorch's own ops and autograd."""
    x64 = x.detach().double().requires_grad_(True)
    z = transform64(x64, logit_scale, softcap)
    w = None if weight is None else weight.double()
    lse = torch.logsumexp(z, 1)
    logp = torch.log_softmax(z, 1)
    if soft is not None:
        loss = F.cross_entropy(z, soft.double(), weight=w, reduction="none",
                               label_smoothing=label_smoothing) + z_loss * lse**2
    else:
        counted = target != ignore_index
        safe = torch.where(counted, target, 0)
        wy = torch.ones_like(lse) if w is None else w[safe]
        if focal_gamma is not None:
            lp = logp.gather(1, safe[:, None])[:, 0]
            loss = torch.where(counted, -wy * (-torch.expm1(lp)) ** focal_gamma * lp, 0.0)
        else:
            loss = F.cross_entropy(z, target, weight=w, ignore_index=ignore_index, reduction="none",
                                   label_smoothing=label_smoothing)
            loss = loss + torch.where(counted, z_loss * wy * lse**2, 0.0)
    c = coef.double() if coef.numel() > 1 else coef.double().expand(len(loss))
    (g,) = torch.autograd.grad((loss * c).sum(), x64)
    return loss.detach(), lse.detach(), g


def focal_grad64(x, target, alpha, gamma, coef):
    """Closed-form focal gradient in float64, finite as p_y -> 1 (autograd of (1-p)^gamma isn't)."""
    logp = torch.log_softmax(x.double(), 1)
    lp = logp.gather(1, target[:, None])[:, 0]
    q = -torch.expm1(lp)
    ratio = torch.where(q > 0, lp / q.clamp_min(1e-300), -1.0)
    a = torch.ones_like(lp) if alpha is None else alpha.double()[target]
    g = a * q**gamma * (1 - gamma * lp.exp() * ratio)
    return (logp.exp() - F.one_hot(target, x.shape[1]).double()) * (g * coef.double())[:, None]


def run_fused(x, target=None, soft=None, weight=None, coef=None, grad=True, **kw):
    coef = torch.tensor([0.75]) if coef is None else coef
    g = torch.empty_like(x) if grad else None
    loss, lse = cy.ce_fused(x, target, soft, weight, coef, g, **opts(**kw))
    return loss, lse, g, coef


def check_close(dtype, ours, want, rtol_lowp=None, scale=1.0):
    """fp32: ~1e-5 relative to the oracle, fp64: ~1e-12; fp16/bf16 gradients: their rounding."""
    ours, want = ours.double(), want.double()
    if dtype in LOWP and rtol_lowp is not None:
        err = (ours - want).abs()
        bound = rtol_lowp * want.abs() + 1e-6 * scale + 1e-7
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(ours))
        assert (err[finite] <= bound[finite]).all(), (err - bound).max()
        return
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(ours, want, rtol=tol * 5, atol=tol * scale, equal_nan=True)


def make_case(n, c, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=gen, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, c, (n,), generator=gen)
    w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    return x, y, w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [1, 3, 1000, 4099, 2**17 + 1])
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_fused_index_targets(dtype, c, name, weighted):
    kw = OPTIONS[name]
    n = 3 if c > 5000 else 9
    x, y, w = make_case(n, c, dtype, seed=c)
    y[2 % n] = kw.get("ignore_index", -100)
    weight = w.to(torch.float64 if dtype == torch.float64 else torch.float32) if weighted else None
    coef = torch.linspace(0.5, 2.0, n)
    loss, lse, g, _ = run_fused(x, y, None, weight, coef, **kw)
    want_loss, want_lse, want_g = oracle(x, y, None, weight, coef, **opts(**kw))
    check_close(dtype, loss, want_loss, scale=1 + want_loss.abs().max().item())
    check_close(dtype, lse, want_lse, scale=1 + want_lse.abs().max().item())
    check_close(dtype, g, want_g, rtol_lowp=LOWP.get(dtype))
    assert g[2 % n].eq(0).all() and loss[2 % n] == 0  # ignored row
    # the reference backend computes the same (in the accumulation dtype)
    g_ref = torch.empty_like(x)
    r_loss, r_lse = ref.ce_fused(x, y, None, weight, coef, g_ref, **opts(**kw))
    check_close(dtype, loss, r_loss, scale=1 + r_loss.abs().max().item())
    # no gradient requested: the same loss and lse (up to summation order)
    loss2, lse2, _, _ = run_fused(x, y, None, weight, coef, grad=False, **kw)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse2, lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [1, 3, 1000, 4099])
@pytest.mark.parametrize("kw", [{}, dict(label_smoothing=0.2, z_loss=1e-2),
                                dict(softcap=4.0, logit_scale=2.0)],
                         ids=["plain", "smooth_zloss", "softcap"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_fused_soft_targets(dtype, c, kw, weighted):
    x, _, w = make_case(6, c, dtype, seed=c + 1)
    gen = torch.Generator().manual_seed(c)
    t = torch.softmax(torch.randn(6, c, generator=gen, dtype=torch.float64) * 2, 1)
    t[0] = 0
    t[0, c // 2] = 1  # one-hot row, exact zeros elsewhere
    t = t.to(dtype)
    weight = w.to(torch.float64 if dtype == torch.float64 else torch.float32) if weighted else None
    loss, lse, g, coef = run_fused(x, None, t, weight, **kw)
    want_loss, want_lse, want_g = oracle(x, None, t, weight, coef, **opts(**kw))
    check_close(dtype, loss, want_loss, scale=1 + want_loss.abs().max().item())
    check_close(dtype, lse, want_lse, scale=1 + want_lse.abs().max().item())
    check_close(dtype, g, want_g, rtol_lowp=LOWP.get(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("c", [3, 1000])
def test_focal(dtype, gamma, c):
    x, y, w = make_case(8, c, dtype, seed=7)
    # rows where p_y -> 1: rounds to 1 in fp32 (and nearly in fp64)
    for row, margin in [(0, 20.0), (1, 40.0), (2, 200.0)]:
        x[row] = 0
        x[row, y[row]] = margin
    alpha = w.to(torch.float64 if dtype == torch.float64 else torch.float32)
    coef = torch.full((8,), 0.5)
    loss, lse, g, _ = run_fused(x, y, None, alpha, coef, focal_gamma=gamma)
    want_loss, want_lse, _ = oracle(x, y, None, alpha, coef, **opts(focal_gamma=gamma))
    want_g = focal_grad64(x, y, alpha, gamma, coef)
    assert torch.isfinite(loss).all() and torch.isfinite(g.double()).all()
    check_close(dtype, loss, want_loss, scale=1 + want_loss.abs().max().item())
    check_close(dtype, g, want_g, rtol_lowp=LOWP.get(dtype))
    # the closed form agrees with autograd where autograd is finite
    _, _, auto_g = oracle(x[3:], y[3:], None, alpha, coef[3:], **opts(focal_gamma=gamma))
    torch.testing.assert_close(focal_grad64(x[3:], y[3:], alpha, gamma, coef[3:]), auto_g)


def test_nan_inf_rows():
    c = 50
    x, y, _ = make_case(8, c, torch.float32, seed=3)
    y[:] = 5
    x[0, 7] = math.nan                  # NaN -> NaN loss and gradient
    x[1, 9] = math.inf                  # +inf -> NaN, like log_softmax
    x[2, 10:20] = -math.inf             # -inf elsewhere: probability 0, finite
    x[3, 5] = -math.inf                 # -inf at the target: infinite loss, finite gradient
    x[4] = -math.inf                    # all -inf: NaN
    x[5, 3] = math.nan                  # NaN but ignored: loss 0, gradient NaN (log_softmax's)
    y[5] = -100
    y[7] = -100                         # ignored, finite: loss 0, gradient 0
    loss, lse, g, coef = run_fused(x, y)
    want_loss, want_lse, want_g = oracle(x, y, None, None, coef, **BASE)
    close = dict(equal_nan=True, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), want_loss, **close)
    torch.testing.assert_close(g.double(), want_g, **close)
    assert torch.isnan(loss[[0, 1, 4]]).all() and torch.isnan(g[[0, 1, 4, 5]]).all()
    assert loss[3] == math.inf and torch.isfinite(g[2:4]).all() and (g[2, 10:20] == 0).all()
    assert loss[5] == 0 and torch.isnan(lse[5]) and loss[7] == 0 and (g[7] == 0).all()
    # in place gives the same
    xi = x.clone()
    loss_i, _ = cy.ce_fused(xi, y, None, None, coef, xi, **BASE)
    assert torch.equal(xi.isnan(), g.isnan()) and torch.equal(xi.nan_to_num(), g.nan_to_num())
    # with a softcap, +inf logits are finite (tanh(inf) = 1)
    xs = torch.zeros(2, c)
    xs[0, 1] = math.inf
    xs[1, :] = -math.inf
    loss_s, _, g_s, coef = run_fused(xs, torch.tensor([1, 2]), softcap=3.0)
    want_loss, _, want_g = oracle(xs, torch.tensor([1, 2]), None, None, coef, **opts(softcap=3.0))
    torch.testing.assert_close(loss_s.double(), want_loss)
    torch.testing.assert_close(g_s[1].double(), want_g[1])  # (autograd of tanh at inf is NaN)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows_and_in_place(dtype):
    n, c = 7, 1001
    x, y, w = make_case(n, c, dtype, seed=11)
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    weight = w.to(torch.float64 if dtype == torch.float64 else torch.float32)
    base_loss, base_lse, base_g, coef = run_fused(x, y, None, weight, **kw)
    # rows with a stride of their own (a column slice of a wider buffer): used without a copy
    wide = torch.full((n, c + 13), 1e4, dtype=dtype)
    wide[:, 5:5 + c] = x
    xs = wide[:, 5:5 + c]
    gwide = torch.zeros(n, c + 9, dtype=dtype)
    loss, lse = cy.ce_fused(xs, y, None, weight, coef, gwide[:, 2:2 + c], **opts(**kw))
    assert torch.equal(loss, base_loss) and torch.equal(lse, base_lse)
    assert torch.equal(gwide[:, 2:2 + c], base_g)
    assert (gwide[:, :2] == 0).all() and (gwide[:, 2 + c:] == 0).all()  # nothing written outside
    # a column stride != 1 (transposed storage) and a gradient buffer with one
    xt = x.t().contiguous().t()
    gt = torch.empty(c, n, dtype=dtype).t()
    loss, lse = cy.ce_fused(xt, y, None, weight, coef, gt, **opts(**kw))
    assert torch.equal(loss, base_loss) and torch.equal(gt, base_g)
    # in place (grad_out is logits): identical to the separate buffer
    xi = x.clone()
    loss, lse = cy.ce_fused(xi, y, None, weight, coef, xi, **opts(**kw))
    assert torch.equal(loss, base_loss) and torch.equal(xi, base_g)
    # in place on strided rows and on soft targets
    wide2 = wide.clone()
    cy.ce_fused(wide2[:, 5:5 + c], y, None, weight, coef, wide2[:, 5:5 + c], **opts(**kw))
    assert torch.equal(wide2[:, 5:5 + c], base_g) and (wide2[:, :5] == 1e4).all()
    t = torch.softmax(x.double(), 1).to(dtype)
    _, _, g_soft, _ = run_fused(x, None, t, weight, coef, **kw)
    xi = x.clone()
    cy.ce_fused(xi, None, t, weight, coef, xi, **opts(**kw))
    assert torch.equal(xi, g_soft)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_longer_than_the_chunk_table(dtype):
    """C > 1024 chunks of 1024: longer chunks, widened in pieces (fp16/bf16)."""
    x, y, w = make_case(2, 1_100_003, dtype, seed=13)
    x[1, 5] = 40.0  # a maximum in one chunk only
    for kw in [{}, dict(label_smoothing=0.1, z_loss=1e-3)]:
        loss, lse, g, coef = run_fused(x, y, None, w.float(), **kw)
        want_loss, want_lse, want_g = oracle(x, y, None, w.float(), coef, **opts(**kw))
        check_close(dtype, loss, want_loss, scale=1 + want_loss.abs().max().item())
        check_close(dtype, lse, want_lse, scale=1 + want_lse.abs().max().item())
        check_close(dtype, g, want_g, rtol_lowp=LOWP.get(dtype))
        st = cy.ce_stats(x, y, w.float(), class_start=0, ignore_index=-100, logit_scale=1.0,
                         softcap=None)
        check_close(dtype, S.lse_of(st), want_lse, scale=20.0)


def test_threads_do_not_change_results():
    x, y, w = make_case(33, 3000, torch.float32, seed=5)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_fused(x, y, None, w.float(), label_smoothing=0.1)
        torch.set_num_threads(2)
        two = run_fused(x, y, None, w.float(), label_smoothing=0.1)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [1000, -1, -101, 2**40])
def test_out_of_range_target_raises_before_writing(bad):
    x, y, _ = make_case(64, 1000, torch.float32, seed=2)
    y[37] = bad
    y[50] = 1000 + 1  # a later bad value: the first one is named
    xi = x.clone()
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        cy.ce_fused(xi, y, None, None, torch.ones(1), xi, **BASE)
    assert torch.equal(xi, x)  # checked before any row was touched, even in place
    with pytest.raises(IndexError, match=f"Target {bad} "):
        cy.ce_fused(x, y, None, None, torch.ones(1), None, **BASE)
    y[37] = y[50] = -100  # ignore_index is fine
    cy.ce_fused(x, y, None, None, torch.ones(1), None, **BASE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(logit_scale=0.5, softcap=6.0)],
                         ids=["plain", "softcap"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_stats_and_grad_blocks(dtype, kw, weighted):
    n, c = 10, 4099
    x, y, w = make_case(n, c, dtype, seed=21)
    y[3] = -100
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = w.to(acc) if weighted else None
    kw = {**dict(logit_scale=1.0, softcap=None), **kw}
    blocks = [(0, 1000), (1000, 1), (1001, 3098)]
    parts = []
    for start, size in blocks:
        xb, wb = x[:, start:start + size], None if weight is None else weight[start:start + size]
        st = cy.ce_stats(xb, y, wb, class_start=start, ignore_index=-100, **kw)
        want = ref.ce_stats(xb, y, wb, class_start=start, ignore_index=-100, **kw)
        check_close(dtype, st, want, scale=100.0)
        parts.append(st)
    merged = S.merge_all(torch.stack(parts))
    z = transform64(x, kw["logit_scale"], kw["softcap"])
    check_close(dtype, S.lse_of(merged), torch.logsumexp(z, 1), scale=10.0)
    loss, lse, rc = S.coefficients(merged, y, weight, num_classes=c, ignore_index=-100,
                                   label_smoothing=0.1, z_loss=1e-3)
    want_loss, _, want_g = oracle(x, y, None, weight, torch.ones(1),
                                  **opts(label_smoothing=0.1, z_loss=1e-3, **kw))
    check_close(dtype, loss, want_loss, scale=10.0)
    for start, size in blocks:
        xb, wb = x[:, start:start + size], None if weight is None else weight[start:start + size]
        g = torch.empty_like(xb)
        cy.ce_grad(xb, y, wb, lse, rc, g, class_start=start, **kw)
        check_close(dtype, g, want_g[:, start:start + size], rtol_lowp=LOWP.get(dtype))
        g_ref = torch.empty_like(xb)
        ref.ce_grad(xb, y, wb, lse, rc, g_ref, class_start=start, **kw)
        check_close(dtype, g, g_ref, rtol_lowp=None if dtype not in LOWP else 2 * LOWP[dtype])
        xi = xb.clone()  # in place
        cy.ce_grad(xi, y, wb, lse, rc, xi, class_start=start, **kw)
        assert torch.equal(xi, g)


def test_stats_grad_special_values():
    x, y, _ = make_case(6, 40, torch.float32, seed=4)
    x[0, 3] = math.nan
    x[1, 4] = math.inf
    x[2] = -math.inf
    x[3, :5] = -math.inf
    x[4, 1], x[4, 2] = math.inf, -math.inf
    st = cy.ce_stats(x, y, None, class_start=0, ignore_index=-100, logit_scale=1.0, softcap=None)
    want = ref.ce_stats(x, y, None, class_start=0, ignore_index=-100, logit_scale=1.0, softcap=None)
    torch.testing.assert_close(st, want, equal_nan=True)
    lse = torch.tensor([math.nan, 1.0, 2.0, 3.0, math.inf, 4.0])
    rc = torch.rand(6, 3)
    g = torch.empty_like(x)
    cy.ce_grad(x, y, None, lse, rc, g, class_start=0, logit_scale=1.0, softcap=None)
    assert torch.isnan(g[[0, 4]]).all() and torch.isfinite(g[5]).all()


def test_n_times_c_above_int32():
    """N x C > 2^31 (bf16, 4.3 GB): row offsets must be 64-bit. Mostly zero rows (loss log C,
    gradient 1/C - [j == y]), a few random rows checked against float64, the last included."""
    n, c = 16385, 131072
    assert n * c > 2**31
    x = torch.empty(n, c, dtype=torch.bfloat16)
    x.zero_()
    gen = torch.Generator().manual_seed(0)
    rows = [0, 1, 8192, 16383, n - 1]
    x[rows] = (torch.randn(len(rows), c, generator=gen) * 2).to(torch.bfloat16)
    y = torch.randint(0, c, (n,), generator=gen)
    y[n - 3] = c - 1
    saved = x[rows].clone()
    loss, lse = cy.ce_fused(x, y, None, None, torch.ones(1), x, **BASE)  # gradient in place
    want_loss, want_lse, want_g = oracle(saved, y[rows], None, None, torch.ones(1), **BASE)
    torch.testing.assert_close(loss[rows].double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[rows].double(), want_lse, rtol=1e-5, atol=1e-5)
    check_close(torch.bfloat16, x[rows], want_g, rtol_lowp=LOWP[torch.bfloat16])
    zero = torch.ones(n, dtype=torch.bool)
    zero[rows] = False
    log_c = torch.full((n - len(rows),), math.log(c))
    torch.testing.assert_close(loss[zero], log_c, rtol=1e-6, atol=1e-5)
    uniform = torch.tensor(1.0 / c).to(torch.bfloat16)
    assert (x[n - 3, :-1] == uniform).all()
    assert x[n - 3, -1] == (uniform.float() - 1).to(torch.bfloat16)


def test_issue12_d1_cpu_tests_skip_without_the_extension(tmp_path):
    """A CELOSS_NO_EXT=1 install: pytest on tests/cpu reports skips, not a collection error."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['celoss.cpu._kernels'] = None\n")
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/cpu"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 5), out.stdout + out.stderr  # 5: every module skipped, none ran
    assert "skipped" in out.stdout and "compiled CPU extension is missing" in out.stdout, out.stdout
    assert "error" not in out.stdout.lower(), out.stdout


def test_missing_extension_raises_import_error():
    code = ("import sys; sys.modules['celoss.cpu._kernels'] = None\n"
            "try:\n    import celoss.backends.cython\n"
            "except ImportError as e:\n    print('ImportError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ImportError" in out.stdout and "_kernels" in out.stdout, (out.stdout, out.stderr)


# ---- Issue 11 items 5 and 6 through the public API: celoss.cross_entropy(..., backend="cython") ----
def _lse64(z):
    """torch.logsumexp's value and NaN/inf rules, with the gradient softmax(z) even where
    log(sum exp(z - max)) is below the lse's ulp: logsumexp's own backward, exp(z - lse), is then
    up to C times too large (a row of -1e30 in float64)."""
    m = z.detach().amax(1, keepdim=True)
    m = torch.where(m.isfinite(), m, 0.0)
    return m[:, 0] + torch.log(torch.exp(z - m).sum(1))


def _composition64(x, y, *, reduction, weight=None, label_smoothing=0.0, logit_scale=1.0,
                   softcap=None, z_loss=0.0):
    """PyTorch's own composition in float64: F.cross_entropy of the transformed logits plus
    z_loss * w_y * lse**2 per counted row (celoss.cross_entropy's definition of the z-loss)."""
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(z, y, weight=weight, reduction="none", label_smoothing=label_smoothing)
    counted = y != -100
    w_y = torch.where(counted, 1.0 if weight is None else weight[y.clamp_min(0)], 0.0).to(z.dtype)
    if z_loss:
        rows = rows + torch.where(counted, z_loss * w_y * _lse64(z) ** 2, 0.0)
    return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / w_y.sum()}[reduction]


def assert_pytorch_pattern(ours, want64, rtol=1e-5, atol=1e-5):
    """The float64 result rounded to ours' dtype has ours' NaN and +-inf in the same places (an
    overflow of that dtype is part of the pattern); finite values are close to the float64 ones."""
    want = want64.to(ours.dtype).double()
    ours = ours.detach().double()
    assert torch.equal(ours.isnan(), want.isnan()), (ours, want64)
    inf = want.isinf()
    assert torch.equal(ours.isinf(), inf) and torch.equal(ours[inf], want[inf]), (ours, want64)
    finite = want.isfinite()
    torch.testing.assert_close(ours[finite], want64[finite], rtol=rtol, atol=atol)


def check_against_composition(backend, x, y, reduction, tol=None, loss_tol=None, **kw):
    """Loss and gradient (random upstream gradient) against _composition64; tol: the gradient's
    (rtol, atol), loss_tol: the loss's (both 1e-5 by default)."""
    kw64 = {**kw, "weight": None if kw.get("weight") is None else kw["weight"].double()}
    loss, want, g, want_g = against_oracle(
        lambda v: celoss.cross_entropy(v, y, reduction=reduction, backend=backend, **kw),
        lambda v: _composition64(v, y, reduction=reduction, **kw64), x)
    assert_pytorch_pattern(loss, want, *(loss_tol or tol or (1e-5, 1e-5)))
    assert_pytorch_pattern(g, want_g, *(tol or (1e-5, 1e-5)))


SCALED_DTYPES = {torch.float32: 1e10, torch.float64: 1e30, torch.bfloat16: 1e10, torch.float16: 3e4}


@pytest.mark.parametrize("dtype", list(SCALED_DTYPES), ids=str)
@pytest.mark.parametrize("scale", [0.7, 1.0, 1.1])  # 1.0: the CE_UNIT loops (no product to guard)
@pytest.mark.parametrize("kw", [{}, dict(z_loss=1e-3), dict(softcap="big")], ids=["plain", "zloss", "softcap"])
def test_issue11_scaled_huge_logits_are_finite(dtype, scale, kw):
    """Item 5: |scale x| far beyond 2^31 gave NaN: the FMA-contracted z_j - max was the exact product
    minus the rounded max, up to ulp(z)/2 > 88 above it, and exp overflowed."""
    v = SCALED_DTYPES[dtype]
    kw = {**kw, "softcap": v / 3} if kw.get("softcap") else kw
    x = torch.tensor([[0.0, v], [v, 0.0], [v, v], [-v, v], [v, 0.999 * v], [-v, -v]], dtype=dtype)
    x = torch.cat([x, (torch.randn(4, 2, generator=torch.Generator().manual_seed(0)) * v).to(dtype)])
    y = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1, 1, 0])
    eps = torch.finfo(dtype).eps
    # p is 0, 1/2 or 1: the gradient is exact up to rounding; the loss, a difference of z values
    # (and lse**2), is exact up to a few ulp of z, as PyTorch's own in that dtype
    for reduction in ("none", "sum"):
        check_against_composition("cython", x, y, reduction, tol=(4 * eps, 4 * eps),
                                  loss_tol=(8 * eps, 8 * eps * scale * v), logit_scale=scale, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", [dict(logit_scale=0.7), dict(logit_scale=1.0),
                                dict(logit_scale=1.1, softcap=1e9)], ids=["scale", "unit", "softcap"])
def test_issue11_scaled_huge_logits_stats_and_grad_kernels(dtype, kw):
    """Item 5 on the kernels of linear CE and celoss.distributed: ce_stats (checked against the
    reference backend) and ce_grad, through linear_cross_entropy with a gradient through the lse."""
    v = 1e5 if dtype != torch.float64 else 1e15  # logits h W^T up to 1e10 (1e30)
    h = torch.tensor([[v, 0.0], [0.0, v], [v, v]], dtype=dtype)
    w = torch.tensor([[v, 0.0], [0.0, 1.0], [1.0, 2 * v]], dtype=dtype)  # no ties after rounding
    y = torch.tensor([1, 0, 2])

    def ours(h, w):
        out = celoss.linear_cross_entropy(h, w, y, reduction="sum", return_lse=True, backend="cython", **kw)
        return out.loss + 0.5 * out.lse.sum()

    def oracle(h, w):
        z = F.linear(h, w) * kw["logit_scale"]
        z = z if kw.get("softcap") is None else kw["softcap"] * torch.tanh(z / kw["softcap"])
        return F.cross_entropy(z, y, reduction="sum") + 0.5 * torch.logsumexp(z, 1).sum()

    loss, want, (gh, gw), (want_gh, want_gw) = against_oracle(ours, oracle, h, w)
    tol = dict(rtol=torch.finfo(dtype).eps * 8, atol=torch.finfo(dtype).eps * 8 * v)
    for a, b in [(loss, want), (gh, want_gh), (gw, want_gw)]:
        assert_pytorch_pattern(a, b, **tol)
    logits = F.linear(h.double(), w.double()).to(dtype)
    st = cy.ce_stats(logits, y, None, class_start=0, ignore_index=-100, **{"softcap": None, **kw})
    want_st = ref.ce_stats(logits, y, None, class_start=0, ignore_index=-100, **{"softcap": None, **kw})
    torch.testing.assert_close(st, want_st, rtol=1e-6 if dtype == torch.float64 else 1e-5, atol=0)


# Item 6: non-finite and huge values in one element (another class or the target) or a whole row,
# injected into a counted row (1) and an ignored row (3): PyTorch's NaN/inf pattern in the loss and
# the gradient (PyTorch's log_softmax backward makes an ignored row's gradient NaN as well).
INJECTIONS = [(math.nan, "other"), (math.nan, "row"), (math.inf, "other"), (math.inf, "target"),
              (math.inf, "row"), (-math.inf, "other"), (-math.inf, "target"), (-math.inf, "row"),
              (1e30, "other"), (1e30, "target"), (-1e30, "row")]
PATTERN_OPTIONS = {
    "plain": {}, "weight": dict(weight=True), "smooth": dict(label_smoothing=0.1),
    "weight_smooth": dict(weight=True, label_smoothing=0.1), "zloss": dict(z_loss=1e-3),
    "weight_zloss": dict(weight=True, z_loss=1e-3), "softcap": dict(softcap=5.0),
    "scale": dict(logit_scale=0.7),
    "all": dict(weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=20.0, logit_scale=1.3),
}


def nonfinite_case(value, where, c=9):
    x, y, w = make_case(5, c, torch.float32, seed=31)
    y[3] = -100
    for row in (1, 3):
        if where == "row":
            x[row] = value
        else:
            x[row, (y[1] + (where == "other")) % c] = value
    return x, y, w.float()


@pytest.mark.parametrize("backend", ["cython"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("name", list(PATTERN_OPTIONS))
@pytest.mark.parametrize("value,where", INJECTIONS, ids=[f"{v}-{p}" for v, p in INJECTIONS])
def test_issue11_nonfinite_logits_pattern_as_pytorch(backend, value, where, name, reduction):
    x, y, w = nonfinite_case(value, where)
    kw = dict(PATTERN_OPTIONS[name])
    if kw.pop("weight", False):
        kw["weight"] = w
    check_against_composition(backend, x, y, reduction, **kw)


@pytest.mark.parametrize("backend", ["cython"])
def test_issue11_zloss_with_inf_logit_is_nan_like_pytorch(backend):
    """Item 6: +inf logit with z_loss. PyTorch's composition F.cross_entropy + z * lse**2 is
    NaN + inf = NaN (the torch backend used to return +inf)."""
    x = torch.tensor([[0.0, math.inf, 1.0], [0.0, 1.0, 2.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    loss = celoss.cross_entropy(x, y, z_loss=1e-3, reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
    assert torch.isnan(x.grad[0]).all() and torch.isfinite(x.grad[1]).all()
    check_against_composition(backend, x.detach(), y, "none", z_loss=1e-3)


# ---- issue 16: bf16 stores with vcvtneps2bf16 (AVX512-BF16) and with the portable rounding ----
def _bf16_modules():
    from celoss.cpu import _family, _kernels
    return _kernels, _family


@contextlib.contextmanager
def bf16_stores(hw):
    """Both extension modules (each has its own switch) store bf16 with the instruction (hw) or
    the portable loop; skips when hw is asked for and the CPU lacks AVX512-BF16."""
    mods = _bf16_modules()
    before = [m.use_avx512bf16() for m in mods]
    try:
        used = [m.use_avx512bf16(hw) for m in mods]
        if hw and not all(used):
            pytest.skip("this CPU has no AVX512-BF16")
        assert not any(used) if not hw else all(used)
        yield
    finally:
        for m, b in zip(mods, before):
            m.use_avx512bf16(b)


def _round_bf16(x32, hw):
    out = torch.empty(x32.shape, dtype=torch.bfloat16)
    with bf16_stores(hw):
        _bf16_modules()[0].to_bf16(x32.data_ptr(), out.data_ptr(), x32.numel())
    return out


@pytest.mark.parametrize("hw", [False, True], ids=["portable", "avx512bf16"])
def test_issue16_bf16_store_rounds_like_torch(hw):
    """Round to nearest even (ties both ways, carries into the exponent, overflow to inf) as
    torch's own float32 -> bfloat16; NaN stays NaN. The instruction takes subnormal inputs as zero
    of the same sign (an absolute difference below 2^-126)."""
    gen = torch.Generator().manual_seed(16)
    bits = torch.randint(-2**31, 2**31, (200_000,), generator=gen, dtype=torch.int64)
    low = torch.tensor([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    hi = torch.randint(0, 2**16, (2000,), generator=gen, dtype=torch.int64)
    ties = ((hi[:, None] << 16) | low).flatten()  # exact ties with even and odd bf16, both signs
    special = torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,
                            0x00000001, 0x007FFFFF, 0x00800000, 0x80000001, 0x0, 0x80000000,
                            0x3F7F8000, 0x3F808000], dtype=torch.int64)
    allb = torch.cat([bits, ties, special, special | (1 << 31)])
    x = ((allb + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32)
    want, ours = x.to(torch.bfloat16), _round_bf16(x, hw)
    nan = torch.isnan(x)
    assert torch.isnan(ours[nan].float()).all()
    w, o = want[~nan].view(torch.int16), ours[~nan].view(torch.int16)
    subnormal = (x[~nan].abs() < 2.0**-126) & (x[~nan] != 0)  # as in fp32: the same exponent range
    assert subnormal.any() and (w[~subnormal] == o[~subnormal]).all()
    if hw:  # read and written as zero, sign kept
        assert (o[subnormal] & 0x7FFF == 0).all() and ((o[subnormal] < 0) == (w[subnormal] < 0)).all()
    else:
        assert (w[subnormal] == o[subnormal]).all()


def test_issue16_bf16_kernels_agree_with_and_without_avx512bf16():
    """Every bf16 store path gives the same bits through the instruction and the portable loop
    (no subnormal values here): cross-entropy (index / soft targets, the exp row kept or
    recomputed under softcap, the blocked grad kernel), distillation and sigmoid focal loss."""
    gen = torch.Generator().manual_seed(3)
    n, c = 5, 4099
    x = (torch.randn(n, c, generator=gen) * 3).bfloat16()
    t = (torch.randn(n, c, generator=gen) * 2).bfloat16()
    y = torch.randint(0, c, (n,), generator=gen)
    soft = torch.softmax(t.float(), 1).bfloat16()
    coef = torch.linspace(0.5, 2.0, n)

    def run():
        out = []
        for kw in ({}, dict(label_smoothing=0.1, logit_scale=0.7), dict(softcap=5.0)):
            for target, s in ((y, None), (None, soft)):
                g = torch.empty_like(x)
                out += [*cy.ce_fused(x, target, s, None, coef, g, **opts(**kw)), g]
        lse = torch.logsumexp(x.float(), 1)
        abd = torch.rand(n, 3, generator=torch.Generator().manual_seed(1))
        g = torch.empty_like(x)
        cy._K.grad(3, n, c, x.data_ptr(), c, g.data_ptr(), c, y.data_ptr(), 0, lse.data_ptr(),
                   abd.data_ptr(), class_start=0, logit_scale=1.0, softcap=None, num_threads=2)
        out.append(g)
        for kind in ("kl", "reverse_kl", "jsd"):
            xs = x.clone().requires_grad_()
            celoss.distillation_loss(xs, t, temperature=2.0, kind=kind, backend="cython").backward()
            out.append(xs.grad)
        xs = x.clone().requires_grad_()
        prob = torch.sigmoid(t.float()).bfloat16()
        loss = celoss.sigmoid_focal_loss(xs, prob, alpha=0.25, gamma=2.0, reduction="none",
                                         backend="cython")
        loss.backward(torch.rand(n, c, generator=torch.Generator().manual_seed(2)).bfloat16())
        return out + [loss.detach(), xs.grad]

    # on the portable passes: with the AVX-512 ones, bf16 rows with AVX512-BF16 also recompute the
    # exp in pass 3 (other rounding; tests/cpu/test_ce_avx512.py checks them against float64)
    rows = _bf16_modules()[0].use_avx512_rows()
    try:
        _bf16_modules()[0].use_avx512_rows(False)
        with bf16_stores(True):
            hw = run()
        with bf16_stores(False):
            sw = run()
    finally:
        _bf16_modules()[0].use_avx512_rows(rows)
    assert len(hw) == len(sw)
    for a, b in zip(hw, sw):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_issue16_no_avx512bf16_environment_variable():
    """CELOSS_NO_AVX512BF16=1 at import selects the portable bf16 stores in every module."""
    code = ("from celoss.cpu import _kernels, _family; "
            "print(_kernels.use_avx512bf16(), _family.use_avx512bf16())")
    env = {**os.environ, "CELOSS_NO_AVX512BF16": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]
