"""LayerCache against the kvspec reference on fresh inputs: stored arrays in any chunking, the
attention protocol (chunked prefill == token-by-token decoding), trim, state, bytes, refusals."""

from __future__ import annotations

import numpy as np
import pytest

import kvspec
from kvspec import reference as R
from kvspec.budget import ModelShape, kv_bytes
from kvspec.reference.quant import NonFiniteError
from kvspec.spec import LowRank
from kvspec.tolerances import assert_close, spec_tolerance, tolerance

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")
from kvmlx.attention import compressed_attention  # noqa: E402
from kvmlx.cache import LayerCache  # noqa: E402

B, HKV, HQ, T, D = 1, 2, 6, 45, 64
SPECS = [
    "fp16", "bf16", "int8", "int4-g32", "int3", "int2-g32", "int4-rot5", "int4-kchan-res8", "int2-g32-chan",
    "k8v4-kchan-res4", "int4-res6-bf16", "rank24-random", "rank16-identity-bf16", "rank32-q4-hadamard",
    "rank32-q3-g32-random", "k4vrank16-random-res3", "krank16v2-random-kq8-vchan-vrot",
]
CHUNKINGS = [[T], [1] * T, [7, 1, 16, 2, 19]]


def history(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((B, HKV, T, D)) * np.linspace(0.3, 3.0, D)).astype(np.float32)
    k[..., 5] += 4.0  # an outlier channel, as RoPE'd keys have
    v = rng.standard_normal((B, HKV, T, D)).astype(np.float32)
    q = rng.standard_normal((B, HQ, T, D)).astype(np.float32)
    return q, k, v


def bases_for(spec: kvspec.KVSpec) -> dict[str, np.ndarray]:
    from kvmlx.integration import default_basis

    return {w: default_basis(t, HKV, D) for w, t in spec.tensors().items() if isinstance(t, LowRank)}


def chunks(sizes):
    start = 0
    for size in sizes:
        yield slice(start, start + size)
        start += size


@pytest.mark.parametrize("sizes", CHUNKINGS, ids=["prefill", "decode", "mixed"])
@pytest.mark.parametrize("text", SPECS)
def test_stored_arrays_equal_whole_history_compression(text, sizes):
    spec = kvspec.parse(text)
    _, k, v = history(1)
    bases = bases_for(spec)
    cache = LayerCache(spec, bases)
    for part in chunks(sizes):
        cache.update_and_fetch(mx.array(k[..., part, :]), mx.array(v[..., part, :]))
    for which, x, store in (("k", k, cache.k), ("v", v, cache.v)):
        t = spec.tensors()[which]
        want = R.compress(x, t, spec.residual, spec.float_dtype, bases.get(which))
        got = {name: np.array(a.astype(mx.float32) if name in ("tail", "coeffs") else a) for name, a in store.arrays().items()}
        np.testing.assert_array_equal(got["tail"], want.tail)
        if want.coeffs is not None:
            assert_close(got["coeffs"], want.coeffs, tolerance("rank", 16, "fp32"), f"{text} {which} coeffs")
        if want.quant is not None and not isinstance(t, LowRank):
            for name in ("codes", "scales", "biases"):
                np.testing.assert_array_equal(got[name], getattr(want.quant, name), f"{text} {which} {name}")


