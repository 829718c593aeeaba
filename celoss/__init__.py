"""celoss: cross-entropy losses for large vocabularies (Triton on CUDA, OpenMP/Cython on CPU).

The functions mirror ``torch.nn.functional``; the modules mirror ``torch.nn``. ``celoss.distributed``
holds the vocab-parallel versions, ``celoss.integrations.transformers`` the Hugging Face hook.

``import celoss`` loads neither Triton nor transformers nor ``torch._dynamo``: the backends load at
their first call (``celoss._dispatch``), the integration when imported.
"""
__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

import importlib.util as _importlib_util
import os as _os
import warnings as _warnings

from . import distributed
from ._dispatch import available_backends
from ._memory import cpu_cache_bytes, empty_cpu_cache, set_cpu_cache_limit
from .binary import binary_cross_entropy_with_logits
from .cross_entropy import CrossEntropyOutput, cross_entropy
from .distillation import distillation_loss
from .focal import focal_loss, sigmoid_focal_loss
from .linear_cross_entropy import linear_cross_entropy
from .linear_distillation import linear_distillation_loss
from .logprobs import TokenLogprobsOutput, linear_token_logprobs, token_logprobs
from .modules import (BCEWithLogitsLoss, CrossEntropyLoss, DistillationLoss, FocalLoss, LinearCrossEntropyLoss,
                      LinearDistillationLoss, SigmoidFocalLoss)

__all__ = [
    "available_backends", "cpu_cache_bytes", "empty_cpu_cache", "set_cpu_cache_limit",
    "distributed",
    "cross_entropy", "CrossEntropyOutput", "linear_cross_entropy",
    "binary_cross_entropy_with_logits", "focal_loss", "sigmoid_focal_loss", "distillation_loss",
    "token_logprobs", "linear_token_logprobs", "TokenLogprobsOutput", "linear_distillation_loss",
    "CrossEntropyLoss", "LinearCrossEntropyLoss", "BCEWithLogitsLoss", "FocalLoss", "SigmoidFocalLoss",
    "DistillationLoss", "LinearDistillationLoss",
]


def _warn_if_source_folder() -> None:
    """In a source checkout, celoss.kernels and celoss.cpu live in kernels/ and cpu/ next to celoss/:
    run from the checkout's root without an editable install (e.g. after a plain ``pip install .``),
    ``import celoss`` finds the folder celoss/ first, shadows any installed celoss and silently
    loses the compiled and Triton backends."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "kernels")) or _importlib_util.find_spec("celoss.kernels"):
        return
    from importlib import metadata
    checkout = _os.path.dirname(here)  # its celoss.egg-info (left by a build) is no installed package
    installed = [d for d in metadata.distributions(name="celoss") if _os.path.abspath(d.locate_file("")) != checkout]
    shadowed = (f"; it shadows the installed celoss {installed[0].version} ({installed[0].locate_file('')})"
                if installed else "")
    _warnings.warn(
        f"celoss is imported from its source folder {here}, not from an installed package{shadowed}. "
        "Its Triton and compiled CPU kernels (kernels/ and cpu/ in the checkout) are not importable from "
        "there, so every call runs the slow torch reference backend. Run Python from another folder to "
        "use the installed package, or install the checkout in editable mode: pip install -e .",
        RuntimeWarning, stacklevel=2)


_warn_if_source_folder()
