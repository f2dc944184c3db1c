"""kvtorch.ops against kvspec.reference on fresh random inputs: codes, scales, biases and rotations
bit-exact; dequantization within the tolerance table; packing round trips; bad input refused."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'kvmlx[torch]')")

from kvspec import reference as R  # noqa: E402
from kvspec.reference.quant import NonFiniteError  # noqa: E402
from kvspec.tolerances import assert_close, tolerance  # noqa: E402
from kvtorch import ops  # noqa: E402

BITS = (2, 3, 4, 8)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    unsigned = {2: np.uint16, 4: np.uint32}[b.dtype.itemsize]
    return a.dtype == b.dtype and a.shape == b.shape and bool((a.view(unsigned) == b.view(unsigned)).all())


def hard_input(rng: np.random.Generator, tokens: int, dim: int) -> np.ndarray:
    """[2, 3, tokens, dim]: gaussian with constant rows and channels, an outlier channel, half steps, zeros."""
    x = rng.standard_normal((2, 3, tokens, dim)).astype(np.float32)
    x[0, 0, : tokens // 3] = 0.75  # constant groups on both axes
    x[0, 1, :, 3] *= 500.0  # outlier channel
    x[1, 0] = np.round(x[1, 0] * 4) / 4  # exact ties after scaling
    x[1, 1, :, : dim // 2] = 0.0
    x[1, 2] *= rng.choice([1e-4, 1.0, 3e4], size=(tokens, 1)).astype(np.float32)  # tiny and near-fp16-max rows
    return np.clip(x, -65504, 65504)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_quantize_bit_exact_and_dequantize_close(bits, group, axis):
    rng = np.random.default_rng(bits * 1000 + group)
    tokens = 2 * group if axis == "channel" else 37  # odd token count on the token axis
    x = hard_input(rng, tokens, 128)
    want = R.quantize(x, bits, group, axis)
    codes, scales, biases = ops.quantize(torch.from_numpy(x), bits, group, axis)
    assert codes.dtype == torch.int32
    assert same_bits(ops.words_to_numpy(codes), want.codes)
    assert same_bits(scales.numpy(), want.scales) and same_bits(biases.numpy(), want.biases)
    got = ops.dequantize(codes, scales, biases, bits, group, axis, 128).numpy()
    assert_close(got, R.dequantize(want, bits, group, axis, 128), tolerance("int", bits, "fp32"), "dequantize")


@pytest.mark.parametrize("bits", BITS)
def test_constant_group_codes_zero_and_value_exact(bits):
    x = torch.full((1, 1, 4, 64), -3.25)
    codes, scales, biases = ops.quantize(x, bits, 64, "token")
    assert (codes == 0).all() and (scales == 0).all() and (biases == -3.25).all()
    assert (ops.dequantize(codes, scales, biases, bits, 64, "token", 64) == -3.25).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 10, 11, 32, 33, 64, 127])
def test_pack_matches_reference_and_unpacks(bits, n):
    codes = np.random.default_rng(n).integers(0, 2**bits, size=(3, 5, n))
    words = ops.pack(torch.from_numpy(codes), bits)
    assert same_bits(ops.words_to_numpy(words), R.pack(codes, bits))
    assert (ops.unpack(words, bits, n).numpy() == codes).all()


def test_int32_words_carry_uint32_bits():
    words = np.array([[0, 1, 0x80000000, 0xFFFFFFFF, 0x87654321]], np.uint32)
    t = ops.words_from_numpy(words)
    assert t.dtype == torch.int32 and t[0, 2].item() == -(2**31) and t[0, 3].item() == -1
    assert same_bits(ops.words_to_numpy(t), words)
    assert ops.pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4).item() == np.int32(np.uint32(0x87654321).view(np.int32))


@pytest.mark.parametrize("dim", [2, 64, 128, 256])
@pytest.mark.parametrize("seed", [0, 3, 12345])
def test_rotation_bit_exact_and_inverse(dim, seed):
    x = np.random.default_rng(seed).standard_normal((3, 5, dim)).astype(np.float32) * 7
    big = x.copy()
    big[0, 0, 1] = 3e4
    for inp in (x, big):
        rot = ops.rotate(torch.from_numpy(inp), seed)
        assert same_bits(rot.numpy(), R.rotate(inp, seed))
        assert same_bits(ops.unrotate(rot, seed).numpy(), R.unrotate(R.rotate(inp, seed), seed))
    # The inverse is exact up to fp32 rounding (an outlier would swamp its row, hence the plain input).
    back = ops.unrotate(ops.rotate(torch.from_numpy(x), seed), seed)
    assert_close(back.numpy(), x, tolerance("float", 16, "fp32"), "unrotate(rotate(x))")


def test_rotation_refuses_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        ops.rotate(torch.zeros(2, 96), 0)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_round_to_matches_reference(name):
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 100
    got = ops.round_to(torch.from_numpy(x), name).float().numpy()
    assert same_bits(got, R.round_to(x, name))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 70000.0])
def test_check_finite_names_place_and_index(bad):
    x = torch.zeros(1, 2, 5, 8)
    x[0, 1, 3, 6] = bad
    with pytest.raises(NonFiniteError, match=r"layer 7 keys at index \(0, 1, 3, 6\)"):
        ops.check_finite(x, "layer 7 keys")
    assert bool(ops.nonfinite_flag(x))
    ops.check_finite(torch.full((2, 2), 65504.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nonfinite_flag_bounds_every_dtype_at_the_fp16_range(dtype):
    """65504 passes; the next value the dtype holds past it, NaN and +-Inf do not (bf16's next is 65536)."""
    top = torch.tensor(65504.0, dtype=dtype)
    above = torch.nextafter(top, torch.tensor(float("inf"), dtype=dtype)) if dtype.itemsize >= 4 else top
    if dtype == torch.bfloat16:
        top, above = torch.tensor(65280.0, dtype=dtype), torch.tensor(65536.0, dtype=dtype)
    rng = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(2, 3, 7, 16, generator=rng).to(dtype)
    x[0, 1, 2, 3] = -top
    assert not bool(ops.nonfinite_flag(x))
    for bad in (above, -above, float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 2, 6, 15] = bad
        if dtype == torch.float16 and bad in (above, -above):
            continue  # fp16's next value past 65504 is Inf, covered below
        assert bool(ops.nonfinite_flag(y)), (dtype, bad)
