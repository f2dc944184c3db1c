"""Key columns for attention over a rebuilt history: which form of K and V each query reads.

Query p reads key s <= p of K compressed iff s < ks(p) = n_quantized_K(p + 1), else in float, and V
likewise with vs(p); K and V may split apart (channel-axis keys with token-axis values). Attention
that rebuilds the compressed rows and runs one fused SDPA over a chunk needs one column per
(position, K form, V form) that some query reads, so each position appears in at most four spans:

    K form      V form      positions                      read by query p iff
    compressed  compressed  [0, min(n_k, n_v))             s < ks and s < vs
    float       compressed  [float_start_k, n_v)           ks <= s < vs
    compressed  float       [float_start_v, n_k)           vs <= s < ks
    float       float       [max(float starts), end)       ks <= s, vs <= s, s <= p

Every (query, s <= p) lands in exactly one span, and in a form the cache holds (the protocol keeps
float every position some query reads in float). The rules are written with comparison and `&`
only, so they evaluate on numpy, torch and mlx arrays alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Positions [lo, hi) read as K in `k_form` and V in `v_form` ("c" compressed, "f" float)."""

    k_form: str
    v_form: str
    lo: int
    hi: int
    reads: Callable  # (s [1, L], ks [Tq, 1], vs [Tq, 1], p [Tq, 1]) -> bool [Tq, L]


def spans(k_n: int, k_float_start: int, v_n: int, v_float_start: int, end: int) -> list[Span]:
    """The non-empty spans of a chunk whose K holds [0, k_n) compressed and [k_float_start, end) in
    float, and V likewise."""
    every = [
        Span("c", "c", 0, min(k_n, v_n), lambda s, ks, vs, p: (s < ks) & (s < vs)),
        Span("f", "c", k_float_start, v_n, lambda s, ks, vs, p: (s >= ks) & (s < vs)),
        Span("c", "f", v_float_start, k_n, lambda s, ks, vs, p: (s < ks) & (s >= vs)),
        Span("f", "f", max(k_float_start, v_float_start), end, lambda s, ks, vs, p: (s >= ks) & (s >= vs) & (s <= p)),
    ]
    return [sp for sp in every if sp.hi > sp.lo]
