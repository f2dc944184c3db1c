"""transformers integration on tiny random models of every supported architecture: generate() runs
through the cache, an fp16 cache matches DynamicCache, chunked prefill equals token-by-token decoding
(the protocol), padded batches, save/load continues decoding, and the attention binding is guarded."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'kvmlx[torch]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install 'kvmlx[torch]')")

from transformers import DynamicCache  # noqa: E402

import kvspec  # noqa: E402
from kvspec.budget import kv_bytes  # noqa: E402
from kvspec.cachefile import CacheFileError  # noqa: E402
from kvspec.tolerances import assert_close, spec_tolerance, tolerance  # noqa: E402
from kvtorch import integration  # noqa: E402
from kvtorch.cache import KVCache, make_cache  # noqa: E402
from kvtorch.cachefile import load_cache, save_cache  # noqa: E402
from kvtorch.model_info import model_info  # noqa: E402
from kvtorch.runner import Runner  # noqa: E402

from .tiny import ARCHS, VOCAB, tiny_model  # noqa: E402

# Same numerics in another chunking: only the arithmetic order differs (fp64 models, see tiny.py).
SAME = tolerance("float", 16, "fp32")
PROMPT = np.random.default_rng(0).integers(0, VOCAB, 40).tolist()


@pytest.fixture(scope="module", params=ARCHS)
def runner(request):
    return Runner.wrap(tiny_model(request.param), name=request.param)


def logits(runner, tokens, cache, chunks):
    out, pos = [], 0
    for size in chunks:
        out.append(runner._forward(tokens[pos : pos + size], cache))
        pos += size
    return torch.cat(out).numpy()


def test_generate_runs_through_the_cache_and_equals_greedy_decoding(runner):
    ids = torch.tensor([PROMPT])
    cache = runner.new_cache("int4-kchan-res8")
    out = runner.model.generate(ids, max_new_tokens=6, do_sample=False, **{runner.cache_arg: cache})
    integration.finish()
    assert out.shape == (1, 46) and cache.get_seq_length() == 45
    assert out[0, 40:].tolist() == runner.greedy(PROMPT, runner.new_cache("int4-kchan-res8"), 6)


def test_fp16_cache_matches_dynamic_cache(runner):
    chunks = [20, 1, 19]
    want = logits(runner, PROMPT, DynamicCache(config=runner.model.config), chunks)
    got = logits(runner, PROMPT, runner.new_cache("fp16"), chunks)
    assert_close(got, want, spec_tolerance(kvspec.parse("fp16"), "fp32", model=True), runner.name)


@pytest.mark.parametrize("text", ["int4", "int2-kchan-res8", "rank16-random"])
def test_chunked_prefill_nll_equals_token_by_token_decoding(runner, text):
    chunked = runner.nll(PROMPT, runner.new_cache(text), chunk=13)
    decoded = runner.nll(PROMPT, runner.new_cache(text), chunk=1)
    assert chunked.shape == (39,) and chunked.dtype == np.float64
    assert_close(chunked, decoded, SAME, f"{runner.name} {text}")
    # The cache matters at this tolerance: fp16 gives other values, so equality above is not vacuous.
    assert np.abs(runner.nll(PROMPT, runner.new_cache("fp16"), chunk=13) - chunked).max() > 10 * SAME.atol


@pytest.mark.parametrize("text", ["k4v2-kchan-rot3-res5", "krank16vint3-kq4-krandom-vg32"])
def test_every_layer_attends_as_the_kvspec_decode_oracle(runner, text, monkeypatch):
    """Inside the model: each layer's attention output over a chunked prefill equals
    kvspec.reference.attend_as_decoded on that layer's queries, keys and values."""
    from kvspec import reference as R
    from kvspec.cachefile import layer_tensor_spec
    from kvtorch.cache import KVLayer

    seen: dict[int, dict[str, list]] = {}
    update, attend = KVLayer.update, integration.compressed_attention

    def record_update(layer, k, v, *args, **kwargs):
        rec = seen.setdefault(layer.layer_idx, {"k": [], "v": [], "q": [], "out": [], "scale": None})
        rec["k"].append(k), rec["v"].append(v)
        seen["last"] = rec
        return update(layer, k, v, *args, **kwargs)

    def record_attend(q, q_pos, k, v, *, scale, **kw):
        out = attend(q, q_pos, k, v, scale=scale, **kw)
        rec = seen["last"]
        rec["q"].append(q), rec["out"].append(out)
        rec["scale"] = scale
        return out

    monkeypatch.setattr(KVLayer, "update", record_update)
    monkeypatch.setattr(integration, "compressed_attention", record_attend)
    spec = kvspec.parse(text)
    cache = runner.new_cache(spec)
    logits(runner, PROMPT, cache, [13, 1, 1, 25])
    for i, layer in enumerate(cache.layers):
        rec = {n: torch.cat(a, dim=2).detach().numpy() for n, a in seen[i].items() if n != "scale"}
        layer_spec = kvspec.KVSpec(
            layer_tensor_spec(spec, layer.window, "k"), layer_tensor_spec(spec, layer.window, "v"), spec.residual,
            spec.float_dtype,
        )
        bases = {w: b.numpy() for w, b in layer.bases.items() if b is not None}
        want = R.attend_as_decoded(
            rec["q"], rec["k"], rec["v"], layer_spec, bases=bases, scale=seen[i]["scale"], window=layer.window
        )
        assert_close(rec["out"], want, spec_tolerance(layer_spec, "fp32"), f"{runner.name} layer {i} {text}")


