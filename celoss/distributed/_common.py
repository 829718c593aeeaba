"""What every family of :mod:`celoss.distributed` shares: the vocabulary layout (:func:`vocab_range`,
explicit / even-shard / DTensor-derived slices, DTensor unwrapping), the cross-rank agreement on the
arguments (the int64 descriptor with its target digest, :func:`_agree`, :func:`_prepare`), the
validated plan of a call (:class:`_Plan`, :func:`_common_plan`), the statistics all-gather
(:func:`_gather_rows`), row chunking (:func:`_chunks`), and the per-softmax row statistics of the
token log-probability and distillation functions (:func:`_merge`, :class:`_Layer`,
:class:`_LayerGrads`, :func:`_aux_plan`). The module docstring of :mod:`celoss.distributed`
describes the protocol."""
from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _dispatch
from .._dtypes import accum_dtype
from ..linear_cross_entropy import _contiguous_rows, _hidden_rows, gather_rows


# Rows of the linear variant's logits computed at once: bounds its workspace to this many elements
# (times the logits' and the gradient's element size) whatever N is.
LINEAR_CHUNK_ELEMENTS = 1 << 24

# descriptor fields (int64 each)
_STATUS, _ROWS, _START, _LOCAL, _SIZE, _HASH, _TDIGEST, _TBAD = range(8)
_FIELDS = 8


