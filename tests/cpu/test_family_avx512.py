"""The loss family's hand-written AVX-512 loops (cpu/family.h, under celoss.cpu._family's
use_avx512_rows switch) and the portable loops they replace, both against the float64 oracle:
sigmoid focal loss at gamma = 2 (fp32 / bf16 logits and targets, upstream gradients of either dtype)."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("celoss.backends.cython", reason="the compiled CPU extension is missing")
F = pytest.importorskip("celoss.cpu._family", reason="the compiled CPU extension is missing")

import oracle  # noqa: E402
from celoss.distillation import distillation_loss  # noqa: E402
from celoss.focal import sigmoid_focal_loss  # noqa: E402
from conftest import against_oracle, avx512_rows as avx512_rows_of  # noqa: E402

ROWS = pytest.mark.parametrize("rows", [False, True], ids=["portable", "avx512"])


def avx512_rows(on):
    return avx512_rows_of(F, on)


def _logits(n, c, dtype, seed):
    """N(0, 9) logits with the extremes every row meets somewhere: 0, |x| where e^-|x| is tiny,
    underflows (|x| > 104) or p rounds to 1 in fp32, and |x| = 1e4. A length that is no multiple
    of 16 or of the 1024-element segments: full vectors, masked tails, several segments."""
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    special = torch.tensor([0.0, -1e4, 1e4, -120.0, 120.0, -40.0, 40.0, -17.0, 17.0, -1e-3, 1e-3])
    x[:, : special.numel()] = special
    return x.to(dtype)


@ROWS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("labels", ["hard", "soft"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sigmoid_focal_gamma2_against_float64(rows, dtype, alpha, labels, reduction):
    """Loss and gradient (non-trivial upstream gradient of the loss dtype for "none", the scalar
    coefficient for "mean") within the rounding of the output dtype of the float64 formula."""
    n, c = 5, 1437  # 7185 elements: 7 segments, the last ending in a partial vector
    gen = torch.Generator().manual_seed(7)
    x = _logits(n, c, dtype, 1)
    y = torch.rand(n, c, generator=gen, dtype=torch.float64)
    y = (y < 0.3).double() if labels == "hard" else y
    y = y.to(dtype)
    xs = x.detach().clone().requires_grad_()
    xd = x.detach().double().requires_grad_()
    with avx512_rows(rows):
        loss = sigmoid_focal_loss(xs, y, alpha, 2.0, reduction, backend="cython")
        up = (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        loss.backward(up)
    ref = oracle.sigmoid_focal_loss(xd, y.double(), alpha, 2.0, reduction)
    ref.backward(up.double())
    assert loss.dtype == dtype and xs.grad.dtype == dtype
    # fp32: a few ulp of the exp / log1p / reciprocal; bf16: two ulp (the stored result's and, for
    # "mean", the bf16 coefficient upstream / numel; the math runs in fp32, with the degree-4 exp). atol: a fraction of the largest value, where p - y
    # cancels (soft labels) or the loss is far below its neighbours.
    rtol = 3e-6 if dtype == torch.float32 else 2.0**-7
    for ours, want in ((loss, ref), (xs.grad, xd.grad)):
        torch.testing.assert_close(ours.double(), want.detach(), rtol=rtol,
                                   atol=1e-6 * want.abs().max().item())


@ROWS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sigmoid_focal_gamma2_nonfinite_logits(rows, dtype):
    """NaN logits give NaN loss and gradient in both loops; +-inf the same values as the portable
    loop (which follows torchvision's formula there), the neighbours stay finite."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -2.0] * 7, dtype=dtype)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0] * 7, dtype=dtype)

    def run(on):
        xs = x.clone().requires_grad_()
        with avx512_rows(on):
            loss = sigmoid_focal_loss(xs, y, 0.25, 2.0, "none", backend="cython")
            loss.backward(torch.full_like(loss, 0.75))
        return loss.detach(), xs.grad

    loss, grad = run(rows)
    assert torch.isnan(loss[0::5]).all() and torch.isnan(grad[0::5]).all()
    assert torch.isfinite(loss[3::5]).all() and torch.isfinite(grad[3::5]).all()
    want_loss, want_grad = run(False)
    finite = torch.isfinite(want_loss) & torch.isfinite(want_grad)
    torch.testing.assert_close(loss, want_loss, equal_nan=True, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad[finite], want_grad[finite], rtol=1e-5, atol=0)
    assert (torch.isnan(grad) == torch.isnan(want_grad)).all()


@ROWS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "ce", "jsd"])
@pytest.mark.parametrize("setting", ["T2", "T1-target", "T2-target"])
def test_distillation_against_float64(rows, dtype, kind, setting):
    """Per-row loss and student gradient (non-trivial upstream gradient) of every kind, with and
    without the class term (T = 1 shares the student's softmax, T = 2 has its own), over rows of
    several chunks whose maxima rise from chunk to chunk (the rescaled sums), with -inf teacher
    classes (zero weights; not for reverse KL) and logits far from 0 (|x| ~ 1e3, where max-shifting matters)."""
    n, v = 6, 3000  # 3 chunks of 1024, the last partial
    gen = torch.Generator().manual_seed(11)
    s = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    t = s + torch.randn(n, v, generator=gen, dtype=torch.float64)
    ramp = torch.linspace(0, 12, v, dtype=torch.float64)
    s[1::2] += ramp  # rows 1, 3, 5: maxima rising over the chunks
    t[1::2] += ramp.flip(0) * 0.5
    s[2] += 1e3
    t[2] -= 1e3
    if kind != "reverse_kl":  # KL(p_S || p_T) is +inf there
        t[4, ::7] = -float("inf")
    s, t = s.to(dtype), t.to(dtype)
    y = torch.randint(0, v, (n,), generator=gen) if "target" in setting else None
    kw = dict(temperature=1.0 if setting.startswith("T1") else 2.0, kind=kind, beta=0.3,
              alpha=0.6 if y is not None else 1.0, reduction="none")
    with avx512_rows(rows):
        a, b, ga, gb = against_oracle(lambda u, w: distillation_loss(u, w, y, backend="cython", **kw),
                                      lambda u, w: oracle.distillation_loss(u, w, y, **kw), s, t, wrt=(0,))
    assert a.dtype == dtype and ga.dtype == dtype
    # fp32: the exps' 3e-7 summed over 3000 terms; bf16: one ulp of the stored loss and gradient
    rtol = 2e-5 if dtype == torch.float32 else 2.0**-8
    torch.testing.assert_close(a.double(), b.detach(), rtol=rtol, atol=1e-6 * b.abs().max().item())
    torch.testing.assert_close(ga.double(), gb, rtol=rtol, atol=1e-5 * gb.abs().max().item())


