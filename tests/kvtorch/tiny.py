"""Tiny random transformers models (built offline from configs) and a byte-level chat tokenizer."""

from __future__ import annotations

import torch

VOCAB = 258  # 256 bytes + two chat markers


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A 2-4 layer random model of `arch` (head dim 64, GQA where the architecture has it), eval mode.

    fp64 by default: then two chunkings of the same computation differ by ~1e-12, far from flipping
    an fp16 rounding or a quantization code, so protocol checks are exact on any CPU.
    """
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=64)
    configs = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, **common)),
        "mistral": lambda: T.MistralForCausalLM(
            T.MistralConfig(num_hidden_layers=2, num_key_value_heads=2, sliding_window=None, **common)
        ),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_hidden_layers=2, num_key_value_heads=2, **common)),
        # Layers 0 and 2 slide over 8 tokens; gemma3 scales queries by query_pre_attn_scalar.
        "gemma3": lambda: T.Gemma3ForCausalLM(
            T.Gemma3TextConfig(
                num_hidden_layers=4, num_key_value_heads=1, sliding_window=8, sliding_window_pattern=2,
                query_pre_attn_scalar=48, **common,
            )
        ),
        "gpt2": lambda: T.GPT2LMHeadModel(
            T.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
        ),
    }
    torch.manual_seed(seed)
    return configs[arch]().to(dtype).eval()


ARCHS = ("llama", "mistral", "qwen2", "gemma3", "gpt2")


def byte_tokenizer():
    """A byte-level tokenizer with <|im_start|> / <|im_end|> markers and a ChatML-style template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert len(fast) == VOCAB
    return fast
