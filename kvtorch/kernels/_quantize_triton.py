"""Triton kernel of kvtorch.kernels.quantize: round, rotate or project, quantize and pack in one pass.

One program handles up to BT = 16 rows of one (batch, head): token-axis groups and low-rank
projections need only those rows; a channel-axis program owns one group of G tokens and walks it
twice in blocks of 16 rows (min/max first, then codes), so its registers stay bounded for any G.
Token-axis quantization of fewer than 16 rows runs programs of the next power of two rows: a decode
step's single token (K and V, batch 8, 8 heads, D 128) took 13.3 us in 16-row programs on an H200
and 8.6 us in 1-row ones (two empty launches: 5.1 us). Low-rank keeps 16 rows (tl.dot's minimum).
K and V of a layer under one spec can share a launch (PAIR: grid axis 2 picks the tensor; 5.8 us there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvspec.spec import LowRank, TensorSpec

from ._jit import fwht_rows, pack_codes, rint_half_even, round_bf16
from .support import padded, patch_interpreter, quantizer

patch_interpreter()

BT = 16


@triton.jit
def _load_rows(x_ptr, rows, M, stride_t, sign_ptr, basis_ptr, rot_norm,
               D: tl.constexpr, LOG_D: tl.constexpr, BT: tl.constexpr, FLOAT: tl.constexpr,
               XFORM: tl.constexpr, RP: tl.constexpr, R: tl.constexpr):
    """Rows [BT, D] rounded to the float dtype; rotated (XFORM 1) or projected to [BT, RP] (XFORM 2)."""
    d = tl.arange(0, D)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_t + d[None, :], mask=(rows < M)[:, None], other=0.0)
    x = _round_float(x.to(tl.float32), FLOAT)
    if XFORM == 1:
        x = fwht_rows(x * tl.load(sign_ptr + d)[None, :], BT, D, LOG_D) * rot_norm
    if XFORM == 2:
        r = tl.arange(0, RP)
        p = tl.load(basis_ptr + d[:, None] * R + r[None, :], mask=(r < R)[None, :], other=0.0)
        x = tl.dot(x, p, input_precision="ieee")
    return x


@triton.jit
def _round_float(x, FLOAT: tl.constexpr):
    """fp32 x rounded to the float dtype, kept in fp32 (round to nearest, ties to even)."""
    if FLOAT == tl.bfloat16:
        return round_bf16(x)
    return x.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)


@triton.jit
def _scale_bias(lo, hi, LEVELS: tl.constexpr):
    """kvspec steps 3-4: bias = fp16(lo), scale = fp16(max(hi - bias, 0) / L) with IEEE division."""
    bias = lo.to(tl.float16, fp_downcast_rounding="rtne")
    span = tl.maximum(hi - bias.to(tl.float32), 0.0)
    scale = tl.math.div_rn(span, tl.full(span.shape, LEVELS, tl.float32)).to(tl.float16, fp_downcast_rounding="rtne")
    return scale, bias


@triton.jit
def _codes(x, s32, b32, LEVELS: tl.constexpr):
    """kvspec step 5: clamp(rint((x - bias) / scale), 0, L) where scale > 0, else 0 (uint32)."""
    pos = s32 > 0
    y = tl.math.div_rn(x - b32, tl.where(pos, s32, 1.0))
    q = tl.minimum(tl.maximum(rint_half_even(y), 0.0), LEVELS)
    return tl.where(pos, q, 0.0).to(tl.uint32)


@triton.jit
def _store_words(out_ptr, rows, M, stride_t, words, BT: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr,
                 W: tl.constexpr):
    """Store packed words (pack_codes' shape) of rows [BT] into int32 rows of W words."""
    r = rows[:, None].to(tl.int64) * stride_t
    if BITS == 3:
        NB: tl.constexpr = DP // 32
        blk = tl.arange(0, NB)[None, :, None]
        k = tl.arange(0, 4)[None, None, :]
        ptrs = out_ptr + r[:, :, None] + blk * 3 + k
        mask = (rows < M)[:, None, None] & (k < 3) & (blk * 3 + k < W)
    else:
        w = tl.arange(0, DP * BITS // 32)[None, :]
        ptrs = out_ptr + r + w
        mask = (rows < M)[:, None] & (w < W)
    tl.store(ptrs, words.to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _quantize_kernel(
    x_ptr, sx_b, sx_h, sx_t,
    c_ptr, sc_b, sc_h, sc_t,
    s_ptr, b_ptr, ss_b, ss_h, ss_t,
    sign_ptr, basis_ptr, row0_ptr, H, M, rot_norm,
    x2_ptr, c2_ptr, s2_ptr, b2_ptr, basis2_ptr,
    D: tl.constexpr, LOG_D: tl.constexpr, FLOAT: tl.constexpr, XFORM: tl.constexpr,
    RP: tl.constexpr, R: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, CHANNEL: tl.constexpr,
    BT: tl.constexpr, ROW0: tl.constexpr, PAIR: tl.constexpr,
):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    if PAIR:
        # Grid axis 2 picks the tensor: K (0) or V (1) of one layer, same spec, shapes and strides.
        if tl.program_id(2) == 1:
            x_ptr, c_ptr, s_ptr, b_ptr, basis_ptr = x2_ptr, c2_ptr, s2_ptr, b2_ptr, basis2_ptr
    # ROW0: the output rows start at a row read from the device (a static cache under a CUDA graph),
    # not at the pointers given; a negative row means nothing is written (no rows leave this step).
    if ROW0:
        row0 = tl.load(row0_ptr).to(tl.int64)
        M = tl.where(row0 >= 0, M, 0)
        row0 = tl.maximum(row0, 0)
    else:
        row0 = 0
    srow0 = row0 // GROUP if CHANNEL else row0  # channel-axis scales hold one row per group
    x_ptr += b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h
    c_ptr += b.to(tl.int64) * sc_b + h.to(tl.int64) * sc_h + row0 * sc_t
    s_ptr += b.to(tl.int64) * ss_b + h.to(tl.int64) * ss_h + srow0 * ss_t
    b_ptr += b.to(tl.int64) * ss_b + h.to(tl.int64) * ss_h + srow0 * ss_t
    basis_ptr += h.to(tl.int64) * D * R
    LEVELS: tl.constexpr = (1 << BITS) - 1
    W: tl.constexpr = (R * BITS + 31) // 32
    if CHANNEL:
        # One group of GROUP tokens: column min/max over the group, then codes block by block.
        d = tl.arange(0, D)
        lo = tl.full((D,), float("inf"), tl.float32)
        hi = tl.full((D,), float("-inf"), tl.float32)
        for r0 in range(0, GROUP, BT):
            rows = pid * GROUP + r0 + tl.arange(0, BT)
            x = _load_rows(x_ptr, rows, M, sx_t, sign_ptr, basis_ptr, rot_norm, D, LOG_D, BT, FLOAT, XFORM, RP, R)
            lo = tl.minimum(lo, tl.min(x, axis=0))
            hi = tl.maximum(hi, tl.max(x, axis=0))
        scale, bias = _scale_bias(lo, hi, LEVELS)
        tl.store(s_ptr + pid * ss_t + d, scale, mask=(d < D) & (pid * GROUP < M))
        tl.store(b_ptr + pid * ss_t + d, bias, mask=(d < D) & (pid * GROUP < M))
        for r0 in range(0, GROUP, BT):
            rows = pid * GROUP + r0 + tl.arange(0, BT)
            x = _load_rows(x_ptr, rows, M, sx_t, sign_ptr, basis_ptr, rot_norm, D, LOG_D, BT, FLOAT, XFORM, RP, R)
            q = _codes(x, scale.to(tl.float32)[None, :], bias.to(tl.float32)[None, :], LEVELS)
            _store_words(c_ptr, rows, M, sc_t, pack_codes(q, BT, RP, BITS), BT, RP, BITS, W)
    else:
        rows = pid * BT + tl.arange(0, BT)
        x = _load_rows(x_ptr, rows, M, sx_t, sign_ptr, basis_ptr, rot_norm, D, LOG_D, BT, FLOAT, XFORM, RP, R)
        if BITS == 0:
            r = tl.arange(0, RP)[None, :]
            tl.store(c_ptr + rows[:, None].to(tl.int64) * sc_t + r, _round_float(x, FLOAT).to(FLOAT), mask=(rows < M)[:, None] & (r < R))
        else:
            NG: tl.constexpr = RP // GROUP
            g = tl.reshape(x, (BT, NG, GROUP))
            scale, bias = _scale_bias(tl.min(g, axis=2), tl.max(g, axis=2), LEVELS)
            q = _codes(g, scale.to(tl.float32)[:, :, None], bias.to(tl.float32)[:, :, None], LEVELS)
            _store_words(c_ptr, rows, M, sc_t, pack_codes(tl.reshape(q, (BT, RP)), BT, RP, BITS), BT, RP, BITS, W)
            j = tl.arange(0, NG)[None, :]
            sb = rows[:, None].to(tl.int64) * ss_t + j
            mask = (rows < M)[:, None] & (j < R // GROUP)
            tl.store(s_ptr + sb, scale, mask=mask)
            tl.store(b_ptr + sb, bias, mask=mask)


def _operands(x: torch.Tensor, t: TensorSpec, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(codes or coefficients, scales, biases) of `out` as the kernel takes them."""
    codes = out["codes"] if quantizer(t) is not None else out["coeffs"]
    scales, biases = (out["scales"], out["biases"]) if quantizer(t) is not None else (codes, codes)
    if scales.stride() != biases.stride():
        raise ValueError("scales and biases must have the same strides")
    return codes, scales, biases


def _strides(a: torch.Tensor) -> tuple[int, ...]:
    """a's strides where they matter: along axes longer than 1 (a decode step's K and V come from
    transformers with different strides along their one token)."""
    return tuple(s if n > 1 else 0 for s, n in zip(a.stride(), a.shape))


def same_layout(x: torch.Tensor, x2: torch.Tensor, t: TensorSpec, out: dict[str, torch.Tensor],
                out2: dict[str, torch.Tensor]) -> bool:
    """Whether one launch can quantize x and x2 (K and V of a layer): the same shape, dtype and
    strides of the input and of every output array."""
    if x.shape != x2.shape or x.dtype != x2.dtype or _strides(x) != _strides(x2):
        return False
    # Equal strides settle it without _strides' per-axis pass (K and V buffers grow in step).
    return all(a.shape == a2.shape and (a.stride() == a2.stride() or _strides(a) == _strides(a2))
               for a, a2 in zip(_operands(x, t, out), _operands(x2, t, out2)))


def quantize_rows_triton(x: torch.Tensor, t: TensorSpec, float_dtype: torch.dtype, out: dict[str, torch.Tensor],
                         signs: torch.Tensor | None, rot_norm: float, basis: torch.Tensor | None,
                         row0: torch.Tensor | None = None, second: tuple | None = None) -> None:
    """Launch over x [B, H, M, D] into `out` (kvspec.layout arrays of M rows; see quantize.quantize_rows),
    or from row `row0` (int64 [1] on the device; negative: write nothing) of `out` when given.
    second: (x2, out2, basis2), a second tensor quantized in the same launch (`same_layout` as x)."""
    bsz, heads, m, d = x.shape
    xform = 2 if isinstance(t, LowRank) else (1 if signs is not None else 0)
    q = quantizer(t)
    width = t.rank if isinstance(t, LowRank) else d
    channel = q is not None and q.axis == "channel"
    codes, scales, biases = _operands(x, t, out)
    dummy = x.new_empty(1, dtype=torch.float32)
    basis = basis if basis is not None else dummy
    x2, codes2, scales2, biases2, basis2 = x, codes, scales, biases, basis
    if second is not None:
        x2, out2, basis2 = second
        codes2, scales2, biases2 = _operands(x2, t, out2)
        basis2 = basis2 if basis2 is not None else dummy
    bt = BT if channel or xform == 2 else min(BT, triton.next_power_of_2(m))
    grid = (triton.cdiv(m, q.group if channel else bt), bsz * heads, 1 if second is None else 2)
    _quantize_kernel[grid](
        x, *x.stride()[:3], codes, *codes.stride()[:3], scales, biases, *scales.stride()[:3],
        signs if signs is not None else dummy, basis, row0 if row0 is not None else dummy, heads, m, rot_norm,
        x2, codes2, scales2, biases2, basis2,
        D=d, LOG_D=d.bit_length() - 1, FLOAT=tl.float16 if float_dtype == torch.float16 else tl.bfloat16,
        XFORM=xform, RP=padded(width) if isinstance(t, LowRank) else d, R=width, BITS=0 if q is None else q.bits,
        GROUP=1 if q is None else q.group, CHANNEL=channel, BT=bt, ROW0=row0 is not None, PAIR=second is not None,
        # No fused multiply-adds: kvspec rounds x * c (rotation) before subtracting the bias.
        enable_fp_fusion=False,
    )
