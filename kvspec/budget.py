"""Exact storage accounting, so that "matched storage" comparisons are arithmetic.

Bits per element count everything stored per token of one head: packed codes (with the zero bits
that pad a row to whole uint32 words), fp16 scale and bias per group (32 bits), float coefficients
of low-rank tensors, and float tokens of the residual window. Per-model data (low-rank bases, the
rotation signs) is not per token and is reported apart by `basis_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .layout import compressed_shapes, n_quantized, words_per_row
from .spec import Float, KVSpec, LowRank, Quant, SpecError, TensorSpec

FLOAT_BITS = 16
SCALE_BIAS_BITS = 32  # one fp16 scale + one fp16 bias per group


@dataclass(frozen=True)
class ModelShape:
    """What KV storage depends on: layers, KV heads and head dim; sliding layers keep `sliding_window` tokens."""

    layers: int
    kv_heads: int
    head_dim: int
    sliding_layers: int = 0
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if min(self.layers, self.kv_heads, self.head_dim) < 1:
            raise SpecError(f"model shape needs positive layers, kv heads, head dim; got {self}")

    def tokens_held(self, sliding: bool, context: int) -> int:
        if sliding and self.sliding_window:
            return min(context, self.sliding_window)
        return context


def compressed_bits(t: TensorSpec, head_dim: int) -> float:
    """Bits per head-dim element of one token in compressed form (no residual window)."""
    if isinstance(t, Float):
        return float(FLOAT_BITS)
    if isinstance(t, Quant):
        codes = 32 * words_per_row(head_dim, t.bits)
        return codes / head_dim + SCALE_BIAS_BITS / t.group
    if t.coeff is None:
        return FLOAT_BITS * t.rank / head_dim
    q = t.coeff
    return (32 * words_per_row(t.rank, q.bits) + SCALE_BIAS_BITS * t.rank // q.group) / head_dim


def tensor_bits(t: TensorSpec, head_dim: int, residual: int, context: int | None) -> float:
    """Bits per element of one tensor; context None gives the long-context limit (window negligible)."""
    if context is None:
        return compressed_bits(t, head_dim)
    if context < 1:
        raise SpecError(f"context must be at least 1 token, got {context}")
    n = n_quantized(t, residual, context)
    return (n * compressed_bits(t, head_dim) + (context - n) * FLOAT_BITS) / context


@dataclass(frozen=True)
class Bits:
    """Bits per element for K, V and both together (their mean: K and V have the same element count)."""

    k: float
    v: float

    @property
    def total(self) -> float:
        return (self.k + self.v) / 2


def bits_per_element(spec: KVSpec, head_dim: int, context: int | None = None) -> Bits:
    spec.check_head_dim(head_dim)
    return Bits(
        k=tensor_bits(spec.k, head_dim, spec.residual, context),
        v=tensor_bits(spec.v, head_dim, spec.residual, context),
    )


def bytes_per_token(spec: KVSpec, shape: ModelShape) -> float:
    """K+V bytes one token adds over all layers, in the long-context limit."""
    b = bits_per_element(spec, shape.head_dim)
    return shape.layers * shape.kv_heads * shape.head_dim * (b.k + b.v) / 8


def kv_bytes(spec: KVSpec, shape: ModelShape, context: int, batch: int = 1) -> int:
    """Exact K+V bytes held at `context` tokens. Sliding-window layers keep at most their window,
    uncompressed (as kvspec.cachefile stores them)."""
    spec.check_head_dim(shape.head_dim)
    total = 0
    for sliding, layers in ((True, shape.sliding_layers), (False, shape.layers - shape.sliding_layers)):
        tokens = shape.tokens_held(sliding, context)
        for t in (Float(), Float()) if sliding else spec.tensors().values():
            n = n_quantized(t, spec.residual, tokens)
            arrays = compressed_shapes(t, batch, shape.kv_heads, n, shape.head_dim)
            for name, dims in arrays.items():
                count = _prod(dims)
                total += layers * count * (4 if name == "codes" else 2)
            total += layers * batch * shape.kv_heads * (tokens - n) * shape.head_dim * FLOAT_BITS // 8
    return total


def basis_bytes(spec: KVSpec, shape: ModelShape) -> int:
    """Per-model bytes of low-rank bases (fp32 D x r per layer and KV head)."""
    return sum(
        shape.layers * shape.kv_heads * shape.head_dim * t.rank * 4
        for t in spec.tensors().values()
        if isinstance(t, LowRank)
    )


def matched_rank(bits: float, head_dim: int, coeff_bits: int | None = None) -> int:
    """Largest rank whose storage per element is <= `bits` (float coefficients, or `coeff_bits`
    codes with one scale/bias per token's coefficients)."""
    best = 0
    for r in range(1, head_dim + 1):
        t = LowRank(rank=r, coeff=None if coeff_bits is None else Quant(bits=coeff_bits, group=r))
        if compressed_bits(t, head_dim) <= bits + 1e-12:
            best = r
    if best == 0:
        raise SpecError(f"no rank fits {bits} bits per element at head dim {head_dim}")
    return best


def _prod(dims: tuple[int, ...]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out
