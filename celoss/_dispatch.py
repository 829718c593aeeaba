"""Which backend runs a call: CUDA -> triton, CPU -> cython, anything else -> torch (reference)."""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

from .backends import conformance_error

BACKENDS = ("triton", "cython", "torch")
_MODULES = {"triton": "celoss.backends.triton", "cython": "celoss.backends.cython",
            "torch": "celoss.backends.reference"}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _load(name: str):
    """(module, None) or (None, reason it can't be imported)."""
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # a missing or broken extension must not break `import celoss`
        return None, f"{type(exc).__name__}: {exc}"
    error = conformance_error(module)
    return (None, error) if error else (module, None)


def _device_reason(name: str, device: torch.device) -> str | None:
    """Why backend `name` can't run on `device` (None if it can)."""
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return f"triton needs CUDA tensors (got {device.type}; CPU only with TRITON_INTERPRET=1)"
    if name == "cython" and device.type != "cpu":
        return f"cython runs on CPU tensors only (got {device.type})"
    return None


def available_backends() -> dict[str, str | None]:
    """Which backends can run on this machine.

    A backend is usable when its module imports (the compiled CPU kernels for ``"cython"``, Triton
    for ``"triton"``) and, for ``"triton"``, a CUDA device is present (or ``TRITON_INTERPRET=1``).
    ``"torch"``, the plain-PyTorch reference, runs on any device.

    Args:
        None.

    Shape:
        Not applicable: no tensor arguments.

    Returns:
        dict[str, str or None]: backend name (``"triton"``, ``"cython"``, ``"torch"``) -> None if
        it can run here, else the reason it can't.

    Example::

        >>> backends = celoss.available_backends()
        >>> sorted(backends)
        ['cython', 'torch', 'triton']
        >>> backends["torch"] is None
        True
    """
    out = {}
    for name in BACKENDS:
        module, reason = _load(name)
        if module is not None and name == "triton" and not torch.cuda.is_available() and not _interpreting():
            reason = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
        out[name] = reason
    return out


@functools.lru_cache(maxsize=None)
def _warn_fallback(name: str, reason: str) -> None:
    warnings.warn(f"celoss: the {name} backend is unavailable ({reason}); using the torch reference "
                  f"backend instead", RuntimeWarning, stacklevel=4)


def _assume_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does (tests/test_dispatch.py checks that), without
    the import of ``torch._dynamo`` it performs: that import alone costs seconds, at ``import celoss``."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def resolve(device: torch.device, backend: str | None = None) -> str:
    """Name of the backend to run on `device` (explicit, $CELOSS_BACKEND, or automatic)."""
    name = backend or os.environ.get("CELOSS_BACKEND") or None
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
        module, reason = _load(name)
        reason = reason or _device_reason(name, device)
        if reason is not None:
            raise RuntimeError(f"celoss backend {name!r} can't run here: {reason}")
        return name
    auto = {"cuda": "triton", "cpu": "cython"}.get(device.type, "torch")
    module, reason = _load(auto)
    if module is None:
        _warn_fallback(auto, reason)
        auto = "torch"
    return auto


def module(name: str):
    """The module of an already-resolved backend name."""
    return _load(name)[0]
