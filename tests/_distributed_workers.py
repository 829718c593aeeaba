"""Worker side of tests/test_distributed.py: runs in processes spawned by the test, one per rank.

Every rank builds the same full-vocabulary problem from a seed, takes its slice, calls the
vocab-parallel function and checks loss, lse and gradients against a float64 PyTorch oracle on the
full vocabulary and against single-process ``celoss.cross_entropy`` with the same backend. Errors
are recorded (traceback) in ``<out_dir>/rank<r>.json``; the first failure ends the worker (the other
ranks then fail fast in their next collective instead of waiting).
"""
from __future__ import annotations

import json
import math
import os
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

import celoss
from celoss import distributed as cd

# ------------------------------------------------------------------------------------------------
# oracle and helpers
# ------------------------------------------------------------------------------------------------


def _transform(x, logit_scale, softcap):
    z = x * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def oracle_rows(z2, t, weight, ignore_index, label_smoothing, z_loss):
    """float64 per-row loss, lse and the weighted-mean denominator with plain PyTorch."""
    w = None if weight is None else weight.double()
    rows = F.cross_entropy(z2, t, weight=w, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(z2, dim=1)
    counted = t != ignore_index
    safe = torch.where(counted, t, torch.zeros_like(t))
    w_y = torch.where(counted, (w[safe] if w is not None else torch.ones_like(lse)), torch.zeros_like(lse))
    rows = rows + z_loss * w_y * lse * lse
    return rows, lse, w_y


def reduce(rows, denom, reduction):
    if reduction == "mean" and float(denom) == 0:
        return rows.sum() * 0.0 + float("nan")  # PyTorch: all ignored -> NaN loss, zero gradient
    return rows if reduction == "none" else rows.sum() if reduction == "sum" else rows.sum() / denom


def assert_close(actual, expected, what, rtol, atol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def slices(world, vocab_size, layout):
    """[(start, end)] per rank: 'balanced' (celoss.distributed.vocab_range), or explicit sizes
    (tuple, in order of the classes) with an optional rank permutation."""
    if layout == "balanced":
        return [cd.vocab_range(vocab_size, r, world) for r in range(world)]
    sizes, order = layout
    assert sum(sizes) == vocab_size and len(sizes) == world
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start, start + s))
        start += s
    return [bounds[order[r]] for r in range(world)]


def weight_and_upstreams(gen, shape, vocab_size, weight, reduction, mean_upstream):
    """Class weights (or None), the loss's upstream gradient (``mean_upstream`` when reduced) and the
    lse's, all drawn from ``gen``."""
    w_full = torch.rand(vocab_size, generator=gen, dtype=torch.float64).to(torch.float32) + 0.25 \
        if weight else None
    up = torch.randn(shape, generator=gen, dtype=torch.float64) if reduction == "none" \
        else torch.tensor(mean_upstream, dtype=torch.float64)
    return w_full, up, torch.randn(shape, generator=gen, dtype=torch.float64)


def make_target(gen, shape, vocab_size, ignore_index, ignore_frac, lo=0, hi=None):
    hi = vocab_size if hi is None else hi
    t = torch.randint(lo, hi, shape, generator=gen)
    if ignore_frac:
        mask = torch.rand(shape, generator=gen) < ignore_frac
        mask.view(-1)[0] = True  # at least one ignored row
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return t


# ------------------------------------------------------------------------------------------------
# the logits variant
# ------------------------------------------------------------------------------------------------

