"""kvspec numerics in torch ops: quantization, bit packing, Hadamard rotation (CPU and CUDA).

Every function follows kvspec/reference op by op, so codes, scales and biases are bit-identical to
the NumPy oracle: fp32 arithmetic, IEEE division, torch.round (half to even), fp16 scale and bias
computed first and codes computed from the stored values; the rotation is the fp32 butterfly FWHT.

Codes are uint32 words in kvspec. torch has only partial uint32 support, so packed words are held as
torch.int32 tensors carrying the same 32 bits (word 0x80000001 is int32 -2147483647). Convert with
`words_to_numpy` / `words_from_numpy`, which reinterpret the bits as NumPy uint32 without copying values.
Shapes follow kvspec.layout: x [..., T, D]; codes [..., T, ceil(D*bits/32)].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from kvspec.reference.quant import FP16_MAX
from kvspec.reference.quant import check_finite as reference_check_finite
from kvspec.reference.rotation import hadamard_signs, norm_factor

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_MASK32 = 0xFFFFFFFF


def float_dtype(name: str) -> torch.dtype:
    """The torch dtype of a spec's float dtype name ("fp16" or "bf16")."""
    try:
        return FLOAT_DTYPES[name]
    except KeyError:
        raise ValueError(f"float dtype must be fp16 or bf16, got {name!r}") from None


def round_to(x: torch.Tensor, name: str) -> torch.Tensor:
    """x rounded to the spec's float dtype (round to nearest, ties to even), in that dtype: x itself
    when already there. fp64 goes through fp32 as the reference does (one rounding each way)."""
    want = float_dtype(name)
    if x.dtype == want:
        return x
    return x.to(want) if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else x.float().to(want)


# --- quantization -------------------------------------------------------------------------------


