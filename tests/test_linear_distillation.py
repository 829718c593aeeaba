"""celoss.linear_distillation_loss (issue 14 item 1) against the float64 composition
``distillation_loss(F.linear(x_s, W_s, b_s), F.linear(x_t, W_t, b_t), target)`` (tests/oracle.py), on
every backend (Triton through its interpreter on CPU tensors, small shapes)."""
import math

import pytest
import torch
import torch.nn.functional as F

import celoss
import oracle
from celoss.linear_distillation import linear_distillation_loss

from conftest import against_oracle, backend_device, backend_params, lowp_error_bound, lowp_margin

ALL_BACKENDS = backend_params("torch", "cython", "triton")
KINDS = ("kl", "reverse_kl", "jsd", "ce")
REDUCTIONS = ("batchmean", "mean", "sum", "none")
IGNORE = -100


def make(lead, ds, dt, v, dtype=torch.float32, *, tdtype=None, bias=True, ignore=True, seed=0, device="cpu"):
    """Student (x, W, b), teacher (x, W, b) and int64 targets (every third ignored)."""
    g = torch.Generator().manual_seed(seed + 13 * v + ds + 5 * dt)
    tdtype = tdtype or dtype
    xs = torch.randn(*lead, ds, generator=g)
    ws = torch.randn(v, ds, generator=g) * (2 / math.sqrt(ds))
    xt = torch.randn(*lead, dt, generator=g)
    wt = torch.randn(v, dt, generator=g) * (3 / math.sqrt(dt))
    bs = torch.randn(v, generator=g) * 0.5 if bias else None
    bt = torch.randn(v, generator=g) * 0.5 if bias else None
    t = torch.randint(0, max(v, 1), lead, generator=g)
    if ignore:
        t.view(-1)[::3] = IGNORE
    s_cast = lambda a: None if a is None else a.to(device=device, dtype=dtype)  # noqa: E731
    t_cast = lambda a: None if a is None else a.to(device=device, dtype=tdtype)  # noqa: E731
    return (s_cast(xs), s_cast(ws), s_cast(bs)), (t_cast(xt), t_cast(wt), t_cast(bt)), t.to(device)


def composition(xs, ws, bs, xt, wt, bt, target=None, shift=False, **kw):
    """The definition: the logits by F.linear, then the distillation oracle (float64 on float64 inputs)."""
    if shift:
        xs, xt, target = xs[..., :-1, :], xt[..., :-1, :], None if target is None else target[..., 1:]
    return oracle.distillation_loss(F.linear(xs, ws, bs), F.linear(xt, wt, bt), target, **kw)


def ours_fn(backend, target, shift=False, **kw):
    def run(xs, ws, bs, xt, wt, bt):
        return linear_distillation_loss(xs, ws, xt, wt, target, student_bias=bs, teacher_bias=bt, shift=shift,
                                        backend=backend, **kw)
    return run


def oracle_fn(target, shift=False, **kw):
    kw.pop("chunk_bytes", None)

    def run(*tensors):  # every tensor in float64 (those differentiated already are)
        return composition(*(None if a is None else a.double() for a in tensors), target, shift, **kw)
    return run


def close(a, b, rtol=2e-5, atol=2e-6):
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach().double(), b.detach().double()
    scale = 1 + (b.nan_to_num(0.0).abs().max().item() if b.numel() else 0.0)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, equal_nan=True)


def check(backend, student, teacher, target, *, wrt, shift=False, rtol=2e-5, atol=2e-6, **kw):
    """Loss and the gradients w.r.t. the inputs in ``wrt`` (indices into (xs, ws, bs, xt, wt, bt)) with a
    random upstream gradient, against the float64 composition."""
    a, b, ga, gb = celoss_vs_oracle(backend, student, teacher, target, wrt, shift, **kw)
    assert a.dtype == student[0].dtype
    close(a, b, rtol, atol)
    for x, y in zip(ga, gb):
        close(x, y, rtol, atol)


def celoss_vs_oracle(backend, student, teacher, target, wrt, shift=False, **kw):
    a, b, ga, gb = against_oracle(ours_fn(backend, target, shift, **kw), oracle_fn(target, shift, **kw),
                                  *student, *teacher, wrt=wrt)
    if len(wrt) == 1:
        ga, gb = (ga,), (gb,)
    return a, b, ga, gb


