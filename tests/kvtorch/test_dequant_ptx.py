"""kvtorch.kernels._jit's packed-fp16 PTX dequantization (4- and 8-bit words), bit for bit.

code * scale + bias as one fused multiply-add rounded once to fp16 is what float64 arithmetic
rounded to fp16 gives (the product and sum of a code below 256 and two fp16 values are exact in
float64), so the kernels' values must equal numpy's bit for bit: every code value, fresh seeds,
constant groups (scale 0), scales and biases at fp16's extremes (where the result overflows to inf
both ways), subnormals. Inline PTX runs only on a CUDA GPU: skipped elsewhere.
"""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: inline PTX")]

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from kvtorch.kernels._jit import dequant4_words, dequant8_words  # noqa: E402


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, b_ptr, out_ptr, BN: tl.constexpr, WP: tl.constexpr, BITS: tl.constexpr):
    r, c = tl.arange(0, BN), tl.arange(0, WP)
    words = tl.load(w_ptr + r[:, None] * WP + c[None, :])
    s = tl.load(s_ptr + r[:, None] * WP + c[None, :])
    b = tl.load(b_ptr + r[:, None] * WP + c[None, :])
    CPW: tl.constexpr = 32 // BITS
    x = dequant4_words(words, s, b) if BITS == 4 else dequant8_words(words, s, b)
    j = tl.arange(0, WP * CPW)
    tl.store(out_ptr + r[:, None] * (WP * CPW) + j[None, :], x)


def expected(words: np.ndarray, s: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """fp16 values [BN, WP * 32 / bits] in stream order (code i at bits [i*bits, i*bits + bits))."""
    cpw = 32 // bits
    shifts = np.arange(cpw, dtype=np.uint32) * bits
    codes = (words.view(np.uint32)[..., None] >> shifts) & ((1 << bits) - 1)
    exact = codes.astype(np.float64) * s.astype(np.float64)[..., None] + b.astype(np.float64)[..., None]
    with np.errstate(over="ignore"):
        return exact.astype(np.float16).reshape(words.shape[0], -1)


def run(words, s, b, bits):
    bn, wp = words.shape
    out = torch.empty(bn, wp * 32 // bits, dtype=torch.float16, device="cuda")
    args = [torch.from_numpy(np.ascontiguousarray(x)).cuda() for x in (words, s, b)]
    _dequant_kernel[(1,)](*args, out, BN=bn, WP=wp, BITS=bits)
    return out.cpu().numpy()


def scales_and_biases(rng, shape, kind):
    if kind == "random":
        return (rng.random(shape) * 0.05).astype(np.float16), (rng.standard_normal(shape) * 2).astype(np.float16)
    if kind == "constant":  # a constant group: scale 0, every value is the bias
        return np.zeros(shape, np.float16), rng.standard_normal(shape).astype(np.float16)
    if kind == "extreme":  # fp16's largest and smallest magnitudes, both signs; some sums overflow
        pool = np.array([65504, -65504, 6.1e-5, -6.1e-5, 6e-8, -6e-8, 1024, 0.5, -0.0], np.float16)
        return rng.choice(pool, shape), rng.choice(pool, shape)
    raise ValueError(kind)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["random", "constant", "extreme"])
def test_ptx_dequantization_is_one_rounding_of_the_exact_value(bits, kind):
    seed = np.random.SeedSequence().entropy % 2**32
    rng = np.random.default_rng(seed)
    bn, wp = 64, 16
    words = rng.integers(-(2**31), 2**31, (bn, wp), dtype=np.int64).astype(np.int32)
    words[0] = -1  # every code at its largest value
    words[1] = 0
    s, b = scales_and_biases(rng, (bn, wp), kind)
    got, want = run(words, s, b, bits), expected(words, s, b, bits)
    same = (got.view(np.uint16) == want.view(np.uint16)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), f"seed {seed}: {(~same).sum()} of {same.size} values differ, first at {np.argwhere(~same)[0]}"
