"""The options of a loss as one frozen dataclass: built once by the public function, kept by its
autograd Function, flattened at the custom-op boundary (custom ops take primitive arguments only)
by :meth:`op_args` and rebuilt inside the op as ``Options(*args)``; the fields are in the ops'
argument order. A backend receives them as its keyword arguments (:meth:`kwargs`)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional


class _Flat:
    def op_args(self) -> tuple:
        """The fields in order: a custom op's trailing primitive arguments."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def kwargs(self) -> dict:
        """The fields by name: a backend function's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SoftmaxOptions(_Flat):
    """Cross-entropy / softmax focal loss (``celoss::ce_forward``, ``Backend.ce_fused``)."""
    ignore_index: int = -100
    label_smoothing: float = 0.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    z_loss: float = 0.0
    focal_gamma: Optional[float] = None  # None: cross-entropy


@dataclass(frozen=True)
class BinaryOptions(_Flat):
    """Binary cross-entropy with logits / sigmoid focal loss (``Backend.binary_fused``)."""
    focal_alpha: float = 0.0  # < 0: no alpha term
    focal_gamma: Optional[float] = None  # None: binary cross-entropy


@dataclass(frozen=True)
class DistillOptions(_Flat):
    """Distillation (``Backend.distill_fused``)."""
    kind: str
    temperature: float
    beta: float
    alpha: float
    ignore_index: int
