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

Layout
------
``_common`` (vocabulary layout, DTensor unwrapping, the cross-rank argument check and target digest,
the plan, the statistics all-gather, chunking, the per-softmax row statistics), ``cross_entropy``
(:func:`vocab_parallel_cross_entropy`, :func:`vocab_parallel_linear_cross_entropy`), ``logprobs``
(:func:`vocab_parallel_token_logprobs`, :func:`vocab_parallel_linear_token_logprobs`),
``linear_distillation`` (:func:`vocab_parallel_linear_distillation_loss`).
"""
from ._common import LINEAR_CHUNK_ELEMENTS, vocab_range
from .cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from .linear_distillation import vocab_parallel_linear_distillation_loss
from .logprobs import vocab_parallel_linear_token_logprobs, vocab_parallel_token_logprobs

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
           "vocab_parallel_linear_distillation_loss", "vocab_parallel_linear_token_logprobs",
           "vocab_parallel_token_logprobs", "vocab_range"]
