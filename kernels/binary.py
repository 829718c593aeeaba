"""Triton elementwise kernel for binary cross-entropy with logits and the sigmoid focal loss
(the ``binary_fused`` backend contract).

One program per ``BLOCK`` elements of the flat, contiguous ``(R, C)`` input; float32 math
whatever the dtypes of input, target and upstream gradient. Weight and pos_weight are
``(R, C)`` broadcast views (any strides, stride 0 included): element ``i`` reads them at
``(i // C) * s0 + (i % C) * s1``. Each program writes the sum of its losses to ``partial_ptr``
(the reductions sum those), and, as asked, the per-element loss and the gradients
``coef * dloss/dx``, ``coef * dloss/dy`` (``coef``: the upstream gradient per element, or one
scalar read from device memory, so no host synchronisation).

Math (the same as the CPU kernel in ``cpu/_family.pyx``), softplus(-x) = max(-x, 0) + log1p(e^-|x|)
is exact for |x| up to the float32 range::

    BCE    lw = 1 + (pw - 1) y,  loss = w ((1 - y) x + lw softplus(-x)),
           dx = w ((1 - y) - lw sigmoid(-x)),  dy = w (pw softplus(-x) - softplus(x))  (-x without pw)
    focal  p = sigmoid(x), ce = (1 - y) x + softplus(-x), q = 1 - p_t = p (1 - y) + y (1 - p),
           at = alpha y + (1 - alpha)(1 - y) (1 when alpha < 0),  loss = at ce q^gamma,
           dx = at q^gamma ((p - y) + gamma ce (1 - 2y) p (1 - p) / q)   (p (1 - p) / q -> 1 as q -> 0)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import SUPPORTED_DTYPES, launch, with_flags
from ._tl import log1p01
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _binary_kernel(
    x_ptr, y_ptr, weight_ptr, ws0, ws1, pw_ptr, ps0, ps1, coef_ptr, loss_ptr, partial_ptr,
    gx_ptr, gy_ptr, numel, C, alpha, gamma,
    BLOCK: tl.constexpr, FOCAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_PW: tl.constexpr,
    PER_ELEMENT: tl.constexpr, PER_ELEMENT_COEF: tl.constexpr, HAS_GX: tl.constexpr, HAS_GY: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT or HAS_PW:
        r = offs // C
        c = offs - r * C
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    spn = tl.maximum(-x, 0.0) + log1p01(e)  # softplus(-x)
    sgn = tl.where(x >= 0, e * inv, inv)      # sigmoid(-x) = 1 - p
    if FOCAL:
        p = tl.where(x >= 0, inv, e * inv)
        ce = (1.0 - y) * x + spn
        q = p * (1.0 - y) + y * sgn
        pos = q > 0
        safe_q = tl.where(pos, q, 1.0)
        mod = tl.where(pos, tl.exp(gamma * tl.log(safe_q)), tl.where(gamma == 0, 1.0, 0.0))
        at = tl.where(alpha >= 0, alpha * y + (1.0 - alpha) * (1.0 - y), 1.0)
        rr = (1.0 - 2.0 * y) * tl.where(pos, p * sgn / safe_q, 1.0)
        loss = at * ce * mod
        # gamma = 0 is at * BCE: no gamma * ce * rr term (0 * inf = NaN at |x| = inf)
        dx = at * mod * ((p * (1.0 - y) - y * sgn) + tl.where(gamma == 0, 0.0, gamma * ce * rr))
        dy = tl.zeros_like(dx)
    else:
        if HAS_PW:
            pw = tl.load(pw_ptr + r * ps0 + c * ps1, mask=mask, other=1.0).to(tl.float32)
            lw = 1.0 + (pw - 1.0) * y
            # pw softplus(-x) - softplus(x), not (pw - 1) softplus(-x) - x: inf - inf at x = -inf.
            # softplus(x) = softplus(-x) + x keeps no extra value live (registers: AOT test)
            dy = pw * spn - tl.where(x == -float("inf"), 0.0, spn + x)
        else:
            lw = 1.0
            dy = -x
        loss = (1.0 - y) * x + lw * spn
        dx = (1.0 - y) - lw * sgn
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + r * ws0 + c * ws1, mask=mask, other=0.0).to(tl.float32)
            loss = w * loss
            dx = w * dx
            dy = w * dy
    loss = tl.where(mask, loss, 0.0)
    tl.store(partial_ptr + pid, tl.sum(loss, axis=0))
    if PER_ELEMENT:
        tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)
    if HAS_GX or HAS_GY:
        if PER_ELEMENT_COEF:
            coef = tl.load(coef_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            coef = tl.load(coef_ptr).to(tl.float32)
        if HAS_GX:
            tl.store(gx_ptr + offs, (dx * coef).to(gx_ptr.dtype.element_ty), mask=mask)
        if HAS_GY:
            tl.store(gy_ptr + offs, (dy * coef).to(gy_ptr.dtype.element_ty), mask=mask)


def binary_plan(x, y, weight, pos_weight, coef, *, per_element, grad_input, grad_target,
                focal_alpha, focal_gamma):
    """Kernel, grid, keyword arguments, launch options and (loss, partials, gx, gy)."""
    for t, name in ((x, "input"), (y, "target")):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"triton binary kernels take fp32/fp16/bf16 {name}, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError("input and target must be (R, C) of the same shape")
    focal = focal_gamma is not None
    if focal and (weight is not None or pos_weight is not None):
        raise ValueError("the sigmoid focal loss takes no weight / pos_weight")
    numel = x.numel()
    c = x.shape[1]
    grid = (triton.cdiv(numel, BLOCK),)
    dev = x.device
    partials = torch.empty(grid[0], dtype=torch.float32, device=dev)
    loss = torch.empty_like(x) if per_element else None
    gx = torch.empty_like(x) if grad_input else None
    gy = torch.empty_like(y) if grad_target else None
    per_element_coef = coef is not None and coef.numel() != 1 and (grad_input or grad_target)
    if (grad_input or grad_target) and coef is None:
        raise ValueError("gradients need coef")
    if per_element_coef:
        assert coef.shape == x.shape and coef.is_contiguous()
    kwargs = with_flags(dict(
        x_ptr=x, y_ptr=y, weight_ptr=weight, ws0=weight.stride(0) if weight is not None else 0,
        ws1=weight.stride(1) if weight is not None else 0, pw_ptr=pos_weight,
        ps0=pos_weight.stride(0) if pos_weight is not None else 0,
        ps1=pos_weight.stride(1) if pos_weight is not None else 0,
        coef_ptr=coef if (grad_input or grad_target) else None,
        loss_ptr=loss, partial_ptr=partials, gx_ptr=gx, gy_ptr=gy, numel=numel, C=max(c, 1),
        alpha=float(focal_alpha) if focal else 0.0, gamma=float(focal_gamma) if focal else 0.0,
        BLOCK=BLOCK, FOCAL=focal, PER_ELEMENT_COEF=per_element_coef,
    ), HAS_WEIGHT="weight_ptr", HAS_PW="pw_ptr", PER_ELEMENT="loss_ptr", HAS_GX="gx_ptr", HAS_GY="gy_ptr")
    return _binary_kernel, grid, kwargs, dict(num_warps=NUM_WARPS), (loss, partials, gx, gy)


def binary(x, y, weight, pos_weight, coef, *, per_element=False, grad_input=False,
           grad_target=False, focal_alpha=0.25, focal_gamma=None):
    """(loss per element or None, partial sums (float32), grad_x or None, grad_y or None)."""
    return launch(binary_plan(
        x, y, weight, pos_weight, coef, per_element=per_element, grad_input=grad_input,
        grad_target=grad_target, focal_alpha=focal_alpha, focal_gamma=focal_gamma))
