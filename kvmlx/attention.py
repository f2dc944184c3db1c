"""Attention over a compressed layer cache: the protocol of docs/BACKENDS.md in plain MLX ops.

Queries q [B, Hq, Tq, D] at positions [q_start, q_start + Tq) read K and V as `Fetched` views
(kvmlx.store): compressed tokens [0, n) and float tokens [float_start, T). Query p reads key s
compressed iff s < n_quantized(p + 1), else in float (keys s <= p, and s > p - W on a sliding
window). Scores of the two forms are concatenated with complementary masks, so one softmax spans
them; K and V keep their own splits. Compressed data is read without rebuilding the history where
the layout allows: token-axis codes in MLX's affine layout go through mx.quantized_matmul with
rotate(q) for rotated keys and unrotate(p . V) for rotated values; low rank reads (qP) . c and
(p . C) P^T. Elsewhere (channel-axis groups, group or bit shapes MLX's affine kernels do not take)
this reference dequantizes the compressed part on each call. GQA folds the Hq / Hkv query heads of one KV head into the query axis, so K and V
are never repeated. Everything is computed in fp32 and cast back to the queries' dtype.

`compressed_attention` is the dispatcher: kernels (kvmlx.kernels) register in KERNELS and return
None where they cannot run; `reference_attention` is the correctness baseline behind them.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from kvspec.spec import LowRank, Quant

from . import ops, prefill
from .store import Fetched

Kernel = Callable[[mx.array, Fetched, Fetched, float, "int | None"], "mx.array | None"]
KERNELS: list[Kernel] = []
# fp32 scores per block of queries: a 2,048-query chunk (mlx-lm's prefill step) at 32k tokens and 32
# query heads would otherwise hold 8.6 GB of scores at once
SCORE_BLOCK_BYTES = 256 * 2**20


def compressed_attention(q: mx.array, k: Fetched, v: Fetched, scale: float, window: int | None = None) -> mx.array:
    """Attention output [B, Hq, Tq, D] of queries q [B, Hq, Tq, D]; the first kernel that accepts
    the configuration runs, else long chunks on kvmlx.prefill (one rebuild, fused SDPA), else the
    reference."""
    for kernel in KERNELS:
        out = kernel(q, k, v, scale, window)
        if out is not None:
            return out
    if prefill.fits(q, k, v):
        return prefill.attend(q, k, v, scale, window)
    return reference_attention(q, k, v, scale, window)


def reference_attention(q: mx.array, k: Fetched, v: Fetched, scale: float, window: int | None = None) -> mx.array:
    """See the module docstring. q [B, Hq, Tq, D]; K/V views over Hkv heads -> [B, Hq, Tq, D].
    Long chunks run in blocks of queries whose fp32 scores stay within SCORE_BLOCK_BYTES."""
    b, hq, tq, d = q.shape
    hkv = k.floats.shape[1]
    if tq != k.tokens - k.q_start or hq % hkv:
        raise ValueError(f"{tq} queries over {hq} heads do not fit a chunk of {k.tokens - k.q_start} tokens, {hkv} KV heads")
    q_pos = np.arange(k.q_start, k.tokens)
    columns = k.n + k.tokens - k.float_start
    block = max(1, SCORE_BLOCK_BYTES // (4 * b * hq * max(1, columns)))
    if block >= tq:
        return _attend(q, k, v, q_pos, k.split, v.split, scale, window)
    outs = []
    for i0 in range(0, tq, block):
        outs.append(_attend(q[:, :, i0 : i0 + block], k, v, q_pos[i0 : i0 + block], k.split[i0 : i0 + block],
                            v.split[i0 : i0 + block], scale, window))
        mx.eval(outs[-1])  # one block's scores at a time: a lazy graph would hold every block's at once
    return mx.concatenate(outs, axis=2)


def _attend(q: mx.array, k: Fetched, v: Fetched, q_pos: np.ndarray, k_split: np.ndarray, v_split: np.ndarray,
            scale: float, window: int | None) -> mx.array:
    """Queries q [B, Hq, M, D] at positions q_pos [M] with their splits of K and V -> [B, Hq, M, D]."""
    b, hq, tq, d = q.shape
    hkv = k.floats.shape[1]
    rep = hq // hkv
    qf = q.astype(mx.float32).reshape(b, hkv, rep * tq, d)  # row r * Tq + t: head h * rep + r, query t

    # Key positions of the score columns: compressed [0, n) then float [float_start, T).
    scores, keep, k_pos = [], [], []
    if k.n:
        scores.append(_compressed_scores(qf, k))
        pos = np.arange(k.n)
        keep.append(pos[None] < k_split[:, None])
        k_pos.append(pos)
    if k.tokens > k.float_start:  # decoding an int cache without a float window has no float keys
        scores.append(qf @ mx.swapaxes(k.floats.astype(mx.float32), -1, -2))
        pos = np.arange(k.float_start, k.tokens)
        keep.append(pos[None] >= k_split[:, None])
        k_pos.append(pos)
    pos, keep = np.concatenate(k_pos), np.concatenate(keep, axis=1)
    keep &= pos[None] <= q_pos[:, None]
    if window is not None:
        keep &= pos[None] > q_pos[:, None] - window

    s = mx.concatenate(scores, axis=-1).reshape(b, hkv, rep, tq, -1) * scale
    if not keep.all():
        s = mx.where(mx.array(keep), s, -mx.inf)
    p = mx.softmax(s, axis=-1, precise=True).reshape(b, hkv, rep * tq, -1)

    if v.n == k.n and v.float_start == k.float_start and np.array_equal(v_split, k_split):
        # Same split for V (e.g. the same spec): the probability columns are already V's.
        p_c, p_f = (p[..., : k.n], p[..., k.n :]) if k.n else (None, p)
    else:
        p_c, p_f = _resplit(p, k, v, v_split, b, hkv, rep, tq)
    parts = [_compressed_output(p_c, v)] if p_c is not None else []
    if v.tokens > v.float_start:
        parts.append(p_f @ v.floats.astype(mx.float32))
    return sum(parts[1:], parts[0]).reshape(b, hq, tq, d).astype(q.dtype)


def _resplit(p: mx.array, k: Fetched, v: Fetched, v_split: np.ndarray, b: int, hkv: int, rep: int, tq: int):
    """Re-split p [B, Hkv, M, L] (columns: K's compressed [0, n_k), then K's float [fs_k, T)) into
    V's compressed columns [0, n_v) and float columns [fs_v, T) by V's splits [M]; each position
    counts in one form."""
    start = 0 if k.n else k.float_start
    width = k.tokens - start
    full = mx.zeros((*p.shape[:-1], width), mx.float32)
    if k.n:
        full = full + mx.pad(p[..., : k.n], [(0, 0)] * 3 + [(0, width - k.n)])
    full = full + mx.pad(p[..., k.n :], [(0, 0)] * 3 + [(k.float_start - start, 0)])
    full = full.reshape(b, hkv, rep, tq, width)
    thr = v_split[:, None]
    p_f = full[..., v.float_start - start :]
    p_f = mx.where(mx.array(np.arange(v.float_start, v.tokens)[None] >= thr), p_f, 0.0)
    p_c = None
    if v.n:
        if start:
            raise ValueError("a compressed part needs every position from token 0")
        p_c = mx.where(mx.array(np.arange(v.n)[None] < thr), full[..., : v.n], 0.0).reshape(b, hkv, rep * tq, -1)
    return p_c, p_f.reshape(b, hkv, rep * tq, -1)


def _fused_quantized_matmul() -> bool:
    """Whether mx.quantized_matmul takes our fp32 queries here: MLX 0.32's CUDA build has no
    fp32-activation kernel ("No implementation for problem shape"), so there we dequantize first."""
    return mx.default_device() != mx.gpu or mx.metal.is_available()


def _affine(t: Quant, dim: int) -> bool:
    return t.axis == "token" and ops.mlx_layout(t.bits, t.group, dim) and _fused_quantized_matmul()


def _compressed_scores(q: mx.array, k: Fetched) -> mx.array:
    """q [B, Hkv, M, D] fp32 against the compressed keys -> [B, Hkv, M, n]."""
    t, c = k.spec, k.compressed
    if isinstance(t, Quant):
        if t.rotation is not None:
            q = ops.rotate(q, t.rotation)
        if _affine(t, k.head_dim):
            return mx.quantized_matmul(q, c["codes"], c["scales"], c["biases"], transpose=True, group_size=t.group, bits=t.bits)
        keys = ops.dequantize(c["codes"], c["scales"], c["biases"], t.bits, t.group, t.axis, k.head_dim)
        return q @ mx.swapaxes(keys, -1, -2)
    qp = ops.project(q, k.basis)  # [B, Hkv, M, r]
    if _hybrid_affine(t):
        g, bits = t.coeff.group, t.coeff.bits
        return mx.quantized_matmul(qp, c["codes"], c["scales"], c["biases"], transpose=True, group_size=g, bits=bits)
    return qp @ mx.swapaxes(ops.coefficients(t, c), -1, -2)


def _compressed_output(p: mx.array, v: Fetched) -> mx.array:
    """Probabilities p [B, Hkv, M, n] times the compressed values -> [B, Hkv, M, D] fp32."""
    t, c = v.spec, v.compressed
    if isinstance(t, Quant):
        if _affine(t, v.head_dim):
            out = mx.quantized_matmul(p, c["codes"], c["scales"], c["biases"], transpose=False, group_size=t.group, bits=t.bits)
        else:
            out = p @ ops.dequantize(c["codes"], c["scales"], c["biases"], t.bits, t.group, t.axis, v.head_dim)
        return out if t.rotation is None else ops.unrotate(out, t.rotation)
    if _hybrid_affine(t):
        pc = mx.quantized_matmul(p, c["codes"], c["scales"], c["biases"], transpose=False, group_size=t.coeff.group, bits=t.coeff.bits)
    else:
        pc = p @ ops.coefficients(t, c)
    return ops.reconstruct(pc, v.basis)


def _hybrid_affine(t: LowRank) -> bool:
    return t.coeff is not None and ops.mlx_layout(t.coeff.bits, t.coeff.group, t.rank) and _fused_quantized_matmul()


def _register_kernels() -> None:
    """The MLX custom kernels (kvmlx.kernels): decode steps on a GPU stream, self-checked on first use."""
    from .kernels.attention import decode_attention

    KERNELS.append(decode_attention)


_register_kernels()
