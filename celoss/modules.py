"""nn.Module wrappers mirroring torch.nn's loss modules (same constructor arguments plus extras)."""
from __future__ import annotations

import inspect
from typing import Optional

from torch import Tensor, nn

from .binary import binary_cross_entropy_with_logits
from .cross_entropy import cross_entropy
from .distillation import distillation_loss
from .focal import focal_loss, sigmoid_focal_loss
from .linear_cross_entropy import linear_cross_entropy
from .linear_distillation import linear_distillation_loss


def _keyword_extras(fn, extras: dict, taken=()) -> dict:
    """`extras` after checking that each is a keyword option of `fn` the module doesn't already set:
    a typo fails at construction, not at the first forward."""
    known = {name for name, p in inspect.signature(fn).parameters.items()
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - set(taken)
    unknown = sorted(set(extras) - known)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown} for {fn.__name__}; "
                        f"expected some of {sorted(known)}")
    return extras


class CrossEntropyLoss(nn.Module):
    """Mirrors ``torch.nn.CrossEntropyLoss``; extra keyword arguments go to :func:`celoss.cross_entropy`."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 backend: Optional[str] = None, **extras):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = nn.modules.loss._Reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.backend = backend
        self.extras = _keyword_extras(cross_entropy, extras, ("input", "target", "weight", "ignore_index",
                                                              "reduction", "label_smoothing", "backend"))

    def forward(self, input: Tensor, target: Tensor):
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                             self.label_smoothing, backend=self.backend, **self.extras)


class LinearCrossEntropyLoss(nn.Module):
    """Loss module of :func:`celoss.linear_cross_entropy`: ``forward(input, linear_weight, target,
    linear_bias=None)``; constructor arguments are that function's keyword options."""

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, backend: Optional[str] = None, **extras):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.backend = backend
        self.extras = _keyword_extras(linear_cross_entropy, extras,
                                      ("input", "linear_weight", "target", "linear_bias", "weight", "reduction",
                                       "ignore_index", "label_smoothing", "backend"))

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, backend=self.backend, **self.extras)


# ----------------------------------------------------------------------------------------------
# Loss family: focal losses, binary cross-entropy with logits, distillation
# ----------------------------------------------------------------------------------------------

class FocalLoss(nn.Module):
    """Softmax focal loss module: ``forward(input, target)`` -> :func:`celoss.focal_loss` (class dim 1).
    ``alpha`` (None, a float or a per-class tensor, registered as a buffer when a tensor)."""

    def __init__(self, gamma: float = 2.0, alpha=None, ignore_index: int = -100, reduction: str = "mean", *,
                 backend: Optional[str] = None):
        super().__init__()
        self.gamma, self.ignore_index, self.reduction, self.backend = gamma, ignore_index, reduction, backend
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha

    def forward(self, input: Tensor, target: Tensor):
        return focal_loss(input, target, self.gamma, self.alpha, self.ignore_index, self.reduction,
                          backend=self.backend)


class SigmoidFocalLoss(nn.Module):
    """Module of :func:`celoss.sigmoid_focal_loss` (torchvision's definition): ``forward(inputs, targets)``."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none", *,
                 backend: Optional[str] = None):
        super().__init__()
        self.alpha, self.gamma, self.reduction, self.backend = alpha, gamma, reduction, backend

    def forward(self, inputs: Tensor, targets: Tensor):
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction, backend=self.backend)


class BCEWithLogitsLoss(nn.Module):
    """Mirrors ``torch.nn.BCEWithLogitsLoss`` (weight and pos_weight buffers) on
    :func:`celoss.binary_cross_entropy_with_logits`."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight: Optional[Tensor] = None, *, backend: Optional[str] = None):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = nn.modules.loss._Reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction, self.backend = reduction, backend

    def forward(self, input: Tensor, target: Tensor):
        return binary_cross_entropy_with_logits(input, target, self.weight, self.reduction, self.pos_weight,
                                                backend=self.backend)


class DistillationLoss(nn.Module):
    """Module of :func:`celoss.distillation_loss`: ``forward(student_logits, teacher_logits, target=None)``;
    constructor arguments are that function's keyword options."""

    def __init__(self, temperature: float = 1.0, kind: str = "kl", beta: float = 0.5, alpha: float = 1.0,
                 ignore_index: int = -100, reduction: str = "batchmean", *, backend: Optional[str] = None):
        super().__init__()
        self.temperature, self.kind, self.beta, self.alpha = temperature, kind, beta, alpha
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None):
        return distillation_loss(student_logits, teacher_logits, target, temperature=self.temperature,
                                 kind=self.kind, beta=self.beta, alpha=self.alpha,
                                 ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend)




class LinearDistillationLoss(nn.Module):
    """Module of :func:`celoss.linear_distillation_loss`: ``forward(student_input, student_weight,
    teacher_input, teacher_weight, target=None)`` (biases as keyword arguments of forward);
    constructor arguments are that function's keyword options."""

    def __init__(self, **options):
        super().__init__()
        self.options = _keyword_extras(linear_distillation_loss, options,
                                       ("student_input", "student_weight", "teacher_input", "teacher_weight",
                                        "target", "student_bias", "teacher_bias"))

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                target: Optional[Tensor] = None, *, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None):
        return linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target,
                                        student_bias=student_bias, teacher_bias=teacher_bias, **self.options)
