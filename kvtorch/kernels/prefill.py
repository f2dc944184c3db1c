"""Long prefill chunks over a compressed cache: rebuild the keys and values once, then SDPA.

The split kernel (kernels.attention) gives each program a block of BQ queries (8 at GQA 4) and has
every block dequantize the history it reads: a 4096-query chunk dequantizes it 512 times, and on
the H200 one compressed prefill of batch 8 x 32k (Mistral-7B shape, chunks of 4096) took over three
minutes. Here a chunk of at least MIN_QUERIES queries at the last positions rebuilds the compressed
history once per call in the cache's float dtype (dequantized in fp32 and rounded once, as the
kernels feed their dots; low-rank rows as c P^T) and runs torch's SDPA with GQA:
- where every query reads every key compressed (residual 0 with token-axis groups or low rank: the
  protocol's split is p + 1), with a lower-right causal mask (FlashAttention on the GPU); rotated
  keys are read against rotate(q), rotated values give unrotate(p V);
- otherwise (a residual window, channel-axis groups, K and V with different splits) over columns
  that pair each position's K and V forms (kvspec.columns), under a boolean mask built from the
  per-query splits (memory-efficient SDPA, query heads folded into rows); rotated rows are rebuilt
  unrotated, since float rows are not rotated.
The rebuilt history is transient: [B, Hkv, T, D] twice in the float dtype (plus the float window).

On the H200 the causal path took batch 8 x 32k prefill from 309 s to 16-20 s per cache; the masked
path is checked against the oracle on CPU and not yet timed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvspec.columns import spans
from kvspec.spec import LowRank, Quant

from .. import ops
from .support import compressed_rows, quantizer

MIN_QUERIES = 1024
FP16_SAFE = 2.0**15  # queries up to this run in fp16 (its largest finite value is 65504)
SLICE = 8192  # tokens rebuilt at a time: bounds unpack's int64 tables and the fp32 values
QUERY_BLOCK = 1024  # queries per masked SDPA call: its mask becomes [G * QUERY_BLOCK, keys] floats


def _reads_all_compressed(part) -> bool:
    """Every query reads every key compressed: token-axis groups or low rank, and nothing stored in float
    (so residual 0; channel-axis groups leave per-query float ranges inside a chunk)."""
    t = part.spec
    q = quantizer(t)
    token_axis = q is None or q.axis == "token"
    return isinstance(t, (Quant, LowRank)) and token_axis and part.n == part.float_start + part.floats.shape[-2]


def fits(q: torch.Tensor, q_pos: torch.Tensor, k, v) -> bool:
    """Whether this path serves the call: a chunk of at least MIN_QUERIES queries at the last positions
    of a growing cache whose K and V are both compressed (reads two positions back from the device)."""
    tq = q.shape[2]
    if tq < MIN_QUERIES or getattr(k, "extent", None) is not None:
        return False
    if not all(isinstance(p.spec, (Quant, LowRank)) for p in (k, v)):
        return False
    first, last = q_pos[[0, -1]].tolist()
    return last == k.float_start + k.floats.shape[-2] - 1 and last - first == tq - 1


def _rebuild(part, dtype: torch.dtype, unrotated: bool = False) -> torch.Tensor:
    """The compressed rows [B, Hkv, n, D] as attention reads them (rotated unless `unrotated`), in
    `dtype`; rotated and low-rank rows are mapped in fp32 and rounded once."""
    t, n = part.spec, part.n
    out = torch.empty(*part.floats.shape[:2], n, part.floats.shape[-1], dtype=dtype, device=part.floats.device)
    basis_t = part.basis.float().transpose(-1, -2) if isinstance(t, LowRank) else None  # [Hkv, r, D]
    rotation = t.rotation if unrotated and isinstance(t, Quant) else None
    for s0 in range(0, n, SLICE):
        x = compressed_rows(part, s0, min(n, s0 + SLICE))
        if basis_t is not None:
            x = x @ basis_t
        elif rotation is not None:
            x = ops.unrotate(x, rotation)
        out[:, :, s0 : s0 + x.shape[2]] = x.to(dtype)
    return out


def _dtype(k, q: torch.Tensor, fp16: bool) -> torch.dtype:
    """The cache's float dtype, or fp16 for a bf16 cache whose values fit it (kernels.attention.
    fp16_operands: 3 more mantissa bits) when the queries fit too."""
    dtype = k.floats.dtype
    if dtype == torch.bfloat16 and fp16 and float(q.abs().amax()) <= FP16_SAFE:
        return torch.float16
    return dtype


def attend(q: torch.Tensor, q_pos: torch.Tensor, k, v, *, scale: float, fp16: bool = False) -> torch.Tensor:
    """Attention of q [B, Hq, Tq, D] (the chunk's queries at the last Tq positions) over K and V that
    `fits` accepted; fp32 [B, Hq, Tq, D]. fp16: K and V both quantized (see `_dtype`)."""
    if _reads_all_compressed(k) and _reads_all_compressed(v) and k.n == v.n:
        return _attend_causal(q, k, v, scale=scale, fp16=fp16)
    dtype = _dtype(k, q, fp16)
    end, dev = k.float_start + k.floats.shape[-2], q.device
    p = q_pos.to(dev)[:, None]
    ks, vs = k.split.to(dev)[:, None], v.split.to(dev)[:, None]
    kc, vc = _rebuild(k, dtype, unrotated=True), _rebuild(v, dtype, unrotated=True)
    kf, vf = k.floats.to(dtype), v.floats.to(dtype)

    def rows(compressed, floats, part, form, lo, hi):
        return compressed[:, :, lo:hi] if form == "c" else floats[:, :, lo - part.float_start : hi - part.float_start]

    keys, values, masks = [], [], []
    for sp in spans(k.n, k.float_start, v.n, v.float_start, end):
        keys.append(rows(kc, kf, k, sp.k_form, sp.lo, sp.hi))
        values.append(rows(vc, vf, v, sp.v_form, sp.lo, sp.hi))
        masks.append(sp.reads(torch.arange(sp.lo, sp.hi, device=dev)[None, :], ks, vs, p))
    keys, values, mask = torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(masks, dim=1)
    # SDPA with a mask and enable_gqa falls back to its math backend (fp32 scores for every query
    # head: 17 GB at 32 heads x 4096 x 32k), so each KV head's G query heads are folded into its rows
    # instead, in blocks of QUERY_BLOCK queries to bound the mask SDPA expands.
    b, hq, tq, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    qg = q.to(dtype).view(b, hkv, g, tq, d)
    out = torch.empty(b, hkv, g, tq, d, dtype=torch.float32, device=dev)
    for i0 in range(0, tq, QUERY_BLOCK):
        i1 = min(tq, i0 + QUERY_BLOCK)
        rows_q = qg[:, :, :, i0:i1].reshape(b, hkv, g * (i1 - i0), d)
        o = F.scaled_dot_product_attention(rows_q, keys, values, attn_mask=mask[i0:i1].repeat(g, 1), scale=scale)
        out[:, :, :, i0:i1] = o.view(b, hkv, g, i1 - i0, d)
    return out.view(b, hq, tq, d)


def _attend_causal(q: torch.Tensor, k, v, *, scale: float, fp16: bool) -> torch.Tensor:
    """`attend` where every query reads every key compressed: causal attention over the rebuilt rows."""
    tk, tv = k.spec, v.spec
    qk = ops.rotate(q, tk.rotation) if isinstance(tk, Quant) and tk.rotation is not None else q
    dtype = _dtype(k, qk, fp16)
    keys, values = _rebuild(k, dtype), _rebuild(v, dtype)
    out = F.scaled_dot_product_attention(qk.to(dtype), keys, values, attn_mask=causal_lower_right(q.shape[2], k.n),
                                         scale=scale, enable_gqa=True).float()
    if isinstance(tv, Quant) and tv.rotation is not None:
        out = ops.unrotate(out, tv.rotation)
    return out
