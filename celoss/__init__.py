"""celoss: cross-entropy losses for large vocabularies (Triton on CUDA, OpenMP/Cython on CPU).

The functions mirror ``torch.nn.functional``; the modules mirror ``torch.nn``. ``celoss.distributed``
holds the vocab-parallel versions, ``celoss.integrations.transformers`` the Hugging Face hook.
"""
from . import distributed
from ._dispatch import available_backends
from ._memory import cpu_cache_bytes, empty_cpu_cache, set_cpu_cache_limit
from .binary import binary_cross_entropy_with_logits
from .cross_entropy import CrossEntropyOutput, cross_entropy
from .distillation import distillation_loss
from .focal import focal_loss, sigmoid_focal_loss
from .linear_cross_entropy import linear_cross_entropy
from .modules import (BCEWithLogitsLoss, CrossEntropyLoss, DistillationLoss, FocalLoss, LinearCrossEntropyLoss,
                      SigmoidFocalLoss)

__all__ = [
    "available_backends", "cpu_cache_bytes", "empty_cpu_cache", "set_cpu_cache_limit",
    "distributed",
    "cross_entropy", "CrossEntropyOutput", "linear_cross_entropy",
    "binary_cross_entropy_with_logits", "focal_loss", "sigmoid_focal_loss", "distillation_loss",
    "CrossEntropyLoss", "LinearCrossEntropyLoss", "BCEWithLogitsLoss", "FocalLoss", "SigmoidFocalLoss",
    "DistillationLoss",
]
__version__ = "0.1.0"