def vocab_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Balanced contiguous split of the vocabulary: ``(vocab_start, vocab_end)`` of ``rank`` (the
    first ``vocab_size % world_size`` ranks get one class more), e.g. 50257 over 4 ranks: 12565,
    12564, 12564, 12564 classes.

    Args:
        vocab_size (int): number of classes.
        rank (int): this rank's index in the group.
        world_size (int): number of ranks in the group.

    Shape:
        - Output: two ints, this rank's slice ``[vocab_start, vocab_end)``.

    Returns:
        tuple[int, int]: ``(vocab_start, vocab_end)``.

    Example::

        >>> celoss.distributed.vocab_range(50257, 1, 4)
        (12565, 25129)
        >>> [celoss.distributed.vocab_range(2, r, 4) for r in range(4)]  # more ranks than classes
        [(0, 1), (1, 2), (2, 2), (2, 2)]
    """
    base, extra = divmod(int(vocab_size), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# ----------------------------------------------------------------------------------------------
# group, DTensor, descriptor exchange
# ----------------------------------------------------------------------------------------------

def _dist():
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("celoss.distributed: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (on one process, use "
                           "celoss.cross_entropy)")
    return dist


def _group_info(group):
    dist = _dist()
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("celoss.distributed: this process is not a member of `group`")
    return dist, dist.get_world_size(group), rank


def _unwrap_dtensors(sharded_name: str, sharded, shard_dim: int, group, **others):
    """Local tensors and the vocabulary layout of DTensor inputs.

    ``sharded`` (the logits, or the classifier) sharded on the vocabulary along its dimension
    ``shard_dim`` gives this rank's slice, ``vocab_size`` and the group; the other inputs must be
    replicated DTensors (class weights and the bias may also be sharded like ``sharded``) or plain
    tensors. Returns ``(local sharded, group, (vocab_start, vocab_size) of the placement or None,
    {name: local other})``. Placements are global metadata, so every rank raises the same error
    here (explicit ``vocab_start`` / ``vocab_size`` are checked against the placement in the plan,
    where an error on one rank becomes an error on every rank)."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return sharded, group, None, others
    mesh = layout = derived = None
    if isinstance(sharded, DTensor):
        ndim = max(sharded.dim(), 1)
        dim, layout = shard_dim % ndim, tuple(sharded.placements)
        on_vocab = [i for i, pl in enumerate(layout) if type(pl) is Shard and pl.dim % ndim == dim]
        if len(on_vocab) != 1 or not all(isinstance(pl, Replicate) for i, pl in enumerate(layout)
                                         if i != on_vocab[0]):
            raise ValueError(f"celoss.distributed: `{sharded_name}` is a DTensor with placements {layout}; "
                             f"it must be sharded on the vocabulary (Shard({shard_dim})) on one mesh "
                             f"dimension and replicated (Replicate()) on the others")
        mesh, mesh_dim = sharded.device_mesh, on_vocab[0]
        # Shard splits like torch.chunk: ceil(V / K) classes per slice, the trailing ones shorter
        v, k = sharded.shape[dim], mesh.size(mesh_dim)
        chunk = -(-v // k)
        start = min(mesh.get_local_rank(mesh_dim) * chunk, v)
        local = sharded.to_local()
        if local.shape[dim] != min(chunk, v - start):
            raise ValueError(f"celoss.distributed: `{sharded_name}`'s local shard has {local.shape[dim]} "
                             f"classes where Shard({shard_dim}) of {v} classes over {k} ranks gives "
                             f"{min(chunk, v - start)} (torch.chunk layout)")
        d_group = mesh.get_group(mesh_dim)
        if group is not None:
            import torch.distributed as dist
            if dist.get_process_group_ranks(group) != dist.get_process_group_ranks(d_group):
                raise ValueError(f"celoss.distributed: `group` is not the DTensor `{sharded_name}`'s mesh "
                                 f"group along its vocabulary dimension; leave it out with DTensor inputs")
        sharded, group, derived = local, d_group, (start, v)
    unwrapped = {}
    for name, t in others.items():
        if isinstance(t, DTensor):
            placements = tuple(t.placements)
            like_sharded = mesh is not None and t.device_mesh == mesh and t.dim() == 1 and \
                placements == tuple(Shard(0) if isinstance(pl, Shard) else pl for pl in layout)
            replicated = all(isinstance(pl, Replicate) for pl in placements)
            # a replicated bias would get a replicated gradient holding only this rank's slice
            bias = name.endswith("bias")
            allowed = like_sharded if bias else {"weight": replicated or like_sharded}.get(name, replicated)
            if not allowed:
                what = "sharded like the classifier (Shard(0))" if bias else \
                    "replicated" + (" or sharded like the logits (Shard(0))" if name == "weight" else "")
                raise ValueError(f"celoss.distributed: `{name}` is a DTensor with placements {placements} "
                                 f"on {t.device_mesh}; it must be {what}"
                                 + ("" if mesh is not None else f", and `{sharded_name}` a DTensor "
                                    f"sharded on the vocabulary"))
            t = t.to_local()
        unwrapped[name] = t
    return sharded, group, derived, unwrapped


def _vocab_layout(vocab_start, vocab_size, v_local: int, rank: int, world: int, derived) -> tuple[int, int]:
    """``(vocab_start, vocab_size)``: from a DTensor's placement (``derived``), explicit, or the
    even-shard defaults when both are left out."""
    if derived is not None:
        if vocab_start is not None and int(vocab_start) != derived[0] or \
                vocab_size is not None and int(vocab_size) != derived[1]:
            raise ValueError(f"celoss.distributed: vocab_start={vocab_start}, vocab_size={vocab_size} "
                             f"contradict the DTensor's placement (this rank's slice starts at "
                             f"{derived[0]} of {derived[1]} classes); leave them out with DTensor inputs")
        return derived
    if vocab_start is None and vocab_size is None:
        return rank * v_local, world * v_local
    if vocab_start is None or vocab_size is None:
        raise ValueError("celoss.distributed: pass both vocab_start and vocab_size (any tiling of the "
                         "vocabulary), or neither (even shards: vocab_start = rank * V_local, "
                         "vocab_size = world_size * V_local)")
    return vocab_start, vocab_size


def _all_gather(dist, out: Tensor, inp: Tensor, group) -> None:
    """out (K * n, ...) <- concatenation of every rank's inp (n, ...)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _gather_rows(dist, group, world: int, local: Tensor) -> Tensor:
    """(K, N, ...): every rank's (N, ...) row statistics, in rank order (one all-gather)."""
    send = local.contiguous()
    recv = send.new_empty((world * send.shape[0],) + tuple(send.shape[1:]))
    _all_gather(dist, recv, send, group)
    return recv.view((world,) + tuple(send.shape))


def _fallback_device(dist, group) -> torch.device:
    try:
        backend = str(dist.get_backend(group))
    except Exception:  # pragma: no cover
        backend = ""
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _options_hash(*items) -> int:
    return zlib.crc32(repr(items).encode())


def _signed64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_MIX1, _MIX2 = _signed64(0xBF58476D1CE4E5B9), _signed64(0x94D049BB133111EB)
_GOLDEN = _signed64(0x9E3779B97F4A7C15)


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 words (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """SplitMix64's finalizer: a bijection of 64-bit words (int64 arithmetic wraps mod 2**64)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _target_summary(target: Tensor, vocab_size: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(64-bit digest of the targets, number of out-of-range targets) as int64 device scalars (no
    host sync). The digest is a wrapping sum of per-position hashes, so it does not depend on the
    summation order (every rank gets the same word for the same targets)."""
    t = target.reshape(-1)
    position = torch.arange(t.numel(), device=t.device, dtype=torch.int64) * _GOLDEN
    digest = _mix64(_mix64(t + _GOLDEN) + position).sum()
    bad = (((t < 0) | (t >= vocab_size)) & (t != ignore_index)).sum()
    return digest, bad


def _agree(dist, group, world: int, rank: int, plan, error, device) -> None:
    """All-gather the descriptor; raise the same error on every rank if anything is off."""
    desc = torch.zeros(_FIELDS, dtype=torch.int64, device=device)
    if error is None:
        desc[:_HASH + 1] = torch.tensor([0, plan.n, plan.vocab_start, plan.v_local, plan.vocab_size,
                                         plan.options_hash], dtype=torch.int64)
        digest, bad = _target_summary(plan.target, plan.vocab_size, plan.ignore_index)
        desc[_TDIGEST] = digest
        desc[_TBAD] = bad
    else:
        desc[_STATUS] = 1
    table = torch.empty(world * _FIELDS, dtype=torch.int64, device=device)
    _all_gather(dist, table, desc, group)
    rows = table.view(world, _FIELDS).tolist()  # the one host sync of the check

    failed = [r for r, row in enumerate(rows) if row[_STATUS] != 0]
    if failed:
        if error is not None:
            raise error
        raise ValueError(f"celoss.distributed: rank(s) {failed} of the group rejected their arguments "
                         f"(the error is raised on those ranks); every rank stops here instead of "
                         f"waiting in a collective")
    problems = []

    def differ(field, what, show=True):
        values = [row[field] for row in rows]
        if len(set(values)) > 1:
            detail = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)) if show else \
                "groups " + str(_groups(values))
            problems.append(f"{what} differ across ranks ({detail})")
            return True
        return False

    differ(_ROWS, "the numbers of rows (N)")
    size_differs = differ(_SIZE, "vocab_size")
    if size_differs:
        problems[-1] += "; left out, vocab_size defaults to world_size * V_local (even shards only)"
    differ(_HASH, "the options (ignore_index, reduction, label_smoothing, logit_scale, softcap, "
                  "z_loss, temperature, kind, beta, alpha, class weights / target / bias given or not, "
                  "shift, dtypes, hidden sizes, which inputs need gradients)", show=False)
    differ(_TDIGEST, "the targets (they must be replicated: the same global class indices on every "
                  "rank)", show=False)
    if not size_differs:
        vocab_size = rows[0][_SIZE]
        spans = sorted((row[_START], row[_START] + row[_LOCAL], r) for r, row in enumerate(rows)
                       if row[_LOCAL] > 0)
        cursor, bad_tiling = 0, False
        for start, end, _ in spans:
            if start != cursor:
                bad_tiling = True
            cursor = max(cursor, end)
        if bad_tiling or cursor != vocab_size:
            layout = ", ".join(f"rank {r}: [{row[_START]}, {row[_START] + row[_LOCAL]})"
                               for r, row in enumerate(rows))
            problems.append(f"the vocabulary slices do not tile [0, {vocab_size}) exactly (gaps or "
                            f"overlaps): {layout}; left out, vocab_start defaults to rank * V_local "
                            f"(even shards only)")
    if problems:
        raise ValueError("celoss.distributed: inconsistent arguments across the process group (every "
                         "rank raises this error):\n  - " + "\n  - ".join(problems))
    if rows[rank][_TBAD]:
        _checks.target_indices(plan.target, plan.vocab_size, plan.ignore_index)  # raises IndexError
        raise IndexError("celoss.distributed: class indices out of range")  # pragma: no cover


