"""Attention over a compressed cache (decode, prefill and chunked prefill in one path).

Inputs, per tensor (K or V) of one layer, as kvtorch.attention.Part holds them (any object with
these fields works):
- spec: kvspec Quant or LowRank; n: compressed tokens, positions [0, n);
- arrays: kvspec.layout arrays with at least n rows along axis 2 (views of larger storage are fine):
  codes int32 [B, Hkv, n, W] with scales/biases fp16 [B, Hkv, n, D/G] (token axis) or
  [B, Hkv, n/G, D] (channel axis); or coeffs [B, Hkv, n, r] in the float dtype;
- basis: fp32 [Hkv, D, r] for LowRank;
- floats: [B, Hkv, Tf, D] in the float dtype (fp16 or bf16) at positions [float_start, float_start + Tf);
- split: int [Tq]; query i reads position s compressed iff s < split[i] (docs/BACKENDS.md protocol:
  split[i] = n_quantized(q_pos[i] + 1); K and V have their own);
- extent (optional): a static cache's storage rows, planned for in full (see kvtorch.attention.Part).
q [B, Hq, Tq, D] at positions q_pos [Tq] (query p sees s <= p); Hq = G * Hkv and query head h reads
KV head h // G. Returns fp32 [B, Hq, Tq, D]. Rotated keys are read against rotate(q), low-rank keys
as (qP).c, outputs as unrotate(p.V) or (p.C)P^T; the D-dim history is never rebuilt.

`attention_reference` is the plain-torch version; `attention` dispatches to the Triton kernels
where `refusal` is None (long prefill chunks: kernels.prefill, one rebuild of the history and
torch's SDPA; 4- and 8-bit decode at head dims 64, 128 and 256: the CUDA kernel of kernels.cuda_decode for the lean
launch) and to the reference otherwise; `attention_kernel` has the signature of
kvtorch.attention.register_kernel (None where it refuses).
"""

from __future__ import annotations

import math

import torch

from kvspec.reference.rotation import norm_factor
from kvspec.spec import LowRank, Quant

from .. import ops
from . import cuda_decode, prefill
from .support import (
    compressed_rows,
    interpreting,
    on_device,
    padded,
    quantizer,
    rotation_signs,
    tensor_refusal,
    triton_refusal,
)

LOG2E = 1.4426950408889634
# (keys per block, warps, stages) of the GENERAL launch: its region is short (the float tail) and its
# loop holds twice the tiles, so it keeps a small block whatever the lean launch uses.
GENERAL_BLOCK = (16, 4, 2)
MAX_SPLITS = 32
# The cap for 2-warp blocks of 64 keys of 4- and 8-bit words over LONG_KEYS or more (`max_splits`).
LONG_MAX_SPLITS = 64
# Fewest keys one split covers: shorter ones cost more in the reduce than they add in parallelism
# (H200, Mistral heads, batch 1 x 4k: 32 splits of 128 keys 0.028-0.031 ms, 16 of 256 0.022-0.026).
MIN_SPLIT_KEYS = 256
# The reduce as a programmatic dependent launch (sm_90+): the Triton split kernels let it launch at
# their start, decode_quant.cu at D 64 after its key loop, so it is resident and waiting when they
# finish. H200, one process: rank32 b8 x 32k 0.0830 -> 0.0825 ms, b1 x 32k 0.0237 -> 0.0232; D 64
# int4 b1 x 32k 0.0163 -> 0.0156. False: a plain launch (benchmarks/ab_reduce_pdl.py sets it).
PDL = True


def _sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 elsewhere: the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _values(part) -> torch.Tensor | None:
    """Compressed rows as attention reads them, fp32 [B, Hkv, n, D or r] (still rotated); None if n == 0."""
    return compressed_rows(part, 0, part.n) if part.n else None


def _to_stored_space(x: torch.Tensor, part) -> torch.Tensor:
    t = part.spec
    if isinstance(t, Quant) and t.rotation is not None:
        return ops.rotate(x, t.rotation)
    if isinstance(t, LowRank):
        return torch.einsum("bhqd,hdr->bhqr", x, part.basis.float())
    return x


