"""compressed_attention against kvspec.reference: over a stored state, through the decode protocol with
any chunking, with GQA and sliding windows; padding masks, softcap and the kernel dispatcher."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'kvmlx[torch]')")

import kvspec  # noqa: E402
from kvspec import reference as R  # noqa: E402
from kvspec.tolerances import assert_close, spec_tolerance, tolerance  # noqa: E402
from kvtorch import attention  # noqa: E402
from kvtorch.attention import compressed_attention  # noqa: E402
from kvtorch.store import LayerStore, TensorStore  # noqa: E402

from .helpers import SPECS, bases_for, chunking, reference_arrays  # noqa: E402

D = 128
ARITH = tolerance("int", 16, "fp32")  # same stored data on both sides: only the arithmetic order differs


def inputs(seed: int, tokens: int, hkv: int, rep: int):
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((1, hkv, tokens, D)) * np.linspace(0.3, 3, D)).astype(np.float32)
    v = rng.standard_normal((1, hkv, tokens, D)).astype(np.float32)
    q = rng.standard_normal((1, hkv * rep, tokens, D)).astype(np.float32)
    return rng, q, k, v


def torch_bases(bases):
    return {w: torch.from_numpy(b) for w, b in bases.items()}


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize(("hkv", "rep", "window"), [(2, 1, None), (1, 4, None), (2, 3, 9)])
def test_attention_over_a_stored_state_matches_reference(text, hkv, rep, window):
    spec = kvspec.parse(text)
    _, q, k, v = inputs(len(text), 45, hkv, rep)
    bases = bases_for(spec, D, hkv)
    q_pos = np.array([3, 30, 40, 44])
    q = q[:, :, : len(q_pos)]
    parts, stored = [], []
    for which, x in (("k", k), ("v", v)):
        t = spec.tensors()[which]
        ref = R.compress(x, t, spec.residual, spec.float_dtype, bases.get(which))
        store = TensorStore(t, spec.residual, spec.float_dtype, torch_bases(bases).get(which))
        arrays = {n: torch.from_numpy(a.view(np.int32) if n == "codes" else a) for n, a in reference_arrays(ref).items()}
        store.restore(arrays, 45)
        parts.append(store.state_part(len(q_pos)))
        stored.append(ref)
    got = compressed_attention(torch.from_numpy(q), torch.from_numpy(q_pos), *parts, scale=D**-0.5, window=window)
    want = R.attend(q, *stored, q_pos, window=window, space="compressed")
    assert_close(got.numpy(), want, ARITH, text)


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("window", [None, 11])
def test_chunked_appends_attend_as_token_by_token_decoding(text, window):
    spec = kvspec.parse(text)
    rng, q, k, v = inputs(7 + len(text), 53, 2, 2)
    bases = bases_for(spec, D, 2)
    want = R.attend_as_decoded(q, k, v, spec, bases=bases, window=window)
    layer = LayerStore(spec.k, spec.v, spec.residual, spec.float_dtype, torch_bases(bases), window=window)
    outs, pos = [], 0
    for size in chunking(rng, 53):
        sl = slice(pos, pos + size)
        chunk = layer.append(torch.from_numpy(k[..., sl, :]), torch.from_numpy(v[..., sl, :]))
        outs.append(compressed_attention(torch.from_numpy(q[..., sl, :]), chunk.q_pos, chunk.k, chunk.v, scale=D**-0.5, window=window))
        pos += size
    assert_close(torch.cat(outs, dim=2).numpy(), want, spec_tolerance(spec, "fp32"), text)


def plain_attention(q, k, v, keep, scale, softcap=None):
    """float64 attention with GQA by repetition: q [B, Hq, Tq, D], k/v [B, Hkv, T, D], keep [B, 1, Tq, T]."""
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = q.astype(np.float64) @ np.swapaxes(k, -1, -2) * scale
    if softcap is not None:
        s = np.tanh(s / softcap) * softcap
    s = np.where(keep, s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True) @ v


def test_padding_mask_and_softcap_match_plain_attention():
    _, q, k, v = inputs(3, 12, 2, 2)
    k16, v16 = (x.astype(np.float16).astype(np.float64) for x in (k, v))
    spec = kvspec.parse("fp16")
    keep = np.tril(np.ones((12, 12), bool))[None, None].repeat(2, axis=0)
    keep[1, :, :, :4] = False  # batch row 1 is left-padded by 4 tokens
    keep[1, :, :4, :4] = np.eye(4, dtype=bool)  # its padding queries see themselves only
    qq = np.concatenate([q, q])
    kk, vv = np.concatenate([k16, k16]), np.concatenate([v16, v16])
    layer = LayerStore(spec.k, spec.v, 0, "fp16")
    chunk = layer.append(torch.from_numpy(np.concatenate([k, k])), torch.from_numpy(np.concatenate([v, v])))
    got = compressed_attention(torch.from_numpy(qq), chunk.q_pos, chunk.k, chunk.v, scale=0.1, softcap=5.0, mask=torch.from_numpy(keep))
    assert_close(got.numpy(), plain_attention(qq, kk, vv, keep, 0.1, softcap=5.0), ARITH, "mask + softcap")


def test_a_query_that_sees_nothing_gets_zeros_not_nan():
    spec = kvspec.parse("int4")
    layer = LayerStore(spec.k, spec.v, 0, "fp16")
    chunk = layer.append(torch.randn(1, 1, 3, D), torch.randn(1, 1, 3, D))
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[..., 1, :] = False
    out = compressed_attention(torch.randn(1, 2, 3, D), chunk.q_pos, chunk.k, chunk.v, scale=1.0, mask=mask)
    assert torch.isfinite(out).all() and (out[:, :, 1] == 0).all()


def test_long_chunks_run_in_blocks_with_the_same_result(monkeypatch):
    spec = kvspec.parse("int4-kchan-res5")
    _, q, k, v = inputs(11, 90, 2, 2)
    layer = LayerStore(spec.k, spec.v, spec.residual, "fp16")
    chunk = layer.append(torch.from_numpy(k), torch.from_numpy(v))
    whole = compressed_attention(torch.from_numpy(q), chunk.q_pos, chunk.k, chunk.v, scale=0.1)
    monkeypatch.setattr(attention, "SCORE_BLOCK_BYTES", 4 * 4 * 90 * 7)  # 7 queries per block
    blocked = compressed_attention(torch.from_numpy(q), chunk.q_pos, chunk.k, chunk.v, scale=0.1)
    assert torch.equal(whole, blocked)


def test_dispatcher_prefers_a_kernel_and_falls_back_when_it_refuses(monkeypatch):
    spec = kvspec.parse("int4")
    layer = LayerStore(spec.k, spec.v, 0, "fp16")
    chunk = layer.append(torch.randn(1, 1, 4, D), torch.randn(1, 1, 4, D))
    q = torch.randn(1, 2, 4, D)
    reference = attention.attention_reference(q, chunk.q_pos, chunk.k, chunk.v, scale=0.1)
    calls = []
    monkeypatch.setattr(attention, "_KERNELS", [])
    attention.register_kernel(lambda *a, **kw: calls.append("refused"))
    assert torch.equal(compressed_attention(q, chunk.q_pos, chunk.k, chunk.v, scale=0.1), reference)
    attention.register_kernel(lambda q, *a, **kw: torch.zeros_like(q))
    assert (compressed_attention(q, chunk.q_pos, chunk.k, chunk.v, scale=0.1) == 0).all()
    assert calls == ["refused", "refused"]


@pytest.mark.parametrize("window", [None, 6])
def test_masks_holding_only_causality_reach_the_kernels_as_none(monkeypatch, window):
    """transformers materializes the causal mask of a chunk after the first; the kernels refuse any mask,
    so a mask that keeps every key causality (and the window) keeps is dropped, and a padding mask is not."""
    spec = kvspec.parse("int4-res3")
    layer = LayerStore(spec.k, spec.v, spec.residual, "fp16", window=window)
    layer.append(torch.randn(2, 1, 9, D), torch.randn(2, 1, 9, D))
    chunk = layer.append(torch.randn(2, 1, 5, D), torch.randn(2, 1, 5, D))
    q = torch.randn(2, 2, 5, D)
    causal = torch.arange(14)[None, :] <= chunk.q_pos[:, None]
    if window is not None:
        causal &= torch.arange(14)[None, :] > chunk.q_pos[:, None] - window
    seen = []
    monkeypatch.setattr(attention, "_KERNELS", [])
    attention.register_kernel(lambda *a, mask=None, **kw: seen.append(mask))
    padded = causal[None, None].repeat(2, 1, 1, 1)
    padded[1, ..., :5] = False  # batch row 1 is left-padded by 5 tokens (inside the window too)
    for mask in (causal[None, None], causal[None, None] | ~causal, padded):
        got = compressed_attention(q, chunk.q_pos, chunk.k, chunk.v, scale=0.1, window=window, mask=mask)
        want = attention.attention_reference(q, chunk.q_pos, chunk.k, chunk.v, scale=0.1, window=window, mask=mask)
        assert torch.equal(got, want)
    assert seen[0] is None and seen[1] is None and seen[2] is padded
