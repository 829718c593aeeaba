"""Vocabulary-parallel cross-entropy over ``torch.distributed`` (tensor-parallel LM heads).

Each rank of a process group holds the logits (or the classifier rows) of one contiguous slice
``[vocab_start, vocab_start + V_local)`` of the vocabulary; the slices of all ranks tile
``[0, vocab_size)`` exactly (uneven slices and empty slices are fine, in any rank order). Targets
are global class indices and are replicated: every rank passes the same ``target``.

The row statistics of :mod:`celoss.backends` -- ``(max, sumexp, target_z, weighted_z)`` -- merge
across ranks exactly as they merge across class blocks, so a call is:

1. local :func:`celoss._ops.ce_stats` of this rank's slice (any backend: Triton on CUDA, Cython or
   the torch reference on CPU);
2. **one** ``all_gather`` of the ``(N, 4)`` statistics (``(N + 1, 5)`` with class weights: the
   target's class weight and this slice's weight sum ride along), merged with
   :func:`celoss.stats.merge_all` in rank order -- every rank computes bit-identical merged
   statistics, hence the identical loss;
3. :func:`celoss.stats.coefficients` -> per-row loss, lse and gradient coefficients (A, B, D);
4. backward: local :func:`celoss._ops.ce_grad` of this slice with the saved global lse and the
   coefficients times the upstream gradient -- **no communication** (logits variant).

Before that, unless ``validate=False``, all ranks all-gather a descriptor of 8 int64 per rank
(rows, vocab range, vocab_size, a hash of the options, a 64-bit digest of the targets, the number
of out-of-range targets, a local error flag) and check it; every rank raises the same
``ValueError`` when the ranks disagree (rows, vocab_size, options, targets) or their slices do not
tile ``[0, vocab_size)``; a rank whose own arguments are wrong raises its own error (TypeError,
ValueError, IndexError ...) and the others a ``ValueError`` naming it. So a bad rank produces an
error on every rank, never a hang in the statistics collective. This costs one extra tiny
collective and one device-to-host sync per call; ``validate=False`` skips both (then arguments
that differ between ranks can hang or give wrong results).

The target digest is ``sum_i mix(mix(t_i + c) + i * g) mod 2**64`` with ``mix`` the SplitMix64
finalizer (a bijection of 64-bit words): targets that differ in one position always give different
digests, and other differences collide with probability about ``2**-64`` (it is a checksum against
mistakes, not a cryptographic hash). It costs about a dozen elementwise int64 operations over the
N targets on their device (N = 8192: ~1 MB of memory traffic, microseconds on a GPU) and no extra
communication: the digest rides in the descriptor. (An exact check would all-reduce the N targets
themselves, 8 N bytes per rank more and a second host sync.)

Conventions
-----------
* ``weight`` (class weights) is either this rank's slice (``V_local`` elements) or the full
  vector (``vocab_size`` elements; this rank uses ``weight[vocab_start:vocab_start + V_local]``).
  The weighted-mean denominator is the sum over counted rows of the target's class weight
  (ignored rows never count), and the loss is divided by it whatever its sign, as in PyTorch:
  a negative sum flips the gradient's sign; a zero sum with counted rows gives a NaN (0/0) or
  +-inf loss and NaN/inf gradients in the counted rows (with label smoothing those rows are all
  NaN, as PyTorch's composition makes them); all rows ignored gives a NaN loss and zero gradients.
  Ignored rows always get a zero gradient.
* The returned loss (and lse) is replicated: identical on every rank. The upstream gradient of the
  loss must be replicated too (it is, when the loss is used identically on every rank).
* ``vocab_parallel_linear_cross_entropy``: ``hidden`` is replicated on the group, the classifier
  is sharded by rows. The hidden-state gradient is **summed over the group** (one all-reduce in
  backward: the tensor-parallel convention, Megatron's ``copy_to_tensor_model_parallel_region``),
  so every rank gets the full gradient; the gradient of the local weight (and bias) slice stays
  local. Every rank must run backward (that all-reduce is a collective).
* ``vocab_start`` / ``vocab_size``: pass both (any tiling), or neither: with plain tensors the
  shards are then taken to be even, ``vocab_start = rank * V_local`` and
  ``vocab_size = world_size * V_local`` (uneven shards then fail the cross-rank check).
* ``torch.distributed.tensor.DTensor`` inputs (the ``loss_parallel`` / torchtitan layout): logits
  sharded on the class dimension (``Shard(-1)``), a classifier sharded by rows (``Shard(0)``, its
  bias too), on one mesh dimension and replicated on any others. The slice, ``vocab_size`` and the
  group come from the placement (``Shard`` splits like ``torch.chunk``: slices of
  ``ceil(V / K)`` classes, the trailing ones shorter or empty); explicit values must agree with
  them. ``target``, ``hidden`` and class weights may be replicated DTensors (class weights also
  sharded like the logits). The results are plain tensors, replicated on the group; gradients
  reach the DTensors through ``to_local``.
* Both functions are differentiable once (their backward forms the first-order gradient
  directly); a double backward raises a RuntimeError that says so.

Numbers
-------
Bytes each rank sends per call (ring all-gather: a rank sends ``(K - 1)`` times its contribution;
ring all-reduce: ``2 (K - 1) / K`` times the message), float32 statistics, for
N = 8192 rows, V = 256000 classes, K = 4 ranks (V_local = 64000):

=============================================  ====================  =====================
what                                           contribution / rank    sent per rank
=============================================  ====================  =====================
descriptor all-gather (8 x int64)              64 B                   192 B
statistics all-gather, (N, 4) fp32             131,072 B (128 KiB)    393,216 B (384 KiB)
  with class weights, (N + 1, 5) fp32          163,860 B              491,580 B
naive all-gather of the logits, bf16           1,048,576,000 B        3,145,728,000 B (3.1 GB)
naive all-gather of the logits, fp32           2,097,152,000 B        6,291,456,000 B (6.3 GB)
linear variant backward: all-reduce of
  d(hidden) (N, D = 2304) bf16                 37,748,736 B           56,623,104 B
=============================================  ====================  =====================

So the forward sends 8,000x (bf16 logits) to 16,000x (fp32) fewer bytes than gathering the
logits; in general the ratio is ``V_local * bytes_per_logit / 16``. Megatron's alternative (an
all-reduce of the max, then one of (sumexp, target logit)) sends ``2 (K - 1) / K * 12 N`` bytes
(~144 KiB here) but takes two latency-bound rounds; one all-gather (TransformerEngine's choice)
is a single round, and its bytes grow as ``(K - 1) * 16 N`` -- still O(N), never O(N x V).
The backward of the logits variant sends nothing; the linear variant's d(hidden) all-reduce is
the one every tensor-parallel LM head pays.
"""
from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _dispatch, _ops
from . import stats as S
from ._autograd import input_grads, once_differentiable
from ._dtypes import accum_dtype
from .cross_entropy import CrossEntropyOutput

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "vocab_range"]

