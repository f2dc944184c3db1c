"""Rounding to the storage float dtypes in NumPy (which has no bfloat16): round to nearest, ties to even."""

from __future__ import annotations

import numpy as np


def round_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 values rounded to the nearest bfloat16 (ties to even), returned as fp32."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def round_to(x: np.ndarray, float_dtype: str) -> np.ndarray:
    """x rounded to the spec's float dtype ("fp16" or "bf16"), returned as fp32."""
    x = np.asarray(x, dtype=np.float32)
    if float_dtype == "fp16":
        return x.astype(np.float16).astype(np.float32)
    if float_dtype == "bf16":
        return round_bf16(x)
    raise ValueError(f"float dtype must be fp16 or bf16, got {float_dtype!r}")
