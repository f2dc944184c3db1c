"""The MLX Runner (docs/BACKENDS.md) and kvspec cache files, on a tiny local mlx-lm model directory."""

from __future__ import annotations

import numpy as np
import pytest

import kvspec
from kvspec.cachefile import CacheFileError, config_fingerprint
from kvspec.reference import round_to
from kvspec.tolerances import assert_close, tolerance

from .conftest import tiny_model, word_tokenizer

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")
import kvmlx  # noqa: E402


def raw(a: mx.array) -> np.ndarray:
    """The array's bits as NumPy (NumPy has no bfloat16)."""
    return np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return kvmlx.Runner(str(tiny_model_dir))


def test_model_facts(runner, tiny_model_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(tiny_model_dir))
    assert (runner.backend, runner.device, runner.max_context) == ("mlx", "cpu", 256)
    assert runner.shape == kvspec.budget.ModelShape(layers=2, kv_heads=2, head_dim=64)
    assert runner.windows == (None, None)
    # The fingerprint transformers' config gives, so cache files move between backends.
    want = config_fingerprint(cfg.model_type, runner.shape, cfg.vocab_size, (None, None))
    assert runner.fingerprint == want


def test_nll_is_the_same_in_any_chunking(runner):
    tokens = runner.tokenize(" ".join(f"w{i % 90}" for i in range(0, 300, 7)))
    assert tokens[0] == runner.tokenizer.bos_token_id or len(tokens) == 43
    a = runner.nll(tokens, runner.new_cache("int4-kchan-g32-res4"), chunk=5)
    b = runner.nll(tokens, runner.new_cache("int4-kchan-g32-res4"), chunk=64)
    assert a.shape == (len(tokens) - 1,) and a.dtype == np.float64
    assert_close(a, b, tolerance("float", 16, "fp32"), "nll")


def test_stream_chat_reuses_the_cache_across_turns(runner, monkeypatch):
    cache = runner.new_cache("int8")
    messages = [{"role": "user", "content": "w1 w2 w3"}]
    first = "".join(runner.stream_chat(messages, cache, 6))
    prompt = runner.tokenizer.encode(runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    greedy = runner.greedy(prompt, runner.new_cache("int8"), 6)
    assert first.split() == runner.tokenizer.decode([t for t in greedy if t not in runner.tokenizer.eos_token_ids]).split()
    held = list(cache.token_ids)
    assert runner.cache_tokens(cache) == len(held) > len(prompt)

    fed = []
    forward = runner._forward
    monkeypatch.setattr(runner, "_forward", lambda tokens, c: (fed.append(len(tokens)), forward(tokens, c))[1])
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "w4"}]
    list(runner.stream_chat(messages, cache, 3))
    text = runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = runner.tokenizer.encode(text, add_special_tokens=False)
    if ids[: len(held)] == held:
        assert fed[0] == len(ids) - len(held) and cache.token_ids[: len(held)] == held
    else:  # the reply re-tokenizes differently: the cache is refilled from scratch
        assert fed[0] == len(ids)


def test_activations_are_post_rope_keys_and_values(runner):
    tokens = list(range(7, 50))
    acts = runner.activations(tokens)
    assert len(acts["k"]) == 2 and acts["k"][0].shape == (2, len(tokens), 64) and acts["v"][1].dtype == np.float32
    cache = runner.new_cache("fp16")
    runner.nll(tokens, cache, 16)
    for which, store in (("k", cache[1].k), ("v", cache[1].v)):
        held = np.array(store.arrays()["tail"][0].astype(mx.float32))
        assert_close(held, round_to(acts[which][1], "fp16"), tolerance("float", 16, "fp16"), which)


@pytest.mark.parametrize("text", ["int4-kchan-g32-res4", "rank16-random-bf16", "rank32-q4-hadamard", "fp16"])
def test_cache_file_round_trip(runner, tmp_path, text):
    tokens = list(range(10, 53))
    cache = runner.new_cache(text)
    runner.nll(tokens, cache, 16)
    kvmlx.save_cache(cache, tmp_path / "c.safetensors", "tiny")
    loaded = kvmlx.load_cache(tmp_path / "c.safetensors", runner.model)
    assert loaded.token_ids == tokens and loaded.offset == len(tokens) and loaded.spec == kvspec.parse(text)
    for a, b in zip(cache, loaded):
        for mine, theirs in ((a.k, b.k), (a.v, b.v)):
            for name, arr in mine.arrays().items():
                got = theirs.arrays()[name]
                assert got.dtype == arr.dtype, name
                np.testing.assert_array_equal(raw(arr), raw(got), name)
    assert runner.greedy([3, 4], cache, 4) == runner.greedy([3, 4], loaded, 4)


def test_cache_file_refuses_another_model(runner, tmp_path):
    cache = runner.new_cache("int4")
    runner.nll([5, 6, 7], cache, 4)
    kvmlx.save_cache(cache, tmp_path / "c.safetensors", "tiny")
    with pytest.raises(CacheFileError, match="another configuration"):
        kvmlx.load_cache(tmp_path / "c.safetensors", tiny_model("gemma3"))


def test_empty_cache_saves_and_peak_memory_is_reported(runner, tmp_path):
    kvmlx.save_cache(runner.new_cache("int4-kchan-g32-res4"), tmp_path / "e.safetensors", "tiny")
    assert kvmlx.load_cache(tmp_path / "e.safetensors", runner.model).offset == 0
    runner.reset_peak_memory()
    runner.nll([1, 2, 3], runner.new_cache("fp16"), 2)
    assert runner.peak_memory() > 0


def test_chat_needs_a_chat_template():
    runner = kvmlx.Runner.wrap(tiny_model("llama"), word_tokenizer(chat_template=False), name="base")
    with pytest.raises(ValueError, match="no chat template"):
        next(runner.stream_chat([{"role": "user", "content": "w1"}], runner.new_cache("int4"), 2))