# Rows of the linear variant's logits computed at once: bounds its workspace to this many elements
# (times the logits' and the gradient's element size) whatever N is.
LINEAR_CHUNK_ELEMENTS = 1 << 24

# descriptor fields (int64 each)
_STATUS, _ROWS, _START, _LOCAL, _SIZE, _HASH, _TDIGEST, _TBAD = range(8)
_FIELDS = 8


def vocab_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Balanced contiguous split: ``(vocab_start, vocab_end)`` of ``rank`` (the first
    ``vocab_size % world_size`` ranks get one class more), e.g. 50257 over 4 ranks:
    12565, 12564, 12564, 12564."""
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
            allowed = {"linear_bias": like_sharded,
                       "weight": replicated or like_sharded}.get(name, replicated)
            if not allowed:
                what = "sharded like the classifier (Shard(0))" if name == "linear_bias" else \
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
                  "z_loss, class weights given or not, dtype, which inputs need gradients)", show=False)
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


def _int_target(target) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must hold global class indices as int64 (torch.long), got {target.dtype}"
                        f" (probability targets are not supported by the vocab-parallel functions)")
    return target


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


def _local_target_weight(p: _Plan) -> Tensor:
    """Class weight of each row's target if it falls in this slice, else 0 (ignored rows: 0)."""
    t = p.target
    if p.v_local == 0:
        return torch.zeros(p.n, dtype=p.acc, device=t.device)
    local = t - p.vocab_start
    here = (local >= 0) & (local < p.v_local) & (t != p.ignore_index)
    w = p.weight[torch.where(here, local, torch.zeros_like(local))]
    return torch.where(here, w, torch.zeros_like(w)).to(p.acc)


def _empty_stats(p: _Plan) -> Tensor:
    """Statistics of an empty class block: max -inf, sum 0 (merge_all drops them exactly)."""
    out = torch.zeros(p.n, S.NUM_STATS, dtype=p.acc, device=p.device)
    out[:, 0] = -float("inf")
    return out


