"""Reference attention: compressed-space equals reconstruction; the decode oracle; masks and GQA."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvspec
from kvspec import reference as R
from kvspec.reference import attention as R_attention
from kvspec.reference.lowrank import make_basis
from kvspec.spec import LowRank

SPECS = ["fp16", "int4", "int3-g32-rot", "int2-kchan-res5", "k8v4-vchan-g32", "rank16", "rank16-q4",
         "k8vrank24", "krank24vrank8-q3-random", "int4-res3-bf16"]


def bases_for(spec, dim, heads, seed):
    out = {}
    for name, t in spec.tensors().items():
        if isinstance(t, kvspec.LowRank):
            out[name] = np.stack([make_basis("random", dim, seed=seed + h)[:, : t.rank] for h in range(heads)])
    return out


@given(st.sampled_from(SPECS), st.integers(0, 10_000), st.integers(1, 70), st.sampled_from([None, 7]))
@settings(max_examples=60, deadline=None)
def test_compressed_space_equals_reconstruction(text, seed, tokens, window):
    spec = kvspec.parse(text)
    rng = np.random.default_rng(seed)
    k, v = rng.standard_normal((2, 1, 2, tokens, 64))
    q = rng.standard_normal((1, 6, 3, 64))
    bases = bases_for(spec, 64, 2, seed)
    ks = R.compress(k, spec.k, spec.residual, spec.float_dtype, bases.get("k"))
    vs = R.compress(v, spec.v, spec.residual, spec.float_dtype, bases.get("v"))
    pos = np.array([max(tokens - 3, 0), max(tokens - 2, 0), tokens - 1])
    a = R.attend(q, ks, vs, pos, window=window)
    b = R.attend(q, ks, vs, pos, window=window, space="compressed")
    assert np.allclose(a, b, atol=1e-10)


def test_fp32_baseline_is_plain_attention_with_gqa_and_mask():
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, 1, 2, 9, 8))
    q = rng.standard_normal((1, 4, 9, 8))
    spec = kvspec.parse("fp16")
    out = R.attend(q, R.compress(k, spec.k, 0), R.compress(v, spec.v, 0), np.arange(9), window=4)
    k16, v16 = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
    for h in range(4):
        for i in range(9):
            lo = max(0, i - 3)
            s = q[0, h, i] @ k16[0, h // 2, lo : i + 1].T / np.sqrt(8)
            p = np.exp(s - s.max())
            assert np.allclose(out[0, h, i], p @ v16[0, h // 2, lo : i + 1] / p.sum(), atol=1e-12)


def test_decoded_oracle_sees_the_cache_as_it_stood():
    # With a 3-token window, the query at position t sees keys t-2..t in float and the rest quantized.
    rng = np.random.default_rng(2)
    k, v = rng.standard_normal((2, 1, 1, 12, 32))
    q = rng.standard_normal((1, 1, 12, 32))
    spec = kvspec.parse("int2-g32-res3")
    dec = R.attend_as_decoded(q, k, v, spec)
    for t in (0, 5, 11):
        ks = R.compress(k[..., : t + 1, :], spec.k, 3)
        vs = R.compress(v[..., : t + 1, :], spec.v, 3)
        assert ks.n == max(t + 1 - 3, 0)
        assert np.allclose(dec[..., t, :], R.attend(q[..., t : t + 1, :], ks, vs, np.array([t]))[..., 0, :])
    # and differs from attending to the final cache (where more tokens are quantized)
    ks, vs = R.compress(k, spec.k, 3), R.compress(v, spec.v, 3)
    assert not np.allclose(dec, R.attend(q, ks, vs, np.arange(12)))


@pytest.mark.parametrize("text,stable", [("int4-g32", True), ("k8v2-g32-krot", True), ("fp16", True),
                                         ("krank8v4-kq4-krandom-vg32", True), ("k4v2-g32-vchan", False),
                                         ("int2-g32-res1", False)])
def test_decoded_oracle_compresses_once_only_where_every_cache_is_a_prefix(text, stable):
    """Where every token is stored alike in each query's cache (residual 0, rows compressed on their
    own), attend_as_decoded compresses the history once under a causal mask; that must equal
    compressing each query's own prefix, and specs with a float window must not take the shortcut."""
    rng = np.random.default_rng(len(text))
    k, v = rng.standard_normal((2, 1, 2, 13, 32))
    q = rng.standard_normal((1, 4, 5, 32))
    spec = kvspec.parse(text)
    bases = {w: np.stack([make_basis("random", 32, seed=h)[:, : t.rank] for h in range(2)])
             for w, t in spec.tensors().items() if isinstance(t, LowRank)}
    dec = R.attend_as_decoded(q, k, v, spec, bases=bases, window=7)
    for i, t in enumerate(range(8, 13)):
        ks = R.compress(k[..., : t + 1, :], spec.k, spec.residual, spec.float_dtype, bases.get("k"))
        vs = R.compress(v[..., : t + 1, :], spec.v, spec.residual, spec.float_dtype, bases.get("v"))
        want = R.attend(q[..., i : i + 1, :], ks, vs, np.array([t]), window=7)[..., 0, :]
        assert np.allclose(dec[..., i, :], want, rtol=0, atol=1e-12), t
    assert R_attention._prefix_stable(spec, range(9, 14)) == stable


def test_lowrank_needs_basis():
    spec = kvspec.parse("rank8")
    with pytest.raises(ValueError, match="needs a basis"):
        R.compress(np.zeros((1, 1, 4, 16)), spec.k, 0)