def _groups(values) -> list[list[int]]:
    """Ranks grouped by equal value (for hashes, whose values mean nothing to a reader)."""
    seen: dict = {}
    for r, v in enumerate(values):
        seen.setdefault(v, []).append(r)
    return list(seen.values())


# ----------------------------------------------------------------------------------------------
# shared planning and the statistics collective
# ----------------------------------------------------------------------------------------------

class _Plan:
    """Validated local arguments of one call (what the descriptor describes), plus the variant's
    inputs (``rows`` or ``hidden``, ``chunk_size``)."""


def _common_plan(like: Tensor, target: Tensor, out_shape, v_local: int, *, vocab_start, vocab_size,
                 weight, ignore_index, reduction, label_smoothing, logit_scale, softcap, z_loss,
                 backend, variant_key) -> _Plan:
    _checks.reduction(reduction)
    softcap = _checks.positive_or_none("softcap", softcap)
    label_smoothing = _checks.probability("label_smoothing", label_smoothing)
    if float(z_loss) < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    vocab_start, vocab_size = int(vocab_start), int(vocab_size)
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    if not 0 <= vocab_start <= vocab_start + v_local <= vocab_size:
        raise ValueError(f"this rank's vocabulary slice [{vocab_start}, {vocab_start + v_local}) "
                         f"(vocab_start={vocab_start}, {v_local} local classes) is not inside "
                         f"[0, vocab_size={vocab_size})")
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.dim() != 1 or \
                weight.numel() not in (v_local, vocab_size):
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"weight (class weights) must be 1-D with this rank's {v_local} classes "
                             f"or all {vocab_size} classes, got {shape}")
        if weight.numel() == vocab_size and v_local != vocab_size:
            weight = weight[vocab_start:vocab_start + v_local]
        weight = _checks.class_weight(weight, v_local, like)
    p = _Plan()
    p.n, p.vocab_start, p.v_local, p.vocab_size = target.numel(), vocab_start, v_local, vocab_size
    p.target, p.weight = target.reshape(-1).contiguous(), weight
    p.backend = _dispatch.resolve(like.device, backend)
    p.ignore_index, p.reduction, p.label_smoothing = int(ignore_index), reduction, label_smoothing
    p.logit_scale, p.softcap, p.z_loss = float(logit_scale), softcap, float(z_loss)
    p.out_shape, p.device = tuple(out_shape), like.device
    p.acc = accum_dtype(like.dtype)
    p.options_hash = _options_hash(p.ignore_index, reduction, label_smoothing, p.logit_scale, softcap,
                                   p.z_loss, weight is not None, str(p.acc), variant_key)
    return p


