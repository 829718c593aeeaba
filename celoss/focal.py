"""Focal losses: softmax (multi-class) ``focal_loss`` and torchvision's ``sigmoid_focal_loss``."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import _checks
from .binary import binary_loss
from .cross_entropy import softmax_loss


def _gamma(gamma) -> float:
    gamma = float(gamma)
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    return gamma


def focal_loss(input: Tensor, target: Tensor, gamma: float = 2.0, alpha: Union[float, Tensor, None] = None,
               ignore_index: int = -100, reduction: str = "mean", *, backend: Optional[str] = None) -> Tensor:
    """Softmax focal loss (Lin et al.), laid out like :func:`celoss.cross_entropy` (classes on dim 1).

    Per counted position: ``loss = -alpha_y * (1 - p_y)**gamma * log p_y`` with ``p = softmax(input)``
    over the classes; positions whose target is ``ignore_index`` have loss 0 and zero gradient.
    ``gamma = 0`` with ``alpha = None`` is exactly ``cross_entropy`` (all reductions). The gradient is
    ``g (softmax - onehot)`` with ``g = alpha_y (1 - p_y)**gamma (1 - gamma p_y log p_y / (1 - p_y))``,
    finite as ``p_y -> 1`` and for ``gamma < 1``. Runs on the cross-entropy kernels of every backend
    (online softmax, gradient formed with the loss).

    Args:
        input (Tensor): logits, float32/float16/bfloat16/float64 (see Shape).
        target (Tensor): class indices (int64 or uint8; probability targets are not supported).
        gamma (float, optional): focusing parameter, finite and >= 0. Default: 2.0
        alpha (float, Tensor or None, optional): None (1 for every class), a float (the same factor
            for every class) or a 1-D tensor of C per-class factors (not differentiated; a 0-D
            tensor acts as a float).
            Default: None
        ignore_index (int, optional): target value that is skipped. Default: -100
        reduction (str, optional): ``"mean"`` = sum over counted positions / their number (NOT
            weighted by alpha, unlike ``cross_entropy(weight=...)``'s weighted mean; NaN when every
            target is ignored, with a zero gradient), ``"sum"`` or ``"none"``. Default: ``"mean"``
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None
            (automatic). Default: None

    Shape:
        - Input: ``(C)``, ``(N, C)`` or ``(N, C, d_1, ..., d_K)`` with ``K >= 1``.
        - Target: ``()``, ``(N)`` or ``(N, d_1, ..., d_K)``.
        - Output: ``()``; with ``reduction="none"``, the target's shape.

    Returns:
        Tensor: the loss, in ``input``'s dtype.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> logits = torch.randn(8, 5, requires_grad=True)
        >>> target = torch.randint(0, 5, (8,))
        >>> loss = celoss.focal_loss(logits, target, gamma=2.0, alpha=0.25)
        >>> p_y = logits.softmax(1).gather(1, target[:, None])[:, 0]
        >>> torch.allclose(loss, (-0.25 * (1 - p_y) ** 2 * p_y.log()).mean())
        True
        >>> loss.backward()
        >>> celoss.focal_loss(logits, target, gamma=0.0, reduction="none").shape
        torch.Size([8])
    """
    gamma = _gamma(gamma)
    _checks.floating("input", input)
    if isinstance(target, Tensor) and target.dtype.is_floating_point:
        raise TypeError("focal_loss takes int64 class-index targets (probability targets are not supported)")
    c = input.shape[1] if input.dim() >= 2 else (input.shape[0] if input.dim() == 1 else 0)
    if alpha is None:
        weight = None
    elif isinstance(alpha, Tensor):
        if alpha.dim() == 0:
            weight = alpha.detach().reshape(1).expand(c).to(input.device)
        else:
            weight = alpha  # checked (1-D, C elements, device) by softmax_loss
    else:
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        weight = torch.full((c,), alpha, dtype=torch.float32, device=input.device)
    return softmax_loss(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=0.0, logit_scale=1.0, softcap=None, z_loss=0.0, focal_gamma=gamma,
                        weighted_mean=False, return_lse=False, return_z_loss=False,
                        inplace_backward=False, backend=backend)


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none", *, backend: Optional[str] = None) -> Tensor:
    """torchvision's ``sigmoid_focal_loss`` (RetinaNet), fused in one elementwise kernel.

    ``p = sigmoid(inputs)``, ``ce = binary_cross_entropy_with_logits(inputs, targets, reduction="none")``,
    ``p_t = p * targets + (1 - p) * (1 - targets)``, ``loss = ce * (1 - p_t)**gamma``, times
    ``alpha * targets + (1 - alpha) * (1 - targets)`` when ``alpha >= 0`` (``alpha < 0`` disables
    it). ``1 - p_t`` is formed as ``p (1 - t) + (1 - p) t`` with ``1 - p = sigmoid(-x)`` computed
    directly, so it does not round to 0 for large |x|.
    NaN and +-inf inputs give NaN / inf where torchvision's composition does (``gamma = 0`` is
    alpha-weighted BCE, finite gradients at +-inf). One deliberate difference: for finite logits
    where ``1 - p_t`` underflows to 0 with ``0 < gamma < 1``, autograd through torchvision's
    ``(1 - p_t) ** gamma`` gives 0 * inf = NaN; celoss returns the exact limit of the gradient, 0.

    Args:
        inputs (Tensor): logits of any shape, float32/float16/bfloat16/float64.
        targets (Tensor): same shape, float probabilities in [0, 1] (soft targets allowed; finite
            values outside [0, 1] are outside the loss's domain and not checked, as a check would
            stop the GPU: their result is unspecified), not differentiated (pass
            ``targets.detach()`` if it requires grad).
        alpha (float, optional): weight of the positive class, finite; ``alpha < 0`` disables the
            weighting. Default: 0.25
        gamma (float, optional): focusing parameter, finite and >= 0. Default: 2.0
        reduction (str, optional): ``"none"`` (as torchvision), ``"mean"`` (over all elements) or
            ``"sum"``. Default: ``"none"``
        backend (str, optional, keyword-only): ``"triton"``, ``"cython"``, ``"torch"`` or None
            (automatic). Default: None

    Shape:
        - Inputs: ``(*)``, any number of dimensions.
        - Targets: ``(*)``, the inputs' shape.
        - Output: ``(*)`` with ``reduction="none"``, else ``()``.

    Returns:
        Tensor: the loss, in ``torch.promote_types(inputs.dtype, targets.dtype)``.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> logits = torch.randn(16, 4, requires_grad=True)
        >>> targets = (torch.rand(16, 4) > 0.8).float()
        >>> loss = celoss.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="mean")
        >>> p = logits.sigmoid()
        >>> p_t = p * targets + (1 - p) * (1 - targets)
        >>> ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        >>> ref = (ce * (1 - p_t) ** 2 * (0.25 * targets + 0.75 * (1 - targets))).mean()
        >>> torch.allclose(loss, ref)
        True
        >>> loss.backward()
    """
    gamma = _gamma(gamma)
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if isinstance(targets, Tensor) and targets.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("celoss.sigmoid_focal_loss: gradients with respect to targets are not "
                                  "supported; pass targets.detach()")
    return binary_loss(inputs, targets, None, None, reduction, backend, focal_alpha=alpha,
                       focal_gamma=gamma, name="inputs", target_name="targets")
