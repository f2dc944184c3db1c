"""kvmlx caches inside mlx-lm: tiny random llama, qwen2 and gemma3_text models through mlx-lm's own
model code, generate loop and prompt-cache utilities."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import kvspec
from kvspec.tolerances import assert_close, tolerance

from .conftest import tiny_model, word_tokenizer

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")
import kvmlx  # noqa: E402
from kvmlx.runner import Runner  # noqa: E402

KINDS = ["llama", "qwen2", "gemma3"]
TOKENS = np.random.default_rng(0).integers(0, 100, 40).tolist()


def logits_through(model, cache, sizes):
    outs, start = [], 0
    for size in sizes:
        outs.append(model(mx.array([TOKENS[start : start + size]]), cache=cache)[0].astype(mx.float32))
        start += size
    return np.array(mx.concatenate(outs))


@pytest.mark.parametrize("kind", KINDS)
def test_fp16_cache_matches_mlx_lm_cache(kind):
    """An fp16 model: mlx-lm's KVCache holds the same fp16 K/V, so only attention arithmetic differs."""
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny_model(kind, mx.float16)
    sizes = [13, 1, 1, 18, 7]  # gemma's window of 8 is crossed inside and across chunks
    want = logits_through(model, make_prompt_cache(model), sizes)
    got = logits_through(model, kvmlx.make_cache(model, "fp16"), sizes)
    assert_close(got, want, tolerance("model-float", 16, "fp16"), kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", ["int4", "int2-g32-kchan-res4", "k8v4-vrot-res8", "rank32-q4-hadamard", "bf16"])
def test_chunked_prefill_nll_equals_decoding_nll(kind, text):
    runner = Runner.wrap(tiny_model(kind))
    chunked = runner.nll(TOKENS, runner.new_cache(text), chunk=16)
    decoded = runner.nll(TOKENS, runner.new_cache(text), chunk=1)
    assert_close(chunked, decoded, tolerance("float", 16, "fp32"), text)
    # The compressed cache changes the model's predictions (the test would catch a silent fp16 cache).
    if text != "bf16":
        assert not np.allclose(chunked, runner.nll(TOKENS, runner.new_cache("fp16"), chunk=16), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_mlx_lm_generate_and_prompt_cache_files(kind, tmp_path):
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import can_trim_prompt_cache, load_prompt_cache, save_prompt_cache, trim_prompt_cache

    model = tiny_model(kind)
    cache = kvmlx.make_cache(model, "int4")
    prompt = mx.array(TOKENS[:20])
    tokens = [t for t, _ in generate_step(prompt, model, prompt_cache=cache, max_tokens=6)]
    assert len(tokens) == 6 and cache[0].offset == 26
    greedy = Runner.wrap(model).greedy(TOKENS[:20], kvmlx.make_cache(model, "int4"), 6)
    assert tokens == greedy

    save_prompt_cache(str(tmp_path / "p.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "p.safetensors"))
    step = mx.array([[TOKENS[0]]])
    np.testing.assert_array_equal(np.array(model(step, cache=cache)), np.array(model(step, cache=loaded)))
    # Sliding-window layers have dropped tokens by now, as mlx-lm's RotatingKVCache has.
    assert can_trim_prompt_cache(cache) == (kind != "gemma3")
    assert trim_prompt_cache(cache, 3) == (0 if kind == "gemma3" else 3)


def test_stream_generate_with_a_kvmlx_cache():
    from mlx_lm import stream_generate

    model = tiny_model("llama")
    tok = word_tokenizer()
    pieces = list(stream_generate(model, tok, "w1 w2 w3", max_tokens=5, prompt_cache=kvmlx.make_cache(model, "int8")))
    assert len(pieces) == 5 and pieces[-1].generation_tokens == 5


def test_dispatch_leaves_plain_caches_alone_and_installs_once():
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny_model("llama")
    before = logits_through(model, make_prompt_cache(model), [40])
    kvmlx.make_cache(model, "int4")
    patched = llama.scaled_dot_product_attention
    kvmlx.make_cache(model, "int8")
    assert llama.scaled_dot_product_attention is patched
    np.testing.assert_array_equal(logits_through(model, make_prompt_cache(model), [40]), before)
    np.testing.assert_array_equal(logits_through(model, None, [40]), np.array(model(mx.array([TOKENS]))[0]))


def test_make_cache_reads_windows_and_refuses_what_does_not_fit():
    model = tiny_model("gemma3")
    cache = kvmlx.make_cache(model, "int4")
    assert [c.window for c in cache] == [8, 8, None] and cache.shape.sliding_layers == 2
    with pytest.raises(kvspec.SpecError, match="PCA"):
        kvmlx.make_cache(model, "rank16")
    with pytest.raises(kvspec.SpecError, match="group size"):
        kvmlx.make_cache(tiny_model("llama"), "int4-g128")
    bases = {"k": [np.eye(64, dtype=np.float32)[None, :, :20]] * 3}
    assert kvmlx.make_cache(model, "krank16v8", bases)[2].k.basis.shape == (1, 64, 16)


def test_cache_bytes_are_the_budget():
    from kvspec.budget import kv_bytes

    runner = Runner.wrap(tiny_model("gemma3"))
    for text in ("fp16", "int4-kchan-res4", "rank32-q4-hadamard"):
        cache = runner.new_cache(text)
        runner.nll(TOKENS, cache, 16)
        assert runner.cache_bytes(cache) == kv_bytes(kvspec.parse(text), runner.shape, len(TOKENS))


def test_importing_kvmlx_imports_neither_torch_nor_mlx_lm():
    code = "import kvmlx, sys; bad = {'torch', 'transformers', 'mlx_lm'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


class OracleCache(kvmlx.LayerCache):
    """A LayerCache whose attention is kvspec's NumPy protocol oracle over the raw K/V history."""

    def update_and_fetch(self, keys, values):
        self.history = [mx.concatenate([h, x], axis=-2) for h, x in zip(getattr(self, "history", (keys[..., :0, :], values[..., :0, :])), (keys, values))]
        return super().update_and_fetch(keys, values)

    def attend(self, queries, keys, values, scale):
        from kvspec import reference as R
        from kvspec.cachefile import layer_tensor_spec

        spec = kvspec.KVSpec(layer_tensor_spec(self.spec, self.window, "k"), layer_tensor_spec(self.spec, self.window, "v"),
                             self.spec.residual, self.spec.float_dtype)
        bases = {w: np.array(s.basis) for w, s in (("k", self.k), ("v", self.v)) if s.basis is not None}
        k, v = (np.array(h.astype(mx.float32)) for h in self.history)
        out = R.attend_as_decoded(np.array(queries.astype(mx.float32)), k, v, spec, bases=bases, scale=scale, window=self.window)
        return mx.array(out.astype(np.float32)).astype(queries.dtype)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("text", ["int4", "k4v2-kchan-g32-rot-res4", "rank32-q4-random"])
def test_model_through_the_cache_equals_the_model_with_oracle_attention(kind, text):
    """End to end: every layer's attention replaced by kvspec.reference.attend_as_decoded."""
    model = tiny_model(kind)
    runner = Runner.wrap(model)
    got = runner.nll(TOKENS, runner.new_cache(text), 16)
    oracle = kvmlx.make_cache(model, text)
    oracle[:] = [OracleCache(c.spec, {w: s.basis for w, s in (("k", c.k), ("v", c.v)) if s.basis is not None}, c.window, i)
                 for i, c in enumerate(oracle)]
    want = runner.nll(TOKENS, oracle, 16)
    assert_close(got, want, tolerance("model-int", 4, "fp32"), text)