def _class_last_rows(x: Tensor, target: Tensor):
    """(N, V_local) rows of (..., V_local) logits (like ``as_rows(..., class_dim_last=True)``, but a
    rank may hold no class at all: V_local = 0), the flat targets and the unreduced loss shape."""
    if target.device != x.device:
        raise ValueError(f"target is on {target.device} but local_logits is on {x.device}")
    out_shape = tuple(x.shape[:-1])
    if tuple(target.shape) != out_shape:
        raise ValueError(f"expected target of shape {out_shape} for local_logits of shape {tuple(x.shape)}, "
                         f"got {tuple(target.shape)}")
    rows = x.reshape(math.prod(out_shape), x.shape[-1])
    if rows.stride(1) != 1 and rows.shape[1] > 1:
        rows = rows.contiguous()
    return rows, target.reshape(-1).contiguous(), out_shape


def _prepare(dist, group, world, rank, make_plan, validate: bool):
    """Run the local checks; then (validate) exchange the descriptor so all ranks fail together."""
    plan, error = None, None
    try:
        plan = make_plan()
    except Exception as exc:  # any local failure must become an error on every rank
        if not validate:
            raise
        error = exc
    if validate:
        device = plan.device if plan is not None else _fallback_device(dist, group)
        _agree(dist, group, world, rank, plan, error, device)
    else:
        _checks.target_indices(plan.target, plan.vocab_size, plan.ignore_index)
    return plan