def quantize_groups(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups along the last axis. x [..., G] -> codes int64 [..., G] (unpacked), scales/biases fp16 [...]."""
    x = x.float()
    # A device tensor, not a Python scalar: CUDA divides by a scalar as a multiply by its reciprocal.
    levels = _constant(float(2**bits - 1), torch.float32, x.device)
    bias = x.amin(dim=-1).half()
    span = torch.clamp_min(x.amax(dim=-1) - bias.float(), 0.0)
    scale = (span / levels).half()
    b32, s32 = bias.float().unsqueeze(-1), scale.float().unsqueeze(-1)
    # Division by a zero scale gives inf/nan; those groups are constant and get code 0 below.
    q = torch.round((x - b32) / s32)
    q = torch.where(s32 > 0, torch.minimum(torch.clamp_min(q, 0.0), levels), torch.zeros_like(q))
    return q.to(torch.int64), scale, bias


def quantize(x: torch.Tensor, bits: int, group: int, axis: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize x [..., T, D] by groups along D ("token") or along T ("channel"; T % group == 0).

    Returns (codes int32 words [..., T, W(D)], scales fp16, biases fp16) with scales/biases of shape
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
        xg = x.reshape(*lead, t // group, group, d).transpose(-1, -2)  # [..., T/G, D, G]
        codes, scales, biases = quantize_groups(xg, bits)
        codes = codes.transpose(-1, -2).reshape(*lead, t, d)
    else:
        raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
    return pack(codes, bits), scales, biases


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    bits: int,
    group: int,
    axis: str,
    dim: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reconstruction [..., T, dim] of `quantize`'s output, code * scale + bias, in `dtype` (fp32 or fp64)."""
    q = unpack(codes, bits, dim).to(dtype)
    s, b = scales.to(dtype), biases.to(dtype)
    *lead, t, d = q.shape
    if axis == "token":
        out = q.view(*lead, t, d // group, group) * s[..., None] + b[..., None]
    else:
        out = q.view(*lead, t // group, group, d) * s[..., None, :] + b[..., None, :]
    return out.view(*lead, t, d)


# --- packing ------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _layout(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Word index and bit shift (int64 on `device`) of each of n codes in a row; the row's word count.
    Cached per device, so decoding does not copy index tables to the GPU every step."""
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        offsets = torch.arange(n, dtype=torch.int64) * bits
        return (offsets // 32).to(device), (offsets % 32).to(device), -(-n * bits // 32)


@lru_cache(maxsize=256)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached 0-dim tensor on `device`."""
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        return torch.tensor(value, dtype=dtype, device=device)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., n] (each < 2**bits) into int32 words [..., ceil(n*bits/32)] (uint32 bits).

    Code i occupies bits [i*bits, i*bits + bits) of the row's little-endian bit stream; a code that
    straddles words (3 bits) puts its low part in word w and its high part in word w + 1.
    """
    n = codes.shape[-1]
    word, shift, words = _layout(n, bits, codes.device)
    shifted = codes.to(torch.int64) << shift  # at most 32 + bits - 1 bits: fits int64
    out = torch.zeros((*codes.shape[:-1], words + 1), dtype=torch.int64, device=codes.device)
    idx = word.expand_as(shifted)
    # Codes occupy disjoint bits, so adding them is OR-ing them.
    out.scatter_add_(-1, idx, shifted & _MASK32)
    out.scatter_add_(-1, idx + 1, shifted >> 32)
    return _to_int32_bits(out[..., :words])


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack int32 words [..., W] (uint32 bits) into n codes [..., n] (int64)."""
    word, shift, count = _layout(n, bits, words.device)
    if words.shape[-1] != count:
        raise ValueError(f"{n} codes of {bits} bits need {count} words per row, got {words.shape[-1]}")
    w = words.to(torch.int64) & _MASK32
    if 32 % bits == 0:
        # No code straddles a word: shift every word by each in-word offset.
        per_word = 32 // bits
        return ((w[..., None] >> shift[:per_word]) & (2**bits - 1)).flatten(-2)[..., :n]
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)  # a zero word for straddling reads
    both = w[..., word] | (w[..., word + 1] << 32)
    return (both >> shift) & (2**bits - 1)


def _to_int32_bits(u: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same low 32 bits."""
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)


def words_to_numpy(words: torch.Tensor) -> np.ndarray:
    """int32 words (uint32 bits) -> NumPy uint32, same bits."""
    return words.detach().cpu().contiguous().numpy().view(np.uint32)


def words_from_numpy(words: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """NumPy uint32 words -> int32 torch tensor with the same bits."""
    return torch.from_numpy(np.ascontiguousarray(words, dtype=np.uint32).view(np.int32)).to(device)


# --- rotation -----------------------------------------------------------------------------------


def _rotation_dtype(x: torch.Tensor) -> torch.dtype:
    # Codes are always rotated in fp32; fp64 inputs (attention on fp64 models) stay fp64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform along the last axis (fp32, or fp64 for fp64 input;
    Sylvester order, butterflies)."""
    x = x.to(_rotation_dtype(x))
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two length, got {d}")
    h = 1
    while h < d:
        y = x.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).reshape(x.shape)
        h *= 2
    return x


def _signs_and_factor(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotation_constants(x.shape[-1], seed, _rotation_dtype(x), x.device)


@lru_cache(maxsize=64)
def _rotation_constants(dim: int, seed: int, dt: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # A 0-dim tensor, so the fp32 multiply is fp32 x fp32 exactly as in NumPy.
    c = float(norm_factor(dim)) if dt == torch.float32 else 1.0 / np.sqrt(dim)
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        return torch.from_numpy(hadamard_signs(dim, seed)).to(device=device, dtype=dt), torch.tensor(c, dtype=dt, device=device)


def rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Randomized Hadamard rotation of the last axis of x [..., D]: fwht(x * signs) * c; fp32 out
    (fp64 for fp64 input)."""
    signs, c = _signs_and_factor(x, seed)
    return fwht(x.to(signs.dtype) * signs) * c


def unrotate(y: torch.Tensor, seed: int) -> torch.Tensor:
    """Inverse of `rotate`: fwht(y) * c * signs; fp32 out (fp64 for fp64 input)."""
    signs, c = _signs_and_factor(y, seed)
    return fwht(y.to(signs.dtype)) * c * signs


# --- input checks -------------------------------------------------------------------------------


def finite_peak(x: torch.Tensor, rotated: bool = False) -> torch.Tensor:
    """A 0-dim tensor on x's device that x is acceptable to quantize iff it is <= FP16_MAX: the largest
    |value| (fp32, or fp64 for fp64 x: exact), with `rotated` the largest token-row L2 norm (fp64, as
    kvspec.reference.check_finite computes it; it bounds every |value| too). NaN anywhere gives NaN,
    which fails the comparison, and Inf gives Inf. bf16 holds nothing in (65504, 65536), so one bound
    serves every dtype. Runs on every decode step: one reduction (rotated: the row norms, then their
    max), and stores fold a step's peak into a running maximum, one more op."""
    if rotated:
        return x.double().square().sum(-1).sqrt().amax()
    # fp32 holds every fp16 and bf16 value exactly
    return torch.linalg.vector_norm(x, ord=float("inf"), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def nonfinite_flag(x: torch.Tensor, rotated: bool = False) -> torch.Tensor:
    """A 0-dim bool tensor on x's device: True if x holds NaN/Inf or a value beyond the fp16 range
    (with `rotated`, also a token row whose L2 norm is beyond it; see kvspec.reference.check_finite)."""
    return ~(finite_peak(x, rotated) <= FP16_MAX)


def check_finite(x: torch.Tensor, where: str = "", rotated: bool = False) -> None:
    """Raise kvspec's NonFiniteError naming the first bad index (as kvspec.reference.check_finite)."""
    if bool(nonfinite_flag(x, rotated)):
        reference_check_finite(x.detach().float().cpu().numpy(), where, rotated)
