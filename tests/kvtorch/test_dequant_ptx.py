"""kvtorch.kernels._jit's packed-fp16 PTX dequantization (4- and 8-bit words), bit for bit.

code * scale + bias as one fused multiply-add rounded once to fp16 is what float64 arithmetic
rounded to fp16 gives (the product and sum of a code below 256 and two fp16 values are exact in
float64), so the kernels' values must equal numpy's bit for bit: every code value, fresh seeds,
constant groups (scale 0), scales and biases at fp16's extremes (where the result overflows to inf
both ways), subnormals. Inline PTX runs only on a CUDA GPU: skipped elsewhere. The column orders
that 4-bit tiles are read in (mma_columns / mma_order for keys, value_order for values) run
everywhere (interpreted on a CPU).
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from kvtorch.kernels._jit import (  # noqa: E402
    dequant4_mma,
    dequant4_pairs,
    dequant4_words,
    dequant8_words,
    mma_columns,
    mma_order,
    stream_order,
    value_order,
    value_stream_order,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, b_ptr, out_ptr, BN: tl.constexpr, WP: tl.constexpr, BITS: tl.constexpr,
                    ORDER: tl.constexpr):
    r, c = tl.arange(0, BN), tl.arange(0, WP)
    words = tl.load(w_ptr + r[:, None] * WP + c[None, :])
    s = tl.load(s_ptr + r[:, None] * WP + c[None, :])
    b = tl.load(b_ptr + r[:, None] * WP + c[None, :])
    CPW: tl.constexpr = 32 // BITS
    if BITS == 8:
        x = dequant8_words(words, s, b)
    elif ORDER == "mma":
        x = dequant4_mma(words, s, b)
    elif ORDER == "pairs":
        x = dequant4_pairs(words, s, b)
    else:
        x = dequant4_words(words, s, b)
    j = tl.arange(0, WP * CPW)
    tl.store(out_ptr + r[:, None] * (WP * CPW) + j[None, :], x)


def mma_stream_columns(d: int) -> list[int]:
    """Stream column of each of `mma_columns`' columns: column 32a + 16e + 4c + k holds code k + 4e of
    word 4a + c, whose stream column is 8 (4a + c) + k + 4e."""
    return [8 * (4 * a + c) + k + 4 * e for a in range(d // 32) for e in range(2) for c in range(4) for k in range(4)]


def expected(words: np.ndarray, s: np.ndarray, b: np.ndarray, bits: int, order: str = "stream") -> np.ndarray:
    """fp16 values [BN, WP * 32 / bits]: in stream order (code i at bits [i*bits, i*bits + bits)), 4 bits
    in dequant4_pairs' order ("pairs": column 2k + e of a word holds its code k + 4e) or in
    dequant4_mma's ("mma": `mma_stream_columns`)."""
    mma = order == "mma"
    cpw = 32 // bits
    order = np.array([k + 4 * e for k in range(4) for e in range(2)]) if order == "pairs" else np.arange(cpw)
    shifts = order.astype(np.uint32) * bits
    codes = (words.view(np.uint32)[..., None] >> shifts) & ((1 << bits) - 1)
    exact = codes.astype(np.float64) * s.astype(np.float64)[..., None] + b.astype(np.float64)[..., None]
    with np.errstate(over="ignore"):
        values = exact.astype(np.float16).reshape(words.shape[0], -1)
    return values[:, mma_stream_columns(values.shape[1])] if mma else values


