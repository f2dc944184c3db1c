"""kvspec numerics in MLX ops: float rounding, quantization, bit packing, Hadamard rotation, projection.

Every function follows kvspec/reference op by op, so codes, scales and biases are bit-identical to the
NumPy oracle: fp32 arithmetic, IEEE division, mx.round (half to even), fp16 scale and bias computed
first and codes computed from the stored values; the rotation is the fp32 butterfly FWHT with the
signs of `kvspec.reference.hadamard_signs`. (MLX's CPU division, rounding and fp16/bf16 casts were
checked against NumPy bit for bit; tests/kvmlx/test_ops.py keeps checking them through the oracle.)

Shapes follow kvspec.layout: x [..., T, D]; codes uint32 [..., T, ceil(D*bits/32)] packed along D,
least significant bits first. That packing is exactly MLX's own affine layout for bits 2, 3, 4 and 8,
so `mlx_layout` codes can go straight into mx.quantized_matmul / mx.dequantize.
"""

from __future__ import annotations

import os
from functools import cache
from math import gcd

import mlx.core as mx
import numpy as np

from kvspec.reference.quant import FP16_MAX
from kvspec.reference.quant import check_finite as reference_check_finite
from kvspec.reference.rotation import hadamard_signs, norm_factor

FLOAT_DTYPES = {"fp16": mx.float16, "bf16": mx.bfloat16}
MLX_GROUPS = (32, 64, 128)


def float_dtype(name: str) -> mx.Dtype:
    """The MLX dtype of a spec's float dtype name ("fp16" or "bf16")."""
    try:
        return FLOAT_DTYPES[name]
    except KeyError:
        raise ValueError(f"float dtype must be fp16 or bf16, got {name!r}") from None


def round_to(x: mx.array, name: str) -> mx.array:
    """x rounded to the spec's float dtype (to nearest, ties to even), returned in that dtype."""
    return x.astype(mx.float32).astype(float_dtype(name))


def check_finite(x: mx.array, where: str = "", rotated: bool = False) -> None:
    """Raise kvspec's NonFiniteError (naming `where` and the index) on NaN/Inf or |x| > fp16 max,
    and with `rotated` on a token row whose L2 norm is beyond it (kvspec.reference.check_finite).

    One scalar sync; the NumPy oracle only runs to word the error once something is wrong."""
    bad = mx.any(mx.logical_not(mx.isfinite(x)) | (mx.abs(x) > FP16_MAX))
    if rotated:
        bad = bad | mx.any(mx.sqrt(mx.sum(mx.square(x.astype(mx.float32)), axis=-1)) > FP16_MAX)
    if bad.item():
        reference_check_finite(np.array(x.astype(mx.float32)), where, rotated)


# --- quantization -------------------------------------------------------------------------------


