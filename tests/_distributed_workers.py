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
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

import celoss
import oracle
from celoss import distributed as cd
from celoss.distributed import _common

# ------------------------------------------------------------------------------------------------
# oracle and helpers
# ------------------------------------------------------------------------------------------------


def oracle_rows(z2, t, weight, ignore_index, label_smoothing, z_loss):
    """float64 per-row loss, lse and the weighted-mean denominator with plain PyTorch."""
    w = None if weight is None else weight.double()
    rows = F.cross_entropy(z2, t, weight=w, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(z2, dim=1)
    w_y = oracle.target_weight(t, w, ignore_index, lse)
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
    z2 = oracle.transform(x, logit_scale, softcap).reshape(-1, vocab_size)
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
    z2 = oracle.transform(F.linear(h_o, w_o, b_o), logit_scale, softcap)
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
    """What goes over the wire: the descriptor (8 int64, the target digest among them) + one (N, 4)
    statistics all-gather in forward, nothing in the logits variant's backward, one d(hidden)
    all-reduce in the linear one."""
    log = []
    real_gather, real_reduce = _common._all_gather, dist.all_reduce

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
    _common._all_gather, dist.all_reduce = gather, reduce_
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
        _common._all_gather, dist.all_reduce = real_gather, real_reduce
    record(f"errors[{backend}] communication")


# ------------------------------------------------------------------------------------------------
# issue 11: weighted-mean denominators <= 0, the target digest, double backward
# ------------------------------------------------------------------------------------------------

def denominator_cases(v):
    """(name, targets (6,), class weights (v,), label_smoothing): weighted-mean denominators that
    are negative, zero with zero weights, zero with weights that cancel, and all rows ignored."""
    gen = torch.Generator().manual_seed(17)
    t = torch.tensor([0, v - 1, 5, -100, v // 2, 5])
    negative = -torch.rand(v, generator=gen, dtype=torch.float64) - 0.5
    negative[v - 1] = 0.75  # one positive target weight; the sum stays below -1
    zero = torch.rand(v, generator=gen, dtype=torch.float64) + 0.25
    zero[t[t >= 0]] = 0.0
    cancel = torch.rand(v, generator=gen, dtype=torch.float64) + 0.25
    cancel[[0, v - 1, 5, v // 2]] = torch.tensor([1.0, -2.0, 0.25, 0.5], dtype=torch.float64)
    return [("negative sum", t, negative, 0.0),
            ("negative sum, smoothing", t, negative, 0.2),
            ("zero target weights", t, zero, 0.0),
            ("zero target weights, smoothing", t, zero, 0.1),
            ("cancelling weights", t, cancel, 0.0),
            ("cancelling weights, smoothing", t, cancel, 0.1),
            ("all ignored", torch.full_like(t, -100), negative, 0.1)]


def check_denominator(rank, world, backend, name, target, w_full, label_smoothing, linear=True):
    """Both functions (the linear one if ``linear``) vs F.cross_entropy in float64 (NaN and inf
    where PyTorch has them); returns the logits oracle's loss and gradient."""
    v, n, d = w_full.numel(), target.numel(), 5
    start, end = cd.vocab_range(v, rank, world)
    gen = torch.Generator().manual_seed(23)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    head = torch.randn(v, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    full = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    up = 0.7
    opts = dict(weight=w_full.float(), ignore_index=-100, label_smoothing=label_smoothing)
    tol = dict(rtol=2e-5, atol=2e-5)

    x_o = full.clone().requires_grad_()
    loss_o = F.cross_entropy(x_o, target, **dict(opts, weight=w_full))
    (loss_o * up).backward()
    x = full[:, start:end].float().requires_grad_()
    loss = cd.vocab_parallel_cross_entropy(x, target, vocab_start=start, vocab_size=v, backend=backend,
                                           **opts)
    (loss * up).backward()
    assert_close(loss, loss_o, f"{name}: loss", **tol)
    assert_close(x.grad, x_o.grad[:, start:end], f"{name}: grad", **tol)
    if not linear:
        return loss_o, x_o.grad
    logits_oracle = loss_o, x_o.grad

    h_o, w_o, b_o = (t.clone().requires_grad_() for t in (hidden, head, bias))
    loss_o = F.cross_entropy(F.linear(h_o, w_o, b_o), target, **dict(opts, weight=w_full))
    (loss_o * up).backward()
    h = hidden.float().requires_grad_()
    w, b = (t[start:end].float().requires_grad_() for t in (head, bias))
    loss = cd.vocab_parallel_linear_cross_entropy(h, w, target, vocab_start=start, vocab_size=v,
                                                  linear_bias=b, backend=backend, chunk_size=4, **opts)
    (loss * up).backward()
    assert_close(loss, loss_o, f"{name}: linear loss", **tol)
    assert_close(h.grad, h_o.grad, f"{name}: linear grad hidden", **tol)
    assert_close(w.grad, w_o.grad[start:end], f"{name}: linear grad weight", **tol)
    assert_close(b.grad, b_o.grad[start:end], f"{name}: linear grad bias", **tol)
    return logits_oracle


def suite_issue11(rank, world, backend, record):
    v = 8 * world + 3
    for i, (name, target, w_full, eps) in enumerate(denominator_cases(v)):
        # the interpreter is slow: the linear variant on a negative and a cancelling sum only there
        linear = not interpreted(backend) or i in (1, 4)
        loss_o, grad_o = check_denominator(rank, world, backend, name, target, w_full, eps, linear)
        record(f"issue11[{backend}] {name}",
               f"loss {float(loss_o.detach())}, NaN grads {int(grad_o.isnan().sum())}")

    # the target digest: the old checksum sum(t_i (2 i + 1)) gave 3 for both [3, 0] and [0, 1]
    start, end = cd.vocab_range(v, rank, world)
    target = torch.tensor([3, 0, 4, 2]) if rank == 0 else torch.tensor([0, 1, 4, 2])
    x = torch.randn(4, v, generator=torch.Generator().manual_seed(2))[:, start:end]
    _expect(record, f"issue11[{backend}] target collision", ValueError,
            lambda: cd.vocab_parallel_cross_entropy(x, target, vocab_start=start, vocab_size=v,
                                                    backend=backend),
            ["the targets (they must be replicated", "every rank raises"])

    # double backward: a clear error naming the function, for both variants
    x = x.clone().requires_grad_()
    loss = cd.vocab_parallel_cross_entropy(x, torch.tensor([3, 0, 4, 2]), vocab_start=start, vocab_size=v,
                                           backend=backend)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    _expect(record, f"issue11[{backend}] double backward", RuntimeError, lambda: g.sum().backward(),
            ["once", "vocab_parallel_cross_entropy"])
    h = torch.randn(4, 3).requires_grad_()
    w = torch.randn(end - start, 3).requires_grad_()
    loss = cd.vocab_parallel_linear_cross_entropy(h, w, torch.tensor([3, 0, 4, 2]), vocab_start=start,
                                                  vocab_size=v, backend=backend)
    gh, gw = torch.autograd.grad(loss, (h, w), create_graph=True)
    _expect(record, f"issue11[{backend}] linear double backward", RuntimeError,
            lambda: (gh.sum() + gw.sum()).backward(), ["once", "vocab_parallel_linear_cross_entropy"])


# ------------------------------------------------------------------------------------------------
# issue 14 part 4: DTensor inputs sharded on the vocabulary, even-shard defaults
# ------------------------------------------------------------------------------------------------

def suite_dtensor(rank, world, backend, record):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    tol = dict(rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(5)
    # (..., V) logits Shard(-1), uneven torch.chunk slices (and an empty trailing one with V = 4
    # on 3 ranks), a replicated DTensor target, class weights sharded like the logits
    for v in (10 * world + 1, 4):
        full = torch.randn(2, 3, v, generator=gen, dtype=torch.float64)
        target = torch.randint(0, v, (2, 3), generator=gen)
        target[0, 1] = -100
        w_full = torch.rand(v, generator=gen, dtype=torch.float64) + 0.5
        x_o = full.clone().requires_grad_()
        loss_o = F.cross_entropy(x_o.reshape(-1, v), target.reshape(-1), weight=w_full, label_smoothing=0.1)
        (loss_o * 1.3).backward()
        dx = distribute_tensor(full.float(), mesh, [Shard(-1)]).requires_grad_()
        loss = cd.vocab_parallel_cross_entropy(dx, distribute_tensor(target, mesh, [Replicate()]),
                                               weight=distribute_tensor(w_full.float(), mesh, [Shard(0)]),
                                               label_smoothing=0.1, backend=backend)
        assert type(loss) is torch.Tensor
        (loss * 1.3).backward()
        assert_close(loss, loss_o, f"dtensor logits V={v} loss", **tol)
        assert tuple(dx.grad.placements) == (Shard(2),)
        assert_close(dx.grad.full_tensor(), x_o.grad, f"dtensor logits V={v} grad", **tol)
        record(f"dtensor logits V={v}")

    # the linear variant: a replicated hidden DTensor, the head and its bias Shard(0)
    v, d = 7 * world + 2, 6
    hidden = torch.randn(5, d, generator=gen, dtype=torch.float64)
    head = torch.randn(v, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    target = torch.randint(0, v, (5,), generator=gen)
    h_o, w_o, b_o = (t.clone().requires_grad_() for t in (hidden, head, bias))
    loss_o = F.cross_entropy(F.linear(h_o, w_o, b_o), target, reduction="sum")
    (loss_o * 0.6).backward()
    dh = distribute_tensor(hidden.float(), mesh, [Replicate()]).requires_grad_()
    dw = distribute_tensor(head.float(), mesh, [Shard(0)]).requires_grad_()
    db = distribute_tensor(bias.float(), mesh, [Shard(0)]).requires_grad_()
    loss = cd.vocab_parallel_linear_cross_entropy(dh, dw, target, linear_bias=db, reduction="sum",
                                                  backend=backend, chunk_size=2)
    (loss * 0.6).backward()
    assert_close(loss, loss_o, "dtensor linear loss", **tol)
    assert tuple(dh.grad.placements) == (Replicate(),)
    assert_close(dh.grad.to_local(), h_o.grad, "dtensor linear grad hidden", **tol)
    assert_close(dw.grad.full_tensor(), w_o.grad, "dtensor linear grad weight", **tol)
    assert_close(db.grad.full_tensor(), b_o.grad, "dtensor linear grad bias", **tol)
    record("dtensor linear")

    # a 2-D mesh (data parallel x tensor parallel, the data-parallel dimension of size 1 here):
    # the vocabulary group is the mesh's second dimension
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    full2 = torch.randn(3, 4 * world + 1, generator=gen, dtype=torch.float64)
    target2 = torch.randint(0, full2.shape[1], (3,), generator=gen)
    x_o = full2.clone().requires_grad_()
    loss_o = F.cross_entropy(x_o, target2)
    loss_o.backward()
    dx = distribute_tensor(full2.float(), mesh2, [Replicate(), Shard(-1)]).requires_grad_()
    loss = cd.vocab_parallel_cross_entropy(dx, target2, backend=backend)
    loss.backward()
    assert_close(loss, loss_o, "dtensor 2-D mesh loss", **tol)
    assert_close(dx.grad.full_tensor(), x_o.grad, "dtensor 2-D mesh grad", **tol)
    record("dtensor 2-D mesh")

    # DTensors laid out some other way: the same clear error on every rank
    logits = torch.randn(4, v, generator=gen)
    t4 = target[:4]
    dx = distribute_tensor(logits, mesh, [Shard(-1)])
    _expect(record, "dtensor batch-sharded logits", ValueError,
            lambda: cd.vocab_parallel_cross_entropy(distribute_tensor(logits, mesh, [Shard(0)]), t4),
            ["must be sharded on the vocabulary (Shard(-1))"])
    # right on rank 0 only: the others raise, rank 0 names them
    _expect(record, "dtensor contradicting vocab_start", ValueError,
            lambda: cd.vocab_parallel_cross_entropy(dx, t4, vocab_start=0, vocab_size=v),
            ["rejected their arguments"] if rank == 0 else ["contradict the DTensor's placement"])
    _expect(record, "dtensor sharded target", ValueError,
            lambda: cd.vocab_parallel_cross_entropy(dx, distribute_tensor(t4, mesh, [Shard(0)])),
            ["`target` is a DTensor", "replicated"])
    _expect(record, "dtensor replicated bias", ValueError,
            lambda: cd.vocab_parallel_linear_cross_entropy(
                dh, dw, target, linear_bias=distribute_tensor(bias, mesh, [Replicate()]))
            ["`linear_bias`", "Shard(0)"])

    # plain tensors: vocab_start / vocab_size default to even shards
    v = 5 * world
    full = torch.randn(6, v, generator=gen)
    target = torch.randint(0, v, (6,), generator=gen)
    x = full[:, 5 * rank:5 * rank + 5].clone().requires_grad_()
    x_o = full.clone().requires_grad_()
    loss_o = F.cross_entropy(x_o, target)
    loss = cd.vocab_parallel_cross_entropy(x, target, backend=backend)
    (loss * 0.9).backward()
    (loss_o * 0.9).backward()
    assert_close(loss, loss_o, "even-shard defaults loss", **tol)
    assert_close(x.grad, x_o.grad[:, 5 * rank:5 * rank + 5], "even-shard defaults grad", **tol)
    record("even-shard defaults")
    uneven = full[:, :6] if rank == 0 else full[:, :5]
    _expect(record, "even-shard defaults, uneven shards", ValueError,
            lambda: cd.vocab_parallel_cross_entropy(uneven, target, backend=backend), ["even shards only"])
    _expect(record, "vocab_start without vocab_size", ValueError,
            lambda: cd.vocab_parallel_cross_entropy(x.detach(), target, vocab_start=5 * rank,
                                                    backend=backend),
            ["pass both vocab_start and vocab_size"])


# ------------------------------------------------------------------------------------------------
# issue 14 items 1, 2, 4: vocab-parallel token log-probs / entropy and linear distillation
# ------------------------------------------------------------------------------------------------

def ragged_layout(world):
    """13 classes in uneven slices, out of rank order; on 3 ranks rank 1 holds none."""
    return {2: ((4, 9), (1, 0)), 3: ((0, 5, 8), (2, 0, 1))}[world]


def _tol(dtype):
    """(vs the float64 oracle, vs single-process celoss) tolerances."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10), dict(rtol=1e-11, atol=1e-11)
    if dtype == torch.float32:
        return dict(rtol=3e-5, atol=3e-5), dict(rtol=1e-5, atol=1e-5)
    return dict(rtol=5e-2, atol=5e-2), dict(rtol=2e-2, atol=2e-2)


def _layout_kw(layout, start, vocab_size):
    """Explicit vocab_start / vocab_size, or none (the even-shard defaults) for layout 'even'."""
    return {} if layout == "even" else dict(vocab_start=start, vocab_size=vocab_size)


def _slice_of(world, rank, vocab_size, layout):
    return slices(world, vocab_size, "balanced" if layout == "even" else layout)[rank]


def _objective(outs, ups):
    """sum_i <out_i, up_i> in float64 (random upstream gradients for every output)."""
    return sum((o.double() * u).sum() for o, u in zip(outs, ups))


def _close_all(pairs, tol, what):
    for name, ours, ref in pairs:
        assert_close(ours, ref, f"{what}: {name}", **tol)


def token_cases(world):
    v = 8 * world + 3
    ragged = ragged_layout(world)
    return [
        dict(vocab_size=v),
        dict(vocab_size=v, temperature=0.7, ignore_index=3, shape=(2, 5)),
        dict(vocab_size=13, layout=ragged, temperature=1.6, entropy=False),
        dict(vocab_size=13, layout=ragged, dtype=torch.float64, temperature=0.5, shape=(3, 4)),
        dict(vocab_size=4 * world, layout="even", temperature=1.3),
        dict(vocab_size=13, layout=ragged, special=True),   # -inf classes, an all -inf slice, NaN / inf rows
        dict(vocab_size=v, dtype=torch.bfloat16, temperature=0.9),
        dict(vocab_size=v, all_ignored=True),
    ]


def check_token_logprobs(rank, world, backend, *, vocab_size, seed, shape=(7,), layout="balanced",
                         dtype=torch.float32, temperature=1.0, ignore_index=-100, entropy=True, special=False,
                         all_ignored=False):
    gen = torch.Generator().manual_seed(seed)
    v = vocab_size
    full = (torch.randn(*shape, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    tokens = make_target(gen, shape, v, ignore_index, 0.3)
    start, end = _slice_of(world, rank, v, layout)
    if special:
        rows = full.view(-1, v)
        first = slices(world, v, layout)
        r0 = first[0]
        rows[0, r0[0]:r0[1]] = -math.inf          # rank 0's whole slice -inf in this row
        rows[0, (r0[1]) % v] = 2.0
        tokens.view(-1)[0] = r0[1] % v
        rows[1, ::3] = -math.inf                    # masked classes (the token's among them: -inf)
        tokens.view(-1)[1] = 3
        rows[2, 5] = math.nan
        tokens.view(-1)[2] = 1
        rows[3] = -math.inf                         # all -inf: NaN, as log_softmax
        tokens.view(-1)[3] = 2
        rows[4, 7] = math.inf
        tokens.view(-1)[4] = 7
        rows[5, 2] = math.nan                       # an ignored NaN row: 0 outputs, 0 gradient
        tokens.view(-1)[5] = ignore_index
    if all_ignored:
        tokens = torch.full_like(tokens, ignore_index)
    ups = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2 if entropy else 1)]

    x_o = full.double().clone().requires_grad_()
    outs_o = oracle.token_logprobs(x_o, tokens, temperature, ignore_index)[:len(ups)]
    _objective(outs_o, ups).backward()

    x_s = full.clone().requires_grad_()
    single = celoss.token_logprobs(x_s, tokens, temperature=temperature, ignore_index=ignore_index,
                                   return_entropy=entropy, backend=backend)
    outs_s = tuple(single) if entropy else (single,)
    _objective(outs_s, ups).backward()

    x_d = full[..., start:end].clone().requires_grad_()
    out = cd.vocab_parallel_token_logprobs(x_d, tokens, temperature=temperature, ignore_index=ignore_index,
                                           return_entropy=entropy, **_layout_kw(layout, start, v))
    if entropy:
        assert isinstance(out, celoss.TokenLogprobsOutput)
        outs_d = tuple(out)
    else:
        assert type(out) is torch.Tensor
        outs_d = (out,)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(o.dtype == acc and o.shape == shape for o in outs_d), [(o.dtype, o.shape) for o in outs_d]
    _objective(outs_d, ups).backward()

    names = ("logprobs", "entropy")
    tol_o, tol_s = _tol(dtype)
    if dtype != torch.bfloat16:  # bf16: vs single-process (itself checked against the oracle in tests/)
        _close_all([*zip(names, outs_d, outs_o), ("grad", x_d.grad, x_o.grad[..., start:end])], tol_o, "vs oracle")
    _close_all([*zip(names, outs_d, outs_s), ("grad", x_d.grad, x_s.grad[..., start:end])], tol_s,
               "vs single-process")
    ignored = tokens == ignore_index
    for o in outs_d:
        assert float(o.detach()[ignored].abs().sum()) == 0.0
    assert float(x_d.grad[ignored].abs().sum()) == 0.0
    if special:  # the edges are reached: NaN rows, a finite row whose slice on rank 0 is all -inf
        assert outs_o[0].view(-1)[[2, 3, 4]].isnan().all() and outs_o[0].view(-1)[0].isfinite()
        assert outs_o[0].view(-1)[1] == -math.inf
    return outs_d


def linear_token_cases(world):
    v = 8 * world + 3
    ragged = ragged_layout(world)
    return [
        dict(vocab_size=v),
        dict(vocab_size=v, shift=True, temperature=0.8, chunk_size=3, bias=False),
        dict(vocab_size=13, layout=ragged, shift=True, chunk_size=2, ignore_index=2),
        dict(vocab_size=13, layout=ragged, dtype=torch.float64, temperature=1.4, entropy=False, hidden_grad=False),
        dict(vocab_size=3 * world, layout="even", shift=True),
        dict(vocab_size=v, dtype=torch.bfloat16, chunk_size=4),
        dict(vocab_size=v, nan_ignored=True, chunk_size=3),  # ignored positions are not read
    ]


def check_linear_token_logprobs(rank, world, backend, *, vocab_size, seed, lead=(2, 5), d=6, layout="balanced",
                                dtype=torch.float32, temperature=1.0, ignore_index=-100, shift=False, bias=True,
                                chunk_size=None, entropy=True, hidden_grad=True, nan_ignored=False):
    gen = torch.Generator().manual_seed(seed)
    v = vocab_size
    hidden = torch.randn(*lead, d, generator=gen, dtype=torch.float64).to(dtype)
    head = (torch.randn(v, d, generator=gen, dtype=torch.float64) * (2 / math.sqrt(d))).to(dtype)
    b = (torch.randn(v, generator=gen, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    tokens = make_target(gen, lead, v, ignore_index, 0.3)
    if nan_ignored:  # position 0 is ignored (make_target): its NaN hidden state must not reach anything
        hidden.view(-1, d)[0] = math.nan
    out_shape = lead[:-1] + (lead[-1] - 1,) if shift else lead
    ups = [torch.randn(out_shape, generator=gen, dtype=torch.float64) for _ in range(2 if entropy else 1)]
    start, end = _slice_of(world, rank, v, layout)

    def leaves(dt, local):
        h = hidden.to(dt).clone().requires_grad_(hidden_grad)
        w = (head[start:end] if local else head).to(dt).clone().requires_grad_()
        bb = None if b is None else (b[start:end] if local else b).to(dt).clone().requires_grad_()
        return h, w, bb

    h_o, w_o, b_o = leaves(torch.float64, False)
    z = F.linear(h_o, w_o, b_o)
    z, t = (z[..., :-1, :], tokens[..., 1:]) if shift else (z, tokens)
    outs_o = oracle.token_logprobs(z, t, temperature, ignore_index)[:len(ups)]
    _objective(outs_o, ups).backward()

    h_s, w_s, b_s = leaves(dtype, False)
    single = celoss.linear_token_logprobs(h_s, w_s, tokens, linear_bias=b_s, temperature=temperature,
                                          ignore_index=ignore_index, shift=shift, return_entropy=entropy,
                                          backend=backend)
    _objective(tuple(single) if entropy else (single,), ups).backward()
    outs_s = tuple(single) if entropy else (single,)

    h_d, w_d, b_d = leaves(dtype, True)
    out = cd.vocab_parallel_linear_token_logprobs(
        h_d, w_d, tokens, local_bias=b_d, temperature=temperature, ignore_index=ignore_index, shift=shift,
        return_entropy=entropy, chunk_size=chunk_size, **_layout_kw(layout, start, v))
    outs_d = tuple(out) if entropy else (out,)
    assert all(o.shape == out_shape for o in outs_d)
    _objective(outs_d, ups).backward()

    def grads(h, w, bb, local):
        sl = slice(None) if local else slice(start, end)
        return [("grad hidden", h.grad), ("grad weight", w.grad[sl])] + \
            ([("grad bias", bb.grad[sl])] if bb is not None else [])

    names = ("logprobs", "entropy")
    tol_o, tol_s = _tol(dtype)
    ours = grads(h_d, w_d, b_d, True) if hidden_grad else grads(h_d, w_d, b_d, True)[1:]
    if not hidden_grad:
        assert h_d.grad is None
    for what, refs, grads_ref, tol in (("vs oracle", outs_o, grads(h_o, w_o, b_o, False), tol_o),
                                       ("vs single-process", outs_s, grads(h_s, w_s, b_s, False), tol_s)):
        if what == "vs oracle" and (dtype == torch.bfloat16 or nan_ignored):  # (the composition reads it)
            continue
        refs_g = grads_ref if hidden_grad else grads_ref[1:]
        _close_all([*zip(names, outs_d, refs), *((n, a, r) for (n, a), (_, r) in zip(ours, refs_g))], tol, what)
    if nan_ignored:
        assert torch.isfinite(w_d.grad).all() and float(h_d.grad.view(-1, d)[0].abs().sum()) == 0.0


KINDS = ("kl", "reverse_kl", "ce", "jsd")


def distill_cases(world):
    v = 8 * world + 3
    ragged = ragged_layout(world)
    cases = []
    for i, kind in enumerate(KINDS):
        cases += [
            dict(kind=kind, vocab_size=v, reduction="batchmean"),
            dict(kind=kind, vocab_size=13, layout=ragged, reduction="none", temperature=2.0, alpha=0.3,
                 target=True, shift=True, teacher_grad=True, chunk_size=3),
            dict(kind=kind, vocab_size=v, reduction=("mean", "sum")[i % 2], temperature=0.7, target=True,
                 ignore_index=4, bias=False, beta=0.3),
        ]
    cases += [
        dict(kind="jsd", vocab_size=3 * world, layout="even", reduction="sum", alpha=0.6, target=True, beta=0.8),
        dict(kind="kl", vocab_size=13, layout=ragged, dtype=torch.float64, reduction="batchmean", temperature=1.5,
             alpha=0.5, target=True, shift=True, teacher_grad=True),
        dict(kind="ce", vocab_size=v, dtype=torch.bfloat16, reduction="batchmean", target=True, alpha=0.5),
        dict(kind="kl", vocab_size=v, reduction="batchmean", target=True, all_ignored=True),
    ]
    return cases


def check_linear_distillation(rank, world, backend, *, vocab_size, seed, kind, reduction, lead=(2, 4), ds=6, dt=5,
                              layout="balanced", dtype=torch.float32, temperature=1.0, alpha=1.0, beta=0.5,
                              target=False, ignore_index=-100, shift=False, teacher_grad=False, bias=True,
                              chunk_size=None, all_ignored=False):
    gen = torch.Generator().manual_seed(seed)
    v = vocab_size
    f64 = dict(generator=gen, dtype=torch.float64)
    base = [torch.randn(*lead, ds, **f64), torch.randn(v, ds, **f64) * (2 / math.sqrt(ds)),
            torch.randn(v, **f64) * 0.5 if bias else None,
            torch.randn(*lead, dt, **f64), torch.randn(v, dt, **f64) * (3 / math.sqrt(dt)),
            torch.randn(v, **f64) * 0.5 if bias else None]
    base = [None if t is None else t.to(dtype) for t in base]
    y = make_target(gen, lead, v, ignore_index, 0.3) if target else None
    if all_ignored:
        y = torch.full_like(y, ignore_index)
    out_shape = lead[:-1] + (lead[-1] - 1,) if shift else lead
    up = torch.randn(out_shape, **f64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    start, end = _slice_of(world, rank, v, layout)
    opts = dict(temperature=temperature, kind=kind, beta=beta, alpha=alpha, ignore_index=ignore_index,
                reduction=reduction)
    needs = (True, True, True, teacher_grad, teacher_grad, teacher_grad)

    def leaves(dt_, local):
        out = []
        for i, t in enumerate(base):
            if t is not None:
                t = t[start:end] if local and i % 3 else t
                t = t.to(dt_).clone().requires_grad_(needs[i])
            out.append(t)
        return out

    o = leaves(torch.float64, False)
    zs, zt = F.linear(o[0], o[1], o[2]), F.linear(o[3], o[4], o[5])
    yo = y
    if shift:
        zs, zt, yo = zs[..., :-1, :], zt[..., :-1, :], None if y is None else y[..., 1:]
    loss_o = oracle.distillation_loss(zs, zt, yo, **opts)
    (loss_o * up).sum().backward()

    s = leaves(dtype, False)
    loss_s = celoss.linear_distillation_loss(s[0], s[1], s[3], s[4], y, student_bias=s[2], teacher_bias=s[5],
                                             shift=shift, backend=backend, **opts)
    (loss_s.double() * up).sum().backward()

    dd = leaves(dtype, True)
    loss_d = cd.vocab_parallel_linear_distillation_loss(
        dd[0], dd[1], dd[3], dd[4], y, student_bias=dd[2], teacher_bias=dd[5], shift=shift, chunk_size=chunk_size,
        **opts, **_layout_kw(layout, start, v))
    assert loss_d.dtype == dtype and loss_d.shape == (out_shape if reduction == "none" else ())
    (loss_d.double() * up).sum().backward()

    names = ("student_input", "student_weight", "student_bias", "teacher_input", "teacher_weight", "teacher_bias")
    tol_o, tol_s = _tol(dtype)
    for what, ref, refs, tol in (("vs oracle", loss_o, o, tol_o), ("vs single-process", loss_s, s, tol_s)):
        if what == "vs oracle" and dtype == torch.bfloat16:
            continue
        pairs = [("loss", loss_d, ref)]
        for i, (name, a, r) in enumerate(zip(names, dd, refs)):
            if a is None:
                continue
            if not needs[i]:
                assert a.grad is None, name
                continue
            pairs.append((f"grad {name}", a.grad, r.grad if i % 3 == 0 else r.grad[start:end]))
        _close_all(pairs, tol, what)
    if all_ignored:
        assert torch.isnan(loss_d) and float(dd[0].grad.abs().sum()) == 0.0


def suite_issue14(rank, world, backend, record):
    """The new vocab-parallel functions vs single-process celoss (``backend``) and the float64 oracle."""
    for name, cases, check in (("token_logprobs", token_cases(world), check_token_logprobs),
                               ("linear_token_logprobs", linear_token_cases(world), check_linear_token_logprobs),
                               ("linear_distillation", distill_cases(world), check_linear_distillation)):
        for i, case in enumerate(cases):
            try:
                check(rank, world, backend, seed=3000 + i, **case)
            except Exception as exc:
                raise AssertionError(f"{name} case {i} {case}: {exc}") from exc
            record(f"issue14 {name} case {i}")
    check_issue14_dtensor(rank, world, record)
    check_issue14_errors(rank, world, record)
    check_issue14_communication(rank, world, record)


def check_issue14_dtensor(rank, world, record):
    """DTensor logits Shard(-1) (uneven torch.chunk slices), heads and biases Shard(0), replicated
    hidden states and tokens: values and DTensor gradients vs the float64 oracle."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    tol = dict(rtol=3e-5, atol=3e-5)
    gen = torch.Generator().manual_seed(9)
    v, d = 5 * world + 1, 4
    full = torch.randn(2, 3, v, generator=gen, dtype=torch.float64) * 2
    tokens = torch.randint(0, v, (2, 3), generator=gen)
    tokens[1, 0] = -100
    gl, gh = (torch.randn(2, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    x_o = full.clone().requires_grad_()
    lp_o, ent_o = oracle.token_logprobs(x_o, tokens, 0.8)
    _objective((lp_o, ent_o), (gl, gh)).backward()
    dx = distribute_tensor(full.float(), mesh, [Shard(-1)]).requires_grad_()
    out = cd.vocab_parallel_token_logprobs(dx, distribute_tensor(tokens, mesh, [Replicate()]), temperature=0.8,
                                           return_entropy=True)
    assert type(out.logprobs) is torch.Tensor
    _objective(tuple(out), (gl, gh)).backward()
    assert tuple(dx.grad.placements) == (Shard(2),)
    _close_all([("logprobs", out.logprobs, lp_o), ("entropy", out.entropy, ent_o),
                ("grad", dx.grad.full_tensor(), x_o.grad)], tol, "dtensor token_logprobs")
    record("issue14 dtensor token_logprobs")

    hidden = torch.randn(2, 3, d, generator=gen, dtype=torch.float64)
    head = torch.randn(v, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    h_o, w_o, b_o = (t.clone().requires_grad_() for t in (hidden, head, bias))
    lp_o, ent_o = oracle.token_logprobs(F.linear(h_o, w_o, b_o)[:, :-1], tokens[:, 1:])
    _objective((lp_o, ent_o), (gl[:, 1:], gh[:, 1:])).backward()
    dh = distribute_tensor(hidden.float(), mesh, [Replicate()]).requires_grad_()
    dw = distribute_tensor(head.float(), mesh, [Shard(0)]).requires_grad_()
    db = distribute_tensor(bias.float(), mesh, [Shard(0)]).requires_grad_()
    out = cd.vocab_parallel_linear_token_logprobs(dh, dw, tokens, local_bias=db, shift=True, return_entropy=True)
    _objective(tuple(out), (gl[:, 1:], gh[:, 1:])).backward()
    _close_all([("logprobs", out.logprobs, lp_o), ("entropy", out.entropy, ent_o),
                ("grad hidden", dh.grad.to_local(), h_o.grad), ("grad weight", dw.grad.full_tensor(), w_o.grad),
                ("grad bias", db.grad.full_tensor(), b_o.grad)], tol, "dtensor linear_token_logprobs")
    record("issue14 dtensor linear_token_logprobs")

    teacher = torch.randn(v, d + 1, generator=gen, dtype=torch.float64)
    t_hidden = torch.randn(2, 3, d + 1, generator=gen, dtype=torch.float64)
    target = torch.randint(0, v, (2, 3), generator=gen)
    h_o, w_o, b_o = (t.clone().requires_grad_() for t in (hidden, head, bias))
    loss_o = oracle.distillation_loss(F.linear(h_o, w_o, b_o), F.linear(t_hidden, teacher), target, kind="jsd",
                                      alpha=0.7, temperature=1.5)
    (loss_o * 1.2).backward()
    dh, dw, db = (distribute_tensor(t.float(), mesh, [pl]).requires_grad_()
                  for t, pl in ((hidden, Replicate()), (head, Shard(0)), (bias, Shard(0))))
    dt_w = distribute_tensor(teacher.float(), mesh, [Shard(0)])
    loss = cd.vocab_parallel_linear_distillation_loss(dh, dw, t_hidden.float(), dt_w, target, student_bias=db,
                                                      kind="jsd", alpha=0.7, temperature=1.5)
    (loss * 1.2).backward()
    _close_all([("loss", loss, loss_o), ("grad hidden", dh.grad.to_local(), h_o.grad),
                ("grad weight", dw.grad.full_tensor(), w_o.grad), ("grad bias", db.grad.full_tensor(), b_o.grad)],
               tol, "dtensor linear_distillation")
    record("issue14 dtensor linear_distillation")
    # the teacher's head sharded some other way than the student's: the same error on every rank
    _expect(record, "issue14 dtensor teacher layout", ValueError,
            lambda: cd.vocab_parallel_linear_distillation_loss(
                dh, dw, t_hidden.float(), distribute_tensor(teacher.float(), mesh, [Replicate()])),
            ["local_teacher_weight", "sharded on the vocabulary"])


def check_issue14_errors(rank, world, record):
    """Arguments that differ across ranks raise the same error everywhere; double backward raises."""
    v, d = 4 * world, 3
    start, end = cd.vocab_range(v, rank, world)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, v, generator=gen)[:, start:end].clone().requires_grad_()
    tokens = torch.randint(0, v, (5,), generator=gen)
    h = torch.randn(5, d, generator=gen).requires_grad_()
    w = torch.randn(v, d, generator=gen)[start:end].clone().requires_grad_()
    last = rank == world - 1
    _expect(record, "issue14 errors token_logprobs temperature", ValueError,
            lambda: cd.vocab_parallel_token_logprobs(x, tokens, temperature=2.0 if last else 1.0),
            ["the options (", "every rank raises"])
    _expect(record, "issue14 errors linear_token_logprobs shift", ValueError,
            lambda: cd.vocab_parallel_linear_token_logprobs(h.unsqueeze(0), w, tokens.unsqueeze(0), shift=last),
            ["the options (", "every rank raises"])
    _expect(record, "issue14 errors linear_distillation kind", ValueError,
            lambda: cd.vocab_parallel_linear_distillation_loss(h, w, h, w, kind="jsd" if last else "kl"),
            ["the options (", "every rank raises"])
    _expect(record, "issue14 errors linear_distillation tokens", ValueError,
            lambda: cd.vocab_parallel_linear_distillation_loss(h, w, h, w, (tokens + last) % v, alpha=0.5),
            ["the targets (they must be replicated"])
    if last:
        _expect(record, "issue14 errors local (raiser)", ValueError,
                lambda: cd.vocab_parallel_token_logprobs(x, tokens, temperature=-1.0), ["temperature"])
    else:
        _expect(record, "issue14 errors local (others)", ValueError,
                lambda: cd.vocab_parallel_token_logprobs(x, tokens), [f"rank(s) [{world - 1}]"])
    bad = tokens.clone()
    bad[1] = v
    _expect(record, "issue14 errors token range", IndexError,
            lambda: cd.vocab_parallel_token_logprobs(x, bad), ["out of bounds"])

    out = cd.vocab_parallel_token_logprobs(x, tokens, return_entropy=True)
    (g,) = torch.autograd.grad(out.logprobs.sum() + out.entropy.sum(), x, create_graph=True)
    _expect(record, "issue14 double backward token_logprobs", RuntimeError, lambda: g.sum().backward(),
            ["once", "vocab_parallel_token_logprobs"])
    lp = cd.vocab_parallel_linear_token_logprobs(h, w, tokens)
    gh_, gw_ = torch.autograd.grad(lp.sum(), (h, w), create_graph=True)
    _expect(record, "issue14 double backward linear_token_logprobs", RuntimeError,
            lambda: (gh_.sum() + gw_.sum()).backward(), ["once", "vocab_parallel_linear_token_logprobs"])
    loss = cd.vocab_parallel_linear_distillation_loss(h, w, h.detach(), w.detach(), kind="reverse_kl")
    gh_, gw_ = torch.autograd.grad(loss, (h, w), create_graph=True)
    _expect(record, "issue14 double backward linear_distillation", RuntimeError,
            lambda: (gh_.sum() + gw_.sum()).backward(), ["once", "vocab_parallel_linear_distillation_loss"])


def check_issue14_communication(rank, world, record):
    """token log-probs: the descriptor + one (N, 4) all-gather, nothing in the logits variant's
    backward, one d(hidden) all-reduce in the linear one; distillation: (N, 8), jsd one (N, 2)
    all-reduce more, backward one d(hidden) all-reduce per model whose hidden states need it."""
    log = []
    real_gather, real_reduce = _common._all_gather, dist.all_reduce

    def gather(dist_mod, out, inp, group):
        log.append(("all_gather", inp.numel() * inp.element_size()))
        return real_gather(dist_mod, out, inp, group)

    def reduce_(tensor, *args, **kwargs):
        log.append(("all_reduce", tensor.numel() * tensor.element_size()))
        return real_reduce(tensor, *args, **kwargs)

    n, v, d = 6, 4 * world + 1, 3
    start, end = cd.vocab_range(v, rank, world)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(n, v, generator=gen)[:, start:end].clone().requires_grad_()
    tokens = torch.randint(0, v, (n,), generator=gen)
    h = torch.randn(n, d, generator=gen).requires_grad_()
    w = torch.randn(v, d, generator=gen)[start:end].clone().requires_grad_()
    kw = dict(vocab_start=start, vocab_size=v)
    _common._all_gather, dist.all_reduce = gather, reduce_
    try:
        out = cd.vocab_parallel_token_logprobs(x, tokens, return_entropy=True, **kw)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        assert log == [("all_gather", 64), ("all_gather", n * 4 * 4)], log
        log.clear()
        cd.vocab_parallel_linear_token_logprobs(h, w, tokens, **kw).sum().backward()
        assert log == [("all_gather", 64), ("all_gather", n * 4 * 4), ("all_reduce", n * d * 4)], log
        log.clear()
        cd.vocab_parallel_linear_distillation_loss(h, w, h.detach(), w.detach(), tokens, alpha=0.5, **kw).backward()
        assert log == [("all_gather", 64), ("all_gather", n * 8 * 4), ("all_reduce", n * d * 4)], log
        log.clear()
        cd.vocab_parallel_linear_distillation_loss(h, w, h.detach(), w.detach(), kind="jsd", **kw).backward()
        assert log == [("all_gather", 64), ("all_gather", n * 8 * 4), ("all_reduce", n * 2 * 4),
                       ("all_reduce", n * d * 4)], log
    finally:
        _common._all_gather, dist.all_reduce = real_gather, real_reduce
    record("issue14 communication")


# in this order: the short suites first, so that a failure in a long one still leaves their checks
SUITES = {"issue11": suite_issue11, "dtensor": suite_dtensor, "logits": suite_logits, "linear": suite_linear,
          "errors": suite_errors, "issue14": suite_issue14}


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
            # DTensor unwrapping does not depend on the backend: one, not the interpreter if possible
            compiled = [b for b in backends if not interpreted(b)] or backends
            # so do the issue 14 functions (plain PyTorch): compared with one single-process backend
            for backend in (compiled[:1] if suite in ("dtensor", "issue14") else backends):
                t = time.monotonic()
                SUITES[suite](rank, world, backend, record)
                result["seconds"][f"{suite}[{backend}]"] = time.monotonic() - t
    except BaseException:
        result["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if result["error"] is not None:
        os._exit(1)  # don't wait in destroy_process_group for ranks that are still running
    # every rank done with its collectives before any tears gloo down; then no interpreter teardown:
    # a rank once aborted there ("terminate called without an active exception", exit -6) after
    # all its checks had passed and its results were written
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
