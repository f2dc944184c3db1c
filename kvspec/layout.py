"""Where tokens live and what shapes the stored arrays have: shared by budget, cache files, backends.

For one layer's K (or V) of shape [B, Hkv, T, D], a cache holds
- a compressed part for tokens [0, n) with n = n_quantized(tensor, residual, T), and
- a float part for tokens [n, T) (the residual window plus, on the channel axis, an incomplete group).
Groups on the channel axis are aligned to absolute token 0, so appending tokens one at a time or a
chunk at once gives the same codes.

Stored arrays of the compressed part, per tensor spec (W = words_per_row):
- Quant, token axis:   codes uint32 [B, Hkv, n, W(D)], scales/biases fp16 [B, Hkv, n, D/G]
- Quant, channel axis: codes uint32 [B, Hkv, n, W(D)], scales/biases fp16 [B, Hkv, n/G, D]
- LowRank:             coeffs float [B, Hkv, n, r]; basis fp32 [Hkv, D, r] per layer
- LowRank hybrid:      codes uint32 [B, Hkv, n, W(r)], scales/biases fp16 [B, Hkv, n, r/G]
Codes are packed along the last axis (head dim, or rank), least significant bits first.
"""

from __future__ import annotations

from .spec import Float, LowRank, Quant, TensorSpec


def words_per_row(n: int, bits: int) -> int:
    """uint32 words holding n codes of `bits` bits (a row is padded with zero bits to a whole word)."""
    return -(-n * bits // 32)


def n_quantized(t: TensorSpec, residual: int, tokens: int) -> int:
    """How many of the first `tokens` tokens are in compressed form when the cache holds `tokens`."""
    if isinstance(t, Float):
        return 0
    older = max(tokens - residual, 0)
    if isinstance(t, Quant) and t.axis == "channel":
        return older // t.group * t.group
    return older


def compressed_shapes(t: TensorSpec, batch: int, heads: int, n: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays that store n compressed tokens of one tensor (see module docstring)."""
    if isinstance(t, Float):
        return {}
    if isinstance(t, LowRank):
        if t.coeff is None:
            return {"coeffs": (batch, heads, n, t.rank)}
        g = t.coeff.group
        return {
            "codes": (batch, heads, n, words_per_row(t.rank, t.coeff.bits)),
            "scales": (batch, heads, n, t.rank // g),
            "biases": (batch, heads, n, t.rank // g),
        }
    codes = (batch, heads, n, words_per_row(head_dim, t.bits))
    if t.axis == "channel":
        return {"codes": codes, "scales": (batch, heads, n // t.group, head_dim), "biases": (batch, heads, n // t.group, head_dim)}
    g = t.group
    return {"codes": codes, "scales": (batch, heads, n, head_dim // g), "biases": (batch, heads, n, head_dim // g)}