def run(words, s, b, bits, order="stream"):
    bn, wp = words.shape
    out = torch.empty(bn, wp * 32 // bits, dtype=torch.float16, device="cuda")
    args = [torch.from_numpy(np.ascontiguousarray(x)).cuda() for x in (words, s, b)]
    _dequant_kernel[(1,)](*args, out, BN=bn, WP=wp, BITS=bits, ORDER=order)
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


@pytest.mark.parametrize("bits,order", [(4, "pairs"), (4, "mma"), (4, "stream"), (8, "stream")])
@pytest.mark.parametrize("kind", ["random", "constant", "extreme"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: inline PTX")
def test_ptx_dequantization_is_one_rounding_of_the_exact_value(bits, order, kind):
    seed = np.random.SeedSequence().entropy % 2**32
    rng = np.random.default_rng(seed)
    bn, wp = 64, 16
    words = rng.integers(-(2**31), 2**31, (bn, wp), dtype=np.int64).astype(np.int32)
    words[0] = -1  # every code at its largest value
    words[1] = 0
    s, b = scales_and_biases(rng, (bn, wp), kind)
    got, want = run(words, s, b, bits, order), expected(words, s, b, bits, order)
    same = (got.view(np.uint16) == want.view(np.uint16)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), f"seed {seed}: {(~same).sum()} of {same.size} values differ, first at {np.argwhere(~same)[0]}"


@triton.jit
def _stream_order_kernel(x_ptr, out_ptr, R: tl.constexpr, D: tl.constexpr):
    idx = tl.arange(0, R)[:, None] * D + tl.arange(0, D)[None, :]
    tl.store(out_ptr + idx, stream_order(tl.load(x_ptr + idx), R, D))


@pytest.mark.parametrize("d", [64, 128, 256])
def test_stream_order_undoes_dequant4_pairs_column_order(d):
    pairs = [8 * w + k + 4 * e for w in range(d // 8) for k in range(4) for e in range(2)]  # stream column per column
    x = torch.randn(16, d, device=DEVICE)
    out = torch.empty_like(x)
    _stream_order_kernel[(1,)](x[:, pairs].contiguous(), out, R=16, D=d)
    assert torch.equal(out, x)


@triton.jit
def _mma_kernel(o_ptr, cols_ptr, x_ptr, ordered_ptr, BN: tl.constexpr, WP: tl.constexpr):
    # o [4, BN, WP, 2]: what the PTX's outputs k hold; cols: mma_columns of them
    r, w, e = tl.arange(0, BN), tl.arange(0, WP), tl.arange(0, 2)
    idx = r[:, None, None] * (WP * 2) + w[None, :, None] * 2 + e[None, None, :]
    n = BN * WP * 2
    cols = mma_columns(tl.load(o_ptr + idx), tl.load(o_ptr + n + idx), tl.load(o_ptr + 2 * n + idx),
                       tl.load(o_ptr + 3 * n + idx))
    j = tl.arange(0, WP * 8)
    tl.store(cols_ptr + r[:, None] * (WP * 8) + j[None, :], cols)
    D: tl.constexpr = WP * 8
    xi = r[:, None] * D + j[None, :]
    tl.store(ordered_ptr + xi, mma_order(tl.load(x_ptr + xi), BN, D, 8))


@pytest.mark.parametrize("d", [64, 128, 256])
def test_mma_columns_and_mma_order_put_stream_columns_in_the_same_place(d):
    """mma_columns places each code where mma_order places its stream column: q and the key tile agree."""
    bn, wp = 16, d // 8
    stream = torch.arange(bn * d, dtype=torch.float32, device=DEVICE).reshape(bn, d)  # value = its stream column
    # output k, lane e of word w holds the code at stream column 8w + k + 4e
    o = torch.stack([stream.reshape(bn, wp, 2, 4)[:, :, :, k] for k in range(4)])  # [4, BN, WP, e]
    cols, ordered = torch.empty(bn, d, device=DEVICE), torch.empty(bn, d, device=DEVICE)
    _mma_kernel[(1,)](o.contiguous(), cols, stream, ordered, BN=bn, WP=wp)
    assert torch.equal(cols, stream[:, mma_stream_columns(d)])
    assert torch.equal(ordered, cols)


@triton.jit
def _value_order_kernel(x_ptr, ordered_ptr, back_ptr, R: tl.constexpr, D: tl.constexpr, WARPS: tl.constexpr):
    idx = tl.arange(0, R)[:, None] * D + tl.arange(0, D)[None, :]
    ordered = value_order(tl.load(x_ptr + idx), R, D, WARPS)
    tl.store(ordered_ptr + idx, ordered)
    tl.store(back_ptr + idx, value_stream_order(ordered, R, D, WARPS))


@pytest.mark.parametrize("d,warps", [(64, 2), (64, 8), (128, 2), (128, 4), (256, 4)])
def test_value_order_hands_each_thread_neighbouring_stream_columns(d, warps):
    """Column 8 (warps r + w) + g holds stream column S (8 w + g) + r (S = d / (8 warps)); value_stream_order
    undoes it."""
    span = d // (8 * warps)
    where = [span * (8 * w + g) + r for r in range(span) for w in range(warps) for g in range(8)]
    x = torch.randn(16, d, device=DEVICE)
    ordered, back = torch.empty_like(x), torch.empty_like(x)
    _value_order_kernel[(1,)](x, ordered, back, R=16, D=d, WARPS=warps)
    assert torch.equal(ordered, x[:, where])
    assert torch.equal(back, x)
