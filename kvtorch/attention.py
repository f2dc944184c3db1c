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

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvspec.spec import Float, LowRank, Quant, TensorSpec

from . import ops

# Bytes of scores one reference block may hold; longer query chunks are split into blocks.
SCORE_BLOCK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Part:
    """One tensor as attention reads it (shapes [B, Hkv, tokens, X]).

    spec: the tensor spec. head_dim: D. n: compressed tokens, positions [0, n).
    arrays: kvspec.layout arrays of those n tokens (codes int32 words, scales/biases fp16, or coeffs).
    basis: [Hkv, D, r] fp32 for LowRank. floats: [B, Hkv, Tf, D] float tokens at positions
    [float_start, float_start + Tf). split: int64 [Tq]; query i reads s < split[i] compressed.
    Every position a query can see must be in the form its split names.
    extent: set by a static cache (kvtorch.graphs): the arrays' storage holds `extent` rows and the
    kernels plan for all of them, taking the live length from q_pos and split on the device, so
    one launch serves every step of a CUDA graph (n and float_start are then the host's view only).
    ring: with extent, floats are a ring of `ring` rows holding position s at row s % ring (tokens
    waiting in float: a residual window, channel-axis groups filling); float_start is then 0.
    """

    spec: TensorSpec
    head_dim: int
    n: int
    arrays: dict[str, torch.Tensor]
    basis: torch.Tensor | None
    floats: torch.Tensor
    float_start: int
    split: torch.Tensor
    extent: int | None = None
    ring: int | None = None

    @property
    def end(self) -> int:
        return self.float_start + self.floats.shape[-2]