@ROWS
def test_bf16_stores_agree_with_and_without_avx512bf16(rows):
    """Under either loop, the bf16 results are the same bits through vcvtneps2bf16 (the fused
    stores included) and the portable rounding (no subnormal values here)."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(5, 4099, generator=gen) * 3).bfloat16()
    t = (torch.randn(5, 4099, generator=gen) * 2).bfloat16()
    y = torch.randint(0, 4099, (5,), generator=gen)
    up = (torch.rand(5, 4099, generator=gen) + 0.5).bfloat16()

    def run(hw):
        before = F.use_avx512bf16()
        try:
            if F.use_avx512bf16(hw) != hw:
                pytest.skip("this CPU has no AVX512-BF16")
            out = []
            for kind in ("kl", "ce", "reverse_kl", "jsd"):
                for target, temperature in ((None, 2.0), (y, 1.0)):
                    xs = x.clone().requires_grad_()
                    loss = distillation_loss(xs, t, target, temperature=temperature, kind=kind,
                                             alpha=0.5 if target is not None else 1.0, backend="cython")
                    loss.backward()
                    out += [loss.detach(), xs.grad]
            xs = x.clone().requires_grad_()
            loss = sigmoid_focal_loss(xs, torch.sigmoid(t.float()).bfloat16(), 0.25, 2.0, "none",
                                      backend="cython")
            loss.backward(up)
            return out + [loss.detach(), xs.grad]
        finally:
            F.use_avx512bf16(before)

    with avx512_rows(rows):
        hw, sw = run(True), run(False)
    for a, b in zip(hw, sw):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_no_avx512_rows_environment_variable():
    """CELOSS_NO_AVX512_ROWS=1 at import selects the portable loops (the module's own switch)."""
    code = "from celoss.cpu import _family; print(_family.use_avx512_rows())"
    env = {**os.environ, "CELOSS_NO_AVX512_ROWS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False"]
