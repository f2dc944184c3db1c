"""Long prefill chunks over a compressed cache: rebuild the keys and values once, then SDPA.

The split kernel (kernels.attention) gives each program a block of BQ queries (8 at GQA 4) and has
every block dequantize the history it reads: a 4096-query chunk dequantizes it 512 times, and on
the H200 one compressed prefill of batch 8 x 32k (Mistral-7B shape, chunks of 4096) took over three
minutes. Where every query reads every key in compressed form (residual 0 with token-axis groups or
low rank, so the protocol's split is p + 1 and nothing is read in float), a chunk's attention is
causal attention over the compressed history as attention reads it. This path rebuilds that history
once per call in the cache's float dtype (dequantized in fp32 and rounded once, as the kernels feed
their dots; low-rank rows as c P^T) and runs torch's SDPA (FlashAttention where the GPU has it) with
a lower-right causal mask and GQA. Rotated keys are read against rotate(q); rotated values give
unrotate(p V). The rebuilt history is transient: [B, Hkv, T, D] twice in the float dtype.

Not yet timed against the split kernel: MIN_QUERIES is where the kernel's repeated dequantization
(MIN_QUERIES / 8 passes over the history) clearly exceeds one rebuild (about 4-7 passes of bytes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvspec.spec import LowRank, Quant

from .. import ops
from .support import compressed_rows, quantizer

MIN_QUERIES = 1024
FP16_SAFE = 2.0**15  # queries up to this run in fp16 (its largest finite value is 65504)
SLICE = 8192  # tokens rebuilt at a time: bounds unpack's int64 tables and the fp32 values


def _reads_all_compressed(part) -> bool:
    """Every query reads every key compressed: token-axis groups or low rank, and nothing stored in float
    (so residual 0; channel-axis groups leave per-query float ranges inside a chunk)."""
    t = part.spec
    q = quantizer(t)
    token_axis = q is None or q.axis == "token"
    return isinstance(t, (Quant, LowRank)) and token_axis and part.n == part.float_start + part.floats.shape[-2]


def fits(q: torch.Tensor, q_pos: torch.Tensor, k, v) -> bool:
    """Whether this path serves the call: a chunk of at least MIN_QUERIES queries at the last positions
    of a cache that holds everything compressed (reads two positions back from the device)."""
    tq = q.shape[2]
    if tq < MIN_QUERIES or getattr(k, "extent", None) is not None:
        return False
    if not (_reads_all_compressed(k) and _reads_all_compressed(v) and k.n == v.n):
        return False
    first, last = q_pos[[0, -1]].tolist()
    return first == k.n - tq and last == k.n - 1


def _rebuild(part, dtype: torch.dtype) -> torch.Tensor:
    """The compressed rows [B, Hkv, n, D] as attention reads them (still rotated), in `dtype`."""
    n = part.n
    out = torch.empty(*part.floats.shape[:2], n, part.floats.shape[-1], dtype=dtype, device=part.floats.device)
    basis_t = part.basis.float().transpose(-1, -2) if isinstance(part.spec, LowRank) else None  # [Hkv, r, D]
    for s0 in range(0, n, SLICE):
        x = compressed_rows(part, s0, min(n, s0 + SLICE))
        out[:, :, s0 : s0 + x.shape[2]] = (x @ basis_t if basis_t is not None else x).to(dtype)
    return out


def attend(q: torch.Tensor, k, v, *, scale: float, fp16: bool = False) -> torch.Tensor:
    """Attention of q [B, Hq, Tq, D] (the chunk's queries at the last Tq positions) over K and V that
    `fits` accepted; fp32 [B, Hq, Tq, D]. fp16: a bf16 cache's values fit fp16 (kernels.attention.
    fp16_operands), so run in fp16 (3 more mantissa bits) when the queries fit too."""
    tk, tv = k.spec, v.spec
    qk = ops.rotate(q, tk.rotation) if isinstance(tk, Quant) and tk.rotation is not None else q
    dtype = k.floats.dtype
    if dtype == torch.bfloat16 and fp16 and float(qk.abs().amax()) <= FP16_SAFE:
        dtype = torch.float16
    keys, values = _rebuild(k, dtype), _rebuild(v, dtype)
    out = F.scaled_dot_product_attention(qk.to(dtype), keys, values, attn_mask=causal_lower_right(q.shape[2], k.n),
                                         scale=scale, enable_gqa=True).float()
    if isinstance(tv, Quant) and tv.rotation is not None:
        out = ops.unrotate(out, tv.rotation)
    return out
