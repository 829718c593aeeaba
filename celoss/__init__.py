"""celoss: cross-entropy losses for large vocabularies (Triton on CUDA, OpenMP/Cython on CPU)."""
from ._dispatch import available_backends
from .cross_entropy import CrossEntropyOutput, cross_entropy
from .modules import CrossEntropyLoss

__all__ = ["available_backends", "cross_entropy", "CrossEntropyOutput", "CrossEntropyLoss"]
__version__ = "0.1.0"

from .linear_cross_entropy import linear_cross_entropy  # noqa: E402
from .modules import LinearCrossEntropyLoss  # noqa: E402

__all__ += ["linear_cross_entropy", "LinearCrossEntropyLoss"]
from . import distributed  # noqa: E402,F401  (vocab-parallel cross-entropy over torch.distributed)

# the loss family: binary CE with logits, focal losses, knowledge distillation
from .binary import binary_cross_entropy_with_logits  # noqa: E402
from .distillation import distillation_loss  # noqa: E402
from .focal import focal_loss, sigmoid_focal_loss  # noqa: E402
from .modules import BCEWithLogitsLoss, DistillationLoss, FocalLoss, SigmoidFocalLoss  # noqa: E402

__all__ += ["binary_cross_entropy_with_logits", "focal_loss", "sigmoid_focal_loss", "distillation_loss",
            "BCEWithLogitsLoss", "FocalLoss", "SigmoidFocalLoss", "DistillationLoss"]