def attend_in_chunks(text: str, window: int | None, seed: int):
    """The mixed chunking's attention outputs [B, HQ, T, D] and the protocol oracle's (float64)."""
    spec = kvspec.parse(text)
    q, k, v = history(seed)
    bases = bases_for(spec)
    cache = LayerCache(spec, bases)
    outs = []
    for part in chunks(CHUNKINGS[2]):
        fk, fv = cache.update_and_fetch(mx.array(k[..., part, :]), mx.array(v[..., part, :]))
        outs.append(compressed_attention(mx.array(q[..., part, :]), fk, fv, 1 / np.sqrt(D), window))
    return mx.concatenate(outs, axis=-2), R.attend_as_decoded(q, k, v, spec, bases=bases, window=window)


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("text", SPECS)
def test_chunked_attention_is_token_by_token_decoding(text, window):
    """The protocol oracle: each chunk's queries read the cache as it stood after their own token."""
    got, want = attend_in_chunks(text, window, seed=2)
    assert_close(got, want, spec_tolerance(kvspec.parse(text), "fp32"), text)


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("text", [t for t in SPECS if t not in ("fp16", "bf16")])
def test_long_chunks_rebuild_the_history_for_fused_sdpa(text, window, monkeypatch):
    """Chunks of at least kvmlx.prefill.MIN_QUERIES queries (here 7: the chunks of 7, 16 and 19) run as
    one rebuild and mx.fast.scaled_dot_product_attention, and still decode as token by token."""
    import kvmlx.prefill as prefill

    monkeypatch.setattr(prefill, "MIN_QUERIES", 7)
    monkeypatch.setattr(prefill, "on_gpu", lambda: True)  # a GPU path; MLX's CPU backend runs it too
    served = []
    monkeypatch.setattr(prefill, "attend", lambda *a, _f=prefill.attend: served.append(1) or _f(*a))
    got, want = attend_in_chunks(text, window, seed=5)
    assert len(served) == 3, text
    assert_close(got, want, spec_tolerance(kvspec.parse(text), "fp32"), text)


@pytest.mark.parametrize("text", ["k8v4-kchan-res4", "int4-rot5", "k4vrank16-random-res3"])
def test_long_chunks_run_in_blocks_with_the_same_result(text, monkeypatch):
    """A chunk whose fp32 scores exceed SCORE_BLOCK_BYTES runs in blocks of queries (K and V splitting
    apart and a sliding window included): the blocks give the whole chunk's result."""
    import kvmlx.attention as attention

    spec = kvspec.parse(text)
    q, k, v = history(4)
    cache = LayerCache(spec, bases_for(spec))
    cache.update_and_fetch(mx.array(k[..., :9, :]), mx.array(v[..., :9, :]))
    fk, fv = cache.update_and_fetch(mx.array(k[..., 9:, :]), mx.array(v[..., 9:, :]))
    qc = mx.array(q[..., 9:, :])
    whole = np.array(attention.reference_attention(qc, fk, fv, 0.1, 11))
    monkeypatch.setattr(attention, "SCORE_BLOCK_BYTES", 4 * B * HQ * T * 5)  # 5 queries per block (of 36)
    blocked = np.array(attention.reference_attention(qc, fk, fv, 0.1, 11))
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-6, err_msg=text)


def test_sliding_window_layer_keeps_its_window_in_float():
    spec = kvspec.parse("int4")
    q, k, v = history(3)
    cache = LayerCache(spec, window=9)
    outs = []
    for part in chunks(CHUNKINGS[2]):
        fk, fv = cache.update_and_fetch(mx.array(k[..., part, :]), mx.array(v[..., part, :]))
        outs.append(cache.attend(mx.array(q[..., part, :]), fk, fv, 1 / np.sqrt(D)))
        assert cache.k.n == 0 and len(cache.k.tail) == min(cache.offset, 9)
    np.testing.assert_array_equal(np.array(cache.k.arrays()["tail"].astype(mx.float32)), R.round_to(k[..., -9:, :], "fp16"))
    want = R.attend_as_decoded(q, k, v, kvspec.parse("fp16"), window=9)
    assert_close(mx.concatenate(outs, axis=-2), want, tolerance("float", 16, "fp32"), "window")
    assert cache.nbytes == 2 * B * HKV * 9 * D * 2