def check_logits(rank, world, backend, *, seed, vocab_size, shape=(7,), layout="balanced",
                 dtype=torch.float32, ignore_index=-100, ignore_frac=0.0, reduction="mean",
                 label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0, weight=None,
                 return_lse=False, return_z_loss=False, target_range=None, all_ignored=False,
                 noncontiguous=False):
    """One comparison; `weight` None, 'shard' or 'full'."""
    gen = torch.Generator().manual_seed(seed)
    full = (torch.randn(*shape, vocab_size, generator=gen, dtype=torch.float64) * 3).to(dtype)
    lo, hi = target_range or (0, vocab_size)
    target = make_target(gen, shape, vocab_size, ignore_index, ignore_frac, lo, hi)
    if all_ignored:
        target = torch.full_like(target, ignore_index)
    w_full, up, up_lse = weight_and_upstreams(gen, shape, vocab_size, weight, reduction, 0.7)
    start, end = slices(world, vocab_size, layout)[rank]

    # float64 oracle on the full vocabulary
    x = full.detach().double().clone().requires_grad_()
    z2 = _transform(x, logit_scale, softcap).reshape(-1, vocab_size)
    t = target.reshape(-1)
    rows, lse_o, w_y = oracle_rows(z2, t, w_full, ignore_index, label_smoothing, z_loss)
    loss_o = reduce(rows, w_y.sum(), reduction)
    obj = (loss_o * up.reshape(loss_o.shape)).sum() if reduction == "none" else loss_o * up
    if return_lse:
        obj = obj + (lse_o * up_lse.reshape(-1)).sum()
    obj.backward()
    grad_o = x.grad[..., start:end]
    if reduction == "none":
        loss_o = loss_o.reshape(shape)

    # single-process celoss, same backend
    xs = full.detach().reshape(-1, vocab_size).clone().requires_grad_()
    opts = dict(logit_scale=logit_scale, softcap=softcap, z_loss=z_loss, backend=backend)
    single = celoss.cross_entropy(xs, t, w_full, ignore_index, reduction, label_smoothing,
                                  return_z_loss=True, **opts)
    s_obj = (single.loss.double() * up.reshape(-1)).sum() if reduction == "none" else single.loss.double() * up
    # the lse (and its gradient) from a second, reduction="none" call: the loss's own gradient is
    # taken without return_lse (see the report on cross_entropy's mean + return_lse backward)
    single_lse = celoss.cross_entropy(xs, t, w_full, ignore_index, "none", label_smoothing, return_lse=True,
                                      **opts).lse
    if return_lse:
        s_obj = s_obj + (single_lse.double() * up_lse.reshape(-1)).sum()
    s_obj.backward()

    # vocab-parallel
    if noncontiguous:  # a strided view of the full logits (rows not contiguous)
        base = full.detach().clone().requires_grad_()
        local = base[..., start:end]
    else:
        base = local = full[..., start:end].detach().clone().requires_grad_()
    w_arg = None if not weight else (w_full if weight == "full" else w_full[start:end].clone())
    out = cd.vocab_parallel_cross_entropy(local, target, vocab_start=start, vocab_size=vocab_size,
                                          weight=w_arg, ignore_index=ignore_index, reduction=reduction,
                                          label_smoothing=label_smoothing, logit_scale=logit_scale,
                                          softcap=softcap, z_loss=z_loss, return_lse=return_lse,
                                          return_z_loss=return_z_loss, backend=backend)
    if return_lse or return_z_loss:
        loss, lse, z_term = out
        assert (lse is not None) == return_lse and (z_term is not None) == return_z_loss
    else:
        loss, lse, z_term = out, None, None
    assert isinstance(loss, torch.Tensor) and loss.dtype == dtype
    assert loss.shape == (shape if reduction == "none" else ()), (loss.shape, shape, reduction)
    d_obj = (loss.double() * up).sum() if reduction == "none" else loss.double() * up
    if return_lse:
        assert lse.shape == shape
        d_obj = d_obj + (lse.double() * up_lse).sum()
    d_obj.backward()
    local_grad = base.grad[..., start:end] if noncontiguous else local.grad
    if noncontiguous:
        outside = torch.ones(vocab_size, dtype=torch.bool)
        outside[start:end] = False
        assert float(base.grad[..., outside].abs().sum()) == 0.0

    lowp = dtype in (torch.float16, torch.bfloat16)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else \
        dict(rtol=2e-2, atol=2e-2) if lowp else dict(rtol=2e-5, atol=2e-5)
    if not lowp:
        assert_close(loss, loss_o, "loss vs oracle", **tol)
        assert_close(local_grad, grad_o, "grad vs oracle", **tol)
        if return_lse:
            assert_close(lse, lse_o.reshape(shape), "lse vs oracle", **tol)
    # same backend, one process: tight
    close = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2) \
        if lowp else dict(rtol=1e-5, atol=1e-6)
    s_loss = single.loss.reshape(shape) if reduction == "none" else single.loss
    assert_close(loss, s_loss, "loss vs single-process", **close)
    assert_close(local_grad, xs.grad.reshape(full.shape)[..., start:end], "grad vs single-process", **close)
    if return_lse:
        assert_close(lse, single_lse.reshape(shape), "lse vs single-process", **close)
    if return_z_loss:
        s_z = single.z_loss.reshape(shape) if reduction == "none" else single.z_loss
        assert_close(z_term, s_z, "z_loss term vs single-process", **close)
    if all_ignored:
        if reduction == "mean":
            assert torch.isnan(loss), loss
        else:
            assert float(loss.detach().abs().sum()) == 0.0, loss
        if not return_lse:
            assert float(local_grad.abs().sum()) == 0.0
    # every rank holds the same (replicated) loss
    mine = loss.detach().double().reshape(-1)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    for other in everyone:
        assert torch.equal(torch.nan_to_num(other, 7.0), torch.nan_to_num(mine, 7.0)), "loss differs across ranks"


