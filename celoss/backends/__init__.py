"""Backends: one module per engine, all implementing the same row-kernel contract.

``reference`` (plain PyTorch, chunked), ``cython`` (OpenMP kernels in ``celoss.cpu``) and
``triton`` (kernels in ``celoss.kernels``). Each module exposes the functions below, on
torch tensors, with no autograd and no argument checking (``celoss`` validated everything,
targets included, before calling). All statistics and losses are float32 (float64 when the
logits are float64); gradients are written in the logits' dtype.

Row statistics -- the one idea everything is built on
------------------------------------------------------
For a row of logits ``x`` (any block of its classes), with the transformed logits
``z = softcap * tanh(logit_scale * x / softcap)`` (just ``logit_scale * x`` without softcap),
the *row statistics* are ``(max, sumexp, target_z, weighted_z)``:
``max = max_j z_j``, ``sumexp = sum_j exp(z_j - max)``, ``target_z = z_y`` if the target class
``y`` falls in this block else 0, ``weighted_z = sum_j w_j z_j`` (w = 1 without class weights).
Blocks, chunks and ranks merge them exactly (``celoss.stats.merge_all``); ``lse = max + log(sumexp)``.

Gradient in coefficient form
----------------------------
Every softmax loss here (cross-entropy with weights, smoothing and z-loss; focal loss) has
``dloss_n/dz_j = A_n p_j - B_n [j == y_n] - w_j (D_n + E_n t_nj)`` with ``p_j = exp(z_j - lse_n)``
(``t`` = probability targets, E = 0 for index targets), and
``dz_j/dx_j = logit_scale * (1 - (z_j / softcap)**2)`` (``logit_scale`` without softcap).
``celoss.stats.coefficients`` gives A, B, D, E and the loss from the statistics.

Contract
--------
``ce_fused(logits, target, soft_target, weight, coef, grad_out, *, ignore_index, label_smoothing,
logit_scale, softcap, z_loss, focal_gamma) -> (loss, lse)``
    logits (N, C), stride(1) == 1, fp32/fp16/bf16 (fp64 on cython/reference). ``target`` (N,)
    int64, or None with ``soft_target`` (N, C) class probabilities (same dtype, stride(1) == 1).
    ``weight`` (C,) contiguous float32/float64 or None (focal: the per-class alpha).
    ``softcap`` None or > 0; ``focal_gamma`` None (cross-entropy) or >= 0 (focal loss, index
    targets, no smoothing/z-loss). Returns the per-row loss (N,) and lse (N,), 0 loss for ignored
    rows. When ``grad_out`` (N, C) is given (it may be ``logits`` itself: in place), writes
    ``coef_n * dloss_n/dlogits_nj`` into it; ``coef`` is a float tensor of shape (1,) (one
    scale for all rows) or (N,), applied in the accumulation dtype (float64 for float64 logits).
    A counted row holding a NaN or +inf transformed logit, or only -inf ones, gets a NaN loss and
    gradient (PyTorch's log_softmax is NaN there). Ignored rows get loss 0 and PyTorch's gradient
    ``0 * softmax``: zeros, or NaN for such a row, whatever ``coef`` is (a 0/0 mean gives NaN). One read of the logits for
    the loss and the gradient (the row is re-read from cache, not from memory, where possible).

``ce_stats(logits, target, weight, *, class_start, ignore_index, logit_scale, softcap) -> (N, 4)``
    Row statistics (see above) of a block of classes ``[class_start, class_start + C)``.

``ce_grad(logits, target, weight, lse, row_coefs, grad_out, *, class_start, logit_scale, softcap)``
    Writes ``dz_j/dx_j * (A_n p_j - B_n [j + class_start == y_n] - D_n w_j)`` for a block of
    classes given the full-row ``lse`` (N,) and ``row_coefs`` (N, 3) = (A, B, D) (already
    multiplied by the upstream gradient). ``grad_out`` may alias ``logits``.
"""