def _chunks(n: int, v_local: int, chunk_size: Optional[int]):
    step = int(chunk_size) if chunk_size else max(1, LINEAR_CHUNK_ELEMENTS // max(v_local, 1))
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(n, start + step))


# ----------------------------------------------------------------------------------------------
# token log-probabilities / entropy and distillation: more row statistics per softmax
# ----------------------------------------------------------------------------------------------
#
# Each rank computes, per row and per softmax it needs, the statistics of its class block: the max
# m, s = sum_j e^(z_j - m), and sums e^(z_j - m) f_j of what the loss needs (f shift-free, e.g.
# t - s, or the shifted f = z - m of the entropy). They merge exactly across ranks by rescaling to
# the common max (_merge, the rule of celoss.stats.merge_all), in one all-gather. The local pass is
# row-chunked plain PyTorch (no backend kernel reports these partial sums), its temporaries bounded
# by about LINEAR_CHUNK_ELEMENTS elements each.

def _finite_or_zero(m: Tensor) -> Tensor:
    """The "safe shift": a max that is +-inf or NaN shifts by 0, so exp never sees inf - inf."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _block(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(max, z - max, e^(z - max)) of a block of rows ``z`` (n, v >= 1), shifted safely."""
    m = z.amax(1)
    d = z - _finite_or_zero(m).unsqueeze(1)
    return m, d, d.exp()


def _pmul(p: Tensor, f: Tensor) -> Tensor:
    """``p * f`` with a zero ``p`` counting 0 (0 log 0 = 0: masked, -inf classes add nothing)."""
    return torch.where(p == 0, 0.0, p * f)


def _merge(m: Tensor, s: Tensor, scaled=(), shifted=()) -> list:
    """Merge (K, N) block statistics of one softmax over the ranks: maxes ``m``, sums
    ``s = sum e^(z - m)``, ``scaled`` sums ``sum e^(z - m) f`` (f shift-free) and ``shifted`` sums
    ``sum e^(z - m) (z - m)``. Returns ``[M, S, *scaled, *shifted]`` relative to the global max M
    (to 0 where M is not finite)."""
    big = m.amax(0)
    safe = _finite_or_zero(big)
    r = torch.exp(m - safe)

    def total(f):  # an underflowed r (a block far below the max) is a zero probability
        return _pmul(r, f).sum(0)

    shifted = [u + torch.where(s == 0, 0.0, (m - safe) * s) for u in shifted]
    return [big, total(s), *(total(f) for f in scaled), *(total(u) for u in shifted)]


def _owned(p: _Plan) -> None:
    """``p.counted``, ``p.here`` (the row's target lies in this slice) and ``p.local_tok`` (its local
    index there, 0 elsewhere)."""
    t = p.target
    p.counted = t != p.ignore_index
    local = t - p.vocab_start
    p.here = (local >= 0) & (local < p.v_local) & p.counted
    p.local_tok = torch.where(p.here, local, torch.zeros_like(local))