def logits_cases(world):
    v = 16 * world + 5
    ragged = {2: ((7, 26), (1, 0)), 3: ((0, 13, 24), (2, 0, 1))}[world]  # rank 0 holds the last block
    ragged_v = sum(ragged[0])
    every = dict(weight="shard", label_smoothing=0.2, z_loss=1e-2, softcap=4.0, logit_scale=0.8,
                 return_lse=True, return_z_loss=True, ignore_frac=0.3)
    cases = []
    for layout, vs in (("balanced", v), (ragged, ragged_v)):
        for reduction in ("none", "mean", "sum"):
            cases += [
                dict(vocab_size=vs, layout=layout, reduction=reduction),
                dict(vocab_size=vs, layout=layout, reduction=reduction, ignore_frac=0.4),
                dict(vocab_size=vs, layout=layout, reduction=reduction, ignore_index=3, ignore_frac=0.4),
                dict(vocab_size=vs, layout=layout, reduction=reduction, label_smoothing=0.1, ignore_frac=0.3),
                dict(vocab_size=vs, layout=layout, reduction=reduction, weight="shard", ignore_frac=0.3),
                dict(vocab_size=vs, layout=layout, reduction=reduction, weight="full", label_smoothing=0.3,
                     ignore_frac=0.3),
                dict(vocab_size=vs, layout=layout, reduction=reduction, z_loss=1e-2, return_z_loss=True),
                dict(vocab_size=vs, layout=layout, reduction=reduction, softcap=3.0, logit_scale=0.7,
                     return_lse=True),
                dict(vocab_size=vs, layout=layout, reduction=reduction,
                     quick=layout != "balanced" and reduction != "sum", **every),
                dict(vocab_size=vs, layout=layout, reduction=reduction, all_ignored=True),
                dict(vocab_size=vs, layout=layout, reduction=reduction, all_ignored=True, weight="shard",
                     label_smoothing=0.1, z_loss=1e-3, quick=layout != "balanced" and reduction == "mean"),
            ]
    first = slices(world, ragged_v, ragged)
    owner_of_zero = [s for s in first if s[0] == 0 and s[1] > 0][0]
    cases += [
        # every target in one rank's slice: the other ranks hold no target
        dict(vocab_size=ragged_v, layout=ragged, target_range=owner_of_zero, quick=True, **every),
        dict(vocab_size=v, target_range=(0, 3), reduction="none", weight="full"),
        # uneven shards of GPT-2's vocabulary
        dict(vocab_size=50257, shape=(5,)),
        dict(vocab_size=50257, shape=(5,), reduction="none", **every),
        # (..., V_local) input, float64, bfloat16
        dict(vocab_size=v, shape=(2, 3), reduction="none", return_lse=True, ignore_frac=0.3),
        dict(vocab_size=v, shape=(2, 3), reduction="mean", **every),
        dict(vocab_size=v, dtype=torch.float64, reduction="sum", **every),
        dict(vocab_size=v, dtype=torch.bfloat16, reduction="mean", ignore_frac=0.2, label_smoothing=0.1),
        dict(vocab_size=v, shape=(4,), noncontiguous=True, reduction="none", **every),
        dict(vocab_size=ragged_v, layout=ragged, shape=(2, 3), noncontiguous=True, reduction="sum"),
        # empty batch
        dict(vocab_size=v, shape=(0,), reduction="mean"),
        dict(vocab_size=v, shape=(0,), reduction="none"),
    ]
    return cases