def test_cache_bytes_count_what_kvspec_budgets(runner):
    spec = kvspec.parse("int4-kchan-res8")
    cache = runner.new_cache(spec)
    runner.nll(PROMPT, cache, chunk=16)
    assert runner.cache_tokens(cache) == len(PROMPT)
    assert runner.cache_bytes(cache) == kv_bytes(spec, runner.shape, len(PROMPT))


@pytest.mark.parametrize("text", ["int4-kchan-res8", "rank16-q4-random", "bf16"])
def test_save_load_continues_with_identical_greedy_tokens(runner, text, tmp_path):
    cache = runner.new_cache(text)
    first = runner.greedy(PROMPT, cache, 5)
    path = tmp_path / "cache.safetensors"
    save_cache(cache, path, runner.name, token_ids=cache.token_ids)
    loaded = load_cache(path, runner.model)
    assert loaded.token_ids == PROMPT + first[:-1] and loaded.get_seq_length() == 44
    for a, b in zip(cache.stores(), loaded.stores()):
        for x, y in ((a.k, b.k), (a.v, b.v)):
            ex, ey = x.export(), y.export()
            assert sorted(ex) == sorted(ey) and all(torch.equal(ex[k], ey[k]) for k in ex)
    assert runner.greedy(first[-1:], loaded, 8) == runner.greedy(first[-1:], cache, 8)


def test_a_cache_filled_in_inference_mode_continues_outside_it():
    model = tiny_model("gemma3")
    arg = integration.cache_argument(model)
    cache, ids = make_cache(model, "k4vrank16-q4-random-kchan-rot-res3"), torch.tensor([PROMPT])
    with torch.inference_mode():
        model(ids[:, :30], **{arg: cache})
    out = model(ids[:, 30:], **{arg: cache}).logits  # grad enabled: the stored tokens stay detached
    integration.finish()
    assert out.requires_grad and cache.get_seq_length() == 40
    out.sum().backward()


def test_a_cache_file_loads_only_into_its_model_configuration(tmp_path):
    llama, qwen = Runner.wrap(tiny_model("llama")), Runner.wrap(tiny_model("qwen2"))
    cache = llama.new_cache("int8")
    llama.nll(PROMPT[:10], cache, 10)
    save_cache(cache, tmp_path / "c.safetensors", "tiny-llama")
    with pytest.raises(CacheFileError, match="another configuration"):
        load_cache(tmp_path / "c.safetensors", qwen.model)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_left_padded_batch_matches_dynamic_cache(arch):
    model = tiny_model(arch)
    arg = integration.cache_argument(model)
    ids = torch.tensor([PROMPT[:12], [0] * 4 + PROMPT[12:20]])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    tol = spec_tolerance(kvspec.parse("fp16"), "fp32", model=True)
    want_cache, got_cache = DynamicCache(config=model.config), make_cache(model, "fp16")
    for a, b in ((0, 10), (10, 12)):  # a prefill, then a chunk whose sliding layers hold their window
        m = mask[:, :b]
        want = model(ids[:, a:b], attention_mask=m, **{arg: want_cache}).logits
        got = model(ids[:, a:b], attention_mask=m, **{arg: got_cache}).logits
        integration.finish()
        keep = mask[:, a:b].bool()
        assert_close(got[keep].detach().numpy(), want[keep].detach().numpy(), tol, f"{arch} padded {a}:{b}")