def _global_rows(dist, group, world: int, p: _Plan, local_stats: Tensor):
    """One all-gather of the local statistics -> (loss, lse, row_coefs (N, 3), per_row weight,
    weighted-mean denominator); the loss is reduced as ``p.reduction`` says."""
    n = p.n
    if p.weight is None:
        send = local_stats.to(p.acc)
    else:
        # column 4: the target's class weight (non-zero on the owning rank only); extra last row:
        # this slice's weight sum (for label smoothing's W = sum_c w_c).
        send = torch.zeros(n + 1, S.NUM_STATS + 1, dtype=p.acc, device=p.device)
        send[:n, :S.NUM_STATS] = local_stats
        send[:n, S.NUM_STATS] = _local_target_weight(p)
        send[n, 0] = p.weight.sum()
    send = send.contiguous()
    recv = send.new_empty((world * send.shape[0],) + tuple(send.shape[1:]))
    _all_gather(dist, recv, send, group)
    recv = recv.view((world,) + tuple(send.shape))
    merged = S.merge_all(recv[:, :n, :S.NUM_STATS])
    options = dict(num_classes=p.vocab_size, label_smoothing=p.label_smoothing, z_loss=p.z_loss)
    counted = p.target != p.ignore_index
    if p.weight is None:
        loss, lse, row_coefs = S.coefficients(merged, p.target, None, ignore_index=p.ignore_index, **options)
        per_row = counted.to(p.acc)
    else:
        # coefficients() looks class weights up as weight[target] and sums them for W. Hand it a
        # table indexed by row instead: entry i = w_{y_i} (gathered), the last entry makes the
        # table sum to W; rows are "classes" 0..N-1 and ignored rows -1 (no collision with a row
        # index whatever ignore_index is).
        per_row = recv[:, :n, S.NUM_STATS].sum(0)
        w_total = recv[:, n, 0].sum(0)
        table = torch.cat([per_row, (w_total - per_row.sum()).reshape(1)])
        rows_as_classes = torch.where(counted, torch.arange(n, device=p.device), torch.full_like(p.target, -1))
        loss, lse, row_coefs = S.coefficients(merged, rows_as_classes, table, ignore_index=-1, **options)
    denom = per_row.sum()
    nll_rows = None
    if p.label_smoothing and p.reduction == "mean":
        # the (1 - eps) * w_y * (lse - z_y) part of each row (B = (1 - eps) w_y; 0 for ignored rows)
        nll_rows = torch.where(counted, row_coefs[:, 1] * (lse - merged[:, 2]), torch.zeros_like(lse))
    return _reduce(loss, denom, p.reduction, nll_rows), lse, row_coefs, per_row, denom