@pytest.mark.parametrize("text", ["fp16", "int4", "rank24-random", "int4-res4", "int4-kchan-g32", "int3-res8-chan-g32"])
def test_trim_is_exact_or_refused(text):
    spec = kvspec.parse(text)
    _, k, v = history(4)
    bases = bases_for(spec)
    cache = LayerCache(spec, bases)
    cache.update_and_fetch(mx.array(k), mx.array(v))
    exact = spec.residual == 0 and all(getattr(t, "axis", "token") == "token" for t in spec.tensors().values())
    assert cache.is_trimmable() == exact
    # Dropping 25 tokens would bring compressed tokens back into the float window (or split a
    # channel group) for every inexact spec here.
    trimmed = cache.trim(25)
    assert trimmed == (25 if exact else 0) and cache.offset == T - trimmed
    if exact:
        shorter = LayerCache(spec, bases)
        shorter.update_and_fetch(mx.array(k[..., : T - 25, :]), mx.array(v[..., : T - 25, :]))
        for a, b in zip((cache.k, cache.v), (shorter.k, shorter.v)):
            for name, arr in b.arrays().items():
                np.testing.assert_array_equal(np.array(a.arrays()[name]), np.array(arr), name)
        # Appending after a trim continues as if the dropped tokens never came.
        cache.update_and_fetch(mx.array(k[..., T - 25 :, :]), mx.array(v[..., T - 25 :, :]))
        assert cache.offset == T


def test_channel_axis_trim_within_the_float_tail():
    """A channel-axis cache can drop tokens that are still float, not tokens of a quantized group."""
    cache = LayerCache("int4-kchan-g32")
    _, k, v = history(5)
    cache.update_and_fetch(mx.array(k[..., :40, :]), mx.array(v[..., :40, :]))  # K: 32 quantized, 8 float
    assert not cache.is_trimmable()
    assert cache.trim(5) == 5 and cache.k.n == 32 and len(cache.k.tail) == 3 and cache.v.n == 35
    assert cache.trim(4) == 0 and cache.offset == 35  # would need token 31 back in float


@pytest.mark.parametrize("text", ["int4-kchan-res8", "rank32-q4-hadamard", "int4-res6-bf16", "fp16"])
def test_state_round_trip_and_bytes(text):
    spec = kvspec.parse(text)
    q, k, v = history(6)
    cache = LayerCache(spec, bases_for(spec), layer=3)
    cache.update_and_fetch(mx.array(k[..., :40, :]), mx.array(v[..., :40, :]))
    copy = LayerCache.from_state(cache.state)
    assert copy.offset == 40 and copy.layer == 3 and copy.nbytes == cache.nbytes
    assert cache.nbytes == kv_bytes(spec, ModelShape(1, HKV, D), 40)
    outs = []
    for c in (cache, copy):
        fk, fv = c.update_and_fetch(mx.array(k[..., 40:, :]), mx.array(v[..., 40:, :]))
        outs.append(np.array(c.attend(mx.array(q[..., 40:, :]), fk, fv, 0.125)))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_non_finite_keys_are_refused_with_the_layer_named():
    k = np.zeros((1, 1, 3, 64), np.float32)
    k[0, 0, 1, 2] = np.nan
    with pytest.raises(NonFiniteError, match="layer 7 K"):
        LayerCache("int4", layer=7).update_and_fetch(mx.array(k), mx.array(np.zeros_like(k)))


def test_buffer_growth_keeps_the_spare_capped():
    """Growth by a quarter of the live rows, at least STEP and at most MAX_SPARE (+ rounding to STEP):
    a long cache holds at most ~1,024 unused rows, and earlier rows survive every grow."""
    from kvmlx.store import MAX_SPARE, STEP, Buffer

    buf, grows, cap, n = Buffer(), 0, 0, 9000
    for i in range(0, n, 3):
        buf.append(mx.full((1, 1, 3, 2), float(i)))
        if buf.data.shape[-2] != cap:
            grows += 1
            cap = buf.data.shape[-2]
            assert cap - len(buf) < MAX_SPARE + STEP, (i, cap, len(buf))
    assert len(buf) == n and grows <= 8 + n // MAX_SPARE
    assert np.array_equal(np.array(buf.view()[0, 0, ::3, 0]), np.arange(0, n, 3, dtype=np.float32))


def test_reset_forgets_every_token():
    cache = LayerCache("int4-res4")
    _, k, v = history(7)
    cache.update_and_fetch(mx.array(k), mx.array(v))
    cache.reset()
    assert cache.empty() and cache.nbytes == 0 and cache.k.n == 0