def test_beam_search_through_an_fp16_cache_finds_the_dynamic_cache_beams():
    model = tiny_model("llama")
    ids = torch.tensor([PROMPT[:6]])
    want = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False)
    got = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, **{integration.cache_argument(model): make_cache(model, "fp16")})
    integration.finish()
    assert torch.equal(got, want)


def test_sliding_layers_stay_float_and_trimmed():
    runner = Runner.wrap(tiny_model("gemma3"))
    cache = runner.new_cache("int4")
    runner.nll(PROMPT, cache, chunk=7)
    windows = runner.windows
    assert windows == (8, None, 8, None)
    for store, w in zip(cache.stores(), windows):
        if w is None:
            assert store.k.n == len(PROMPT) and len(store.k.tail) == 0
        else:
            assert store.k.n == 0 and len(store.k.tail) == w and store.k.spec == kvspec.Float()


def test_attention_that_bypasses_the_cache_is_an_error():
    model = tiny_model("llama")  # still on SDPA: nothing reads the kvmlx layers
    info = model_info(model.config)
    cache = KVCache(kvspec.parse("int8"), info, {})
    with pytest.raises(RuntimeError, match="attention did not read the kvmlx cache"):
        model(torch.tensor([PROMPT[:5]]), **{integration.cache_argument(model): cache})
    integration.clear()


def test_without_a_kvmlx_cache_the_attention_is_sdpa():
    model = tiny_model("gemma3")
    ids = torch.tensor([PROMPT])
    want = model(ids).logits
    make_cache(model, "int4")
    assert model.config._attn_implementation == "kvmlx"
    assert torch.equal(model(ids).logits, want)


def test_low_rank_bases_from_calibration_or_the_spec():
    runner = Runner.wrap(tiny_model("llama"))
    with pytest.raises(kvspec.SpecError, match="kvmlx calibrate"):
        runner.new_cache("rank16")
    full = [np.linalg.qr(np.random.default_rng(i).standard_normal((2, 64, 64)))[0] for i in range(2)]
    cache = runner.new_cache("rank16", {"k": full, "v": full})  # a full basis: its first 16 columns are used
    assert cache.layers[0].bases["k"].shape == (2, 64, 16)
    with pytest.raises(kvspec.SpecError, match="basis of layer 0 has shape"):
        runner.new_cache("rank16", {"k": [b[:, :8, :] for b in full], "v": full})
    assert runner.new_cache("rank16-identity").layers[1].bases["v"].shape == (2, 64, 16)


def test_activations_are_the_post_rope_keys_the_cache_stores():
    runner = Runner.wrap(tiny_model("llama"))
    acts = runner.activations(PROMPT)
    cache = runner.new_cache("fp16")
    runner.nll(PROMPT, cache, chunk=40)
    stores = cache.stores()
    # Layer 0 sees the same input either way; later layers see attention over fp16-rounded K/V.
    assert np.array_equal(acts["k"][0].astype(np.float16), stores[0].k.tail.view()[0].numpy())
    assert np.array_equal(acts["v"][0].astype(np.float16), stores[0].v.tail.view()[0].numpy())
    for i, store in enumerate(stores):
        assert acts["k"][i].shape == (2, 40, 64) and acts["k"][i].dtype == np.float32
        for which, ts in (("k", store.k), ("v", store.v)):
            got = ts.tail.view()[0].float().numpy()
            assert_close(acts[which][i], got, spec_tolerance(kvspec.parse("fp16"), "fp32", model=True), f"{which}{i}")
