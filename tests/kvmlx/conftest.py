"""Shared fixtures: mlx is required (tests skip without it); tiny random mlx-lm models."""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")


def tiny_model(kind: str, dtype=None):
    """A tiny random mlx-lm model: llama (GQA 4/2), qwen2 (qkv bias) or gemma3_text (window 8 on
    2 of 3 layers); head dim 64, vocab 100. Weights in `dtype` (default fp32)."""
    from mlx_lm.models import gemma3_text, llama, qwen2

    mx.random.seed(0)
    common = dict(intermediate_size=128, rms_norm_eps=1e-5, vocab_size=100)
    if kind == "llama":
        model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=64, **common))
    elif kind == "qwen2":
        model = qwen2.Model(qwen2.ModelArgs(model_type="qwen2", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, **common))
    elif kind == "gemma3":
        model = gemma3_text.Model(gemma3_text.ModelArgs(
            model_type="gemma3_text", hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            head_dim=64, sliding_window=8, sliding_window_pattern=3, query_pre_attn_scalar=64, **common))
    else:
        raise ValueError(kind)
    if dtype is not None:
        model.set_dtype(dtype)
    # Random init gives tiny logits; scale the embeddings so attention patterns are not uniform.
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 4
    model.eval()
    mx.eval(model.parameters())
    return model


TINY_LLAMA = dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, intermediate_size=128, rms_norm_eps=1e-5, vocab_size=100, max_position_embeddings=256)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant{% endif %}"
)


def save_word_tokenizer(directory, chat_template: bool = True) -> None:
    """A word-level tokenizer over w0..w92 plus <s>, </s>, <unk>, <pad>, user, assistant, system (100 ids)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>", "<pad>", "user", "assistant", "system"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(100 - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>"}
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def word_tokenizer(chat_template: bool = True):
    """The word-level tokenizer wrapped for mlx-lm (built in a temporary directory)."""
    import tempfile
    from pathlib import Path

    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        save_word_tokenizer(Path(d), chat_template)
        return TokenizerWrapper(AutoTokenizer.from_pretrained(d))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A local mlx-lm model directory (tiny random llama, word tokenizer with a chat template)."""
    import json

    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    directory = tmp_path_factory.mktemp("tiny-llama")
    mx.random.seed(1)
    model = llama.Model(llama.ModelArgs(**TINY_LLAMA))
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 4
    mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA))
    save_word_tokenizer(directory)
    return directory
