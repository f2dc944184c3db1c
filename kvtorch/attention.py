"""Attention that reads the compressed cache: a plain-torch reference and the dispatcher kernels take over.

One tensor (K or V) of one layer is handed to attention as a `Part`: its compressed tokens [0, n)
(kvspec.layout arrays), its float tokens [float_start, end), and per query the position `split`
below which the query reads the compressed form (the protocol of docs/BACKENDS.md: a query at
position p reads s < n_quantized(p + 1) compressed, the rest in float). K and V carry their own
split. The compressed part is read as the spec says: rotated keys against rotate(q), low-rank keys
as (qP).c, outputs as unrotate(p.V) or (p.C)P^T; GQA maps query head h to KV head h // (Hq / Hkv)
by reshaping the queries, never by repeating K/V.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvspec.spec import Float, LowRank, Quant, TensorSpec

from . import ops

# Bytes of fp32 scores one reference block may hold; longer query chunks are split into blocks.
SCORE_BLOCK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Part:
    """One tensor as attention reads it (shapes [B, Hkv, tokens, X]).

    spec: the tensor spec. head_dim: D. n: compressed tokens, positions [0, n).
    arrays: kvspec.layout arrays of those n tokens (codes int32 words, scales/biases fp16, or coeffs).
    basis: [Hkv, D, r] fp32 for LowRank. floats: [B, Hkv, Tf, D] float tokens at positions
    [float_start, float_start + Tf). split: int64 [Tq]; query i reads s < split[i] compressed.
    Every position a query can see must be in the form its split names.
    """

    spec: TensorSpec
    head_dim: int
    n: int
    arrays: dict[str, torch.Tensor]
    basis: torch.Tensor | None
    floats: torch.Tensor
    float_start: int
    split: torch.Tensor

    @property
    def end(self) -> int:
        return self.float_start + self.floats.shape[-2]


def compressed_values(part: Part) -> torch.Tensor | None:
    """The compressed tokens as attention reads them, fp32: [B, Hkv, n, D] (still rotated if the
    spec rotates) or [B, Hkv, n, r] coefficients; None when n == 0."""
    t, a = part.spec, part.arrays
    if part.n == 0 or isinstance(t, Float):
        return None
    if isinstance(t, Quant):
        return ops.dequantize(a["codes"], a["scales"], a["biases"], t.bits, t.group, t.axis, part.head_dim)
    if t.coeff is None:
        return a["coeffs"].float()
    return ops.dequantize(a["codes"], a["scales"], a["biases"], t.coeff.bits, t.coeff.group, "token", t.rank)


def _query_space(q: torch.Tensor, part: Part) -> torch.Tensor:
    """Queries [B, Hkv, R, D] mapped to where compressed keys live: rotate(q) or q P."""
    t = part.spec
    if isinstance(t, Quant) and t.rotation is not None:
        return ops.rotate(q, t.rotation)
    if isinstance(t, LowRank):
        return torch.einsum("bhqd,hdr->bhqr", q, part.basis.float())
    return q


def _output_space(out: torch.Tensor, part: Part) -> torch.Tensor:
    """p.V of compressed values [B, Hkv, R, D|r] mapped back to head-dim space."""
    t = part.spec
    if isinstance(t, Quant) and t.rotation is not None:
        return ops.unrotate(out, t.rotation)
    if isinstance(t, LowRank):
        return torch.einsum("bhqr,hdr->bhqd", out, part.basis.float())
    return out


def attention_reference(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: Part,
    v: Part,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch attention over compressed K/V, fp32. Returns [B, Hq, Tq, D].

    q [B, Hq, Tq, D]; q_pos int64 [Tq] absolute positions; query p sees s <= p (and s > p - window).
    Columns run over positions [lo, end) with lo = 0 if anything is compressed, else the first float
    position; `mask` (bool [B or 1, 1, Tq, end - lo], True = keep) further restricts them (padding).
    Compressed values are dequantized once per call; long query chunks run in blocks.
    """
    b, hq, tq, _ = q.shape
    hkv = k.floats.shape[1]
    lo = 0 if (k.n or v.n) else min(k.float_start, v.float_start)
    width = k.end - lo
    kc, vc = compressed_values(k), compressed_values(v)
    block = max(1, SCORE_BLOCK_BYTES // max(1, 4 * b * hq * width))
    outs = []
    for i0 in range(0, tq, block):
        i1 = min(tq, i0 + block)
        sub_mask = None if mask is None else mask[..., i0:i1, :]
        outs.append(
            _attend_block(q[:, :, i0:i1], q_pos[i0:i1], slice(i0, i1), k, v, kc, vc, lo, scale, window, softcap, sub_mask, hkv)
        )
    return torch.cat(outs, dim=2)


def _attend_block(q, q_pos, rows, k, v, kc, vc, lo, scale, window, softcap, mask, hkv):
    b, hq, tq, d = q.shape
    rep = hq // hkv
    # Query head h = kv * rep + j reads KV head kv: fold the rep heads into the query axis.
    qg = q.float().reshape(b, hkv, rep * tq, d)
    pos = torch.arange(lo, k.end, device=q.device)
    q_pos = q_pos.to(q.device)
    split_k = k.split[rows].to(q.device)[:, None]
    split_v = v.split[rows].to(q.device)[:, None]
    keep = pos[None, :] <= q_pos[:, None]
    if window is not None:
        keep &= pos[None, :] > q_pos[:, None] - window
    use_kc = pos[None, :] < split_k  # [tq, width]

    scores = torch.zeros(b, hkv, rep * tq, k.end - lo, dtype=torch.float32, device=q.device)
    f0 = k.float_start - lo
    scores[..., f0:] = qg @ k.floats.float().transpose(-1, -2)
    if kc is not None:
        sc = _query_space(qg, k) @ kc.transpose(-1, -2)
        c_cols = use_kc[:, : k.n].repeat(rep, 1)
        scores[..., : k.n] = torch.where(c_cols, sc, scores[..., : k.n])
    scores = scores * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    keep = keep.repeat(rep, 1)
    if mask is not None:
        # mask rows are queries; the folded rows run j * tq + i over the rep heads j.
        keep = keep & mask.to(q.device).repeat(1, 1, rep, 1)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = _softmax(scores)

    fv0 = v.float_start - lo
    use_vc = (pos[None, :] < split_v).repeat(rep, 1)
    out = probs[..., fv0:].masked_fill(use_vc[:, fv0:], 0.0) @ v.floats.float()
    if vc is not None:
        pc = probs[..., : v.n].masked_fill(~use_vc[:, : v.n], 0.0)
        out = out + _output_space(pc @ vc, v)
    return out.reshape(b, hq, tq, d)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; a row with nothing visible (a padding query) gives zeros, not NaN."""
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(scores - top)
    return e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


Kernel = Callable[..., "torch.Tensor | None"]
_KERNELS: list[Kernel] = []


def register_kernel(kernel: Kernel) -> None:
    """Add a kernel with `compressed_attention`'s signature; it returns None for inputs it refuses
    (device, dtype, spec), and the dispatcher then tries the next one and finally the reference."""
    _KERNELS.append(kernel)


def compressed_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: Part,
    v: Part,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of queries q [B, Hq, Tq, D] at positions q_pos [Tq] over K and V `Part`s; [B, Hq, Tq, D] fp32.

    The dispatcher: registered kernels (kvtorch.kernels, CUDA) get the first chance; the plain-torch
    `attention_reference` runs wherever none accepts. Arguments as in `attention_reference`.
    """
    for kernel in _KERNELS:
        out = kernel(q, q_pos, k, v, scale=scale, window=window, softcap=softcap, mask=mask)
        if out is not None:
            return out
    return attention_reference(q, q_pos, k, v, scale=scale, window=window, softcap=softcap, mask=mask)
