"""nn.Module wrappers mirroring torch.nn's loss modules (same constructor arguments plus extras)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .cross_entropy import cross_entropy


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
        self.backend, self.extras = backend, extras

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
        self.backend, self.extras = backend, extras

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                linear_bias: Optional[Tensor] = None):
        from .linear_cross_entropy import linear_cross_entropy
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, backend=self.backend, **self.extras)
