"""Argument checks shared by the public functions: clear errors before any kernel runs."""
from __future__ import annotations

import torch

from ._dtypes import accum_dtype

REDUCTIONS = ("none", "mean", "sum")
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def reduction(value: str, allowed=REDUCTIONS) -> str:
    if value not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {value!r}")
    return value


def floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def class_weight(weight, num_classes: int, like: torch.Tensor, name: str = "weight", differentiable: bool = False):
    """Validated per-class weight as a contiguous float32 (float64 for float64 input) tensor; detached
    unless `differentiable` (the caller then owns its gradient)."""
    if weight is None:
        return None
    floating(name, weight)
    if weight.dim() != 1 or weight.numel() != num_classes:
        raise ValueError(f"{name} must be a 1-D tensor of {num_classes} elements (one per class), "
                         f"got shape {tuple(weight.shape)}")
    if weight.device != like.device:
        raise ValueError(f"{name} is on {weight.device} but input is on {like.device}")
    return (weight if differentiable else weight.detach()).to(accum_dtype(like.dtype)).contiguous()


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def index_value(name: str, value) -> int:
    """An int64 class index (ignore_index): a float is a TypeError, as in PyTorch."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value.__index__())
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit in int64 (class indices are int64), got {value}")
    return value


def probability(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def positive_or_none(name: str, value):
    if value is None:
        return None
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be None or > 0, got {value}")
    return value


def device_side(t: torch.Tensor, backend=None) -> bool:
    """Whether data-dependent decisions about ``t`` (an upstream-gradient scale of 1, bad targets)
    are taken on its device, never by reading values on the host: off the CPU (a host read
    synchronises the stream and breaks CUDA-graph capture), and for the triton backend's CPU
    tensors (Triton's interpreter), so tests run the device code path."""
    return t.device.type != "cpu" or backend == "triton"


def target_indices(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Class indices must be in [0, C) or equal ignore_index.

    On the CPU: IndexError naming the first bad value. On a device (:func:`device_side`) the check
    is queued on the stream instead (``torch._assert_async``, no host synchronisation, captured
    with a CUDA graph): a bad target fails as PyTorch's own CUDA cross_entropy does, with a
    device-side assert at the next synchronisation, which leaves the CUDA context unusable. The
    assert is queued before the kernels that read the targets; the cross-entropy, linear-CE and
    token log-prob kernels never read out of bounds whatever the targets anyway (an out-of-range
    target reads class 0 and makes its row's loss NaN, or matches no class)."""
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if device_side(target):
        torch._assert_async(~bad.any(), f"celoss: a target is out of bounds: class indices must be in "
                                        f"[0, {num_classes}) or equal ignore_index={ignore_index}")
        return
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"Target {value} is out of bounds: class indices must be in [0, {num_classes})"
                         f" or equal ignore_index={ignore_index}")