def _from_stored_space(x: torch.Tensor, part) -> torch.Tensor:
    t = part.spec
    if isinstance(t, Quant) and t.rotation is not None:
        return ops.unrotate(x, t.rotation)
    if isinstance(t, LowRank):
        return torch.einsum("bhqr,hdr->bhqd", x, part.basis.float())
    return x


def attention_reference(q: torch.Tensor, q_pos: torch.Tensor, k, v, *, scale: float) -> torch.Tensor:
    """Plain torch, fp32: q [B, Hq, Tq, D] over K/V parts (module docstring) -> [B, Hq, Tq, D]."""
    b, hq, tq, d = q.shape
    hkv = k.floats.shape[1]
    g = hq // hkv
    end = k.float_start + k.floats.shape[-2]
    qg = q.float().reshape(b, hkv, g * tq, d)  # row j * tq + i: head kv * g + j, query i
    pos = torch.arange(end, device=q.device)
    q_pos = q_pos.to(q.device)
    rows = lambda x: x.to(q.device)[:, None].repeat(g, 1)  # per-query [Tq, 1] -> per-row [G * Tq, 1]
    use_kc, use_vc = pos[None, :] < rows(k.split), pos[None, :] < rows(v.split)
    scores = torch.full((b, hkv, g * tq, end), float("-inf"), device=q.device)
    scores[..., k.float_start :] = qg @ k.floats.float().transpose(-1, -2)
    kc = _values(k)
    if kc is not None:
        sc = _to_stored_space(qg, k) @ kc.transpose(-1, -2)
        scores[..., : k.n] = torch.where(use_kc[:, : k.n], sc, scores[..., : k.n])
    keep = pos[None, :] <= rows(q_pos)
    p = torch.softmax((scores * scale).masked_fill(~keep, float("-inf")), dim=-1)
    out = p[..., v.float_start :].masked_fill(use_vc[:, v.float_start :], 0.0) @ v.floats.float()
    vc = _values(v)
    if vc is not None:
        out = out + _from_stored_space(p[..., : v.n].masked_fill(~use_vc[:, : v.n], 0.0) @ vc, v)
    return out.reshape(b, hq, tq, d)


def refusal(q: torch.Tensor, k, v, *, window=None, softcap=None, mask=None) -> str | None:
    """Why the kernels cannot run this attention (None: they can). Besides kernels.support's shape
    rules: no sliding window, softcap or explicit mask; both K and V compressed (Quant or LowRank);
    fp16/bf16 floats; at most 64 query heads per KV head."""
    why = triton_refusal(q.device)
    if why:
        return why
    if window is not None or softcap is not None or mask is not None:
        return "sliding windows, softcaps and explicit masks run on the reference"
    for name, part in (("K", k), ("V", v)):
        why = tensor_refusal(part.spec, q.shape[-1])
        if why:
            return f"{name}: {why}"
        if part.floats.dtype not in (torch.float16, torch.bfloat16):
            return f"{name}: float tokens are {part.floats.dtype}, not fp16/bf16"
    if k.floats.dtype != v.floats.dtype or k.float_start + k.floats.shape[-2] != v.float_start + v.floats.shape[-2]:
        return "K and V floats differ in dtype or end position"
    hq, hkv = q.shape[1], k.floats.shape[1]
    if hq % hkv or hq // hkv > 64:
        return f"{hq} query heads over {hkv} KV heads"
    return None


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x with a unit stride along its last axis (the kernels index that axis directly)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _operands(part, device):
    """(compressed array, scales, biases, aux, norm, constexprs) of one part for the split kernel."""
    t, a = part.spec, part.arrays
    d = part.floats.shape[-1]
    # Stand-ins are never read: empty, so a call launches no fill kernels (two per call with zeros).
    dummy = torch.empty(1, dtype=torch.int32, device=device)
    q = quantizer(t)
    width = t.rank if isinstance(t, LowRank) else d
    stored = part.n or part.extent is not None  # a static store's rows may fill during a graph
    if stored:
        c = _unit_stride(a.get("codes", a.get("coeffs")))
        s = _unit_stride(a["scales"]) if q is not None else c
        bias = _unit_stride(a["biases"]) if q is not None else c
    else:
        # Nothing compressed yet (decoding inside the residual window): never read, but typed as the
        # stored arrays are, since the dequantization is compiled for them (4-bit PTX takes fp16
        # scales; an int32 stand-in there aborted LLVM on the H200).
        c = dummy.view(1, 1, 1, 1)
        s = bias = torch.empty(1, 1, 1, 1, dtype=torch.float16, device=device) if q is not None else c
    if s.stride() != bias.stride():
        s, bias = s.contiguous(), bias.contiguous()
    aux, norm, xform = dummy, 1.0, 0
    if isinstance(t, Quant) and t.rotation is not None:
        aux, norm, xform = rotation_signs(d, t.rotation, device), float(norm_factor(d)), 1
    elif isinstance(t, LowRank):
        aux, xform = part.basis.float().contiguous(), 2
    meta = dict(BITS=0 if q is None else q.bits, GROUP=1 if q is None else q.group,
                CHANNEL=q is not None and q.axis == "channel", XFORM=xform,
                DP=padded(width) if isinstance(t, LowRank) else d, DREAL=width)
    return c, s, bias, aux, norm, meta