def compressed_values(part: Part, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The compressed tokens as attention reads them, in `dtype`: [B, Hkv, n, D] (still rotated if
    the spec rotates) or [B, Hkv, n, r] coefficients; None when n == 0."""
    t, a = part.spec, part.arrays
    if part.n == 0 or isinstance(t, Float):
        return None
    if isinstance(t, Quant):
        return ops.dequantize(a["codes"], a["scales"], a["biases"], t.bits, t.group, t.axis, part.head_dim, dtype)
    if t.coeff is None:
        return a["coeffs"].to(dtype)
    return ops.dequantize(a["codes"], a["scales"], a["biases"], t.coeff.bits, t.coeff.group, "token", t.rank, dtype)


def _query_space(q: torch.Tensor, part: Part, dt: torch.dtype) -> torch.Tensor:
    """Queries [B, Hkv, R, D] mapped to where compressed keys live: rotate(q) or q P."""
    t = part.spec
    if isinstance(t, Quant) and t.rotation is not None:
        return ops.rotate(q, t.rotation)
    if isinstance(t, LowRank):
        return q @ part.basis.to(dt)
    return q


def _output_space(out: torch.Tensor, part: Part, dt: torch.dtype) -> torch.Tensor:
    """p.V of compressed values [B, Hkv, R, D|r] mapped back to head-dim space."""
    t = part.spec
    if isinstance(t, Quant) and t.rotation is not None:
        return ops.unrotate(out, t.rotation)
    if isinstance(t, LowRank):
        return out @ part.basis.to(dt).transpose(-1, -2)
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
    """Plain-torch attention over compressed K/V in fp32 (fp64 for fp64 queries). Returns [B, Hq, Tq, D].

    q [B, Hq, Tq, D]; q_pos int64 [Tq] absolute positions; query p sees s <= p (and s > p - window).
    Columns run over positions [lo, end) with lo = 0 if anything is compressed, else the first float
    position; `mask` (bool [B or 1, 1, Tq, end - lo], True = keep) further restricts them (padding).
    Compressed values are dequantized once per call; long query chunks run in blocks.
    """
    b, hq, tq, _ = q.shape
    hkv = k.floats.shape[1]
    lo = 0 if (k.n or v.n) else min(k.float_start, v.float_start)
    width = k.end - lo
    if mask is not None and tuple(mask.shape[-2:]) != (tq, width):
        raise ValueError(f"mask covers {tuple(mask.shape[-2:])} (queries, keys); this attention reads {(tq, width)}")
    kc, vc = compressed_values(k, work_dtype(q)), compressed_values(v, work_dtype(q))
    item = torch.finfo(work_dtype(q)).bits // 8
    block = max(1, SCORE_BLOCK_BYTES // max(1, item * b * hq * width))
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
    rep, width, dev = hq // hkv, k.end - lo, q.device
    dt = work_dtype(q)
    # Query head h = kv * rep + j reads KV head kv: fold the rep heads into the rows (row j * tq + i),
    # and view scores as [b, hkv, rep, tq, width] so per-query masks broadcast over the rep heads.
    qg = q.to(dt).reshape(b, hkv, rep * tq, d)
    pos = torch.arange(lo, k.end, device=dev)
    q_pos = q_pos.to(dev)[:, None]
    keep = pos <= q_pos  # [tq, width]
    if window is not None:
        keep &= pos > q_pos - window
    if mask is not None:
        keep = keep & mask.to(dev)[:, :, None]  # [B', 1, 1, tq, width]

    scores = torch.empty(b, hkv, rep * tq, width, dtype=dt, device=dev)
    f0 = k.float_start - lo
    scores[..., f0:] = qg @ k.floats.to(dt).transpose(-1, -2)
    s5 = scores.view(b, hkv, rep, tq, width)
    if kc is not None:
        sc = (_query_space(qg, k, dt) @ kc.transpose(-1, -2)).view(b, hkv, rep, tq, k.n)
        use_kc = pos[: k.n] < k.split[rows].to(dev)[:, None]
        s5[..., : k.n] = torch.where(use_kc, sc, s5[..., : k.n])
    elif f0:
        scores[..., :f0] = float("-inf")  # V starts earlier than K: columns no key covers
    scores.mul_(scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
        s5 = scores.view(b, hkv, rep, tq, width)
    s5.masked_fill_(~keep, float("-inf"))
    # A row with nothing visible (a padding query) gives NaN: make it zeros.
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).view(b, hkv, rep, tq, width)

    fv0 = v.float_start - lo
    use_vc = pos < v.split[rows].to(dev)[:, None]  # [tq, width]
    pf = probs[..., fv0:].masked_fill(use_vc[:, fv0:], 0.0).reshape(b, hkv, rep * tq, width - fv0)
    out = pf @ v.floats.to(dt)
    if vc is not None:
        pc = probs[..., : v.n].masked_fill(~use_vc[:, : v.n], 0.0).reshape(b, hkv, rep * tq, v.n)
        out = out + _output_space(pc @ vc, v, dt)
    return out.reshape(b, hq, tq, d)


def work_dtype(q: torch.Tensor) -> torch.dtype:
    """fp32 arithmetic, or fp64 for fp64 queries (exact comparisons in tests)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


Kernel = Callable[..., "torch.Tensor | None"]
_KERNELS: list[Kernel] = []
_kernels_imported = False


def register_kernel(kernel: Kernel) -> None:
    """Add a kernel with `compressed_attention`'s signature; it returns None for inputs it refuses
    (device, dtype, spec), and the dispatcher then tries the next one and finally the reference."""
    _KERNELS.append(kernel)


def _import_kernels() -> None:
    """On the first GPU call, import kvtorch.kernels so it can register its kernels; without its
    dependencies (Triton) the reference serves."""
    global _kernels_imported
    _kernels_imported = True
    try:
        importlib.import_module("kvtorch.kernels")
    except ImportError as e:
        warnings.warn(f"kvtorch kernels unavailable ({e}); attention runs on the torch reference", stacklevel=3)


def _only_causal(mask: torch.Tensor, q_pos: torch.Tensor, k: Part, v: Part, window: int | None) -> bool:
    """Whether `mask` (bool [B or 1, 1, Tq, width], columns as in `attention_reference`) keeps every key
    that causality and the window keep, so it restricts nothing (no padding). Reads one flag back."""
    lo = 0 if (k.n or v.n) else min(k.float_start, v.float_start)
    if mask.dtype != torch.bool or tuple(mask.shape[-2:]) != (q_pos.shape[0], k.end - lo):
        return False  # the reference names what is wrong with it
    pos = torch.arange(lo, k.end, device=mask.device)
    p = q_pos.to(mask.device)[:, None]
    keep = pos <= p
    if window is not None:
        keep &= pos > p - window
    return bool((mask | ~keep).all())


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

    The dispatcher: registered kernels (kvtorch.kernels registers its CUDA kernels when imported,
    which the first CUDA call does) get the first chance; the plain-torch `attention_reference` runs
    wherever none accepts. Arguments as in `attention_reference`.
    """
    if q.is_cuda and not _kernels_imported:
        _import_kernels()
    if mask is not None and k.extent is None and _only_causal(mask, q_pos, k, v, window):
        mask = None  # transformers materializes causal masks for chunks; the kernels refuse any mask
    for kernel in _KERNELS:
        out = kernel(q, q_pos, k, v, scale=scale, window=window, softcap=softcap, mask=mask)
        if out is not None:
            return out
    if k.extent is not None:
        # The reference reads the host's token counts, which a CUDA graph would freeze at capture.
        raise RuntimeError(
            "a static cache (kvtorch.graphs) is read by the attention kernels only, and they refused this call "
            f"(mask {'given' if mask is not None else 'none'}, window {window}, softcap {softcap}); decode without "
            "a padding mask, or use the growing cache"
        )
    return attention_reference(q, q_pos, k, v, scale=scale, window=window, softcap=softcap, mask=mask)