def quantize_groups(x: mx.array, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """Groups along the last axis. x [..., G] -> codes uint32 [..., G] (unpacked), scales/biases fp16 [...]."""
    x = x.astype(mx.float32)
    levels = 2**bits - 1
    bias = mx.min(x, axis=-1).astype(mx.float16)
    span = mx.maximum(mx.max(x, axis=-1) - bias.astype(mx.float32), 0.0)
    scale = (span / levels).astype(mx.float16)
    b32, s32 = bias.astype(mx.float32)[..., None], scale.astype(mx.float32)[..., None]
    # A constant group has scale 0: divide by 1 instead and give it code 0 below.
    q = mx.round((x - b32) / mx.where(s32 > 0, s32, 1.0))
    q = mx.where(s32 > 0, mx.clip(q, 0, levels), 0.0)
    return q.astype(mx.uint32), scale, bias


def quantize(x: mx.array, bits: int, group: int, axis: str) -> tuple[mx.array, mx.array, mx.array]:
    """Quantize x [..., T, D] by groups along D ("token") or along T ("channel"; T % group == 0).

    Returns (codes uint32 [..., T, W(D)], scales fp16, biases fp16), scales/biases of shape
    [..., T, D/group] (token axis) or [..., T/group, D] (channel axis), as kvspec.reference.quantize.
    """
    *lead, t, d = x.shape
    if axis == "token":
        if d % group:
            raise ValueError(f"group {group} does not divide head dim {d}")
        codes, scales, biases = quantize_groups(x.reshape(*lead, t, d // group, group), bits)
        codes = codes.reshape(*lead, t, d)
    elif axis == "channel":
        if t % group:
            raise ValueError(f"channel-axis quantization needs whole groups: {t} tokens, group {group}")
        xg = mx.swapaxes(x.reshape(*lead, t // group, group, d), -1, -2)  # [..., T/G, D, G]
        codes, scales, biases = quantize_groups(xg, bits)
        codes = mx.swapaxes(codes, -1, -2).reshape(*lead, t, d)
    else:
        raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
    return pack(codes, bits), scales, biases


def dequantize(
    codes: mx.array, scales: mx.array, biases: mx.array, bits: int, group: int, axis: str, dim: int
) -> mx.array:
    """fp32 reconstruction [..., T, dim]: f32(scale) * code + f32(bias), per kvspec.reference.quant."""
    c = unpack(codes, bits, dim).astype(mx.float32)
    s, b = scales.astype(mx.float32), biases.astype(mx.float32)
    *lead, t, d = c.shape
    if axis == "token":
        out = c.reshape(*lead, t, d // group, group) * s[..., None] + b[..., None]
        return out.reshape(*lead, t, d)
    out = c.reshape(*lead, t // group, group, d) * s[..., None, :] + b[..., None, :]
    return out.reshape(*lead, t, d)


def mlx_layout(bits: int, group: int, dim: int) -> bool:
    """Whether token-axis codes of rows of `dim` values are exactly MLX affine quantization."""
    return group in MLX_GROUPS and dim % group == 0 and dim * bits % 32 == 0


# --- packing ------------------------------------------------------------------------------------


@cache
def _pack_table(bits: int) -> tuple[int, int, mx.array, mx.array, mx.array]:
    """A block of lcm(bits, 32) bits: codes per block, words per block, and per (code, word) the
    left and right shifts that place the code's bits in that word (valid where the mask is set)."""
    block_bits = bits * 32 // gcd(bits, 32)
    per_block, words = block_bits // bits, block_bits // 32
    offset = bits * np.arange(per_block)[:, None] - 32 * np.arange(words)[None, :]  # [C, Wb]
    valid = (offset > -bits) & (offset < 32)
    left = np.where(valid & (offset >= 0), offset, 0).astype(np.uint32)
    right = np.where(valid & (offset < 0), -offset, 0).astype(np.uint32)
    return per_block, words, mx.array(left), mx.array(right), mx.array(valid)


def pack(codes: mx.array, bits: int) -> mx.array:
    """Pack codes [..., n] (each < 2**bits) into uint32 words [..., ceil(n*bits/32)], LSB first."""
    codes = codes.astype(mx.uint32)
    *lead, n = codes.shape
    per_block, words, left, right, valid = _pack_table(bits)
    blocks = -(-n // per_block)
    if blocks * per_block != n:
        codes = mx.concatenate([codes, mx.zeros((*lead, blocks * per_block - n), mx.uint32)], axis=-1)
    c = codes.reshape(*lead, blocks, per_block, 1)
    # Bit ranges of different codes never overlap, so a sum is their bitwise OR.
    placed = mx.where(valid, (c << left) >> right, mx.array(0, mx.uint32))
    out = mx.sum(placed, axis=-2).reshape(*lead, blocks * words)
    return out[..., : -(-n * bits // 32)]


def unpack(words: mx.array, bits: int, n: int) -> mx.array:
    """Unpack uint32 words [..., W] into n codes uint32 [..., n]."""
    mask = mx.array(2**bits - 1, mx.uint32)
    *lead, w = words.shape
    if 32 % bits == 0:
        shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
        codes = (words[..., None] >> shifts) & mask
        return codes.reshape(*lead, w * (32 // bits))[..., :n]
    start = bits * np.arange(n)
    first, shift = start // 32, (start % 32).astype(np.uint32)
    straddles = shift + bits > 32
    second = np.minimum(first + 1, w - 1)
    lo = mx.take(words, mx.array(first), axis=-1) >> mx.array(shift)
    # A straddling code takes its high bits from the low end of the next word.
    hi = mx.take(words, mx.array(second), axis=-1) << mx.array(np.where(straddles, 32 - shift, 0).astype(np.uint32))
    hi = mx.where(mx.array(straddles), hi, mx.array(0, mx.uint32))
    return (lo | hi) & mask


# --- rotation -----------------------------------------------------------------------------------


@cache
def _signs(dim: int, seed: int) -> mx.array:
    return mx.array(hadamard_signs(dim, seed))


def fwht(x: mx.array) -> mx.array:
    """Unnormalized Walsh-Hadamard transform along the last axis (fp32 butterfly, Sylvester order)."""
    x = x.astype(mx.float32)
    shape, d = x.shape, x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two length, got {d}")
    h = 1
    while h < d:
        y = x.reshape(*shape[:-1], d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = mx.stack([a + b, a - b], axis=-2).reshape(shape)
        h *= 2
    return x


def rotate(x: mx.array, seed: int) -> mx.array:
    """Randomized Hadamard rotation of the last axis of x [..., D]; fp32 out, bit-exact with kvspec."""
    d = x.shape[-1]
    return fwht(x.astype(mx.float32) * _signs(d, seed)) * float(norm_factor(d))


def unrotate(y: mx.array, seed: int) -> mx.array:
    """Inverse of `rotate` (fp32)."""
    d = y.shape[-1]
    return fwht(y) * float(norm_factor(d)) * _signs(d, seed)


# --- low rank -----------------------------------------------------------------------------------


def _tf32_high(x: mx.array) -> mx.array:
    """x (fp32) with the low 13 mantissa bits cleared: exactly representable in TF32 (10-bit mantissa)."""
    return mx.view(mx.view(x, mx.uint32) & mx.array(0xFFFFE000, mx.uint32), mx.float32)


def matmul_fp32(a: mx.array, b: mx.array, split: bool | None = None) -> mx.array:
    """a @ b (fp32) at fp32 accuracy also where MLX runs fp32 GEMMs as TF32 (MLX_ENABLE_TF32, on by
    default: its CUDA build, M5-class Apple GPUs), whose ~1e-3 relative error flips stored rank
    coefficients away from kvspec's. split (default: on a GPU unless MLX_ENABLE_TF32=0) sums three
    GEMMs of TF32-exact high parts and remainders, hi.hi + hi.lo + lo.hi: relative error ~2^-21
    instead of 2^-11, for 3 GEMMs and 8 elementwise ops instead of one GEMM."""
    if split is None:
        split = mx.default_device() != mx.cpu and os.environ.get("MLX_ENABLE_TF32", "1") != "0"
    if not split:
        return a @ b
    ah, bh = _tf32_high(a), _tf32_high(b)
    return ah @ bh + (ah @ (b - bh) + (a - ah) @ bh)


def project(x: mx.array, basis: mx.array, stored: bool = False) -> mx.array:
    """x [B, H, T, D], basis [H, D, r] -> coefficients [B, H, T, r] in fp32. stored: coefficients
    the cache keeps (fp32 accuracy, see matmul_fp32); queries take the plain GEMM, as scores do."""
    x, basis = x.astype(mx.float32), basis.astype(mx.float32)
    return matmul_fp32(x, basis) if stored else x @ basis


def coefficients(t, compressed: dict[str, mx.array]) -> mx.array:
    """A LowRank tensor's stored coefficients [B, H, n, r] in fp32 (dequantized for hybrids)."""
    if t.coeff is None:
        return compressed["coeffs"].astype(mx.float32)
    c = compressed
    return dequantize(c["codes"], c["scales"], c["biases"], t.coeff.bits, t.coeff.group, "token", t.rank)


def reconstruct(c: mx.array, basis: mx.array) -> mx.array:
    """coefficients [B, H, T, r], basis [H, D, r] -> [B, H, T, D] in fp32."""
    return c.astype(mx.float32) @ mx.swapaxes(basis.astype(mx.float32), -1, -2)
