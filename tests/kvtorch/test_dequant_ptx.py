"""kvtorch.kernels._jit's packed-fp16 PTX dequantization (4- and 8-bit words), bit for bit.

code * scale + bias as one fused multiply-add rounded once to fp16 is what float64 arithmetic
rounded to fp16 gives (the product and sum of a code below 256 and two fp16 values are exact in
float64), so the kernels' values must equal numpy's bit for bit: every code value, fresh seeds,
constant groups (scale 0), scales and biases at fp16's extremes (where the result overflows to inf
both ways), subnormals. Inline PTX runs only on a CUDA GPU: skipped elsewhere. The column orders
that 4-bit tiles are read in (pair_order, stream_order) run everywhere (interpreted on a CPU).
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from kvtorch.kernels._jit import dequant4_pairs, dequant8_words, pair_order, stream_order  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, b_ptr, out_ptr, BN: tl.constexpr, WP: tl.constexpr, BITS: tl.constexpr):
    r, c = tl.arange(0, BN), tl.arange(0, WP)
    words = tl.load(w_ptr + r[:, None] * WP + c[None, :])
    s = tl.load(s_ptr + r[:, None] * WP + c[None, :])
    b = tl.load(b_ptr + r[:, None] * WP + c[None, :])
    CPW: tl.constexpr = 32 // BITS
    x = dequant4_pairs(words, s, b) if BITS == 4 else dequant8_words(words, s, b)
    j = tl.arange(0, WP * CPW)
    tl.store(out_ptr + r[:, None] * (WP * CPW) + j[None, :], x)


def expected(words: np.ndarray, s: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """fp16 values [BN, WP * 32 / bits]: 8 bits in stream order (code i at bits [i*bits, i*bits + bits)),
    4 bits in dequant4_pairs' order (column 2k + e of a word holds its code k + 4e)."""
    cpw = 32 // bits
    order = np.arange(cpw) if bits == 8 else np.array([k + 4 * e for k in range(4) for e in range(2)])
    shifts = order.astype(np.uint32) * bits
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
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: inline PTX")
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


@triton.jit
def _orders_kernel(x_ptr, p_ptr, back_ptr, R: tl.constexpr, D: tl.constexpr):
    idx = tl.arange(0, R)[:, None] * D + tl.arange(0, D)[None, :]
    p = pair_order(tl.load(x_ptr + idx), R, D)
    tl.store(p_ptr + idx, p)
    tl.store(back_ptr + idx, stream_order(p, R, D))


@pytest.mark.parametrize("d", [64, 128, 256])
def test_pair_order_is_dequant4_pairs_column_order_and_stream_order_undoes_it(d):
    x = torch.randn(16, d, device=DEVICE)
    p, back = torch.empty_like(x), torch.empty_like(x)
    _orders_kernel[(1,)](x, p, back, R=16, D=d)
    order = [8 * w + k + 4 * e for w in range(d // 8) for k in range(4) for e in range(2)]
    assert torch.equal(p, x[:, order]) and torch.equal(back, x)
