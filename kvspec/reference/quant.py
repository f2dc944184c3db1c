"""Affine group quantization and bit packing: the normative numerics (every backend must match the codes).

Quantizing one group x (G values, any float dtype) to b bits, L = 2**b - 1:
 1. Work in fp32 (the input is converted exactly; fp16 and bf16 fit in fp32).
 2. lo = min(x), hi = max(x).
 3. bias  = fp16(lo)                                   (round to nearest, ties to even)
 4. scale = fp16(max(hi - f32(bias), 0) / L)           (fp32 subtraction and IEEE division, then fp16)
 5. code  = clamp(rint((x - f32(bias)) / f32(scale)), 0, L)   where scale > 0, else 0
    (fp32 subtraction and correctly rounded fp32 division; rint rounds half to even)
 6. x_hat = f32(scale) * code + f32(bias)
Codes depend only on the stored fp16 scale and bias, so a decoder needs nothing else. A constant
group (hi == lo) has scale 0 and every code 0: it reconstructs as fp16(lo), exact whenever lo is
representable in fp16, with no division by zero. The error bound is
|x - x_hat| <= scale/2 + the fp16 rounding of bias and scale (see `error_bound`).
Inputs must be finite and within the fp16 range (|x| <= 65504): `check_finite` names the first bad
position otherwise. A tensor that is rotated first must also have every token row's L2 norm within
that range, since the rotation can gather a whole row into one coordinate (|rotate(x)_i| <= |x|_2).

Packing: a row of n codes becomes ceil(n*b/32) uint32 words. Code i occupies bits [i*b, i*b + b) of
the row's little-endian bit stream, least significant bit first; word w holds stream bits
[32w, 32w + 32) (bit j of the word is stream bit 32w + j). 3-bit codes therefore straddle words
(code 10 uses bits 30-31 of word 0 and bit 0 of word 1). Unused trailing bits are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP16_MAX = 65504.0


class NonFiniteError(ValueError):
    """Input that cannot be quantized: NaN, Inf, or beyond the fp16 range of scales and biases."""


@dataclass(frozen=True)
class Quantized:
    """Codes packed into uint32 words with fp16 scales and biases (shapes in kvspec.layout)."""

    codes: np.ndarray
    scales: np.ndarray
    biases: np.ndarray


def check_finite(x: np.ndarray, where: str = "", rotated: bool = False) -> None:
    """Raise NonFiniteError naming the first index of a NaN/Inf or an out-of-fp16-range value
    (with `rotated`, also the first token row whose L2 norm is beyond the fp16 range)."""
    x = np.asarray(x)
    place = f" in {where}" if where else ""
    bad = ~np.isfinite(x) | (np.abs(np.where(np.isfinite(x), x, 0)) > FP16_MAX)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        value = x[idx]
        what = "NaN/Inf" if not np.isfinite(value) else f"{float(value):.6g} (beyond fp16 range)"
        raise NonFiniteError(f"cannot quantize {what}{place} at index {idx} (B, H, T, D)")
    if rotated:
        norms = np.sqrt((x.astype(np.float64) ** 2).sum(-1))
        if (norms > FP16_MAX).any():
            idx = tuple(int(i) for i in np.argwhere(norms > FP16_MAX)[0])
            raise NonFiniteError(
                f"cannot rotate and quantize the row{place} at index {idx} (B, H, T): its L2 norm "
                f"{norms[idx]:.6g} could land beyond the fp16 range; drop 'rot' from the spec"
            )


def quantize_groups(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize groups along the last axis.

    x: [..., G] float. Returns codes uint32 [..., G] (unpacked), scales fp16 [...], biases fp16 [...].
    """
    x = np.asarray(x, dtype=np.float32)
    levels = np.float32(2**bits - 1)
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    bias = lo.astype(np.float16)
    span = np.maximum(hi - bias.astype(np.float32), np.float32(0))
    scale = (span / levels).astype(np.float16)
    b32, s32 = bias.astype(np.float32)[..., None], scale.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((x - b32) / s32)
    q = np.where(s32 > 0, np.clip(q, 0, levels), 0)
    return q.astype(np.uint32), scale, bias


