"""The one tolerance table every numeric test uses: (method, bits, dtype) -> (atol, rtol).

method: "float", "int", "rank", "hybrid" for one attention or dequantization computed by two
implementations from the same stored data; "model-<method>" for whole-model logits compared across
backends (many layers, different matmul orders). bits: the code bits (16 for float and rank).
dtype: the compute dtype, "fp32", "fp16" or "bf16".
A check passes when |actual - expected| <= atol + rtol * |expected| elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


# Same stored data, different arithmetic order: a few ulps of the compute dtype, scaled by the
# number of terms summed (head dims up to 256, histories of a few thousand tokens).
_ARITH = {"fp32": Tol(2e-5, 2e-5), "fp16": Tol(4e-3, 4e-3), "bf16": Tol(3e-2, 3e-2)}
# Low-rank coefficients are rounded to fp16 from projections computed in different orders,
# so one of them can land one fp16 ulp away.
_RANK = {"fp32": Tol(2e-3, 2e-3), "fp16": Tol(6e-3, 6e-3), "bf16": Tol(3e-2, 3e-2)}
# Hybrid codes come from those coefficients, so a code can move by one step: 2^-bits of the range.
_HYBRID_STEP = {2: 0.4, 3: 0.2, 4: 0.1, 8: 0.01}
# Whole-model logits: differences compound through layers, and a code that sits on a rounding
# boundary can flip between backends.
_MODEL = {"float": Tol(2e-3, 2e-3), "int": Tol(5e-2, 5e-2), "rank": Tol(5e-2, 5e-2), "hybrid": Tol(2e-1, 5e-2)}


def tolerance(method: str, bits: int, dtype: str) -> Tol:
    """Look up the tolerance for comparing two implementations (see module docstring)."""
    if dtype not in _ARITH:
        raise KeyError(f"no tolerances for dtype {dtype!r}; use fp32, fp16 or bf16")
    if method.startswith("model-"):
        base = _MODEL[method[len("model-"):]]
        arith = _ARITH[dtype]
        return Tol(max(base.atol, arith.atol * 10), max(base.rtol, arith.rtol * 10))
    if method in ("float", "int"):
        return _ARITH[dtype]
    if method == "rank":
        return _RANK[dtype]
    if method == "hybrid":
        step = _HYBRID_STEP[bits]
        return Tol(max(step, _RANK[dtype].atol), _RANK[dtype].rtol)
    raise KeyError(f"no tolerances for method {method!r}")


def assert_close(actual, expected, tol: Tol, what: str = "") -> None:
    """Raise AssertionError with the worst element if |actual - expected| > atol + rtol*|expected|."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    excess = np.abs(a - e) - (tol.atol + tol.rtol * np.abs(e))
    if not np.all(np.isfinite(a)) or (excess > 0).any():
        i = np.unravel_index(np.nanargmax(np.where(np.isfinite(a), excess, np.inf)), a.shape)
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {a.size} elements beyond atol={tol.atol} rtol={tol.rtol}; "
            f"worst at {tuple(int(x) for x in i)}: {a[i]!r} vs {e[i]!r}"
        )


def spec_tolerance(spec, dtype: str, model: bool = False) -> Tol:
    """The loosest entry over a KVSpec's K and V (e.g. K int8 with V hybrid takes the hybrid's)."""
    from .spec import LowRank, Quant, method_of

    tols = []
    for t in spec.tensors().values():
        method = method_of(t)
        bits = t.bits if isinstance(t, Quant) else (t.coeff.bits if isinstance(t, LowRank) and t.coeff else 16)
        tols.append(tolerance(f"model-{method}" if model else method, bits, dtype))
    return Tol(max(t.atol for t in tols), max(t.rtol for t in tols))