# ------------------------------------------------------------------------------------------------
# values and gradients against the float64 composition
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_composition(backend, kind, reduction):
    """Every kind and reduction, hard-label term (alpha 0.6), ignored rows, T = 2, biases, several chunks."""
    dev = backend_device(backend)
    student, teacher, t = make((11,), 8, 8, 37, device=dev)
    check(backend, student, teacher, t, wrt=(0, 1, 2), kind=kind, reduction=reduction, temperature=2.0, alpha=0.6,
          chunk_bytes=3 * 37 * 4 * 3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ("kl", "jsd"))
def test_shift_and_different_hidden_sizes(backend, kind):
    """shift=True on (B, T, D) hidden states of different sizes; the loss 'none' has shape (B, T - 1)."""
    dev = backend_device(backend)
    student, teacher, t = make((3, 5), 6, 10, 29, bias=False, device=dev)
    a, b, _, _ = celoss_vs_oracle(backend, student, teacher, t, (0, 1), shift=True, kind=kind, reduction="none",
                                  temperature=0.7, alpha=0.3, beta=0.3, chunk_bytes=2000)
    assert a.shape == (3, 4)
    check(backend, student, teacher, t, wrt=(0, 1), shift=True, kind=kind, reduction="batchmean", temperature=0.7,
          alpha=0.3, beta=0.3, chunk_bytes=2000)
    check(backend, student, teacher, t, wrt=(0, 1), shift=True, kind=kind, reduction="none", temperature=0.7,
          alpha=0.3, beta=0.3, chunk_bytes=2000)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_target(backend, reduction):
    dev = backend_device(backend)
    student, teacher, _ = make((2, 6), 7, 5, 23, device=dev)
    check(backend, student, teacher, None, wrt=(0, 1, 2), kind="reverse_kl", reduction=reduction, temperature=1.5,
          chunk_bytes=1)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_teacher_gradients(backend, reduction):
    """A teacher that requires grad gets its input, weight and bias gradients too."""
    dev = backend_device(backend)
    student, teacher, t = make((9,), 6, 4, 19, device=dev)
    check(backend, student, teacher, t, wrt=(0, 1, 2, 3, 4, 5), kind="jsd", beta=0.4, alpha=0.8, temperature=1.3,
          reduction=reduction, chunk_bytes=900)
    # the teacher alone
    check(backend, student, teacher, t, wrt=(3, 4), kind="kl", reduction=reduction, chunk_bytes=900)


