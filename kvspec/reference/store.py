"""What a cache holds for one layer's K or V, computed from the whole history at once.

`compress` turns x [B, H, T, D] into a `Stored`: tokens [0, n) in compressed form and tokens
[n, T) in the float dtype, with n = kvspec.layout.n_quantized. Every token is first rounded to the
float dtype (the precision a cache holds it in before it leaves the window), and quantization or
projection acts on those rounded values. Because of that, and because groups are aligned to token 0,
this equals what an incremental cache holds after appending the same T tokens in any chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..layout import n_quantized
from ..spec import Float, LowRank, Quant, TensorSpec
from .floats import round_to
from .lowrank import project, reconstruct
from .quant import Quantized, check_finite, dequantize, quantize
from .rotation import rotate, unrotate_f64


@dataclass(frozen=True)
class Stored:
    """One tensor's cache contents.

    quant: codes/scales/biases of the compressed tokens (Quant, or hybrid coefficients).
    coeffs: float low-rank coefficients [B, H, n, r] (LowRank without coeff quantization).
    tail: float tokens [B, H, T - n, D], rounded to the float dtype (held as fp32).
    basis: [H, D, r] for LowRank.
    """

    spec: TensorSpec
    tokens: int
    n: int
    head_dim: int
    tail: np.ndarray
    quant: Quantized | None = None
    coeffs: np.ndarray | None = None
    basis: np.ndarray | None = None


def compress(
    x: np.ndarray,
    t: TensorSpec,
    residual: int,
    float_dtype: str = "fp16",
    basis: np.ndarray | None = None,
    where: str = "",
) -> Stored:
    """Compress a whole history x [B, H, T, D]; `basis` [H, D, r] is required for LowRank."""
    x = np.asarray(x, dtype=np.float32)
    *_, tokens, dim = x.shape
    n = n_quantized(t, residual, tokens)
    if not isinstance(t, Float):
        check_finite(x, where, rotated=isinstance(t, Quant) and t.rotation is not None)
    x = round_to(x, float_dtype)
    head, tail = x[..., :n, :], x[..., n:, :]
    if isinstance(t, Float) or n == 0:
        return Stored(t, tokens, n, dim, tail, basis=basis if isinstance(t, LowRank) else None)
    if isinstance(t, Quant):
        if t.rotation is not None:
            head = rotate(head, t.rotation)
        return Stored(t, tokens, n, dim, tail, quant=quantize(head, t.bits, t.group, t.axis))
    if basis is None or basis.shape[-1] != t.rank:
        raise ValueError(f"rank {t.rank} needs a basis [H, D, {t.rank}]")
    coeffs = project(head, basis).astype(np.float32)
    if t.coeff is None:
        return Stored(t, tokens, n, dim, tail, coeffs=round_to(coeffs, float_dtype), basis=basis)
    q = quantize(coeffs, t.coeff.bits, t.coeff.group, "token")
    return Stored(t, tokens, n, dim, tail, quant=q, basis=basis)


def compressed_values(s: Stored) -> np.ndarray:
    """The compressed tokens as the attention reads them (float64): [B, H, n, D] for Quant
    (still rotated if the spec rotates), [B, H, n, r] coefficients for LowRank."""
    t = s.spec
    if isinstance(t, Quant):
        return dequantize(s.quant, t.bits, t.group, t.axis, s.head_dim)
    if isinstance(t, LowRank):
        if t.coeff is None:
            return s.coeffs.astype(np.float64)
        return dequantize(s.quant, t.coeff.bits, t.coeff.group, "token", t.rank)
    raise ValueError("a float tensor has no compressed part")


def decompress(s: Stored) -> np.ndarray:
    """Full-precision view [B, H, T, D] (float64) of everything stored."""
    parts = []
    if s.n:
        head = compressed_values(s)
        t = s.spec
        if isinstance(t, Quant) and t.rotation is not None:
            head = unrotate_f64(head, t.rotation)
        elif isinstance(t, LowRank):
            head = reconstruct(head, s.basis)
        parts.append(head)
    parts.append(s.tail.astype(np.float64))
    return np.concatenate(parts, axis=-2)