def _splits(lo: int, hi: int, block: int, programs: int, want: int | None, sms: int,
            per_sm: int = 4, cap: int = MAX_SPLITS) -> tuple[int, int]:
    """(splits, chunk) covering keys [lo, hi) in chunks of whole blocks: `want` splits, or enough that
    the `programs` programs of one split, times the splits, fill about `per_sm` per multiprocessor (of
    `sms`; see `programs_per_sm`) with at most `cap` (the reduce loads every split's partials at once;
    see `max_splits`) and at least MIN_SPLIT_KEYS keys each."""
    blocks = max(1, -(-(hi - lo) // block))
    splits = want if want is not None else min(cap, per_sm * sms // programs, (hi - lo) // MIN_SPLIT_KEYS)
    splits = max(1, min(splits, blocks))
    chunk = -(-blocks // splits) * block
    return max(1, -(-(hi - lo) // chunk)), chunk


def cuda_splits(bits: int, d: int, keys: int, programs: int, want: int | None, sms: int) -> tuple[int, int]:
    """(splits, chunk) of the CUDA decode kernel over keys [0, keys): `_splits` aiming for its build's
    blocks per multiprocessor (at most MAX_SPLITS; b1 x 32k: 32 splits 0.0350 ms, 64: 0.0368), or for one
    where that leaves splits shorter than the build's `short_split_keys` (cuda_decode.Build)."""
    build = cuda_decode.BUILDS[bits, d]
    step = cuda_decode.keys_per_step(bits, d)
    splits, chunk = _splits(0, keys, step, programs, want, sms, build.blocks_per_sm)
    if chunk < build.short_split_keys:
        splits, chunk = _splits(0, keys, step, programs, want, sms, 1)
    return splits, chunk


def _word_tokens(t) -> bool:
    return isinstance(t, Quant) and t.bits in (2, 4, 8) and t.axis == "token"


def _bits_tokens(kspec, vspec, bits: int) -> bool:
    return all(_word_tokens(t) and t.bits == bits for t in (kspec, vspec))


def _int4_tokens(kspec, vspec) -> bool:
    return _bits_tokens(kspec, vspec, 4)


# Keys from which 4-bit K and V at D 256 take 4-warp blocks of 64 keys with 8+ programs (`default_block`),
# and at D 128 aim for VALUE_ORDER_PER_SM programs per multiprocessor (`programs_per_sm`).
LONG_KEYS = 16384
VALUE_ORDER_PER_SM = 6
# Programs per split (batch x KV heads) from which 2-bit K and V at D 128 take 1-warp blocks of 16 keys.
TINY_BLOCK_PROGRAMS = 32


def default_block(kspec, vspec, d: int, programs: int = 1, keys: int = 0, queries: int = 1) -> tuple[int, int, int]:
    """(keys per block, warps, stages) of the lean launch for `programs` programs per split
    (batch x KV heads x query blocks) over `keys` keys, for `queries` queries per sequence (1: decode):
    the fastest measured on an H200 where measured
    (benchmarks/results/decode_launch_nvidia_h200.json, kernel "mma-order-346daf6": key tiles in MMA order).
    4-bit K and V at D <= 128: 4 warps over 128 keys for up to 8 programs over fewer than LONG_KEYS keys
    (Mistral heads b1 x 4k: 0.0155 ms vs 0.0183 for (64, 2, 3)), 2 warps over 64 keys otherwise (b8 x 32k
    0.185 vs 0.206 for (128, 4, 3); b32 x 32k 0.688 vs 0.769; Qwen2.5 heads, 16 programs: 0.0459 vs
    0.0587), at few programs with up to LONG_MAX_SPLITS splits (kernel "main 6f5e365": b1 x 32k 0.0382
    vs 0.0395 for (128, 4, 3), b1 x 128k 0.1045 vs 0.1176; Qwen2.5 heads b1 x 32k 0.0212 vs 0.0257,
    SmolLM2 heads 0.0228 vs 0.0261; 32 splits lost: b1 x 32k 0.0436). 2-bit K and V at D 128, decoding:
    one warp over 16 keys from TINY_BLOCK_PROGRAMS programs, with MAX_SPLITS splits (kernel "session23 value
    order int4 D128, int2 1-warp blocks": b8 x 32k 0.249 vs 0.280 ms for (64, 4, 3); b32 x 32k 0.888 vs
    1.080; b4 x 32k 0.133 vs 0.145; b8 x 8k 0.074 vs 0.080; b8 x 128k 0.945 vs 1.075 for (64, 2, 3)), 4
    warps over 64 keys below (b2 x 32k 0.0805 vs 0.0984; b1 x 32k 0.050 vs 0.095) and for query chunks
    (prefill with 1-warp blocks not measured); over 128 keys at D 64
    (SmolLM2 heads b8 x 32k 0.0636 vs 0.0670 for (64, 2, 3) and 0.0907 for (16, 1, 3)). Other token-axis
    2/4/8-bit K and V: 4 warps over 128 keys for up to 16 programs over fewer than LONG_KEYS keys, 2
    warps over 64 keys otherwise (int8 b8 x 32k: 0.206 vs 0.335 for (64, 4, 3); b1 x 32k with 64 splits
    0.0410 vs 0.0442, b1 x 128k 0.1096 vs 0.1285; b1 x 4k 0.0170 vs 0.0188; 16 programs, b2 x 32k:
    0.0617 vs 0.0773; at the LONG_KEYS boundary, b1 x 16k, int8 0.0296 vs 0.0300 and int4 0.0270 vs 0.0264,
    within 2% either way). At D 256 int4 takes (128, 8, 3), or (64, 4, 3) with 8+ programs
    over LONG_KEYS or more (b8 x 32k 0.0777 vs 0.0813; b1 x 32k: 0.0432 vs 0.0573). Low-rank K and V: 4
    warps over 128 keys (rank 32, b8 x 32k: 0.0827 ms vs 0.0875 for (64, 4, 3); b1 x 32k: 0.0236 vs 0.0269).
    3-bit tiles gather their codes from two words each, which the pipeline stages multiply:
    (64, 4, 3) asks 284,672 B of shared memory at D 128 (an H200 has 232,448), (64, 4, 2) 153,600,
    and at D 256 (32, 4, 2) 156,672 (benchmarks/triton_smem.py, compiled offline for sm_90)."""
    if d <= 128 and _bits_tokens(kspec, vspec, 2):
        if d > 64:
            return (16, 1, 3) if programs >= TINY_BLOCK_PROGRAMS and queries == 1 else (64, 4, 3)
        return 128, 4, 3
    if d <= 128 and _int4_tokens(kspec, vspec):
        return (128, 4, 3) if programs <= 8 and keys < LONG_KEYS else (64, 2, 3)
    if d <= 128 and _word_tokens(kspec) and _word_tokens(vspec):
        return (128, 4, 3) if programs <= 16 and keys < LONG_KEYS else (64, 2, 3)
    if d > 128 and _int4_tokens(kspec, vspec):
        # D 256 (Gemma-3 heads): 4 warps over 64 keys win with 8+ programs over long contexts and
        # lose with fewer keys or programs (b8 x 4k 0.0273 vs 0.0253 ms in pair order).
        return (64, 4, 3) if programs >= 8 and keys >= LONG_KEYS else (128, 8, 3)
    if isinstance(kspec, LowRank) and isinstance(vspec, LowRank):
        return 128, 4, 3
    if d > 64 and any(q is not None and q.bits == 3 for q in map(quantizer, (kspec, vspec))):
        return (64, 4, 2) if d <= 128 else (32, 4, 2)
    return 64, 4, 3


def programs_per_sm(kspec, vspec, block: tuple[int, int, int], d: int = 0, keys: int = 0) -> int:
    """Programs per multiprocessor the default splits aim for (`_splits`), for head dim d over `keys`
    keys: 32 for 1-warp blocks, i.e. MAX_SPLITS up to 132 programs (int2 (16, 1, 3), H200, Mistral
    heads: b8 x 32k 32 splits 0.249 ms, 16: 0.253, 8: 0.343; b32 x 32k 32: 0.888, 8: 0.943); 8 for 4-bit
    token-axis K and V in 4-warp blocks of 128 keys (b8 x 32k 16 splits 0.2392 ms vs 8: 0.2513; b32 x 32k
    4 vs 2: 0.904 vs 0.958); VALUE_ORDER_PER_SM for them in 2-warp blocks at D 128 over LONG_KEYS or
    more: their value tiles skip shared memory (22.5 KB a program), so 6 programs fit a multiprocessor
    by registers (b8 x 32k 12 splits 0.176 ms vs 8: 0.189; b8 x 128k 0.650 vs 0.704; b32 x 32k 3: 0.650
    vs 2: 0.709; b4 x 32k 24: 0.098 vs 16: 0.100; but b8 x 4k 12: 0.037 vs 8: 0.035); 4 otherwise (~8
    warps per multiprocessor with the 2-warp blocks, where every fast config measured on an H200 sat)."""
    if block[1] == 1:
        return 32
    if _int4_tokens(kspec, vspec) and block[:2] == (128, 4):
        return 8
    if _int4_tokens(kspec, vspec) and block[:2] == (64, 2) and d == 128 and keys >= LONG_KEYS:
        return VALUE_ORDER_PER_SM
    return 4


def max_splits(kspec, vspec, block: tuple[int, int, int], keys: int) -> int:
    """The most splits the default takes (`_splits`' cap): LONG_MAX_SPLITS for 2-warp blocks of 64 keys
    of 4- and 8-bit token-axis words over LONG_KEYS or more keys, whose few-program launches (batch 1)
    want ~512 programs (Mistral heads b1 x 32k int4: 64 splits 0.0382 ms, 48: 0.0444, 32: 0.0436);
    MAX_SPLITS otherwise."""
    words48 = all(_word_tokens(t) and t.bits in (4, 8) for t in (kspec, vspec))
    return LONG_MAX_SPLITS if words48 and block[:2] == (64, 2) and keys >= LONG_KEYS else MAX_SPLITS


def fp16_operands(kspec, vspec) -> bool:
    """Whether bf16 caches' dots take fp16 operands: where K and V are both quantized, every value
    they hold is within fp16's range (kvspec refuses others), and fp16 keeps 3 more mantissa bits of
    q, of each dequantized value and of p than bf16 does; dequantization takes fp16 scales and
    biases as stored (4- and 8-bit tiles: the packed PTX path). Low-rank coefficients have no such bound."""
    return isinstance(kspec, Quant) and isinstance(vspec, Quant)


def attend(q: torch.Tensor, q_pos: torch.Tensor, k, v, *, scale: float, splits: int | None = None,
           block: tuple[int, int, int] | None = None, ptx: bool = True, cuda: bool = True) -> torch.Tensor:
    """The kernel path of `attention` (inputs must pass `refusal`): Triton, with the lean launch on the
    CUDA decode kernel (kernels.cuda_decode) where that applies. splits: key splits of the
    all-compressed range (default: see `_splits`). block: (keys per block, warps, pipeline stages)
    of the lean launch (default: `default_block`). A single
    query with K and V fully compressed is taken as decode at the last position (the protocol's
    split n_quantized(end) = n), which needs the lean launch only. ptx:
    dequantize 4- and 8-bit token-axis tiles with packed fp16 inline PTX (CUDA only; ignored under the
    interpreter, and where the dots take bf16 operands: see `fp16_operands`). cuda: take the lean launch
    on the CUDA C++ kernel where `cuda_decode.refusal` allows (decode over 4- or 8-bit K and V; `block` then
    only applies elsewhere)."""
    b, hq, tq, d = q.shape
    q, kf, vf = _unit_stride(q), _unit_stride(k.floats), _unit_stride(v.floats)
    hkv = kf.shape[1]
    g = hq // hkv
    gp = 1 << (g - 1).bit_length()
    bq = 1 if tq == 1 else max(1, 32 // gp)
    nqb = -(-tq // bq)
    end = k.float_start + k.floats.shape[-2]
    # Host-side bounds of the two regions: keys below min(n) may be all-compressed; keys from the
    # first float position on may need the float form (the kernels refine both per query block).
    n_fast = min(k.n, v.n)
    g0 = min(k.float_start, v.float_start)
    static = getattr(k, "extent", None) is not None
    if static:
        # A static cache's step (one query, everything compressed): plan over the whole storage; the
        # lean programs stop at the query's position, which they read on the device.
        end = n_fast = k.extent
    block = block or default_block(k.spec, v.spec, d, b * hkv * nqb, n_fast, tq)
    sms = _sms(q.device)
    on_cuda_kernel = cuda and cuda_decode.refusal(q, k, v) is None
    if on_cuda_kernel:
        s_fast, c_fast = cuda_splits(k.spec.bits, d, n_fast, b * hkv, splits, sms)
    else:
        s_fast, c_fast = _splits(0, n_fast, block[0], b * hkv * nqb, splits, sms,
                                 programs_per_sm(k.spec, v.spec, block, d, n_fast),
                                 max_splits(k.spec, v.spec, block, n_fast))
    s_gen, c_gen = _splits(g0, end, GENERAL_BLOCK[0], b * hkv * nqb, splits, sms)
    ring = (k.ring or 0) if static else 0
    if ring:
        # A static cache's float tail in a ring: one GENERAL program per query block starts at the
        # block's smallest split (read on the device) and covers at most `ring` keys up to the query.
        if v.ring != ring:
            raise ValueError(f"K and V rings differ ({ring} and {v.ring} rows)")
        s_gen, c_gen = 1, ring
    elif static or (tq == 1 and k.n == end and v.n == end):
        # Decode with nothing left in float (no residual window): the one query sits at end - 1, so its
        # splits are n_quantized(end) = n and the lean launch covers every key; the GENERAL launch
        # would only write empty slots, so it is not made (one launch fewer per layer and step).
        s_gen = 0
    slots = s_fast + s_gen
    kc, ks, kb, kaux, knorm, km = _operands(k, q.device)
    vc, vs, vb, vaux, vnorm, vm = _operands(v, q.device)
    f32 = dict(dtype=torch.float32, device=q.device)
    n_part = b * hkv * tq * slots * gp
    pm, pl = torch.empty(n_part, **f32), torch.empty(n_part, **f32)
    pc, pf = torch.empty(n_part * vm["DP"], **f32), torch.empty(n_part * d, **f32)
    flag = torch.empty(b * hkv * nqb * slots, dtype=torch.int32, device=q.device)
    out = torch.empty(b, hq, tq, d, **f32)
    import triton.language as tl

    from ._attention_triton import _reduce_kernel, _split_kernel

    pdl = PDL and not interpreting() and torch.cuda.get_device_capability(q.device) >= (9, 0)
    dot = tl.float16 if k.floats.dtype == torch.float16 or fp16_operands(k.spec, v.spec) else tl.bfloat16
    qpos = q_pos.to(q.device)
    launches = ((False, s_fast, 0, c_fast, 0, block),
                (True, s_gen, g0, c_gen, s_fast, GENERAL_BLOCK))
    # Triton launches on the current device, not the tensors': a layer on cuda:1 (an accelerate device
    # map) would otherwise run on cuda:0.
    with on_device(q):
        for general, s_n, lo, chunk, slot0, (bn, warps, stages) in launches:
            if s_n == 0:
                continue
            if on_cuda_kernel and not general:
                cuda_decode.launch(q, qpos, k, v, qk_scale=scale * LOG2E, splits=s_n, chunk=chunk, slots=slots,
                                   end=end, pm=pm, pl=pl, pc=pc, flag=flag)
                continue
            _split_kernel[(s_n, b * hkv, nqb)](
                q, q.stride(0), q.stride(1), q.stride(2), qpos, k.split, v.split,
                kc, *kc.stride()[:2], kc.stride(2), ks, kb, *ks.stride()[:3],
                kf, *kf.stride()[:3], k.float_start,
                vc, *vc.stride()[:2], vc.stride(2), vs, vb, *vs.stride()[:3],
                vf, *vf.stride()[:3], v.float_start,
                kaux, knorm, pm, pl, pc, pf, flag,
                hkv, g, tq, end, lo, chunk, slot0, slots, nqb, scale * LOG2E,
                D=d, LOG_D=int(math.log2(d)), GP=gp, BQ=bq, ROWS=max(16, bq * gp), BN=bn,
                K_BITS=km["BITS"], K_GROUP=km["GROUP"], K_CHANNEL=km["CHANNEL"], K_XFORM=km["XFORM"], DK=km["DP"],
                DK_REAL=km["DREAL"], V_BITS=vm["BITS"], V_GROUP=vm["GROUP"], V_CHANNEL=vm["CHANNEL"], DV=vm["DP"],
                DV_REAL=vm["DREAL"], DOT=dot, MM_F32=interpreting() and dot == tl.bfloat16, GENERAL=general,
                PTX=ptx and not interpreting() and dot == tl.float16, RING=ring, WARPS=warps, PDL=pdl,
                num_warps=warps, num_stages=stages,
            )
        sp = 1 << (slots - 1).bit_length()
        _reduce_kernel[(b * hq, tq)](
            pm, pl, pc, pf, flag, out, *out.stride()[:3], vaux, vnorm, hkv, g, tq, slots, nqb,
            D=d, LOG_D=int(math.log2(d)), GP=gp, BQ=bq, DV=vm["DP"], DV_REAL=vm["DREAL"],
            V_XFORM=vm["XFORM"], SP=sp, PDL=pdl, num_warps=4 if sp * d <= 4096 else 8, launch_pdl=pdl,
        )
    return out


def attention(q: torch.Tensor, q_pos: torch.Tensor, k, v, *, scale: float, window: int | None = None,
              softcap: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The dispatcher: Triton kernels where `refusal` is None, `attention_reference` otherwise
    (which also refuses windows, softcaps and masks: kvtorch.attention handles those)."""
    if refusal(q, k, v, window=window, softcap=softcap, mask=mask) is None:
        return _serve(q, q_pos, k, v, scale)
    if window is not None or softcap is not None or mask is not None:
        raise ValueError("window, softcap and mask are handled by kvtorch.attention.attention_reference")
    return attention_reference(q, q_pos, k, v, scale=scale)


def attention_kernel(q: torch.Tensor, q_pos: torch.Tensor, k, v, *, scale: float, window: int | None = None,
                     softcap: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """For kvtorch.attention.register_kernel: the kernels' output, or None where they refuse."""
    if refusal(q, k, v, window=window, softcap=softcap, mask=mask) is not None:
        return None
    return _serve(q, q_pos, k, v, scale)


def _serve(q: torch.Tensor, q_pos: torch.Tensor, k, v, scale: float) -> torch.Tensor:
    """Long prefill chunks on kernels.prefill (one rebuild, then SDPA), the rest on `attend`."""
    if prefill.fits(q, q_pos, k, v):
        return prefill.attend(q, q_pos, k, v, scale=scale, fp16=fp16_operands(k.spec, v.spec))
    return attend(q, q_pos, k, v, scale=scale)
