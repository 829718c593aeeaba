"""Host-side helpers shared by the kernel launchers.

Every launcher is split into a ``*_plan`` function returning ``(kernel, grid, kwargs, options,
result)`` and :func:`launch`, so the AOT compile tests (tests/kernels/aot.py) compile exactly the
configurations a launch can produce.
"""
import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_rows(t: torch.Tensor, name: str, what: str, axis: str = "C") -> None:
    """``t`` is an fp32/fp16/bf16 (N, axis) matrix with unit stride along its second dimension."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton {what} kernels take fp32/fp16/bf16 {name}, got {t.dtype}")
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be (N, {axis}) with unit stride along its second dimension")


def f32(t):
    """A contiguous float32 copy (or ``t`` itself when it already is one); None stays None."""
    return None if t is None else t.to(torch.float32).contiguous()


def softcap_args(logit_scale, softcap):
    """(scale, softcap, 1 / softcap) kernel arguments; softcap 1 when there is none (unused then)."""
    if softcap is None:
        return float(logit_scale), 1.0, 1.0
    return float(logit_scale), float(softcap), 1.0 / float(softcap)


def with_flags(kwargs: dict, **flags: str) -> dict:
    """``kwargs`` plus each compile-time flag ``FLAG=name`` set to ``kwargs[name] is not None``:
    a flag saying an optional pointer is given is derived from that pointer, never passed apart."""
    return dict(kwargs, **{flag: kwargs[name] is not None for flag, name in flags.items()})


def aligned16(t) -> bool:
    """Whether Triton sees the rows of ``t`` as 16-byte aligned: its pointer and its row stride
    (in elements) divisible by 16, the JIT's divisibility specialization."""
    return t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0


def launch(plan):
    """Launch a plan unless its grid is empty; returns its result."""
    kernel, grid, kwargs, options, result = plan
    if all(g > 0 for g in grid):
        kernel[grid](**kwargs, **options)
    return result