def _reduce(loss_rows: Tensor, denom: Tensor, reduction: str, nll_rows: Optional[Tensor] = None) -> Tensor:
    """Sum, or the weighted mean: divided by ``denom`` whatever its sign (PyTorch does; 0 -> NaN/inf)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    total = loss_rows.sum()
    if nll_rows is None:
        return total / denom
    # label smoothing: PyTorch divides its cross-entropy and smoothing terms separately, so a zero
    # denominator with a zero cross-entropy sum is NaN (0/0) even when the smoothing term is not 0
    nll = nll_rows.sum()
    return torch.where(denom == 0, nll / denom + (total - nll) / denom, total / denom)


def _upstream_row_coefs(p: _Plan, row_coefs, denom, grad_loss, grad_lse):
    """Row coefficients (A, B, D) times the upstream gradient (over the weighted-mean denominator,
    whatever its sign), plus the lse's gradient in A. Ignored rows get no loss gradient even when
    that factor is inf or NaN (all rows ignored: NaN loss, zero gradients, as in PyTorch)."""
    out = torch.zeros_like(row_coefs)
    if grad_loss is not None:
        g = grad_loss.to(row_coefs.dtype)
        if p.reduction == "none":
            g = g.reshape(-1, 1)
        elif p.reduction == "mean":
            g = g / denom
        scaled = row_coefs * g
        if p.label_smoothing:
            # PyTorch's smoothing term spreads a non-finite factor over every class of the row
            # (inf - inf in log_softmax's backward): the whole row is NaN
            scaled[:, :1] = torch.where(torch.isfinite(g), scaled[:, :1], float("nan"))
        else:
            scaled[:, 2] = 0  # D (smoothing) is 0 here; times an infinite factor it would be NaN
        # B only touches the target's class: keep an infinite B away from the kernels on ranks that
        # do not hold it (a masked-out B * 0 would be NaN there)
        local = p.target - p.vocab_start
        scaled[:, 1] = torch.where((local >= 0) & (local < p.v_local), scaled[:, 1], 0)
        counted = (p.target != p.ignore_index).unsqueeze(1)
        out = torch.where(counted, scaled, out)
    if grad_lse is not None:
        out[:, 0] += grad_lse.reshape(-1).to(out.dtype)
    return out.contiguous()


def _finish(p: _Plan, loss, lse, per_row, dtype, return_lse, return_z_loss):
    if p.reduction == "none":
        loss = loss.reshape(p.out_shape)
    loss = loss.to(dtype)
    if not (return_lse or return_z_loss):
        return loss
    z_term = None
    if return_z_loss:
        lse_d = lse.detach()
        z_rows = p.z_loss * per_row * lse_d * lse_d
        z_term = _reduce(z_rows, per_row.sum(), p.reduction)
        z_term = (z_term.reshape(p.out_shape) if p.reduction == "none" else z_term).to(dtype)
    return CrossEntropyOutput(loss, lse.reshape(p.out_shape) if return_lse else None, z_term)


# ----------------------------------------------------------------------------------------------
# logits variant
# ----------------------------------------------------------------------------------------------

class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, plan, dist, group, world):
        ctx.set_materialize_grads(False)
        p = plan
        if p.v_local:
            local = _ops.ce_stats(logits, p.target, p.weight, p.backend, p.vocab_start, p.ignore_index,
                                  p.logit_scale, p.softcap)
        else:
            local = _empty_stats(p)
        loss, lse, row_coefs, per_row, denom = _global_rows(dist, group, world, p, local)
        ctx.plan = p
        ctx.save_for_backward(logits, lse, row_coefs, denom)
        ctx.mark_non_differentiable(per_row)
        return loss, lse, per_row

    @staticmethod
    @once_differentiable("celoss.distributed.vocab_parallel_cross_entropy")
    def backward(ctx, grad_loss, grad_lse, _):
        logits, lse, row_coefs, denom = ctx.saved_tensors
        p = ctx.plan
        if (grad_loss is None and grad_lse is None) or not ctx.needs_input_grad[0]:
            return input_grads(ctx)
        if p.v_local == 0:
            return input_grads(ctx, torch.zeros_like(logits))
        upstream = _upstream_row_coefs(p, row_coefs, denom, grad_loss, grad_lse)
        grad = _ops.ce_grad(logits, p.target, p.weight, lse, upstream, p.backend, p.vocab_start,
                            p.logit_scale, p.softcap)
        return input_grads(ctx, grad)


def vocab_parallel_cross_entropy(local_logits: Tensor, target: Tensor, *,
                                 vocab_start: Optional[int] = None, vocab_size: Optional[int] = None,
                                 group=None, weight: Optional[Tensor] = None,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 label_smoothing: float = 0.0, logit_scale: float = 1.0,
                                 softcap: Optional[float] = None, z_loss: float = 0.0,
                                 return_lse: bool = False, return_z_loss: bool = False,
                                 backend: Optional[str] = None, validate: bool = True):
    """Cross-entropy of logits sharded over the vocabulary across the ranks of ``group``.

    ``local_logits`` (N, V_local) or (..., V_local) -- the class dimension is the **last** one (the
    tensor-parallel layout) -- holds classes ``[vocab_start, vocab_start + V_local)`` of a
    ``vocab_size``-class softmax; ``target`` (N,) or (...) holds global class indices (int64), the
    same on every rank. ``weight``: class weights, this rank's slice (V_local) or the full vector
    (vocab_size). Options as :func:`celoss.cross_entropy` (``ignore_index``, ``reduction``,
    ``label_smoothing``, ``logit_scale``, ``softcap``, ``z_loss``, ``return_lse``,
    ``return_z_loss``, ``backend``); results equal the single-process call on the concatenated
    vocabulary and are replicated on every rank. Forward: one all-gather of O(N) statistics (plus
    the tiny argument check unless ``validate=False``); backward: no communication. See the module
    docstring for the conventions and the bytes sent.

    ``vocab_start`` and ``vocab_size`` left out: even shards (``rank * V_local`` and
    ``world_size * V_local``). ``local_logits`` may be a DTensor sharded on the class dimension
    (``Shard(-1)``, as under ``loss_parallel``): the slice, ``vocab_size`` and ``group`` then come
    from its placement.
    """
    local_logits, group, derived, rest = _unwrap_dtensors("local_logits", local_logits, -1, group,
                                                          target=target, weight=weight)
    target, weight = rest["target"], rest["weight"]
    dist, world, rank = _group_info(group)

    def make_plan():
        _checks.floating("local_logits", local_logits)
        if local_logits.dim() == 0:
            raise ValueError("local_logits must have at least 1 dimension (the local classes)")
        rows, t, out_shape = _class_last_rows(local_logits, _int_target(target))
        start, size = _vocab_layout(vocab_start, vocab_size, rows.shape[1], rank, world, derived)
        p = _common_plan(local_logits, t, out_shape, rows.shape[1],
                         vocab_start=start, vocab_size=size, weight=weight,
                         ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                         logit_scale=logit_scale, softcap=softcap, z_loss=z_loss, backend=backend,
                         variant_key=("logits",))
        p.rows = rows
        return p

    p = _prepare(dist, group, world, rank, make_plan, validate)
    loss, lse, per_row = _VocabParallelCE.apply(p.rows, p, dist, group, world)
    p.rows = None  # the autograd graph keeps what backward needs
    return _finish(p, loss, lse, per_row, local_logits.dtype, return_lse, return_z_loss)


# ----------------------------------------------------------------------------------------------
# linear variant
# ----------------------------------------------------------------------------------------------

def _chunks(n: int, v_local: int, chunk_size: Optional[int]):
    step = int(chunk_size) if chunk_size else max(1, LINEAR_CHUNK_ELEMENTS // max(v_local, 1))
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(n, start + step))


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, plan, dist, group, world):
        ctx.set_materialize_grads(False)
        p = plan
        if p.v_local:
            local = torch.empty(p.n, S.NUM_STATS, dtype=p.acc, device=p.device)
            for rows in _chunks(p.n, p.v_local, p.chunk_size):
                logits = F.linear(hidden[rows], weight, bias)
                local[rows] = _ops.ce_stats(logits, p.target[rows], p.weight, p.backend, p.vocab_start,
                                            p.ignore_index, p.logit_scale, p.softcap)
        else:
            local = _empty_stats(p)
        loss, lse, row_coefs, per_row, denom = _global_rows(dist, group, world, p, local)
        ctx.plan, ctx.dist, ctx.group = p, dist, group
        ctx.save_for_backward(hidden, weight, bias, lse, row_coefs, denom)
        ctx.mark_non_differentiable(per_row)
        return loss, lse, per_row

    @staticmethod
    @once_differentiable("celoss.distributed.vocab_parallel_linear_cross_entropy")
    def backward(ctx, grad_loss, grad_lse, _):
        hidden, weight, bias, lse, row_coefs, denom = ctx.saved_tensors
        p = ctx.plan
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_loss is None and grad_lse is None:
            # nothing flows, but the group all-reduce must still run on every rank
            upstream = torch.zeros_like(row_coefs)
        else:
            upstream = _upstream_row_coefs(p, row_coefs, denom, grad_loss, grad_lse)
        grad_h = torch.zeros_like(hidden) if need_h else None
        acc_dtype = p.acc if weight.dtype in (torch.float32, torch.float64) else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) \
            if need_b and bias is not None else None
        if p.v_local:
            for rows in _chunks(p.n, p.v_local, p.chunk_size):
                h = hidden[rows]
                logits = F.linear(h, weight, bias)
                dlogits = _ops.ce_grad(logits, p.target[rows], p.weight, lse[rows], upstream[rows], p.backend,
                                       p.vocab_start, p.logit_scale, p.softcap)
                if grad_h is not None:
                    grad_h[rows] = dlogits @ weight
                if grad_w is not None:
                    # per-chunk product in the weight's dtype (fp32 accumulation inside the matmul),
                    # accumulated across chunks in fp32: no bf16 accumulation drift
                    grad_w += (dlogits.t() @ h).to(acc_dtype)
                if grad_b is not None:
                    grad_b += dlogits.sum(0, dtype=acc_dtype)
        if grad_h is not None:
            # tensor-parallel convention: hidden is replicated, its gradient is the sum over ranks
            ctx.dist.all_reduce(grad_h, group=ctx.group)
        return input_grads(ctx, grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                           grad_b.to(bias.dtype) if grad_b is not None else None)


def vocab_parallel_linear_cross_entropy(hidden: Tensor, local_weight: Tensor, target: Tensor, *,
                                        vocab_start: Optional[int] = None,
                                        vocab_size: Optional[int] = None, group=None,
                                        linear_bias: Optional[Tensor] = None,
                                        weight: Optional[Tensor] = None, ignore_index: int = -100,
                                        reduction: str = "mean", label_smoothing: float = 0.0,
                                        logit_scale: float = 1.0, softcap: Optional[float] = None,
                                        z_loss: float = 0.0, return_lse: bool = False,
                                        return_z_loss: bool = False, backend: Optional[str] = None,
                                        chunk_size: Optional[int] = None, validate: bool = True):
    """Cross-entropy of ``hidden @ local_weight.T (+ linear_bias)`` with the classifier sharded by rows.

    ``hidden`` (N, D) or (..., D) is replicated on the group; ``local_weight`` (V_local, D) holds
    classifier rows ``[vocab_start, vocab_start + V_local)``, ``linear_bias`` (V_local,) their bias.
    The local logits are computed ``chunk_size`` rows at a time (default: about
    ``LINEAR_CHUNK_ELEMENTS / V_local`` rows), so the workspace is bounded whatever N is and logits
    are never gathered; the statistics flow is the one of :func:`vocab_parallel_cross_entropy`
    (same options; ``weight`` = class weights). Backward recomputes each chunk's logits; the
    gradient of ``hidden`` is **summed over the group** with one all-reduce (every rank gets the full
    gradient -- the tensor-parallel convention; every rank must run backward), the gradients of
    ``local_weight`` / ``linear_bias`` are local (accumulated in fp32 across chunks).

    ``vocab_start`` and ``vocab_size`` left out: even shards. ``local_weight`` may be a DTensor
    sharded by rows (``Shard(0)``; ``linear_bias`` then sharded alike, ``hidden`` replicated): the
    slice, ``vocab_size`` and ``group`` then come from its placement.
    """
    local_weight, group, derived, rest = _unwrap_dtensors(
        "local_weight", local_weight, 0, group, hidden=hidden, target=target, linear_bias=linear_bias,
        weight=weight)
    hidden, target, linear_bias, weight = rest["hidden"], rest["target"], rest["linear_bias"], rest["weight"]
    dist, world, rank = _group_info(group)

    def make_plan():
        _checks.floating("hidden", hidden)
        _checks.floating("local_weight", local_weight)
        if hidden.dim() == 0:
            raise ValueError("hidden must have at least 1 dimension (the hidden size)")
        if local_weight.dim() != 2 or local_weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"local_weight must be (V_local, D={hidden.shape[-1]}), got "
                             f"{tuple(local_weight.shape)}")
        if local_weight.dtype != hidden.dtype or local_weight.device != hidden.device:
            raise ValueError(f"hidden ({hidden.dtype}, {hidden.device}) and local_weight "
                             f"({local_weight.dtype}, {local_weight.device}) must share dtype and device")
        v_local = local_weight.shape[0]
        if linear_bias is not None:
            _checks.floating("linear_bias", linear_bias)
            if tuple(linear_bias.shape) != (v_local,) or linear_bias.dtype != hidden.dtype:
                raise ValueError(f"linear_bias must be ({v_local},) of dtype {hidden.dtype}, got "
                                 f"{tuple(linear_bias.shape)} {linear_bias.dtype}")
        t = _int_target(target)
        out_shape = tuple(hidden.shape[:-1])
        if tuple(t.shape) != out_shape:
            raise ValueError(f"expected target of shape {out_shape} for hidden of shape "
                             f"{tuple(hidden.shape)}, got {tuple(t.shape)}")
        if chunk_size is not None and int(chunk_size) <= 0:
            raise ValueError(f"chunk_size must be None or > 0, got {chunk_size}")
        grad_on = torch.is_grad_enabled()
        needs = (grad_on and hidden.requires_grad,)
        start, size = _vocab_layout(vocab_start, vocab_size, v_local, rank, world, derived)
        p = _common_plan(hidden, t, out_shape, v_local, vocab_start=start, vocab_size=size,
                         weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, logit_scale=logit_scale, softcap=softcap,
                         z_loss=z_loss, backend=backend,
                         variant_key=("linear", hidden.shape[-1], needs))
        p.hidden, p.chunk_size = hidden.reshape(-1, hidden.shape[-1]), chunk_size
        return p

    p = _prepare(dist, group, world, rank, make_plan, validate)
    loss, lse, per_row = _VocabParallelLinearCE.apply(p.hidden, local_weight, linear_bias, p, dist, group,
                                                      world)
    p.hidden = None
    return _finish(p, loss, lse, per_row, hidden.dtype, return_lse, return_z_loss)
