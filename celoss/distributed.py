"""Vocabulary-parallel losses over ``torch.distributed`` (tensor-parallel LM heads): cross-entropy,
token log-probabilities and entropy (RL), knowledge distillation from hidden states.

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
* Every function is differentiable once (its backward forms the first-order gradient
  directly); a double backward raises a RuntimeError that says so.

Token log-probabilities, entropy, distillation
----------------------------------------------
:func:`vocab_parallel_token_logprobs`, :func:`vocab_parallel_linear_token_logprobs` and
:func:`vocab_parallel_linear_distillation_loss` follow the same conventions (replicated tokens /
targets and hidden states, the argument check, DTensor inputs, the hidden-state gradient summed
over the group). Their per-row statistics are, per softmax, the max ``m``, ``s = sum e^(z - m)`` and
the sums ``sum e^(z - m) f`` each result needs (the entropy's ``f = z - m``; distillation's
``t - s``, ``s`` or ``s - t`` by kind), merged across ranks by rescaling to the common max; one
all-gather of ``(N, 4)`` (log-probs) or ``(N, 8)`` (distillation) statistics in forward, plus one
all-reduce of ``(N, 2)`` sums for ``kind="jsd"`` (its mixture term needs the merged lse's first).
Their local passes are row-chunked plain PyTorch (no fused kernel reports these partial sums).

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
from .distillation import distill_options
from .linear_cross_entropy import _contiguous_rows, _hidden_rows, check_layer, check_shift, gather_rows
from .logprobs import _check_temperature, _check_tokens, _result

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
           "vocab_parallel_linear_distillation_loss", "vocab_parallel_linear_token_logprobs",
           "vocab_parallel_token_logprobs", "vocab_range"]

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
    recv = _gather_rows(dist, group, world, send)
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
    ``vocab_size``-class softmax; ``target`` holds global class indices (int64), the same on every
    rank. Options as :func:`celoss.cross_entropy`; results equal the single-process call on the
    concatenated vocabulary and are replicated on every rank. Forward: one all-gather of O(N)
    statistics (plus the tiny argument check unless ``validate=False``); backward: no
    communication. See the module docstring for the conventions and the bytes sent.

    ``local_logits`` may be a DTensor sharded on the class dimension (``Shard(-1)``, as under
    ``loss_parallel``): the slice, ``vocab_size`` and ``group`` then come from its placement.

    Args:
        local_logits (Tensor): this rank's slice of the logits, float32/float16/bfloat16/float64,
            or a DTensor ``Shard(-1)``.
        target (Tensor): int64 global class indices, replicated (a replicated DTensor is accepted).
        vocab_start (int, optional, keyword-only): first global class of this rank's slice; with
            ``vocab_size``, any tiling of the vocabulary (uneven, empty, in any rank order). Both
            left out: even shards, ``rank * V_local`` of ``world_size * V_local``. Default: None
        vocab_size (int, optional, keyword-only): the full vocabulary size. Default: None
        group (ProcessGroup, optional, keyword-only): the tensor-parallel group; None: the default
            group (with DTensor inputs: the mesh's group). Default: None
        weight (Tensor, optional, keyword-only): class weights, this rank's slice (``V_local``) or
            the full vector (``vocab_size``); a DTensor replicated or sharded like the logits.
            Default: None
        ignore_index (int, keyword-only): target value that is skipped. Default: -100
        reduction (str, keyword-only): ``"mean"`` (weighted), ``"sum"`` or ``"none"``. Default: ``"mean"``
        label_smoothing (float, keyword-only): in [0, 1]. Default: 0.0
        logit_scale (float, keyword-only): multiplies the logits first. Default: 1.0
        softcap (float, optional, keyword-only): then ``softcap * tanh(z / softcap)``. Default: None
        z_loss (float, keyword-only): adds ``z_loss * lse**2`` per counted row. Default: 0.0
        return_lse (bool, keyword-only): also return the per-row lse (differentiable). Default: False
        return_z_loss (bool, keyword-only): also return the z-loss part of the loss. Default: False
        backend (str, optional, keyword-only): the row kernels' backend (``"triton"``,
            ``"cython"``, ``"torch"`` or None: automatic), as :func:`celoss.cross_entropy`. Default: None
        validate (bool, keyword-only): check the arguments across the ranks first (one tiny
            all-gather and host sync; every rank then raises the same error on a mismatch). False
            skips it: arguments that differ between ranks can then hang or give wrong results.
            Default: True

    Shape:
        - Local_logits: ``(N, V_local)`` or ``(..., V_local)``.
        - Target: ``(N)`` or ``(...)``.
        - Output: ``()``; with ``reduction="none"``, the target's shape (the lse: always).

    Returns:
        Tensor: the loss in the logits' dtype, replicated; with ``return_lse`` / ``return_z_loss``,
        a :class:`celoss.CrossEntropyOutput` ``(loss, lse, z_loss)``.

    Example::

        >>> import torch.distributed as dist
        >>> # every rank of the tensor-parallel group runs this; here a group of one process
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> rank, world = dist.get_rank(), dist.get_world_size()
        >>> _ = torch.manual_seed(0)
        >>> logits, target = torch.randn(4, 1000), torch.tensor([1, 500, 999, -100])  # every rank
        >>> start, end = celoss.distributed.vocab_range(1000, rank, world)
        >>> local = logits[:, start:end].clone().requires_grad_()
        >>> loss = celoss.distributed.vocab_parallel_cross_entropy(
        ...     local, target, vocab_start=start, vocab_size=1000, label_smoothing=0.1)
        >>> torch.allclose(loss, celoss.cross_entropy(logits, target, label_smoothing=0.1))
        True
        >>> loss.backward()  # local.grad: this rank's slice of the gradient
        >>> dist.destroy_process_group()
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

    ``local_weight`` holds classifier rows ``[vocab_start, vocab_start + V_local)``; ``hidden`` is
    replicated. The local logits are computed ``chunk_size`` rows at a time (default: about
    ``LINEAR_CHUNK_ELEMENTS / V_local`` rows), so the workspace is bounded whatever N is and logits
    are never gathered; the statistics flow is the one of :func:`vocab_parallel_cross_entropy`.
    Backward recomputes each chunk's logits; the gradient of ``hidden`` is **summed over the group**
    with one all-reduce (every rank gets the full gradient -- the tensor-parallel convention; every
    rank must run backward), the gradients of ``local_weight`` / ``linear_bias`` are local
    (accumulated in fp32 across chunks). ``local_weight`` may be a DTensor sharded by rows
    (``Shard(0)``; ``linear_bias`` then sharded alike, ``hidden`` replicated).

    Args:
        hidden (Tensor): hidden states, replicated (a replicated DTensor is accepted).
        local_weight (Tensor): this rank's classifier rows (the dtype and device of ``hidden``), or
            a DTensor ``Shard(0)``.
        target (Tensor): int64 global class indices, replicated.
        vocab_start (int, optional, keyword-only): first global class of this rank's slice; with
            ``vocab_size``, any tiling of the vocabulary (uneven, empty, in any rank order). Both
            left out: even shards, ``rank * V_local`` of ``world_size * V_local``. Default: None
        vocab_size (int, optional, keyword-only): the full vocabulary size. Default: None
        group (ProcessGroup, optional, keyword-only): the tensor-parallel group; None: the default
            group (with DTensor inputs: the mesh's group). Default: None
        linear_bias (Tensor, optional, keyword-only): the bias of those rows. Default: None
        weight (Tensor, optional, keyword-only): class weights, this rank's slice or all of them.
            Default: None
        ignore_index (int, keyword-only): target value that is skipped. Default: -100
        reduction (str, keyword-only): ``"mean"`` (weighted), ``"sum"`` or ``"none"``. Default: ``"mean"``
        label_smoothing (float, keyword-only): in [0, 1]. Default: 0.0
        logit_scale (float, keyword-only): multiplies the logits first. Default: 1.0
        softcap (float, optional, keyword-only): then ``softcap * tanh(z / softcap)``. Default: None
        z_loss (float, keyword-only): adds ``z_loss * lse**2`` per counted row. Default: 0.0
        return_lse (bool, keyword-only): also return the per-row lse (differentiable). Default: False
        return_z_loss (bool, keyword-only): also return the z-loss part of the loss. Default: False
        backend (str, optional, keyword-only): the row kernels' backend (``"triton"``,
            ``"cython"``, ``"torch"`` or None: automatic), as :func:`celoss.cross_entropy`. Default: None
        chunk_size (int, optional, keyword-only): rows of local logits per chunk. Default: None
        validate (bool, keyword-only): check the arguments across the ranks first (one tiny
            all-gather and host sync; every rank then raises the same error on a mismatch). False
            skips it: arguments that differ between ranks can then hang or give wrong results.
            Default: True

    Shape:
        - Hidden: ``(N, D)`` or ``(..., D)``; local_weight: ``(V_local, D)``; linear_bias: ``(V_local)``.
        - Target: ``(N)`` or ``(...)``.
        - Output: ``()``; with ``reduction="none"``, the target's shape.

    Returns:
        Tensor: the loss in ``hidden``'s dtype, replicated; with ``return_lse`` /
        ``return_z_loss``, a :class:`celoss.CrossEntropyOutput`.

    Example::

        >>> import torch.distributed as dist
        >>> # every rank of the tensor-parallel group runs this; here a group of one process
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> rank, world = dist.get_rank(), dist.get_world_size()
        >>> _ = torch.manual_seed(0)
        >>> hidden = torch.randn(4, 16, requires_grad=True)             # replicated
        >>> head = torch.randn(1000, 16)                                 # the full LM head
        >>> target = torch.tensor([1, 500, 999, -100])
        >>> start, end = celoss.distributed.vocab_range(1000, rank, world)
        >>> local_head = head[start:end].clone().requires_grad_()        # this rank's rows
        >>> loss = celoss.distributed.vocab_parallel_linear_cross_entropy(
        ...     hidden, local_head, target, vocab_start=start, vocab_size=1000, chunk_size=2)
        >>> torch.allclose(loss, celoss.linear_cross_entropy(hidden, head, target))
        True
        >>> loss.backward()  # hidden.grad: the full gradient on every rank
        >>> dist.destroy_process_group()
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
    """The plan (descriptor fields, target digest) of the functions below, through the
    cross-entropy plan without its options."""
    p = _common_plan(like, target, out_shape, v_local, vocab_start=layout[0], vocab_size=layout[1],
                     weight=None, ignore_index=_checks.index_value("ignore_index", ignore_index),
                     reduction="none", label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0,
                     backend=None, variant_key=variant_key)
    _owned(p)
    return p


# ---- token log-probabilities and entropy ----
# local statistics per row: (m, s, u = sum e^(z - m) (z - m), z_y on the rank holding the token)

def _positions(p: _Plan, rows: slice):
    """Output rows of processed rows ``rows`` (ignored rows are not processed where ``p.proc`` lists
    the others: their outputs and gradients are 0 whatever their logits)."""
    return rows if p.proc is None else p.proc[rows]


def _logprobs_stats(z: Tensor, p: _Plan, pos) -> Tensor:
    m, d, e = _block(z)
    zy = z.gather(1, p.local_tok[pos].unsqueeze(1)).squeeze(1)
    return torch.stack([m, e.sum(1), _pmul(e, d).sum(1), torch.where(p.here[pos], zy, 0.0)], 1)


def _logprobs_rows(recv: Tensor, p: _Plan) -> tuple[Tensor, Tensor, Tensor]:
    """(log p_y, entropy, lse) per row from the gathered (K, N, 4) statistics: as the single-process
    kernels, log p_y = (z_y - M) - log S, H = log S - U / S; NaN where lse is not finite, 0 on
    ignored rows."""
    big, s, u = _merge(recv[..., 0], recv[..., 1], shifted=(recv[..., 2],))
    log_s = s.log()
    lse = big + log_s
    vals = torch.stack([(recv[..., 3].sum(0) - big) - log_s, log_s - u / s, lse])
    vals = torch.where(torch.isfinite(lse), vals, math.nan)
    return tuple(torch.where(p.counted, vals, 0.0).unbind(0))


def _logprobs_grad(z: Tensor, p: _Plan, pos, lse, ent, gl, gh) -> Tensor:
    """dz = gl [j == y] - p_j (gl + gh (a_j + H)) times 1/T, a = z - lse (0 where p_j == 0),
    0 on ignored rows."""
    a = z - lse[pos].unsqueeze(1)
    prob = a.exp()
    c = torch.zeros_like(lse[pos]) if gl is None else gl[pos]
    if gh is None:
        g = -prob * c.unsqueeze(1)
    else:
        g = -_pmul(prob, (c + gh[pos] * ent[pos]).unsqueeze(1) + gh[pos].unsqueeze(1) * a)
    g.scatter_add_(1, p.local_tok[pos].unsqueeze(1), torch.where(p.here[pos], c, 0.0).unsqueeze(1))
    return torch.where(p.counted[pos].unsqueeze(1), g * p.scale, 0.0)


class _VocabParallelLogprobs(torch.autograd.Function):
    """Inputs (logits, None, None) or (hidden, weight, bias); outputs (log p_y, entropy)."""

    @staticmethod
    def forward(ctx, x, w, b, plan, dist, group, world):
        ctx.set_materialize_grads(False)
        p = plan
        layer = _Layer(x, w, b, p.src)
        local = torch.zeros(p.n, 4, dtype=p.acc, device=p.device)
        local[:, 0] = -math.inf  # an empty block (V_local = 0)
        if p.v_local:
            for rows in _chunks(p.m, p.v_local, p.chunk_size):
                pos = _positions(p, rows)
                local[pos] = _logprobs_stats(layer.chunk(rows)[2].to(p.acc) * p.scale, p, pos)
        lp, ent, lse = _logprobs_rows(_gather_rows(dist, group, world, local), p)
        ctx.plan, ctx.dist, ctx.group = p, dist, group
        ctx.save_for_backward(x, w, b, lse, ent)
        if not p.entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent


def _logprobs_backward(ctx, gl, gh):
    x, w, b, lse, ent = ctx.saved_tensors
    p = ctx.plan
    layer = _Layer(x, w, b, p.src)
    grads = _LayerGrads(layer, ctx.needs_input_grad[:3])
    if p.v_local and (gl is not None or gh is not None):
        gl, gh = (None if g is None else g.reshape(-1).to(p.acc) for g in (gl, gh))
        for rows in _chunks(p.m, p.v_local, p.chunk_size):
            sel, h, z = layer.chunk(rows)
            grads.add(rows, sel, h, _logprobs_grad(z.to(p.acc) * p.scale, p, _positions(p, rows), lse, ent, gl, gh))
    return input_grads(ctx, *grads.result(ctx.dist, ctx.group))


class _VocabParallelLinearLogprobs(_VocabParallelLogprobs):
    @staticmethod
    @once_differentiable("celoss.distributed.vocab_parallel_linear_token_logprobs")
    def backward(ctx, grad_logprobs, grad_entropy):
        return _logprobs_backward(ctx, grad_logprobs, grad_entropy)


class _VocabParallelTokenLogprobs(_VocabParallelLogprobs):
    @staticmethod
    @once_differentiable("celoss.distributed.vocab_parallel_token_logprobs")
    def backward(ctx, grad_logprobs, grad_entropy):
        return _logprobs_backward(ctx, grad_logprobs, grad_entropy)


def _logprobs_plan(like, tokens, out_shape, v_local, layout, temperature, ignore_index, return_entropy,
                   variant_key) -> _Plan:
    scale = 1.0 / _check_temperature(temperature)
    p = _aux_plan(like, tokens, out_shape, v_local, layout, ignore_index,
                  ("token_logprobs", scale, bool(return_entropy)) + variant_key)
    p.scale, p.entropy, p.src, p.chunk_size, p.proc, p.m = scale, bool(return_entropy), None, None, None, p.n
    return p


def vocab_parallel_token_logprobs(local_logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                                  ignore_index: int = -100, return_entropy: bool = False,
                                  vocab_start: Optional[int] = None, vocab_size: Optional[int] = None,
                                  group=None, validate: bool = True):
    """:func:`celoss.token_logprobs` of logits sharded over the vocabulary across the ranks of ``group``.

    Per position, ``log softmax(z)[token]`` and (``return_entropy``) the entropy ``H = lse - sum_j
    p_j z_j`` of ``z = logits / temperature`` over the whole vocabulary, although each rank holds
    only its slice ``[vocab_start, vocab_start + V_local)`` of the logits. Forward: each rank's row
    statistics (max, sum of exps, sum of exps times ``z - max``, the token's logit on the rank that
    holds it), one all-gather of those ``(N, 4)`` statistics, merged in rank order: the results are
    identical on every rank and equal the single-process call on the concatenated logits (ignored
    positions 0 with a zero gradient; NaN rows where ``log_softmax`` has them). Backward: local, no
    communication; gradients flow from both outputs with any (replicated) upstream gradients. The
    local pass is row-chunked plain PyTorch (any device). Differentiable once.

    Args:
        local_logits (Tensor): this rank's slice of the logits (class dimension last),
            float32/float16/bfloat16/float64; or a DTensor sharded on the class dimension
            (``Shard(-1)``): slice, ``vocab_size`` and ``group`` then come from its placement.
        tokens (Tensor): integer global token ids in ``[0, vocab_size)`` or ``ignore_index``, the
            same on every rank (a replicated DTensor is accepted).
        temperature (float, keyword-only): finite and > 0. Default: 1.0
        ignore_index (int, keyword-only): token value whose outputs and gradients are 0. Default: -100
        return_entropy (bool, keyword-only): also return the entropy (differentiable). Default: False
        vocab_start (int, optional, keyword-only): first global class of this rank's slice; with
            ``vocab_size``, any tiling of the vocabulary (uneven, empty, in any rank order). Both
            left out: even shards, ``rank * V_local`` of ``world_size * V_local``. Default: None
        vocab_size (int, optional, keyword-only): the full vocabulary size. Default: None
        group (ProcessGroup, optional, keyword-only): the tensor-parallel group; None: the default
            group (with DTensor inputs: the mesh's group). Default: None
        validate (bool, keyword-only): check the arguments across the ranks first (one tiny
            all-gather and host sync; every rank then raises the same error on a mismatch). False
            skips it: arguments that differ between ranks can then hang or give wrong results.
            Default: True

    Shape:
        - Local_logits: ``(..., V_local)``.
        - Tokens: ``(...)``.
        - Output(s): ``(...)``.

    Returns:
        Tensor: the log-probabilities (float32 for float32/float16/bfloat16 logits, float64 for
        float64), replicated; with ``return_entropy``, a :class:`celoss.TokenLogprobsOutput`
        ``(logprobs, entropy)``.

    Example::

        >>> import torch.distributed as dist
        >>> # every rank of the tensor-parallel group runs this; here a group of one process
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> rank, world = dist.get_rank(), dist.get_world_size()
        >>> _ = torch.manual_seed(0)
        >>> logits = torch.randn(2, 8, 1000)                      # the same on every rank
        >>> tokens = torch.randint(0, 1000, (2, 8))
        >>> start, end = celoss.distributed.vocab_range(1000, rank, world)
        >>> local = logits[..., start:end].clone().requires_grad_()
        >>> out = celoss.distributed.vocab_parallel_token_logprobs(
        ...     local, tokens, temperature=0.7, return_entropy=True, vocab_start=start, vocab_size=1000)
        >>> ref = celoss.token_logprobs(logits, tokens, temperature=0.7, return_entropy=True)
        >>> torch.allclose(out.logprobs, ref.logprobs) and torch.allclose(out.entropy, ref.entropy)
        True
        >>> advantages = torch.randn(2, 8)
        >>> (-(out.logprobs * advantages).mean() - 0.01 * out.entropy.mean()).backward()
        >>> dist.destroy_process_group()
    """
    local_logits, group, derived, rest = _unwrap_dtensors("local_logits", local_logits, -1, group, tokens=tokens)
    tokens = rest["tokens"]
    dist, world, rank = _group_info(group)

    def make_plan():
        _checks.floating("local_logits", local_logits)
        if local_logits.dim() == 0:
            raise ValueError("local_logits must have at least 1 dimension (the local classes, last)")
        t = _check_tokens(tokens, tuple(local_logits.shape[:-1]), local_logits, "local_logits")
        rows, t, out_shape = _class_last_rows(local_logits, t)
        layout = _vocab_layout(vocab_start, vocab_size, rows.shape[1], rank, world, derived)
        p = _logprobs_plan(local_logits, t, out_shape, rows.shape[1], layout, temperature, ignore_index,
                           return_entropy, ("logits",))
        p.rows = rows
        return p

    p = _prepare(dist, group, world, rank, make_plan, validate)
    lp, ent = _VocabParallelTokenLogprobs.apply(p.rows, None, None, p, dist, group, world)
    p.rows = None  # the autograd graph keeps what backward needs
    return _result(lp, ent, p.out_shape, return_entropy)


def vocab_parallel_linear_token_logprobs(hidden: Tensor, local_weight: Tensor, tokens: Tensor, *,
                                         local_bias: Optional[Tensor] = None, temperature: float = 1.0,
                                         ignore_index: int = -100, shift: bool = False,
                                         return_entropy: bool = False, chunk_size: Optional[int] = None,
                                         vocab_start: Optional[int] = None, vocab_size: Optional[int] = None,
                                         group=None, validate: bool = True):
    """:func:`celoss.linear_token_logprobs` with the classifier sharded by rows across ``group``.

    The logits ``hidden @ local_weight.T + local_bias`` of this rank's classes are computed
    ``chunk_size`` rows at a time (default: about ``LINEAR_CHUNK_ELEMENTS / V_local`` rows), never
    gathered; the statistics flow is the one of :func:`vocab_parallel_token_logprobs` (one
    all-gather of ``(N, 4)`` statistics in forward). Backward recomputes each chunk's logits; the
    gradient of ``hidden`` is **summed over the group** by one all-reduce (every rank gets the full
    gradient, the tensor-parallel convention; every rank must run backward), the gradients of
    ``local_weight`` / ``local_bias`` stay local (accumulated in float32 at least across chunks).
    Results equal the single-process call with the full classifier. Differentiable once.

    Args:
        hidden (Tensor): hidden states, replicated on the group (a replicated DTensor is accepted).
        local_weight (Tensor): classifier rows ``[vocab_start, vocab_start + V_local)``, the dtype
            and device of ``hidden``; or a DTensor sharded by rows (``Shard(0)``).
        tokens (Tensor): integer global token ids or ``ignore_index``, replicated.
        local_bias (Tensor, optional, keyword-only): the bias of those rows (a DTensor sharded like
            the classifier). Default: None
        temperature (float, keyword-only): finite and > 0. Default: 1.0
        ignore_index (int, keyword-only): token value whose outputs and gradients are 0. Default: -100
        shift (bool, keyword-only): next-token scoring on ``(..., T, D)`` / ``(..., T)``: position t
            is scored against token t + 1, the last position is dropped (by index arithmetic).
            Default: False
        return_entropy (bool, keyword-only): also return the entropy (differentiable). Default: False
        chunk_size (int, optional, keyword-only): rows of local logits per chunk. Default: None
        vocab_start (int, optional, keyword-only): first global class of this rank's slice; with
            ``vocab_size``, any tiling of the vocabulary (uneven, empty, in any rank order). Both
            left out: even shards, ``rank * V_local`` of ``world_size * V_local``. Default: None
        vocab_size (int, optional, keyword-only): the full vocabulary size. Default: None
        group (ProcessGroup, optional, keyword-only): the tensor-parallel group; None: the default
            group (with DTensor inputs: the mesh's group). Default: None
        validate (bool, keyword-only): check the arguments across the ranks first (one tiny
            all-gather and host sync; every rank then raises the same error on a mismatch). False
            skips it: arguments that differ between ranks can then hang or give wrong results.
            Default: True

    Shape:
        - Hidden: ``(..., D)``; local_weight: ``(V_local, D)``; local_bias: ``(V_local)``.
        - Tokens: ``(...)``.
        - Output(s): ``(...)``; with ``shift``, ``(..., T - 1)``.

    Returns:
        Tensor: the log-probabilities (float32, or float64 for float64 inputs), replicated; with
        ``return_entropy``, a :class:`celoss.TokenLogprobsOutput` ``(logprobs, entropy)``.

    Example::

        >>> import torch.distributed as dist
        >>> # every rank of the tensor-parallel group runs this; here a group of one process
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> rank, world = dist.get_rank(), dist.get_world_size()
        >>> _ = torch.manual_seed(0)
        >>> hidden = torch.randn(2, 8, 16, requires_grad=True)    # replicated
        >>> head = torch.randn(1000, 16)                           # the full LM head
        >>> input_ids = torch.randint(0, 1000, (2, 8))
        >>> start, end = celoss.distributed.vocab_range(1000, rank, world)
        >>> out = celoss.distributed.vocab_parallel_linear_token_logprobs(
        ...     hidden, head[start:end], input_ids, shift=True, return_entropy=True,
        ...     vocab_start=start, vocab_size=1000)
        >>> out.logprobs.shape
        torch.Size([2, 7])
        >>> ref = celoss.linear_token_logprobs(hidden, head, input_ids, shift=True)
        >>> torch.allclose(out.logprobs, ref, atol=1e-5)
        True
        >>> (-(out.logprobs * torch.randn(2, 7)).mean() - 0.01 * out.entropy.mean()).backward()
        >>> dist.destroy_process_group()
    """
    local_weight, group, derived, rest = _unwrap_dtensors(
        "local_weight", local_weight, 0, group, hidden=hidden, tokens=tokens, local_bias=local_bias)
    hidden, tokens, local_bias = rest["hidden"], rest["tokens"], rest["local_bias"]
    dist, world, rank = _group_info(group)

    def make_plan():
        check_layer(hidden, local_weight, local_bias, ("hidden", "local_weight", "local_bias"))
        check_shift(hidden, shift, "hidden")
        t = _check_tokens(tokens, tuple(hidden.shape[:-1]), hidden, "hidden")
        _check_chunk_size(chunk_size)
        x, labels, src, out_shape = _linear_rows(hidden, t, shift)
        v_local = local_weight.shape[0]
        layout = _vocab_layout(vocab_start, vocab_size, v_local, rank, world, derived)
        needs = torch.is_grad_enabled() and hidden.requires_grad
        p = _logprobs_plan(hidden, labels, out_shape, v_local, layout, temperature, ignore_index, return_entropy,
                           ("linear", hidden.shape[-1], local_bias is not None, bool(shift), needs))
        if not bool(p.counted.all()):  # ignored positions cost no matrix-product work
            p.proc = p.counted.nonzero().squeeze(1)
            p.m = p.proc.numel()
            src = p.proc if src is None else src[p.proc]
        p.hidden, p.src, p.chunk_size = x, src, chunk_size
        return p

    p = _prepare(dist, group, world, rank, make_plan, validate)
    lp, ent = _VocabParallelLinearLogprobs.apply(p.hidden, local_weight, local_bias, p, dist, group, world)
    p.hidden = None
    return _result(lp, ent, p.out_shape, return_entropy)


# ---- distillation ----
# local statistics per row (s = student / T, t = teacher / T, y the hard target):
#   0, 1: m, sum e^(s - m)             2, 3: m, sum e^(t - m)
#   4: the kind's sum: kl sum e^(t - m_t) (t - s); ce sum e^(t - m_t) s; reverse_kl
#      sum e^(s - m_s) (s - t); jsd none (its mixture term is not a row statistic: a second pass
#      sums it elementwise, with the merged lse's, and all-reduces the sums)
#   5, 6, 7: the hard-label cross-entropy's softmax of the student at temperature 1: m, sum, z_y

_STUDENT_SUM_KINDS, _TEACHER_SUM_KINDS = ("reverse_kl",), ("kl", "ce")


def _distill_stats(zs: Tensor, zt: Tensor, p: _Plan, rows: slice) -> Tensor:
    s, t = zs * p.inv_t, zt * p.inv_t
    ms, _, es = _block(s)
    mt, _, et = _block(t)
    kind_sum = {"kl": lambda: _pmul(et, t - s), "ce": lambda: _pmul(et, s),
                "reverse_kl": lambda: _pmul(es, s - t)}.get(p.kind, lambda: torch.zeros_like(s))().sum(1)
    cols = [ms, es.sum(1), mt, et.sum(1), kind_sum]
    if p.hard:
        m1, e1 = (ms, es) if p.inv_t == 1.0 else _block(zs)[::2]
        zy = zs.gather(1, p.local_tok[rows].unsqueeze(1)).squeeze(1)
        cols += [m1, e1.sum(1), torch.where(p.here[rows], zy, 0.0)]
    else:
        cols += [torch.full_like(ms, -math.inf), torch.zeros_like(ms), torch.zeros_like(ms)]
    return torch.stack(cols, 1)


def _jsd_logs(zs: Tensor, zt: Tensor, p: _Plan, rows: slice, saved: Tensor):
    """(log p_S, log p_T, log M) of a chunk, M = beta p_T + (1 - beta) p_S."""
    ls = zs * p.inv_t - saved[rows, 0].unsqueeze(1)
    lt = zt * p.inv_t - saved[rows, 1].unsqueeze(1)
    lm = torch.logaddexp(lt + math.log(p.beta), ls + math.log1p(-p.beta)) if p.kind == "jsd" else None
    return ls, lt, lm


def _distill_rows(dist, group, world, recv: Tensor, p: _Plan, layers) -> tuple[Tensor, Tensor]:
    """(row losses, saved (N, 5): lse_S, lse_T, D (jsd: KL(p_S || M)), KL(p_T || M) (jsd), lse of
    the student at temperature 1) from the gathered (K, N, 8) statistics; jsd's second pass here."""
    c = recv.unbind(-1)
    ms, ss, *a_s = _merge(c[0], c[1], scaled=c[4:5] if p.kind in _STUDENT_SUM_KINDS else ())
    mt, st, *a_t = _merge(c[2], c[3], scaled=c[4:5] if p.kind in _TEACHER_SUM_KINDS else ())
    lse_s, lse_t = ms + ss.log(), mt + st.log()
    saved = torch.zeros(p.n, 5, dtype=p.acc, device=p.device)
    saved[:, 0], saved[:, 1] = lse_s, lse_t
    if p.kind == "kl":
        d = a_t[0] / st + lse_s - lse_t
    elif p.kind == "ce":
        d = lse_s - a_t[0] / st
    elif p.kind == "reverse_kl":
        d = a_s[0] / ss + lse_t - lse_s
    else:
        sums = torch.zeros(p.n, 2, dtype=p.acc, device=p.device)
        if p.v_local:
            for rows in _chunks(p.n, p.v_local, p.chunk_size):
                zs, zt = (layer.chunk(rows)[2].to(p.acc) for layer in layers)
                ls, lt, lm = _jsd_logs(zs, zt, p, rows, saved)
                sums[rows, 0] = _pmul(ls.exp(), ls - lm).sum(1)
                sums[rows, 1] = _pmul(lt.exp(), lt - lm).sum(1)
        dist.all_reduce(sums, group=group)
        saved[:, 2:4] = sums
        d = (1 - p.beta) * sums[:, 0] + p.beta * sums[:, 1]
    d = torch.where(torch.isfinite(lse_s) & torch.isfinite(lse_t), d, math.nan)
    if p.kind != "jsd":
        saved[:, 2] = d
    loss = p.temperature ** 2 * d
    if p.hard:
        m1, s1 = _merge(c[5], c[6])
        log_s1 = s1.log()
        saved[:, 4] = m1 + log_s1
        nll = torch.where(torch.isfinite(saved[:, 4]), (m1 - c[7].sum(0)) + log_s1, math.nan)
        loss = p.alpha * loss + (1 - p.alpha) * nll
    return torch.where(p.counted, loss, 0.0), saved


def _distill_grads(zs: Tensor, zt: Tensor, p: _Plan, rows: slice, saved: Tensor, coef: Tensor, teacher: bool):
    """(d/dz_S, d/dz_T or None) of ``sum_rows coef * loss`` for a chunk (``coef`` 0 on ignored rows:
    0 times the row's gradient, NaN where that is NaN, as in PyTorch); dD/ds and dD/dt by kind."""
    ls, lt, lm = _jsd_logs(zs, zt, p, rows, saved)
    ps, pt = ls.exp(), lt.exp()
    d = saved[rows, 2].unsqueeze(1)
    gs, gt = {"kl": (lambda: ps - pt, lambda: _pmul(pt, lt - ls - d)),
              "ce": (lambda: ps - pt, lambda: -_pmul(pt, ls + d)),
              "reverse_kl": (lambda: _pmul(ps, ls - lt - d), lambda: pt - ps),
              "jsd": (lambda: (1 - p.beta) * _pmul(ps, ls - lm - d),
                      lambda: p.beta * _pmul(pt, lt - lm - saved[rows, 3].unsqueeze(1)))}[p.kind]
    c = coef[rows].unsqueeze(1)
    k = c * (p.alpha * p.temperature)  # T^2 D of z / T: T dD/d(z / T)
    dzs, dzt = k * gs(), k * gt() if teacher else None
    if p.hard:
        ch = c * (1 - p.alpha)
        dzs += ch * (zs - saved[rows, 4].unsqueeze(1)).exp()
        dzs.scatter_add_(1, p.local_tok[rows].unsqueeze(1), torch.where(p.here[rows].unsqueeze(1), -ch, 0.0))
    return dzs, dzt


class _VocabParallelLinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, plan, dist, group, world):
        ctx.set_materialize_grads(False)
        p = plan
        layers = (_Layer(xs, ws, bs, p.src), _Layer(xt, wt, bt, p.src))
        local = torch.zeros(p.n, 8, dtype=p.acc, device=p.device)
        local[:, [0, 2, 5]] = -math.inf  # an empty block (V_local = 0)
        if p.v_local:
            for rows in _chunks(p.n, p.v_local, p.chunk_size):
                zs, zt = (layer.chunk(rows)[2].to(p.acc) for layer in layers)
                local[rows] = _distill_stats(zs, zt, p, rows)
        loss_rows, saved = _distill_rows(dist, group, world, _gather_rows(dist, group, world, local), p, layers)
        ctx.plan, ctx.dist, ctx.group = p, dist, group
        ctx.save_for_backward(xs, ws, bs, xt, wt, bt, saved)
        if p.reduction == "none":
            return loss_rows
        total = loss_rows.sum()
        return total if p.reduction == "sum" else total / p.denom

    @staticmethod
    @once_differentiable("celoss.distributed.vocab_parallel_linear_distillation_loss")
    def backward(ctx, grad):
        xs, ws, bs, xt, wt, bt, saved = ctx.saved_tensors
        p = ctx.plan
        layers = (_Layer(xs, ws, bs, p.src), _Layer(xt, wt, bt, p.src))
        sinks = (_LayerGrads(layers[0], ctx.needs_input_grad[:3]), _LayerGrads(layers[1], ctx.needs_input_grad[3:6]))
        if p.v_local and grad is not None:
            coef = grad.to(p.acc).reshape(-1).expand(p.n)
            if p.reduction in ("mean", "batchmean"):
                coef = coef * torch.where(p.denom > 0, 1 / p.denom, 0.0)
            coef = torch.where(p.counted, coef, 0.0)
            teacher = any(ctx.needs_input_grad[3:6])
            for rows in _chunks(p.n, p.v_local, p.chunk_size):
                (sel_s, h_s, zs), (sel_t, h_t, zt) = (layer.chunk(rows) for layer in layers)
                dzs, dzt = _distill_grads(zs.to(p.acc), zt.to(p.acc), p, rows, saved, coef, teacher)
                sinks[0].add(rows, sel_s, h_s, dzs)
                if teacher:
                    sinks[1].add(rows, sel_t, h_t, dzt)
        return input_grads(ctx, *sinks[0].result(ctx.dist, ctx.group), *sinks[1].result(ctx.dist, ctx.group))


def vocab_parallel_linear_distillation_loss(student_input: Tensor, local_student_weight: Tensor,
                                            teacher_input: Tensor, local_teacher_weight: Tensor,
                                            target: Optional[Tensor] = None, *,
                                            student_bias: Optional[Tensor] = None,
                                            teacher_bias: Optional[Tensor] = None, temperature: float = 1.0,
                                            kind: str = "kl", beta: float = 0.5, alpha: float = 1.0,
                                            ignore_index: int = -100, reduction: str = "batchmean",
                                            shift: bool = False, chunk_size: Optional[int] = None,
                                            vocab_start: Optional[int] = None, vocab_size: Optional[int] = None,
                                            group=None, validate: bool = True) -> Tensor:
    """:func:`celoss.linear_distillation_loss` with both classifiers sharded by rows across ``group``.

    Each rank holds rows ``[vocab_start, vocab_start + V_local)`` of the student's and of the
    teacher's classifier (the same slice for both); the hidden states and ``target`` are
    replicated. The loss equals the single-process call with the full classifiers (every
    ``kind``, the hard-label term, ``shift``, reductions, NaN / inf rows) and is replicated.

    Forward, per chunk of rows (``chunk_size``, default about ``LINEAR_CHUNK_ELEMENTS / V_local``),
    both local logits by one matrix product each and their row statistics: max and sum of exps of
    ``s = student / T`` and ``t = teacher / T``, plus the sum the kind needs, relative to a max that
    merges across ranks (``"kl"``: ``A = sum e^(t - m_t) (t - s)``, ``KL = A / S_t + lse_s -
    lse_t``; ``"ce"``: ``B = sum e^(t - m_t) s``, ``CE = lse_s - B / S_t``; ``"reverse_kl"``:
    ``sum e^(s - m_s) (s - t)``), and with a hard-label term the student's statistics at
    temperature 1 and its target logit: one all-gather of ``(N, 8)`` statistics. ``"jsd"``: the
    mixture's ``log M`` is not a function of row statistics, so a second pass recomputes the chunks
    and sums ``p_S (log p_S - log M)`` and ``p_T (log p_T - log M)`` elementwise with the merged
    lse's, then one all-reduce of those ``(N, 2)`` sums. Backward recomputes the chunks; the
    hidden-state gradients (the student's, and the teacher's if it requires grad) are summed over
    the group by one all-reduce each (every rank must run backward); the classifier and bias
    gradients stay local. The local pass is row-chunked plain PyTorch. Differentiable once.

    Args:
        student_input (Tensor): student hidden states, replicated.
        local_student_weight (Tensor): the student's classifier rows of this slice, or a DTensor
            sharded by rows (``Shard(0)``; slice, ``vocab_size`` and ``group`` from its placement).
        teacher_input (Tensor): teacher hidden states (the same leading dimensions; its hidden size
            may differ from the student's), replicated.
        local_teacher_weight (Tensor): the teacher's classifier rows of the same slice, or a
            DTensor laid out like the student's.
        target (Tensor, optional): int64 global class indices for the hard-label term, replicated;
            None: none (``alpha`` must be 1). Default: None
        student_bias (Tensor, optional, keyword-only): the student's bias slice (a DTensor sharded
            like its classifier). Default: None
        teacher_bias (Tensor, optional, keyword-only): the teacher's bias slice. Default: None
        temperature (float, keyword-only): ``T``, finite and > 0. Default: 1.0
        kind (str, keyword-only): ``"kl"``, ``"reverse_kl"``, ``"ce"`` or ``"jsd"``, as
            :func:`celoss.distillation_loss`. Default: ``"kl"``
        beta (float, keyword-only): the JSD mixture weight, in [0, 1]. Default: 0.5
        alpha (float, keyword-only): weight of the soft term; ``1 - alpha`` weighs the hard-label
            cross-entropy. Default: 1.0
        ignore_index (int, keyword-only): target value whose rows are excluded. Default: -100
        reduction (str, keyword-only): ``"batchmean"``, ``"mean"`` (divided by the counted rows
            times the full ``vocab_size``), ``"sum"`` or ``"none"``. Default: ``"batchmean"``
        shift (bool, keyword-only): both hidden states drop their last position and the labels are
            ``target[..., 1:]`` (``(..., T, D)`` inputs). Default: False
        chunk_size (int, optional, keyword-only): rows per chunk. Default: None
        vocab_start (int, optional, keyword-only): first global class of this rank's slice; with
            ``vocab_size``, any tiling of the vocabulary (uneven, empty, in any rank order). Both
            left out: even shards, ``rank * V_local`` of ``world_size * V_local``. Default: None
        vocab_size (int, optional, keyword-only): the full vocabulary size. Default: None
        group (ProcessGroup, optional, keyword-only): the tensor-parallel group; None: the default
            group (with DTensor inputs: the mesh's group). Default: None
        validate (bool, keyword-only): check the arguments across the ranks first (one tiny
            all-gather and host sync; every rank then raises the same error on a mismatch). False
            skips it: arguments that differ between ranks can then hang or give wrong results.
            Default: True

    Shape:
        - Student_input: ``(..., D_s)``; teacher_input: ``(..., D_t)``.
        - Local weights: ``(V_local, D_s)``, ``(V_local, D_t)``; biases: ``(V_local)``.
        - Target: ``(...)``.
        - Output: ``()``; with ``reduction="none"``, ``(...)`` (with ``shift``, ``(..., T - 1)``).

    Returns:
        Tensor: the loss in the student's dtype, replicated on the group.

    Example::

        >>> import torch.distributed as dist
        >>> # every rank of the tensor-parallel group runs this; here a group of one process
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> rank, world = dist.get_rank(), dist.get_world_size()
        >>> _ = torch.manual_seed(0)
        >>> student_hidden = torch.randn(2, 8, 16, requires_grad=True)
        >>> teacher_hidden = torch.randn(2, 8, 32)
        >>> student_head, teacher_head = torch.randn(1000, 16), torch.randn(1000, 32)
        >>> input_ids = torch.randint(0, 1000, (2, 8))
        >>> start, end = celoss.distributed.vocab_range(1000, rank, world)
        >>> loss = celoss.distributed.vocab_parallel_linear_distillation_loss(
        ...     student_hidden, student_head[start:end], teacher_hidden, teacher_head[start:end],
        ...     input_ids, kind="jsd", alpha=0.5, temperature=2.0, shift=True,
        ...     vocab_start=start, vocab_size=1000)
        >>> ref = celoss.linear_distillation_loss(
        ...     student_hidden, student_head, teacher_hidden, teacher_head, input_ids, kind="jsd",
        ...     alpha=0.5, temperature=2.0, shift=True)
        >>> torch.allclose(loss, ref)
        True
        >>> loss.backward()
        >>> dist.destroy_process_group()
    """
    local_student_weight, group, derived, rest = _unwrap_dtensors(
        "local_student_weight", local_student_weight, 0, group, student_input=student_input,
        teacher_input=teacher_input, target=target, student_bias=student_bias)
    local_teacher_weight, group, derived_t, rest_t = _unwrap_dtensors(
        "local_teacher_weight", local_teacher_weight, 0, group, teacher_bias=teacher_bias)
    if derived is not None and derived_t is not None and derived != derived_t:
        raise ValueError(f"celoss.distributed: the student's classifier holds classes [{derived[0]}, ...) of "
                         f"{derived[1]} but the teacher's [{derived_t[0]}, ...) of {derived_t[1]}: both must be "
                         f"sharded alike")
    derived = derived or derived_t
    xs, xt, target = rest["student_input"], rest["teacher_input"], rest["target"]
    ws, wt, bs, bt = local_student_weight, local_teacher_weight, rest["student_bias"], rest_t["teacher_bias"]
    dist, world, rank = _group_info(group)

    def make_plan():
        check_layer(xs, ws, bs, ("student_input", "local_student_weight", "student_bias"))
        check_layer(xt, wt, bt, ("teacher_input", "local_teacher_weight", "teacher_bias"))
        if tuple(xt.shape[:-1]) != tuple(xs.shape[:-1]):
            raise ValueError(f"student_input {tuple(xs.shape)} and teacher_input {tuple(xt.shape)} must have "
                             f"the same leading dimensions (one row each)")
        if wt.shape[0] != ws.shape[0]:
            raise ValueError(f"local_student_weight has {ws.shape[0]} classes but local_teacher_weight has "
                             f"{wt.shape[0]}: both must hold this rank's slice of the shared vocabulary")
        if xt.device != xs.device:
            raise ValueError(f"teacher_input is on {xt.device} but student_input is on {xs.device}")
        check_shift(xs, shift, "student_input")
        _check_chunk_size(chunk_size)
        lead = tuple(xs.shape[:-1])
        o = distill_options(kind, temperature, beta, alpha, _checks.index_value("ignore_index", ignore_index),
                            reduction, target, lead, xs, "student_input")
        labels = target if target is not None else torch.zeros(lead, dtype=torch.int64, device=xs.device)
        x_s, labels, src, out_shape = _linear_rows(xs, labels, shift)
        x_t = xt.reshape(-1, xt.shape[-1])
        v_local = ws.shape[0]
        layout = _vocab_layout(vocab_start, vocab_size, v_local, rank, world, derived)
        grad_on = torch.is_grad_enabled()
        needs = (grad_on and xs.requires_grad, grad_on and xt.requires_grad)
        p = _aux_plan(xs, labels, out_shape, v_local, layout, o.ignore_index,
                      ("distillation", o.kind, o.temperature, o.beta, o.alpha, reduction, target is not None,
                       str(xt.dtype), xs.shape[-1], xt.shape[-1], bs is not None, bt is not None, bool(shift),
                       needs))
        if target is None:
            p.counted = torch.ones_like(p.counted)
        p.acc = accum_dtype(xs.dtype, xt.dtype)
        p.kind, p.temperature, p.inv_t, p.beta, p.alpha = o.kind, o.temperature, 1.0 / o.temperature, o.beta, o.alpha
        p.reduction, p.hard, p.src, p.chunk_size = reduction, target is not None and o.alpha != 1.0, src, chunk_size
        counted = p.counted.sum().to(p.acc)
        p.denom = counted * p.vocab_size if reduction == "mean" else counted
        p.inputs = (x_s, x_t)
        return p

    p = _prepare(dist, group, world, rank, make_plan, validate)
    loss = _VocabParallelLinearDistillation.apply(p.inputs[0], ws, bs, p.inputs[1], wt, bt, p, dist, group, world)
    p.inputs = None
    if p.reduction == "none":
        loss = loss.reshape(p.out_shape)
    return loss.to(xs.dtype)
