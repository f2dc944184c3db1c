"""Budget arithmetic: exact bits per element, bytes per token, matched ranks."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvspec
from kvspec.budget import ModelShape, basis_bytes, bits_per_element, bytes_per_token, kv_bytes, matched_rank
from kvspec.layout import n_quantized

MISTRAL = ModelShape(layers=32, kv_heads=8, head_dim=128)


def test_issue_figures():
    spec = kvspec.parse("int4-g64")
    assert bits_per_element(spec, 128).total == 4.5
    assert bytes_per_token(spec, MISTRAL) == 36_864
    assert bytes_per_token(kvspec.parse("fp16"), MISTRAL) == 131_072


@pytest.mark.parametrize(
    "text, dim, bits",
    [
        ("int8", 128, 8.5),
        ("int4-g32", 128, 5.0),
        ("int2-g128", 128, 2.25),
        ("int3-g32", 64, 4.0),  # 64 x 3 bits = 6 words exactly, no padding
        ("int3-g32-chan", 80, 32 * 8 / 80 + 1.0),  # 240 bits pad to 8 words
        ("rank32", 128, 4.0),
        ("rank16", 64, 4.0),
        ("rank32-q4", 128, (128 + 32) / 128),
        ("rank64-q4-g32", 128, (256 + 64) / 128),
        ("k8v4", 128, (8.5 + 4.5) / 2),
        ("k16v2", 64, (16 + 2.5) / 2),
    ],
)
def test_bits_per_element(text, dim, bits):
    assert bits_per_element(kvspec.parse(text), dim).total == pytest.approx(bits, abs=1e-12)


@given(st.integers(1, 5000), st.sampled_from([0, 16, 128]), st.sampled_from(["int4", "int2-kchan", "rank16", "int3-chan-g32"]))
def test_window_accounting_is_exact(context, residual, text):
    spec = kvspec.parse(f"{text}-res{residual}" if residual else text)
    shape = ModelShape(layers=2, kv_heads=3, head_dim=64)
    b = bits_per_element(spec, 64, context)
    elements = context * 64 * 3 * 2
    assert kv_bytes(spec, shape, context) * 8 == pytest.approx((b.k + b.v) * elements, rel=1e-12)
    n = n_quantized(spec.k, residual, context)
    assert 0 <= n <= max(context - residual, 0)


def test_channel_axis_quantizes_whole_groups_only():
    t = kvspec.parse("int4-chan-g32").k
    assert [n_quantized(t, 8, T) for T in (39, 40, 41, 72, 73)] == [0, 32, 32, 64, 64]


def test_sliding_layers_hold_their_window_in_float():
    gemma = ModelShape(layers=18, kv_heads=1, head_dim=256, sliding_layers=15, sliding_window=512)
    spec = kvspec.parse("int4")
    full = kv_bytes(spec, gemma, 4096)
    assert full == 3 * 4096 * 256 * 2 * 4.5 / 8 + 15 * 512 * 256 * 2 * 2


def test_matched_rank():
    assert matched_rank(4.5, 128) == 36
    assert matched_rank(4.0, 128) == 32
    assert matched_rank(4.5, 64) == 18
    r = matched_rank(2.0, 128, coeff_bits=4)
    assert r == 56
    assert bits_per_element(kvspec.parse(f"rank{r}-q4"), 128).total <= 2.0
    assert bits_per_element(kvspec.parse(f"rank{r + 1}-q4"), 128).total > 2.0


def test_basis_bytes():
    assert basis_bytes(kvspec.parse("rank32"), MISTRAL) == 2 * 32 * 8 * 128 * 32 * 4
    assert basis_bytes(kvspec.parse("int4"), MISTRAL) == 0
