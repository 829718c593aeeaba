"""celoss.linear_cross_entropy: the LM-head loss ``cross_entropy(input @ W^T + b, target)`` without
ever holding the N x V logits.

Two engines, both built on the per-row statistics of :mod:`celoss.stats`:

* **Chunked (CPU, and any backend without fused linear kernels).** The counted rows are processed
  in chunks whose logits workspace never exceeds ``chunk_bytes`` (default
  :data:`DEFAULT_CHUNK_BYTES` = 256 MB): ``L = X_c W^T (+ b)`` by BLAS into one reused buffer, then
  the backend's fused row kernel (``celoss::ce_forward_inplace``) overwrites ``L`` with
  ``coef * dloss/dlogits``, and ``dX_c = L W``, ``dW += L^T X_c``, ``db += sum_rows L``. With
  reduction "mean"/"sum" this runs in forward (three matrix products in all) and backward only
  rescales the saved gradients by ``grad_output``; with reduction "none" (a per-row upstream
  gradient) or a returned lse, forward computes the loss only and backward recomputes.
* **Fused (Triton).** ``lce_stats`` computes partial row statistics of logit tiles (``tl.dot``)
  merged with :func:`celoss.stats.merge_all`; backward recomputes logit tiles and accumulates dX,
  dW, db in float32 from the row coefficients of :func:`celoss.stats.coefficients`, with optional
  gradient filtering (``filter_eps``). See ``celoss/kernels/linear_cross_entropy.py``.

Rows whose target is ``ignore_index`` are compacted away before any matrix product (unless
``return_lse`` asks for every row's lse). ``shift=True`` maps output row ``r`` of a
``(..., T, D)`` input to hidden row ``r + r // (T - 1)`` (index arithmetic: no copy of the hidden
states) and reads its label from ``target[..., 1:]``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _checks, _dispatch, _ops
from . import stats as S
from .cross_entropy import CrossEntropyOutput, counted_weight

DEFAULT_CHUNK_BYTES = 256 << 20  # logits workspace of the chunked engine (bytes)
_LOWP_ACC_BYTES = 16 << 20       # bound of the per-slice temporary of a low-precision dW update
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Rows(NamedTuple):
    """The rows actually processed: ``M`` of them, out of ``n_out`` output rows."""
    src: Optional[Tensor]   # (M,) int64 rows of the flattened hidden states; None: 0..M-1
    tgt: Tensor             # (M,) int64 targets
    proc: Optional[Tensor]  # (M,) int64 output positions; None: all n_out rows, in order
    n_out: int


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# Row coefficients (shared by the recomputing backward passes)
# ------------------------------------------------------------------------------------------------

def _row_coefs(lse: Tensor, tgt: Tensor, weight, num_classes: int, opts: dict) -> Tensor:
    """(M, 3) gradient coefficients (A, B, D) of the per-row loss given the full-row lse.

    A, B, D depend on the statistics only through the lse (celoss.stats.coefficients), so the
    statistics are stood in for by (lse, 1, 0, 0)."""
    ones = torch.ones_like(lse)
    zeros = torch.zeros_like(lse)
    stand_in = torch.stack([lse, ones, zeros, zeros], dim=-1)
    return S.coefficients(stand_in, tgt, weight, num_classes=num_classes,
                          ignore_index=opts["ignore_index"], label_smoothing=opts["label_smoothing"],
                          z_loss=opts["z_loss"])[2]


def _scaled_coefs(lse, tgt, weight, num_classes, opts, scale, grad_lse):
    coefs = _row_coefs(lse, tgt, weight, num_classes, opts) * scale.to(lse.dtype).reshape(-1, 1)
    if grad_lse is not None:
        coefs[:, 0] += grad_lse.to(lse.dtype)
    return coefs


# ------------------------------------------------------------------------------------------------
# Chunked engine: BLAS products + the backend's row kernels
# ------------------------------------------------------------------------------------------------

class _ChunkedEngine:
    """Row chunks bounded by ``chunk_bytes``; products by torch (BLAS), rows by ``backend``."""
    fuses = True

    def __init__(self, backend: str, weight, opts: dict, chunk_bytes: int):
        self.backend, self.weight, self.opts, self.chunk_bytes = backend, weight, opts, chunk_bytes

    def _step(self, x2d, w, buffers: int) -> int:
        """Rows per chunk: `buffers` logits-sized buffers plus gathered rows within chunk_bytes."""
        v, d = w.shape
        per_row = x2d.element_size() * (buffers * v + 2 * d)
        return max(1, self.chunk_bytes // max(per_row, 1))

    def _pass(self, x2d, w, b, rows: _Rows, need, make_grad, buffers=1):
        """Run the chunks: ``make_grad(L, s, e)`` turns the logits chunk ``L`` of rows [s, e) into
        dloss/dlogits (in place or a new tensor; None: no gradient) and records what it wants.
        Returns the (dx, dw, db) accumulated from those gradients (None where not needed)."""
        m = rows.tgt.shape[0]
        v, d = w.shape
        dtype = x2d.dtype
        acc = _acc_dtype(dtype)
        need_dx, need_dw, need_db = need
        # dx rows outside the processed set stay 0; dw is written (not accumulated) by the first
        # chunk, unless there is no chunk
        every_row = rows.src is None and m == x2d.shape[0]
        dx = (torch.empty if every_row else torch.zeros)(x2d.shape, dtype=dtype, device=x2d.device) \
            if need_dx else None
        dw = (torch.empty if m else torch.zeros)(v, d, dtype=acc if dtype != acc else dtype, device=w.device) \
            if need_dw else None
        db = torch.zeros(v, dtype=acc, device=w.device) if need_db else None
        if m == 0:
            return dx, dw, db
        step = min(self._step(x2d, w, buffers), m)
        buf = torch.empty(step, v, dtype=dtype, device=x2d.device)
        wt = w.t()
        for s in range(0, m, step):
            e = min(m, s + step)
            sel = _contiguous_rows(rows.src, s, e)
            xc = x2d[sel] if isinstance(sel, slice) else x2d.index_select(0, sel)
            logits = buf[: e - s]
            if b is None:
                torch.mm(xc, wt, out=logits)
            else:
                torch.addmm(b, xc, wt, out=logits)
            g = make_grad(logits, s, e)
            if g is None:
                continue
            if need_dx:
                if isinstance(sel, slice):
                    torch.mm(g, w, out=dx[sel])
                else:
                    dx.index_copy_(0, sel, g @ w)
            if need_dw:
                _accumulate_dw(dw, g, xc, first=s == 0)
            if need_db:
                db += g.sum(0, dtype=acc)
        return dx, dw, db

    def forward(self, x2d, w, b, rows: _Rows, coef=None, need=(False, False, False)):
        """Per-row loss and lse of the processed rows; with ``coef`` also the gradients of
        ``coef * sum(loss)`` (as (dx, dw, db) in the parameter dtypes)."""
        m = rows.tgt.shape[0]
        acc = _acc_dtype(x2d.dtype)
        loss = torch.zeros(m, dtype=acc, device=x2d.device)
        lse = torch.zeros(m, dtype=acc, device=x2d.device)
        grads = coef is not None and any(need)

        def make_grad(logits, s, e):
            t = rows.tgt[s:e]
            if grads:
                loss[s:e], lse[s:e] = _ops.ce_forward_inplace(logits, t, None, self.weight, coef,
                                                              self.backend, **self.opts)
                return logits
            loss[s:e], lse[s:e], _ = _ops.ce_forward(logits, t, None, self.weight, None, self.backend,
                                                     **self.opts)
            return None

        out = self._pass(x2d, w, b, rows, need if grads else (False, False, False), make_grad)
        return loss, lse, (_finish(out, w, b) if grads else None)

    def backward(self, x2d, w, b, rows: _Rows, lse, scale, grad_lse, need):
        """Gradients of ``sum_n scale_n loss_n + grad_lse_n lse_n`` by recomputing the logits."""
        opts = self.opts
        if grad_lse is None and x2d.dtype != torch.float64:  # (the in-place kernel takes a float32 scale)
            def make_grad(logits, s, e):
                c = scale if scale.numel() == 1 else scale[s:e]
                _ops.ce_forward_inplace(logits, rows.tgt[s:e], None, self.weight, c, self.backend, **opts)
                return logits
            return _finish(self._pass(x2d, w, b, rows, need, make_grad), w, b)

        v = w.shape[0]
        coefs = _scaled_coefs(lse, rows.tgt, self.weight, v, opts, scale.expand(lse.shape[0]), grad_lse)

        def make_grad_lse(logits, s, e):
            return _ops.ce_grad(logits, rows.tgt[s:e], self.weight, lse[s:e], coefs[s:e], self.backend,
                                0, opts["logit_scale"], opts["softcap"])
        return _finish(self._pass(x2d, w, b, rows, need, make_grad_lse, buffers=2), w, b)


def _contiguous_rows(src, s, e):
    """Rows [s, e) of the processed set as a slice of the hidden states when they are one
    contiguous run (always without a row map), else the int64 index tensor."""
    if src is None:
        return slice(s, e)
    idx = src[s:e]
    first, last = int(idx[0]), int(idx[-1])
    if last - first == e - s - 1:  # src is strictly increasing
        return slice(first, last + 1)
    return idx


def _accumulate_dw(dw: Tensor, g: Tensor, xc: Tensor, first: bool) -> None:
    """dw (+)= g^T xc (``first``: dw is uninitialised), with float32 accumulation across chunks for
    fp16/bf16 (the product of one chunk is rounded once, in vocabulary slices that bound its
    temporary)."""
    if dw.dtype == g.dtype:
        if first:
            torch.mm(g.t(), xc, out=dw)
        else:
            dw.addmm_(g.t(), xc)
        return
    v, d = dw.shape
    step = max(1, _LOWP_ACC_BYTES // max(d * g.element_size(), 1))
    for s in range(0, v, step):
        part = torch.mm(g[:, s:s + step].t(), xc)
        if first:
            dw[s:s + step] = part
        else:
            dw[s:s + step] += part


def _finish(grads, w, b):
    dx, dw, db = grads
    return (dx, None if dw is None else dw.to(w.dtype),
            None if (db is None or b is None) else db.to(b.dtype))


# ------------------------------------------------------------------------------------------------
# Fused engine: backends with linear cross-entropy kernels (``lce_stats`` / ``lce_backward``)
# ------------------------------------------------------------------------------------------------

class _FusedEngine:
    """Logit tiles never leave the kernels (Triton)."""
    fuses = False  # backward recomputes tiles; nothing to precompute in forward

    def __init__(self, module, weight, opts: dict, filter_eps):
        self.k, self.weight, self.opts, self.filter_eps = module, weight, opts, filter_eps

    def forward(self, x2d, w, b, rows: _Rows, coef=None, need=None):
        o = self.opts
        partial = self.k.lce_stats(x2d, w, b, rows.src, rows.tgt, self.weight, logit_scale=o["logit_scale"],
                                   softcap=o["softcap"], need_wz=o["label_smoothing"] != 0.0)
        merged = S.merge_all(partial)
        loss, lse, _ = S.coefficients(merged, rows.tgt, self.weight, num_classes=w.shape[0],
                                      ignore_index=o["ignore_index"], label_smoothing=o["label_smoothing"],
                                      z_loss=o["z_loss"])
        return loss, lse, None

    def backward(self, x2d, w, b, rows: _Rows, lse, scale, grad_lse, need):
        o = self.opts
        m = rows.tgt.shape[0]
        v, d = w.shape
        scale = scale.to(torch.float32).expand(m).contiguous()
        coefs = _scaled_coefs(lse, rows.tgt, self.weight, v, o, scale, grad_lse).contiguous()
        thresholds = None
        if self.filter_eps is not None:
            thresholds = (self.filter_eps * scale.abs()).contiguous()
        need_dx, need_dw, need_db = need
        f32 = dict(dtype=torch.float32, device=x2d.device)
        dx = torch.zeros(x2d.shape, **f32) if need_dx else None
        dw = torch.zeros(v, d, **f32) if need_dw else None
        db = torch.zeros(v, **f32) if (need_db and b is not None) else None
        if m > 0 and (dx is not None or dw is not None or db is not None):
            # largest per-row scale: fp16/bf16 gradient tiles are normalized by it before rounding
            unit = scale.abs().amax()
            if grad_lse is not None:
                unit = torch.maximum(unit, grad_lse.abs().amax().to(unit.dtype))
            unit = torch.where(unit > 0, unit, 1.0).reshape(1).to(torch.float32)
            self.k.lce_backward(x2d, w, b, rows.src, rows.tgt, self.weight, lse.contiguous(), coefs,
                                thresholds, dx, dw, db, logit_scale=o["logit_scale"], softcap=o["softcap"],
                                has_d=o["label_smoothing"] != 0.0, unit=unit)
        return (None if dx is None else dx.to(x2d.dtype), None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(b.dtype))


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------

class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, w, b, rows, engine, reduction, denom, return_lse, grad_enabled):
        ctx.set_materialize_grads(False)
        need = tuple(bool(grad_enabled and n) for n in ctx.needs_input_grad[:3])
        fused = any(need) and engine.fuses and reduction != "none" and not return_lse
        if fused:
            # backends take a float32 coef: float64 gradients are formed unscaled, scaled in backward
            exact = x2d.dtype == torch.float64
            den = denom.to(_acc_dtype(x2d.dtype))
            one = torch.ones((), dtype=den.dtype, device=den.device)
            coef = torch.where(den > 0, one / den, 0.0) if reduction == "mean" else one
            fwd_coef = torch.ones(1, dtype=torch.float32, device=x2d.device) if exact else \
                coef.reshape(1).to(torch.float32)
            loss_p, lse_p, grads = engine.forward(x2d, w, b, rows, coef=fwd_coef, need=need)
            # saved (not kept on ctx): without retain_graph autograd releases them right after
            # backward, so AccumulateGrad can adopt the returned tensors without a copy
            ctx.save_for_backward(*grads)
            ctx.post_scale = coef.to(torch.float64) if exact else None
        else:
            loss_p, lse_p, _ = engine.forward(x2d, w, b, rows)
            if any(need):
                ctx.save_for_backward(x2d, w, b, lse_p)
        ctx.fused, ctx.rows, ctx.engine, ctx.need, ctx.consumed = fused, rows, engine, need, False
        ctx.reduction, ctx.denom = reduction, denom
        if reduction == "none":
            loss = loss_p if rows.proc is None else \
                loss_p.new_zeros(rows.n_out).index_copy_(0, rows.proc, loss_p)
        elif reduction == "sum":
            loss = loss_p.sum()
        else:
            loss = loss_p.sum() / denom
        if not return_lse:
            ctx.mark_non_differentiable(lse_p)
        return loss, lse_p

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_lse):
        nothing = (None,) * 6
        if ctx.fused:
            if ctx.consumed:
                raise RuntimeError(
                    "celoss.linear_cross_entropy: backward ran twice through a loss (reduction 'mean'/'sum') "
                    "whose gradients were formed in forward and handed over (rescaled in place) by the first "
                    "backward; use reduction='none' (recomputes in backward) to backpropagate through the "
                    "same graph several times")
            grads = ctx.saved_tensors
            if grad_loss is None:
                return (None, None, None) + nothing
            scale = grad_loss.detach().to(_acc_dtype(grad_loss.dtype)).reshape(1)
            if ctx.post_scale is not None:
                scale = scale * ctx.post_scale
            if ctx.post_scale is not None:  # float64: repeatable (gradcheck), returns scaled copies
                return tuple(None if g is None else g * scale for g in grads) + nothing
            ctx.consumed = True
            for g in grads:
                if g is not None:
                    _ops.scale_(g, scale)  # skipped when the scale is 1 (plain loss.backward())
            return tuple(grads) + nothing
        if grad_loss is None and grad_lse is None:
            return (None, None, None) + nothing
        x2d, w, b, lse_p = ctx.saved_tensors
        rows = ctx.rows
        m = rows.tgt.shape[0]
        acc = _acc_dtype(x2d.dtype)
        if grad_loss is None:
            scale = torch.zeros(m, dtype=acc, device=x2d.device)
        elif ctx.reduction == "none":
            scale = grad_loss.reshape(-1).to(acc)
            scale = (scale if rows.proc is None else scale[rows.proc]).contiguous()
        else:
            scale = grad_loss.reshape(1).to(acc)
            if ctx.reduction == "mean":
                scale = torch.where(ctx.denom > 0, scale / ctx.denom, 0.0).reshape(1).to(acc)
        gl = None if grad_lse is None else grad_lse.reshape(-1).contiguous()
        dx, dw, db = ctx.engine.backward(x2d, w, b, rows, lse_p, scale, gl, ctx.need)
        return (dx, dw, db) + nothing


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

def _check_args(input, linear_weight, target, linear_bias, shift):
    _checks.floating("input", input)
    _checks.floating("linear_weight", linear_weight)
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"input ({input.dtype}) and linear_weight ({linear_weight.dtype}) must have the "
                        f"same dtype")
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be 2-D (num_classes, in_features), got shape "
                         f"{tuple(linear_weight.shape)}")
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (the features)")
    v, d = linear_weight.shape
    if v == 0:
        raise ValueError("linear_weight must have at least one row (class)")
    if input.shape[-1] != d:
        raise ValueError(f"input has {input.shape[-1]} features (last dimension of shape "
                         f"{tuple(input.shape)}) but linear_weight expects {d} (shape {tuple(linear_weight.shape)})")
    if linear_weight.device != input.device:
        raise ValueError(f"linear_weight is on {linear_weight.device} but input is on {input.device}")
    if linear_bias is not None:
        _checks.floating("linear_bias", linear_bias)
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias ({linear_bias.dtype}) must have the input's dtype ({input.dtype})")
        if linear_bias.dim() != 1 or linear_bias.shape[0] != v:
            raise ValueError(f"linear_bias must have shape ({v},) (one entry per class), got "
                             f"{tuple(linear_bias.shape)}")
        if linear_bias.device != input.device:
            raise ValueError(f"linear_bias is on {linear_bias.device} but input is on {input.device}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if target.dtype.is_floating_point:
        raise TypeError("celoss.linear_cross_entropy takes class-index targets (int64); probability "
                        "targets are not supported")
    if target.dtype != torch.int64:
        raise TypeError(f"class-index targets must be int64 (torch.long), got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"expected target of shape {tuple(input.shape[:-1])} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if shift and input.dim() < 3:
        raise ValueError(f"shift=True needs a time axis: input (..., T, D) with at least 3 dimensions and "
                         f"target (..., T); got input of shape {tuple(input.shape)}")


def _plan_rows(target: Tensor, shift: bool, ignore_index: int, keep_all: bool):
    """(rows, labels of every output row, unreduced output shape)."""
    if shift:
        t_len = target.shape[-1]
        labels = target[..., 1:].reshape(-1)
        out_shape = tuple(target.shape[:-1]) + (max(t_len - 1, 0),)
    else:
        labels = target.reshape(-1)
        out_shape = tuple(target.shape)
    n_out = labels.numel()
    proc = None
    if not keep_all and n_out:
        counted = labels != ignore_index
        if not bool(counted.all()):
            proc = counted.nonzero().squeeze(1)
    tgt = labels.contiguous() if proc is None else labels[proc]
    src = proc  # rows of the flattened hidden states
    if shift:
        pos = proc if proc is not None else torch.arange(n_out, device=target.device)
        src = pos + pos // (target.shape[-1] - 1) if n_out else pos
    return _Rows(src, tgt, proc, n_out), labels, out_shape


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                         logit_scale: float = 1.0, softcap: Optional[float] = None, z_loss: float = 0.0,
                         shift: bool = False, return_lse: bool = False, filter_eps: Optional[float] = None,
                         chunk_bytes: Optional[int] = None, backend: Optional[str] = None):
    """``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without the N x V logits.

    Matches ``torch.nn.functional.linear_cross_entropy`` (PyTorch 2.13) for the arguments they share
    (class-index targets; values and gradients for ``input``, ``linear_weight``, ``linear_bias``),
    and also accepts ``input (..., D)`` with ``target (...)`` (e.g. ``(B, T, D)`` / ``(B, T)``).

    Extras (as in :func:`celoss.cross_entropy`): ``logit_scale``, then ``softcap``
    (``softcap * tanh(x / softcap)``), then softmax; ``z_loss`` adds ``z_loss * lse**2`` per counted
    row (weighted by the target's class weight); ``return_lse`` returns
    ``CrossEntropyOutput(loss, lse, None)`` with the per-row (differentiable) lse of every row.

    ``shift=True``: next-token prediction on ``input (..., T, D)`` / ``target (..., T)``: position t
    is scored against label t + 1 and the last position is dropped (an unreduced loss has shape
    ``(..., T - 1)``); the hidden states are addressed by index arithmetic, never copied (as long
    as ``input.reshape(-1, D)`` is a view, e.g. any contiguous input).

    Rows whose target is ``ignore_index`` cost no matrix-product work (they are compacted away;
    with ``return_lse`` every row is computed, since every row's lse is returned). An all-ignored
    "mean" is NaN with zero gradients, as in PyTorch.

    Gradients: with reduction "mean"/"sum" (and no ``return_lse``) the chunked (CPU) engine forms
    them during forward and backward only rescales them, so a second backward through the same
    graph raises (except in float64); reduction "none" recomputes in backward and supports any
    per-row upstream gradient and repeated backward.

    ``filter_eps``: None (default) computes exact gradients. A float enables gradient filtering in
    the fused (Triton) kernels: a (rows x vocabulary) tile whose every ``|dloss/dz|`` (before the
    upstream / mean scaling; ``|softmax - onehot|`` for plain cross-entropy) is at most
    ``filter_eps`` contributes nothing to the gradients. Each skipped element changes a gradient
    by at most ``filter_eps`` times the row's scale times ``|W|`` (or ``|X|``). Cut Cross-Entropy's
    default, ``2**-12`` (bf16's epsilon / 32), is below the rounding of a bf16 gradient element;
    for a confident model most tiles are skipped and the backward cost falls towards the
    recomputation of the logit tiles -- so runtime then depends on the data. Not measured on a
    GPU here yet. CPU (chunked) paths ignore it: BLAS gains nothing from sparse tiles, and their
    gradients stay exact.

    ``chunk_bytes``: bound of the chunked engine's workspace (the logits of a chunk of rows plus
    their gathered hidden states), default :data:`DEFAULT_CHUNK_BYTES` (256 MB); at least one row.
    Larger chunks amortise the dW accumulation, smaller ones bound memory. fp16/bf16 inputs on CPU
    add at most 16 MB for the float32 accumulation of dW.

    ``backend``: "triton", "cython", "torch" or None (auto: CUDA -> triton, CPU -> cython).
    """
    _checks.reduction(reduction)
    _check_args(input, linear_weight, target, linear_bias, shift)
    softcap = _checks.positive_or_none("softcap", softcap)
    label_smoothing = _checks.probability("label_smoothing", label_smoothing)
    if float(z_loss) < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if filter_eps is not None and not float(filter_eps) >= 0:
        raise ValueError(f"filter_eps must be None or >= 0, got {filter_eps}")
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES
    if int(chunk_bytes) <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    v, d = linear_weight.shape
    weight = _checks.class_weight(weight, v, input)
    ignore_index = int(ignore_index)
    name = _dispatch.resolve(input.device, backend)

    rows, labels, out_shape = _plan_rows(target, shift, ignore_index, keep_all=return_lse)
    _checks.target_indices(labels, v, ignore_index)
    denom = counted_weight(labels, weight, ignore_index).sum()
    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, logit_scale=float(logit_scale),
                softcap=softcap, z_loss=float(z_loss), focal_gamma=None)

    module = _dispatch.module(name)
    if hasattr(module, "lce_stats") and input.dtype in _FUSED_DTYPES:
        engine = _FusedEngine(module, weight, opts, None if filter_eps is None else float(filter_eps))
    else:
        engine = _ChunkedEngine(name, weight, opts, int(chunk_bytes))

    x2d = input.reshape(-1, d)
    grad_enabled = torch.is_grad_enabled()
    loss, lse = _LinearCrossEntropy.apply(x2d, linear_weight, linear_bias, rows, engine, reduction, denom,
                                          return_lse, grad_enabled)
    if reduction == "none":
        loss = loss.reshape(out_shape)
    loss = loss.to(input.dtype)
    if not return_lse:
        return loss
    return CrossEntropyOutput(loss, lse.reshape(out_shape), None)
