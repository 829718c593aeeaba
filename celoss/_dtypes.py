"""Host-side dtype rules shared by the API, the custom ops and every backend."""
from __future__ import annotations

import torch

# The dtype codes of the C kernels' entry points (cpu/*.pyx).
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def accum_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype of statistics, losses and coefficients: float64 when any input is
    float64, else float32 (fp16/bf16 inputs accumulate in float32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