def dequantize_groups(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """Inverse of quantize_groups in float64: codes [..., G], scales/biases [...] -> [..., G]."""
    return codes.astype(np.float64) * scales.astype(np.float64)[..., None] + biases.astype(np.float64)[..., None]


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes [..., n] (each < 2**bits) into uint32 words [..., ceil(n*bits/32)]."""
    codes = np.asarray(codes, dtype=np.uint64)
    n = codes.shape[-1]
    stream = (codes[..., None] >> np.arange(bits, dtype=np.uint64)) & 1  # [..., n, bits]
    stream = stream.reshape(*codes.shape[:-1], n * bits)
    pad = -(n * bits) % 32
    stream = np.concatenate([stream, np.zeros((*codes.shape[:-1], pad), np.uint64)], axis=-1)
    words = stream.reshape(*codes.shape[:-1], (n * bits + pad) // 32, 32) << np.arange(32, dtype=np.uint64)
    return words.sum(axis=-1).astype(np.uint32)


def unpack(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Unpack uint32 words [..., W] into n codes [..., n] (uint32)."""
    words = np.asarray(words, dtype=np.uint64)
    stream = (words[..., None] >> np.arange(32, dtype=np.uint64)) & 1  # [..., W, 32]
    stream = stream.reshape(*words.shape[:-1], words.shape[-1] * 32)[..., : n * bits]
    stream = stream.reshape(*words.shape[:-1], n, bits) << np.arange(bits, dtype=np.uint64)
    return stream.sum(axis=-1).astype(np.uint32)


def quantize(x: np.ndarray, bits: int, group: int, axis: str) -> Quantized:
    """Quantize x [..., T, D] by groups along D ("token") or along T ("channel"; T % group == 0).

    Returns codes uint32 [..., T, ceil(D*bits/32)] packed along D, and fp16 scales/biases of shape
    [..., T, D/group] (token) or [..., T/group, D] (channel).
    """
    x = np.asarray(x)
    *lead, t, d = x.shape
    if axis == "token":
        if d % group:
            raise ValueError(f"group {group} does not divide head dim {d}")
        codes, scales, biases = quantize_groups(x.reshape(*lead, t, d // group, group), bits)
        codes = codes.reshape(*lead, t, d)
    elif axis == "channel":
        if t % group:
            raise ValueError(f"channel-axis quantization needs whole groups: {t} tokens, group {group}")
        xg = np.swapaxes(x.reshape(*lead, t // group, group, d), -1, -2)  # [..., T/G, D, G]
        codes, scales, biases = quantize_groups(xg, bits)
        codes = np.swapaxes(codes, -1, -2).reshape(*lead, t, d)
    else:
        raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
    return Quantized(pack(codes, bits), scales, biases)


def dequantize(q: Quantized, bits: int, group: int, axis: str, dim: int) -> np.ndarray:
    """Float64 reconstruction [..., T, dim] of `quantize`'s output."""
    codes = unpack(q.codes, bits, dim)
    *lead, t, d = codes.shape
    if axis == "token":
        out = dequantize_groups(codes.reshape(*lead, t, d // group, group), q.scales, q.biases)
        return out.reshape(*lead, t, d)
    cg = np.swapaxes(codes.reshape(*lead, t // group, group, d), -1, -2)
    out = dequantize_groups(cg, q.scales, q.biases)
    return np.swapaxes(out, -1, -2).reshape(*lead, t, d)


def error_bound(x: np.ndarray, bits: int, group: int, axis: str) -> np.ndarray:
    """Per-element bound on |x - dequantize(quantize(x))|: half a step plus fp16 rounding of the
    stored bias and scale (the top code can sit L half-ulps of the scale away)."""
    x = np.asarray(x, dtype=np.float64)
    levels = 2**bits - 1
    if axis == "token":
        *lead, t, d = x.shape
        g = x.reshape(*lead, t, d // group, group)
        lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
        shape_back = lambda a: np.broadcast_to(a, g.shape).reshape(x.shape)  # noqa: E731
    else:
        *lead, t, d = x.shape
        g = x.reshape(*lead, t // group, group, d)
        lo, hi = g.min(-2, keepdims=True), g.max(-2, keepdims=True)
        shape_back = lambda a: np.broadcast_to(a, g.shape).reshape(x.shape)  # noqa: E731
    step = (hi - lo) / levels
    ulp = lambda v: np.spacing(np.abs(v).astype(np.float16)).astype(np.float64)  # noqa: E731
    bound = step / 2 + ulp(lo) + levels * ulp(step) + 1e-7 * (np.abs(lo) + np.abs(hi))
    return shape_back(bound)