def interpreted(backend):
    """Triton kernels run in Triton's (slow) interpreter on CPU: check a representative subset."""
    return backend == "triton" and not torch.cuda.is_available()


def suite_logits(rank, world, backend, record):
    for i, case in enumerate(logits_cases(world)):
        # with the interpreter only the cases marked quick: every option together on ragged slices
        # (reduction none and mean), an all-ignored weighted mean, a rank without targets
        if not case.pop("quick", False) and interpreted(backend):
            continue
        try:
            check_logits(rank, world, backend, seed=1000 + i, **case)
        except Exception as exc:
            raise AssertionError(f"{backend} case {i} {case}: {exc}") from exc
        record(f"logits[{backend}] case {i}")


# ------------------------------------------------------------------------------------------------
# the linear variant
# ------------------------------------------------------------------------------------------------

def check_linear(rank, world, backend, *, seed, vocab_size, n=9, d=12, layout="balanced", bias=True,
                 hidden_grad=True, chunk_size=None, ignore_index=-100, ignore_frac=0.3, reduction="mean",
                 label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0, weight=None,
                 return_lse=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    w_lin = (torch.randn(vocab_size, d, generator=gen, dtype=torch.float64) / math.sqrt(d) * 2).to(dtype)
    b_lin = torch.randn(vocab_size, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    target = make_target(gen, (n,), vocab_size, ignore_index, ignore_frac)
    w_full, up, up_lse = weight_and_upstreams(gen, (n,), vocab_size, weight, reduction, 1.3)
    start, end = slices(world, vocab_size, layout)[rank]

    h_o = hidden.detach().double().clone().requires_grad_(hidden_grad)
    w_o = w_lin.detach().double().clone().requires_grad_()
    b_o = b_lin.detach().double().clone().requires_grad_() if bias else None
    z2 = _transform(F.linear(h_o, w_o, b_o), logit_scale, softcap)
    rows, lse_o, w_y = oracle_rows(z2, target, w_full, ignore_index, label_smoothing, z_loss)
    loss_o = reduce(rows, w_y.sum(), reduction)
    obj = (loss_o * up).sum()
    if return_lse:
        obj = obj + (lse_o * up_lse).sum()
    obj.backward()

    h = hidden.clone().requires_grad_(hidden_grad)
    w_loc = w_lin[start:end].clone().requires_grad_()
    b_loc = b_lin[start:end].clone().requires_grad_() if bias else None
    w_arg = None if not weight else (w_full if weight == "full" else w_full[start:end].clone())
    out = cd.vocab_parallel_linear_cross_entropy(
        h, w_loc, target, vocab_start=start, vocab_size=vocab_size, linear_bias=b_loc, weight=w_arg,
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        logit_scale=logit_scale, softcap=softcap, z_loss=z_loss, return_lse=return_lse, backend=backend,
        chunk_size=chunk_size)
    loss, lse = (out.loss, out.lse) if return_lse else (out, None)
    assert loss.dtype == dtype
    obj = (loss.double() * up).sum()
    if return_lse:
        obj = obj + (lse.double() * up_lse).sum()
    obj.backward()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=3e-5, atol=3e-5) \
        if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    assert_close(loss, loss_o, "linear loss", **tol)
    if return_lse:
        assert_close(lse, lse_o, "linear lse", **tol)
    if hidden_grad:
        # the hidden gradient is summed over the group: the full gradient on every rank
        assert_close(h.grad, h_o.grad, "linear grad hidden", **tol)
    else:
        assert h.grad is None
    assert_close(w_loc.grad, w_o.grad[start:end], "linear grad of the weight shard", **tol)
    if bias:
        assert_close(b_loc.grad, b_o.grad[start:end], "linear grad of the bias shard", **tol)


def suite_linear(rank, world, backend, record):
    v = 16 * world + 5
    ragged = {2: ((7, 26), (1, 0)), 3: ((0, 13, 24), (2, 0, 1))}[world]
    every = dict(weight="shard", label_smoothing=0.2, z_loss=1e-2, softcap=4.0, logit_scale=0.8,
                 return_lse=True)
    cases = [
        dict(vocab_size=v),
        dict(vocab_size=v, chunk_size=2, reduction="none", **every),
        dict(vocab_size=sum(ragged[0]), layout=ragged, chunk_size=4, reduction="sum", **every),
        dict(vocab_size=sum(ragged[0]), layout=ragged, bias=False, hidden_grad=False, weight="full"),
        dict(vocab_size=v, reduction="mean", ignore_frac=1.0, chunk_size=3),  # all ignored: NaN, 0 grads
        dict(vocab_size=v, dtype=torch.float64, chunk_size=5, reduction="mean", **every),
        dict(vocab_size=5003, n=6, d=8, reduction="none", label_smoothing=0.1),
        dict(vocab_size=v, dtype=torch.bfloat16, chunk_size=4, reduction="none", **every),
    ]
    for i, case in enumerate(cases):
        if interpreted(backend) and i != 2:
            continue
        if case.get("ignore_frac") == 1.0:
            case = dict(case, ignore_frac=0.0)
            check_linear_all_ignored(rank, world, backend, **case)
        else:
            try:
                check_linear(rank, world, backend, seed=2000 + i, **case)
            except Exception as exc:
                raise AssertionError(f"{backend} linear case {i} {case}: {exc}") from exc
        record(f"linear[{backend}] case {i}")


def check_linear_all_ignored(rank, world, backend, *, vocab_size, reduction, chunk_size, ignore_frac):
    start, end = cd.vocab_range(vocab_size, rank, world)
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(5, 4, generator=gen).requires_grad_()
    w = torch.randn(vocab_size, 4, generator=gen)[start:end].clone().requires_grad_()
    target = torch.full((5,), -100)
    loss = cd.vocab_parallel_linear_cross_entropy(h, w, target, vocab_start=start, vocab_size=vocab_size,
                                                  reduction=reduction, chunk_size=chunk_size, backend=backend)
    assert torch.isnan(loss)
    loss.backward()
    assert float(h.grad.abs().sum()) == 0.0 and float(w.grad.abs().sum()) == 0.0


# ------------------------------------------------------------------------------------------------
# errors: never a hang, the same error on every rank
# ------------------------------------------------------------------------------------------------

def _expect(record, name, exc_type, fn, contains=()):
    try:
        fn()
    except exc_type as exc:
        msg = str(exc)
        for piece in contains:
            assert piece in msg, (name, piece, msg)
        record(name, type(exc).__name__ + ": " + msg)
        return
    raise AssertionError(f"{name}: no {exc_type.__name__} raised")


def suite_errors(rank, world, backend, record):
    v = 10 * world + 3
    start, end = cd.vocab_range(v, rank, world)
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(6, v, generator=gen)
    target = torch.randint(0, v, (6,), generator=gen)
    local = full[:, start:end].clone()
    last = rank == world - 1

    def call(x=local, t=target, **kw):
        args = dict(vocab_start=start, vocab_size=v, backend=backend)
        args.update(kw)
        return cd.vocab_parallel_cross_entropy(x, t, **args)

    pre = f"errors[{backend}] "
    # cross-rank inconsistencies: the same ValueError on every rank
    _expect(record, pre + "rows", ValueError,
            lambda: call(x=local[:5] if last else local, t=target[:5] if last else target),
            ["numbers of rows", "every rank raises"])
    _expect(record, pre + "overlap", ValueError,
            lambda: call(vocab_start=start - 1 if last else start), ["do not tile"])
    _expect(record, pre + "gap", ValueError,
            lambda: call(x=local[:, :-1] if last else local), ["do not tile"])
    _expect(record, pre + "vocab_size", ValueError,
            lambda: call(vocab_size=v + 1 if last else v), ["vocab_size differ"])
    _expect(record, pre + "options", ValueError,
            lambda: call(label_smoothing=0.1 if rank == 0 else 0.0), ["the options (", "differ across ranks"])
    _expect(record, pre + "weights given on one rank", ValueError,
            lambda: call(weight=torch.ones(end - start) if rank == 0 else None),
            ["the options (", "differ across ranks"])
    _expect(record, pre + "targets", ValueError,
            lambda: call(t=(target + 1) % v if last else target), ["targets"])
    # out-of-range target on every rank: the same IndexError everywhere
    bad = target.clone()
    bad[2] = v
    _expect(record, pre + "target range", IndexError, lambda: call(t=bad), ["out of bounds"])
    # a local error on one rank: its own error there, a ValueError naming it everywhere else
    if last:
        _expect(record, pre + "local error (raiser)", TypeError, lambda: call(t=target.float()), ["int64"])
    else:
        _expect(record, pre + "local error (others)", ValueError, lambda: call(), [f"rank(s) [{world - 1}]"])
    if last:
        _expect(record, pre + "bad range (raiser)", ValueError, lambda: call(vocab_start=v), ["not inside"])
    else:
        _expect(record, pre + "bad range (others)", ValueError, lambda: call(), [f"rank(s) [{world - 1}]"])
    # the linear variant checks the same way
    h = torch.randn(6, 4)
    w = torch.randn(end - start, 5 if last else 4)
    _expect(record, pre + "linear shapes", ValueError,
            lambda: cd.vocab_parallel_linear_cross_entropy(h, w, target, vocab_start=start, vocab_size=v,
                                                           backend=backend))
    # the group is still in step after all that
    loss = call()
    ref = F.cross_entropy(full, target)
    assert_close(loss, ref, "after errors", rtol=1e-5, atol=1e-5)
    record(pre + "still in step")
    check_communication(rank, world, backend, record)


def check_communication(rank, world, backend, record):
    """What goes over the wire: the descriptor (8 int64) + one (N, 4) statistics all-gather in
    forward, nothing in the logits variant's backward, one d(hidden) all-reduce in the linear one."""
    log = []
    real_gather, real_reduce = cd._all_gather, dist.all_reduce

    def gather(dist_mod, out, inp, group):
        log.append(("all_gather", inp.numel() * inp.element_size()))
        return real_gather(dist_mod, out, inp, group)

    def reduce_(tensor, *args, **kwargs):
        log.append(("all_reduce", tensor.numel() * tensor.element_size()))
        return real_reduce(tensor, *args, **kwargs)

    n, v = 11, 8 * world + 3
    start, end = cd.vocab_range(v, rank, world)
    gen = torch.Generator().manual_seed(11)
    full, target = torch.randn(n, v, generator=gen), torch.randint(0, v, (n,), generator=gen)
    cd._all_gather, dist.all_reduce = gather, reduce_
    try:
        x = full[:, start:end].clone().requires_grad_()
        loss = cd.vocab_parallel_cross_entropy(x, target, vocab_start=start, vocab_size=v, backend=backend)
        assert log == [("all_gather", 8 * 8), ("all_gather", n * 4 * 4)], log
        loss.backward()
        assert len(log) == 2, log  # no communication in backward
        log.clear()
        x.grad = None
        loss2 = cd.vocab_parallel_cross_entropy(x, target, vocab_start=start, vocab_size=v, backend=backend,
                                                weight=torch.ones(end - start), validate=False)
        assert log == [("all_gather", (n + 1) * 5 * 4)], log  # weighted: (N + 1, 5), no descriptor
        assert_close(loss2, loss, "validate=False, unit weights", rtol=1e-6, atol=1e-6)
        log.clear()
        d = 6
        h = torch.randn(n, d, generator=gen).requires_grad_()
        w = torch.randn(v, d, generator=gen)[start:end].clone().requires_grad_()
        cd.vocab_parallel_linear_cross_entropy(h, w, target, vocab_start=start, vocab_size=v,
                                               backend=backend, chunk_size=4).backward()
        assert log == [("all_gather", 64), ("all_gather", n * 16), ("all_reduce", n * d * 4)], log
    finally:
        cd._all_gather, dist.all_reduce = real_gather, real_reduce
    record(f"errors[{backend}] communication")


def suite_dtensor(rank, world, backend, record):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    v = 10 * world + 1
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(4, v, generator=gen)
    target = torch.randint(0, v, (4,), generator=gen)
    dt = distribute_tensor(full, mesh, [Shard(1)])
    _expect(record, "dtensor rejected", TypeError,
            lambda: cd.vocab_parallel_cross_entropy(dt, target, vocab_start=0, vocab_size=v),
            ["to_local()", "device_mesh.get_group()"])
    # the recipe in the error message works
    local = dt.to_local().detach().requires_grad_()
    start = min(rank * math.ceil(v / world), v)
    assert torch.equal(local, full[:, start:start + local.shape[1]])
    loss = cd.vocab_parallel_cross_entropy(local, target, vocab_start=start, vocab_size=v,
                                           group=dt.device_mesh.get_group(), backend=backend)
    x = full.clone().requires_grad_()
    ref = F.cross_entropy(x, target)
    ref.backward()
    loss.backward()
    assert_close(loss, ref, "dtensor recipe loss", rtol=1e-5, atol=1e-6)
    assert_close(local.grad, x.grad[:, start:start + local.shape[1]], "dtensor recipe grad", rtol=1e-5, atol=1e-6)
    record("dtensor recipe")


SUITES = {"logits": suite_logits, "linear": suite_linear, "errors": suite_errors, "dtensor": suite_dtensor}


def main(rank, world, port, backends, suites, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    result = {"rank": rank, "passed": [], "messages": {}, "error": None}

    def record(name, message=None):
        result["passed"].append(name)
        if message is not None:
            result["messages"][name] = message

    t0 = time.monotonic()
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        result["seconds"] = {"init": time.monotonic() - t0}
        for suite in suites:
            for backend in (backends[:1] if suite == "dtensor" else backends):
                t = time.monotonic()
                SUITES[suite](rank, world, backend, record)
                result["seconds"][f"{suite}[{backend}]"] = time.monotonic() - t
    except BaseException:
        result["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if result["error"] is not None:
        os._exit(1)  # don't wait in destroy_process_group for ranks that are still running
    dist.destroy_process_group()
