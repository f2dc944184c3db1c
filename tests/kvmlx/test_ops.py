"""kvmlx.ops against the kvspec reference on fresh random inputs: codes, scales and biases bit-exact;
floats within kvspec.tolerances."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvspec import reference as R
from kvspec.reference.quant import NonFiniteError
from kvspec.tolerances import assert_close, tolerance

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")
from kvmlx import ops  # noqa: E402


def bits_equal(got: mx.array, want: np.ndarray, what: str) -> None:
    got = np.array(got)
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
    unsigned = {2: np.uint16, 4: np.uint32}[want.dtype.itemsize]
    differ = np.argwhere(got.view(unsigned) != want.view(unsigned))
    assert differ.size == 0, f"{what}: {len(differ)} elements differ, first at {differ[:3].tolist()}"


def hard_input(seed: int, tokens: int, dim: int, peak: float = 60000.0) -> np.ndarray:
    """[1, 2, T, D]: gaussian rows plus constant groups, an outlier channel, exact half steps,
    tiny ranges and a row reaching `peak` (near the fp16 limit)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, tokens, dim)).astype(np.float32)
    x[0, 0, : tokens // 4] = -0.75  # constant token rows and constant channel groups
    x[0, 1, :, 3] *= 500.0  # outlier channel
    x[0, 1, : tokens // 3, : dim // 2] = np.round(x[0, 1, : tokens // 3, : dim // 2] * 4) / 4  # ties
    x[0, 0, -3:] *= 1e-4  # tiny ranges
    x[0, 0, tokens // 2] *= peak / np.abs(x[0, 0, tokens // 2]).max()
    return x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("rotation", [None, 11])
def test_quantize_bit_exact(bits, group, axis, rotation):
    tokens = 2 * group if axis == "channel" else 37  # odd token count on the token axis
    # Rotation can raise a row's peak by up to sqrt(D): keep rotated values within fp16 range.
    x = hard_input(bits * 1000 + group, tokens, 128, peak=60000.0 if rotation is None else 5000.0)
    if rotation is not None:
        rotated = ops.rotate(mx.array(x), rotation)
        bits_equal(rotated, R.rotate(x, rotation), "rotation")
        x = R.rotate(x, rotation)
    codes, scales, biases = ops.quantize(mx.array(x), bits, group, axis)
    want = R.quantize(x, bits, group, axis)
    bits_equal(codes, want.codes, "codes")
    bits_equal(scales, want.scales, "scales")
    bits_equal(biases, want.biases, "biases")
    got = ops.dequantize(codes, scales, biases, bits, group, axis, 128)
    assert_close(got, R.dequantize(want, bits, group, axis, 128), tolerance("int", bits, "fp32"), "dequantize")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_are_mlx_affine_layout(bits):
    """Token-axis codes, scales and biases go straight into MLX's own dequantize."""
    x = hard_input(bits, 9, 128)
    codes, scales, biases = ops.quantize(mx.array(x), bits, 32, "token")
    assert ops.mlx_layout(bits, 32, 128)
    mine = ops.dequantize(codes, scales, biases, bits, 32, "token", 128)
    theirs = mx.dequantize(codes, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32, bits=bits)
    assert_close(theirs, mine, tolerance("int", bits, "fp32"), "mx.dequantize")


@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 3, 4, 8]), st.integers(1, 130))
@settings(max_examples=60, deadline=None)
def test_pack_unpack_match_reference(seed, bits, n):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(3, n)).astype(np.uint32)
    words = ops.pack(mx.array(codes), bits)
    bits_equal(words, R.pack(codes, bits), "words")
    bits_equal(ops.unpack(words, bits, n), codes, "codes")


def test_unrotate_inverts_rotate_and_matches_reference():
    y = np.random.default_rng(3).standard_normal((2, 5, 64)).astype(np.float32)
    bits_equal(ops.unrotate(mx.array(y), 4), R.unrotate(y, 4), "unrotate")
    assert_close(ops.unrotate(ops.rotate(mx.array(y), 4), 4), y, tolerance("float", 16, "fp32"), "round trip")


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_round_to_float_dtype_is_nearest_even(name):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(20000) * np.exp(rng.uniform(-12, 10, 20000))).astype(np.float32)
    # Exact ties between neighbouring fp16 / bf16 values.
    ties = (np.arange(1, 2000, dtype=np.uint32) << (12 if name == "fp16" else 15) | 0x3F800000).view(np.float32)
    x = np.concatenate([x, ties, -ties])
    got = ops.round_to(mx.array(x), name).astype(mx.float32)
    bits_equal(got, R.round_to(x, name), name)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 7e4])
def test_check_finite_refuses_like_the_reference(bad):
    x = np.zeros((1, 1, 4, 8), np.float32)
    x[0, 0, 2, 5] = bad
    with pytest.raises(NonFiniteError) as ours:
        ops.check_finite(mx.array(x), "layer 3 K")
    with pytest.raises(NonFiniteError) as theirs:
        R.check_finite(x, "layer 3 K")
    assert str(ours.value) == str(theirs.value) and "layer 3 K" in str(ours.value)
    ops.check_finite(mx.array(np.full((2, 3), 65504.0, np.float32)))


def test_tf32_split_matmul_keeps_fp32_accuracy():
    """The three-GEMM split (what GPUs run, where fp32 GEMMs may be TF32) against float64: its high
    parts are TF32-exact and its error stays at fp32 level, far below TF32's 2^-11."""
    rng = np.random.default_rng()
    a = (rng.standard_normal((2, 3, 37, 128)) * np.exp(rng.uniform(-6, 6, (2, 3, 37, 1)))).astype(np.float32)
    b = rng.standard_normal((3, 128, 32)).astype(np.float32)
    hi = np.array(ops._tf32_high(mx.array(a)))
    assert not (hi.view(np.uint32) & 0x1FFF).any() and np.all(np.abs(a - hi) <= np.abs(a) * 2.0**-10)
    want = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    for split in (True, False):
        got = np.array(ops.matmul_fp32(mx.array(a), mx.array(b), split=split))
        assert np.max(np.abs(got - want) / scale) < 2.0**-19, split


def test_projection_within_rank_tolerance():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 2, 11, 64)).astype(np.float32)
    basis = np.stack([R.make_basis("random", 64, seed=h)[:, :24] for h in range(2)]).astype(np.float32)
    c = ops.project(mx.array(x), mx.array(basis))
    assert_close(c, R.project(x, basis), tolerance("rank", 16, "fp32"), "project")
    assert_close(ops.reconstruct(c, mx.array(basis)), R.reconstruct(R.project(x, basis), basis), tolerance("rank", 16, "fp32"), "reconstruct")