@pytest.mark.parametrize("backend", backend_params("torch", "cython"))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_float64_exact(backend, reduction):
    """float64 inputs: the mean coefficient and the upstream gradient are applied in float64."""
    student, teacher, t = make((10,), 5, 7, 17, dtype=torch.float64)
    check(backend, student, teacher, t, wrt=(0, 1, 2), kind="ce", alpha=0.5, reduction=reduction, temperature=3.0,
          chunk_bytes=500, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_low_precision(backend, dtype, reduction):
    """fp16 / bf16: no farther from the float64 composition than PyTorch's own composition in that dtype
    (plus a margin); the loss has the student's dtype."""
    dev = backend_device(backend)
    student, teacher, t = make((12,), 16, 16, 40, dtype=dtype, device=dev)
    kw = dict(kind="kl", alpha=0.7, temperature=2.0, reduction=reduction)
    a, b, ga, gb = celoss_vs_oracle(backend, student, teacher, t, (0, 1, 2), chunk_bytes=2000, **kw)
    assert a.dtype == dtype
    leaves = [p.detach().clone().requires_grad_() if i < 3 else p for i, p in enumerate(student + teacher)]
    same = composition(*leaves, t, **kw)
    up = (torch.rand(b.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5).to(dtype)
    g_same = torch.autograd.grad(same, leaves[:3], up)
    margin = lowp_margin(backend, dtype)
    lowp_error_bound(a, same, b, margin)
    for x, s, o in zip(ga, g_same, gb):
        lowp_error_bound(x, s, o, margin)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_mixed_student_teacher_dtypes(backend):
    """A bf16 teacher with a float32 student: the loss and gradients are the student's dtype."""
    dev = backend_device(backend)
    student, teacher, t = make((8,), 6, 12, 21, tdtype=torch.bfloat16, device=dev)
    kw = dict(kind="kl", alpha=0.5, reduction="sum")
    zt = F.linear(*teacher).double()  # the teacher's logits as PyTorch rounds them in bf16; the rest in float64

    def ref(xs, ws, bs, *_):
        return oracle.distillation_loss(F.linear(xs, ws, bs), zt, t, **kw)

    a, b, ga, gb = against_oracle(ours_fn(backend, t, chunk_bytes=700, **kw), ref, *student, *teacher, wrt=(0, 1, 2))
    assert a.dtype == torch.float32 and all(g.dtype == torch.float32 for g in ga)
    close(a, b)
    for x, y in zip(ga, gb):
        close(x, y)


# ------------------------------------------------------------------------------------------------
# edges
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nonfinite_rows_like_composition(backend):
    """A NaN hidden state: NaN loss and NaN gradient rows as the composition; an ignored row holding an
    inf gets 0 * its gradient (NaN) as in PyTorch, other ignored rows exact zeros."""
    dev = backend_device(backend)
    student, teacher, t = make((9,), 5, 5, 13, device=dev)
    xs = student[0].clone()
    xs[1, 2] = math.nan           # counted row
    xs[3, 0] = math.inf           # ignored row (3 % 3 == 0)
    student = (xs,) + student[1:]
    a, b, ga, gb = celoss_vs_oracle(backend, student, teacher, t, (0, 1), kind="kl", alpha=0.5, reduction="none")
    for ours, ref in ((a, b),) + tuple(zip(ga, gb)):
        assert torch.equal(ours.isnan(), ref.isnan())
        fin = ~ref.isnan()
        close(ours[fin], ref[fin])
    assert (ga[0][6] == 0).all()  # an ordinary ignored row


@pytest.mark.parametrize("backend", backend_params("torch", "cython"))
def test_empty_and_all_ignored(backend):
    """N = 0, V = 0 and every row ignored give what the composition gives (NaN 0/0 means, zero gradients)."""
    student, teacher, t = make((0,), 4, 4, 7)
    for red in REDUCTIONS:
        check(backend, student, teacher, t, wrt=(0, 1), reduction=red)
    student, teacher, t = make((5,), 4, 4, 7)
    t = torch.full_like(t, IGNORE)
    for red in REDUCTIONS:
        check(backend, student, teacher, t, wrt=(0, 1, 2), reduction=red, alpha=0.5)
    student, teacher, _ = make((5,), 4, 4, 0)
    for red in REDUCTIONS:
        check(backend, student, teacher, None, wrt=(0, 1), reduction=red)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_workspace_bounded_by_chunk_bytes(backend, monkeypatch):
    """Every row-kernel call sees at most the rows that chunk_bytes allows (the N x V logits never
    exist), and the chunked result equals the one-chunk result."""
    dev = backend_device(backend)
    student, teacher, t = make((40,), 6, 9, 31, device=dev)
    module = celoss._dispatch.module(backend)
    seen = []
    real = module.distill_fused

    def spy(s, t_, *args, **kw):
        seen.append(s.shape[0])
        return real(s, t_, *args, **kw)

    monkeypatch.setattr(module, "distill_fused", spy)
    per_row = 4 * (2 * 31 + 2 * 6) + 4 * (31 + 2 * 9)  # student logits + gradient, teacher logits, gathered rows
    bound = 5 * per_row
    xs = student[0].detach().clone().requires_grad_()
    loss = linear_distillation_loss(xs, student[1], *teacher[:2], t, chunk_bytes=bound, backend=backend)
    loss.backward()
    assert max(seen) == 5 and sum(seen) == 40 - 14  # 14 ignored rows compacted away
    monkeypatch.setattr(module, "distill_fused", real)
    xs1 = student[0].detach().clone().requires_grad_()
    linear_distillation_loss(xs1, student[1], *teacher[:2], t, backend=backend).backward()
    close(xs.grad, xs1.grad, 1e-6, 1e-7)


@pytest.mark.parametrize("backend", backend_params("torch", "cython"))
def test_issue14_chunk_buffers_recycled_through_the_cpu_cache(backend, monkeypatch):
    """The chunk workspace (the student's and the teacher's logits, the student's logit gradient) comes
    from celoss's CPU cache: the first training step maps it, the second reuses those mappings (no
    fresh page faults every step, which cost as much as the bf16 products here), same gradients."""
    import mmap as mmap_module
    n, d, v = 64, 8, 40000  # one chunk: 64 x 40000 float32 = 10 MB per buffer (cached from 8 MB)
    student, teacher, t = make((n,), d, d, v, ignore=False)
    celoss.empty_cpu_cache()
    real, made = mmap_module.mmap, []
    monkeypatch.setattr(mmap_module, "mmap", lambda *a, **k: made.append(a[1]) or real(*a, **k))
    counts, grads = [], []
    for _ in range(2):
        xs, ws = (a.clone().requires_grad_() for a in student[:2])
        linear_distillation_loss(xs, ws, *teacher[:2], t, backend=backend).backward()
        grads.append((xs.grad, ws.grad))
        counts.append(sum(1 for size in made if size >= n * v * 4))
        del xs, ws
    assert counts == [3, 3], counts
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# autograd contract, module, errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_issue11_double_backward_raises(backend, reduction):
    dev = backend_device(backend)
    student, teacher, t = make((6,), 4, 4, 9, device=dev)
    xs = student[0].clone().requires_grad_()
    loss = linear_distillation_loss(xs, student[1], *teacher[:2], t, reduction=reduction, backend=backend).sum()
    g = torch.autograd.grad(loss, xs, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once"):
        g.sum().backward()


def test_second_backward_scalar_reduction_raises_none_recomputes():
    student, teacher, t = make((6,), 4, 4, 9)
    xs = student[0].clone().requires_grad_()
    loss = linear_distillation_loss(xs, student[1], *teacher[:2], t, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice.*reduction='none'"):
        loss.backward()
    xs.grad = None
    rows = linear_distillation_loss(xs, student[1], *teacher[:2], t, reduction="none", backend="torch")
    rows.sum().backward(retain_graph=True)
    first = xs.grad.clone()
    rows.sum().backward()
    close(xs.grad, 2 * first, 1e-6, 0)


def test_module_matches_function():
    student, teacher, t = make((7,), 5, 3, 11)
    mod = celoss.modules.LinearDistillationLoss(kind="jsd", beta=0.3, temperature=2.0, alpha=0.5, backend="torch")
    got = mod(student[0], student[1], teacher[0], teacher[1], t, student_bias=student[2], teacher_bias=teacher[2])
    want = linear_distillation_loss(student[0], student[1], teacher[0], teacher[1], t, student_bias=student[2],
                                    teacher_bias=teacher[2], kind="jsd", beta=0.3, temperature=2.0, alpha=0.5,
                                    backend="torch")
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="temprature"):
        celoss.modules.LinearDistillationLoss(temprature=2.0)


def test_bad_inputs():
    (xs, ws, bs), (xt, wt, bt), t = make((4,), 5, 3, 11)
    ld = linear_distillation_loss
    with pytest.raises(ValueError, match="teacher_input has 3 features"):
        ld(xs, ws, xt, wt[:, :2], t)
    with pytest.raises(ValueError, match="share the vocabulary"):
        ld(xs, ws, xt, wt[:7], t)
    with pytest.raises(ValueError, match="same leading dimensions"):
        ld(xs, ws, xt[:3], wt, t)
    with pytest.raises(TypeError, match="student_input .* and student_weight .* must have the same dtype"):
        ld(xs, ws.double(), xt, wt, t)
    with pytest.raises(ValueError, match="teacher_bias must have shape"):
        ld(xs, ws, xt, wt, t, teacher_bias=bt[:4])
    with pytest.raises(TypeError, match="int64"):
        ld(xs, ws, xt, wt, t.int())
    with pytest.raises(ValueError, match="target of shape"):
        ld(xs, ws, xt, wt, t[:2])
    with pytest.raises(IndexError, match="out of bounds"):
        ld(xs, ws, xt, wt, t.clamp(min=0) + 11)
    with pytest.raises(ValueError, match="kind"):
        ld(xs, ws, xt, wt, t, kind="js")
    with pytest.raises(ValueError, match="reduction"):
        ld(xs, ws, xt, wt, t, reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        ld(xs, ws, xt, wt, t, temperature=0.0)
    with pytest.raises(ValueError, match="alpha != 1"):
        ld(xs, ws, xt, wt, None, alpha=0.5)
    with pytest.raises(ValueError, match="shift=True needs a time axis"):
        ld(xs, ws, xt, wt, t, shift=True)
    with pytest.raises(ValueError, match="chunk_bytes"):
        ld(xs, ws, xt, wt, t, chunk_bytes=0)
    with pytest.raises(TypeError, match="teacher_weight must be a torch.Tensor"):
        ld(xs, ws, xt, None, t)
