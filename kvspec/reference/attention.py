"""Reference attention over compressed K/V (float64), the oracle for every backend's attention.

Shapes: q [B, Hq, Tq, D]; K and V histories of T tokens over Hkv heads, Hq % Hkv == 0, query head h
reads KV head h // (Hq // Hkv) (transformers' repeat_kv order). Query i sits at absolute position
q_pos[i] and sees key s iff s <= q_pos[i] and, with a sliding window W, s > q_pos[i] - W.

Two ways to read the compressed part, which must agree:
- "reconstruct": rebuild D-dim keys and values, then plain attention;
- "compressed": scores as rotate(q).codes-values for rotated quantized keys, (qP).c for low-rank
  keys; outputs as unrotate(p . V) or (p . C_v) P_v^T; the D-dim history is never rebuilt.
`attend_as_decoded` is the protocol oracle: query i attends to the cache exactly as it stood right
after token q_pos[i] was appended, i.e. what token-by-token decoding computes.
"""

from __future__ import annotations

import numpy as np

from ..layout import n_quantized
from ..spec import Float, KVSpec, LowRank, Quant
from .rotation import rotate_f64, unrotate_f64
from .store import Stored, compress, compressed_values, decompress


def visible(q_pos: np.ndarray, tokens: int, window: int | None) -> np.ndarray:
    """Boolean [Tq, T]: which keys each query position may see (causal, optional sliding window)."""
    s = np.arange(tokens)[None, :]
    p = np.asarray(q_pos)[:, None]
    keep = s <= p
    if window is not None:
        keep &= s > p - window
    return keep


def _softmax(scores: np.ndarray, keep: np.ndarray) -> np.ndarray:
    scores = np.where(keep, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


def _kv_heads(x: np.ndarray, rep: int, axis: int) -> np.ndarray:
    return np.repeat(x, rep, axis=axis)


def attend(
    q: np.ndarray,
    k: Stored,
    v: Stored,
    q_pos: np.ndarray,
    *,
    scale: float | None = None,
    window: int | None = None,
    space: str = "reconstruct",
) -> np.ndarray:
    """Attention output [B, Hq, Tq, D] (float64) of queries at `q_pos` over stored K and V."""
    q = np.asarray(q, dtype=np.float64)
    b, hq, tq, d = q.shape
    hkv = k.tail.shape[1]
    rep = hq // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    keep = visible(q_pos, k.tokens, window)[None, None]
    if space == "reconstruct":
        kf = _kv_heads(decompress(k), rep, 1)
        vf = _kv_heads(decompress(v), rep, 1)
        return _softmax(q @ np.swapaxes(kf, -1, -2) * scale, keep) @ vf
    if space != "compressed":
        raise ValueError(f"space must be 'reconstruct' or 'compressed', got {space!r}")
    scores = [q @ np.swapaxes(_kv_heads(k.tail, rep, 1).astype(np.float64), -1, -2)]
    if k.n:
        scores.insert(0, _compressed_scores(q, k, rep))
    p = _softmax(np.concatenate(scores, axis=-1) * scale, keep)
    out = p[..., v.n :] @ _kv_heads(v.tail, rep, 1).astype(np.float64)
    if v.n:
        out = out + _compressed_output(p[..., : v.n], v, rep)
    return out


def _compressed_scores(q: np.ndarray, k: Stored, rep: int) -> np.ndarray:
    vals = _kv_heads(compressed_values(k), rep, 1)
    t = k.spec
    if isinstance(t, Quant) and t.rotation is not None:
        q = rotate_f64(q, t.rotation)
    if isinstance(t, LowRank):
        q = np.einsum("bhtd,hdr->bhtr", q, _kv_heads(k.basis, rep, 0))
    return q @ np.swapaxes(vals, -1, -2)


def _compressed_output(p: np.ndarray, v: Stored, rep: int) -> np.ndarray:
    out = p @ _kv_heads(compressed_values(v), rep, 1)
    t = v.spec
    if isinstance(t, Quant) and t.rotation is not None:
        return unrotate_f64(out, t.rotation)
    if isinstance(t, LowRank):
        return np.einsum("bhtr,hdr->bhtd", out, _kv_heads(v.basis, rep, 0))
    return out


def _prefix_stable(spec: KVSpec, counts: range) -> bool:
    """True when, at every cache size in `counts`, each tensor holds all its tokens compressed (or all
    in float): a token is then stored the same way in every cache that holds it (rows are compressed
    on their own), so the decode-time caches are prefixes of the whole history's."""
    return all(
        isinstance(t, Float) or all(n_quantized(t, spec.residual, m) == m for m in counts)
        for t in (spec.k, spec.v)
    )


def attend_as_decoded(
    q: np.ndarray,
    k_full: np.ndarray,
    v_full: np.ndarray,
    spec: KVSpec,
    *,
    bases: dict[str, np.ndarray] | None = None,
    scale: float | None = None,
    window: int | None = None,
) -> np.ndarray:
    """Queries q [B, Hq, Tq, D] at the last Tq positions of histories [B, Hkv, T, D]: each query
    reads the cache as it stood right after its own token was appended. Returns [B, Hq, Tq, D]."""
    tokens = k_full.shape[-2]
    tq = q.shape[-2]
    bases = bases or {}
    if _prefix_stable(spec, range(tokens - tq + 1, tokens + 1)):
        # every stored token reads the same in each query's cache: one compression, a causal mask
        ks = compress(k_full, spec.k, spec.residual, spec.float_dtype, bases.get("k"))
        vs = compress(v_full, spec.v, spec.residual, spec.float_dtype, bases.get("v"))
        return attend(q, ks, vs, np.arange(tokens - tq, tokens), scale=scale, window=window)
    outs = []
    for i, pos in enumerate(range(tokens - tq, tokens)):
        ks = compress(k_full[..., : pos + 1, :], spec.k, spec.residual, spec.float_dtype, bases.get("k"))
        vs = compress(v_full[..., : pos + 1, :], spec.v, spec.residual, spec.float_dtype, bases.get("v"))
        outs.append(attend(q[..., i : i + 1, :], ks, vs, np.array([pos]), scale=scale, window=window))
    return np.concatenate(outs, axis=-2)