class _Layer:
    """One model's local logits, chunk by chunk of output rows: ``x`` itself ((N, V_local) logits,
    ``w`` None), or ``x @ w.T + b`` with ``x`` the flattened hidden states read at rows ``src``
    (None: hidden row r for output row r; with shift, r + r // (T - 1))."""

    def __init__(self, x: Tensor, w: Optional[Tensor] = None, b: Optional[Tensor] = None, src=None):
        self.x, self.w, self.b, self.src = x, w, b, src

    def chunk(self, rows: slice):
        """(hidden rows selector, hidden rows, local logits) of output rows ``rows``."""
        if self.w is None:
            return rows, None, self.x[rows]
        sel = _contiguous_rows(self.src, rows.start, rows.stop)
        h = gather_rows(self.x, sel)
        return sel, h, F.linear(h, self.w, self.b)


class _LayerGrads:
    """Gradients of a :class:`_Layer`'s inputs (x, w, b; None where not needed), chunk by chunk:
    ``dX = dZ W``, ``dW += dZ^T X``, ``db += sum dZ`` (dW, db accumulated in float32 at least)."""

    def __init__(self, layer: _Layer, need):
        self.layer = layer
        x, w, b = layer.x, layer.w, layer.b
        self.gx = torch.zeros_like(x) if need[0] else None
        acc = accum_dtype(x.dtype)
        self.gw = torch.zeros(w.shape, dtype=acc, device=w.device) if w is not None and need[1] else None
        self.gb = torch.zeros(b.shape, dtype=acc, device=b.device) if b is not None and need[2] else None

    def add(self, rows: slice, sel, h: Optional[Tensor], dz: Tensor) -> None:
        w = self.layer.w
        g = dz.to(self.layer.x.dtype)
        if self.gx is not None:
            if w is None:
                self.gx[rows] = g
            elif isinstance(sel, slice):
                torch.mm(g, w, out=self.gx[sel])
            else:
                self.gx.index_copy_(0, sel, g @ w)
        if self.gw is not None:
            self.gw += (g.t() @ h).to(self.gw.dtype)
        if self.gb is not None:
            self.gb += g.sum(0, dtype=self.gb.dtype)

    def result(self, dist, group) -> tuple:
        layer = self.layer
        if layer.w is not None and self.gx is not None:
            # tensor-parallel convention: the hidden states are replicated, their gradient is the
            # sum over the ranks (every rank runs this: whether it does is part of the options hash)
            dist.all_reduce(self.gx, group=group)
        return (self.gx, None if self.gw is None else self.gw.to(layer.w.dtype),
                None if self.gb is None else self.gb.to(layer.b.dtype))


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be None or > 0, got {chunk_size}")


def _linear_rows(hidden: Tensor, tokens: Tensor, shift: bool):
    """(flattened hidden states, output-row labels, hidden row of each output row or None, output shape)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    if not shift:
        return x, tokens, None, tuple(tokens.shape)
    labels = tokens[..., 1:]
    n_out = labels.numel()
    src = _hidden_rows(torch.arange(n_out, device=x.device), hidden.shape[-2]) if n_out else None
    return x, labels, src, tuple(labels.shape)


def _aux_plan(like: Tensor, target: Tensor, out_shape, v_local: int, layout, ignore_index, variant_key) -> _Plan:
    """The plan (descriptor fields, target digest) of the token log-probability and distillation
    functions, through the cross-entropy plan without its options."""
    p = _common_plan(like, target, out_shape, v_local, vocab_start=layout[0], vocab_size=layout[1],
                     weight=None, ignore_index=_checks.index_value("ignore_index", ignore_index),
                     reduction="none", label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0,
                     backend=None, variant_key=variant_key)
    _owned(p)
    return p
