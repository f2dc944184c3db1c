"""Reference quantization numerics: rounding rule, error bound, constant groups, packing, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvspec.reference import quant as Q


@given(
    hnp.arrays(np.float32, (3, 64), elements=st.floats(-6e4, 6e4, width=32)),
    st.sampled_from([2, 3, 4, 8]),
    st.sampled_from([32, 64]),
)
@settings(max_examples=200, deadline=None)
def test_error_within_half_step_plus_fp16_rounding(x, bits, group):
    q = Q.quantize(x[None], bits, group, "token")
    y = Q.dequantize(q, bits, group, "token", 64)[0]
    assert (np.abs(y - x) <= Q.error_bound(x, bits, group, "token")).all()


@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 3, 4, 8]), st.integers(1, 130))
def test_pack_unpack_identity(seed, bits, n):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(2, n))
    words = Q.pack(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (2, -(-n * bits // 32))
    assert (Q.unpack(words, bits, n) == codes).all()


def test_pack_unpack_empty():
    assert Q.pack(np.zeros((2, 0, 5), np.uint32), 3).shape == (2, 0, 1)
    assert Q.unpack(np.zeros((1, 0, 8), np.uint32), 4, 64).shape == (1, 0, 64)


def test_packing_order_is_lsb_first_and_3bit_straddles_words():
    assert Q.pack(np.array([1, 2, 3, 4, 5, 6, 7, 8]), 4)[0] == 0x87654321
    codes = np.zeros(11, np.uint32)
    codes[10] = 0b101  # bits 30, 31 of word 0 and bit 0 of word 1
    words = Q.pack(codes, 3)
    assert words.tolist() == [0b01 << 30, 0b1]
    assert Q.pack(np.array([3] * 16), 2)[0] == 0xFFFFFFFF


def test_round_half_to_even_on_stored_scale():
    # bias 0, scale 1 (exact in fp16): x = k + 0.5 rounds to the even code
    x = np.array([[0.0, 0.5, 1.5, 2.5, 3.0] + [3.0] * 27], np.float32)
    codes, scales, biases = Q.quantize_groups(x, 2)
    assert scales[0] == 1.0 and biases[0] == 0.0
    assert codes[0, :5].tolist() == [0, 0, 2, 2, 3]


def test_codes_come_from_stored_fp16_scale_and_bias():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 32)).astype(np.float32) * 3 + 0.1
    codes, s, b = Q.quantize_groups(x, 4)
    assert s.dtype == np.float16 and b.dtype == np.float16
    recomputed = np.clip(np.rint((x - b.astype(np.float32)[:, None]) / s.astype(np.float32)[:, None]), 0, 15)
    assert (codes == recomputed).all()


@pytest.mark.parametrize("value", [0.0, 1.5, -3.25, 65504.0, -65504.0, 2.0**-14, 2.0**-24, 0.1005859375])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_constant_group_reconstructs_exactly(value, bits):
    x = np.full((1, 2, 32), value, np.float32)
    for axis in ("token", "channel"):
        xx = x if axis == "token" else np.swapaxes(np.full((1, 32, 32), value, np.float32), -1, -2)
        q = Q.quantize(xx, bits, 32, axis)
        assert (q.scales == 0).all()
        assert (Q.dequantize(q, bits, 32, axis, 32) == np.float32(value)).all()


def test_channel_axis_groups_run_along_tokens():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 64, 16)).astype(np.float32)
    x[..., 3] *= 100  # one outlier channel: per-channel scales isolate it
    q = Q.quantize(x, 4, 32, "channel")
    assert q.scales.shape == (1, 2, 2, 16)
    err = np.abs(Q.dequantize(q, 4, 32, "channel", 16) - x)
    assert err[..., [0, 1, 2, 4]].max() < 0.25
    with pytest.raises(ValueError, match="whole groups"):
        Q.quantize(x[..., :40, :], 4, 32, "channel")


@pytest.mark.parametrize("bad, what", [(np.nan, "NaN/Inf"), (np.inf, "NaN/Inf"), (7e4, "beyond fp16 range")])
def test_non_finite_refused_with_position(bad, what):
    x = np.zeros((1, 2, 5, 8), np.float32)
    x[0, 1, 3, 6] = bad
    with pytest.raises(Q.NonFiniteError, match=r"layer 4.*index \(0, 1, 3, 6\)") as e:
        Q.check_finite(x, "layer 4 keys")
    assert what in str(e.value)
