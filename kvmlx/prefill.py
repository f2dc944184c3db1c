"""Long chunks over a compressed layer cache: rebuild the compressed rows once, then MLX's fused SDPA.

kvmlx.attention's reference computes fp32 scores for every (query head, query, key) of a chunk, in
blocks of SCORE_BLOCK_BYTES. A chunk of at least MIN_QUERIES queries (mlx-lm prefills 2,048 tokens
a step) instead rebuilds K's and V's compressed rows once, in the queries' dtype (dequantized in
fp32, unrotated or reconstructed from low rank, rounded once), lays the columns out as
kvspec.columns pairs each position's K and V forms, and runs mx.fast.scaled_dot_product_attention
under the boolean mask of the per-query splits (GQA without repeating K and V). On Apple GPUs that
is MLX's fused attention kernel, the one mlx-lm prefills fp16 caches with; on the CPU backend the
blocked reference is faster (see `on_gpu`), so this path runs on Apple GPUs only. Checked against
the oracle on the CPU (forced on); never run on Apple hardware (none here).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from kvspec.columns import spans
from kvspec.spec import LowRank, Quant

from . import ops
from .store import Fetched

MIN_QUERIES = 256  # below, the reference's fused quantized matmuls beat rebuilding the history


def on_gpu() -> bool:
    """Whether MLX runs on an Apple GPU. On the CPU backend its SDPA fallback ran a 2,048-query fp16
    chunk over 8k tokens (Mistral-7B heads) in 144 s against the blocked reference's 64 s; MLX's CUDA
    build, where kvmlx is verified on the H200, keeps the reference too (its masked SDPA untried)."""
    return mx.default_device() == mx.gpu and mx.metal.is_available()


def fits(q: mx.array, k: Fetched, v: Fetched) -> bool:
    """A chunk of at least MIN_QUERIES queries, on a GPU, over K and V that are both compressed."""
    return q.shape[2] >= MIN_QUERIES and on_gpu() and all(isinstance(p.spec, (Quant, LowRank)) for p in (k, v))


def rows(part: Fetched, dtype: mx.Dtype) -> mx.array:
    """The compressed rows [B, Hkv, n, D] in the original space (unrotated, or c P^T), in `dtype`."""
    t, c = part.spec, part.compressed
    if isinstance(t, Quant):
        x = ops.dequantize(c["codes"], c["scales"], c["biases"], t.bits, t.group, t.axis, part.head_dim)
        return (x if t.rotation is None else ops.unrotate(x, t.rotation)).astype(dtype)
    return ops.reconstruct(ops.coefficients(t, c), part.basis).astype(dtype)


def attend(q: mx.array, k: Fetched, v: Fetched, scale: float, window: int | None = None) -> mx.array:
    """Queries q [B, Hq, Tq, D] at the chunk's positions [q_start, T) over K and V -> [B, Hq, Tq, D]."""
    dtype = q.dtype
    p = np.arange(k.q_start, k.tokens)[:, None]
    ks, vs = k.split[:, None], v.split[:, None]
    kc = rows(k, dtype) if k.n else None
    vc = rows(v, dtype) if v.n else None

    def take(compressed, part, form, lo, hi):
        if form == "c":
            return compressed[:, :, lo:hi]
        return part.floats[:, :, lo - part.float_start : hi - part.float_start].astype(dtype)

    keys, values, masks = [], [], []
    for sp in spans(k.n, k.float_start, v.n, v.float_start, k.tokens):
        s = np.arange(sp.lo, sp.hi)[None, :]
        keep = sp.reads(s, ks, vs, p)
        if window is not None:
            keep &= s > p - window
        keys.append(take(kc, k, sp.k_form, sp.lo, sp.hi))
        values.append(take(vc, v, sp.v_form, sp.lo, sp.hi))
        masks.append(keep)
    mask = mx.array(np.concatenate(masks, axis=1))
    return mx.fast.scaled_dot_product_attention(q, mx.concatenate(keys, axis=2), mx.concatenate(values, axis=2),
                                                scale=scale, mask=mask)
