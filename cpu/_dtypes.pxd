"""The dtype codes of the CPU kernels' raw-pointer arguments, shared by the .pyx row loops:
0 fp32, 1 fp64, 2 fp16, 3 bf16 (the enum of ce_rows.h). fp64 accumulates in fp64, the others in
fp32."""
from libc.stdint cimport int64_t


cdef inline int check_dtype(int dt) except -1:
    if dt < 0 or dt > 3:
        raise ValueError(f"unknown dtype code {dt}")
    return 0


cdef inline int64_t itemsize(int dt) noexcept nogil:
    """Bytes per stored element."""
    return 4 if dt == 0 else (8 if dt == 1 else 2)


cdef inline int64_t acc_itemsize(int dt) noexcept nogil:
    """Bytes per element of the accumulation type (loss, lse, statistics, coefficients)."""
    return 8 if dt == 1 else 4
