"""GGUF files (llama, qwen2, gemma3) as mlx-lm models, with no hub access.

Weights are read with the `gguf` package. Q4_0 / Q4_1 / Q8_0 blocks are exactly MLX affine
quantization with group 32 (value = scale * code + bias), so they stay quantized: the block's codes
are repacked LSB-first into uint32 words and the layer becomes a QuantizedLinear/QuantizedEmbedding.
Every other type (K-quants, Q5_0, ...) is dequantized by gguf's NumPy dequantizer. Undone on load:
llama-arch files store q/k rows permuted for interleaved RoPE (llama.cpp's convert), gemma files
store norm weights + 1. The tokenizer comes from the GGUF metadata through transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

GROUP = 32  # elements per Q4_0 / Q4_1 / Q8_0 block
ARCHITECTURES = ("llama", "qwen2", "gemma3")

# GGUF tensor name (after "blk.N.") -> mlx-lm parameter name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_FFN_NORM = {"llama": "post_attention_layernorm", "qwen2": "post_attention_layernorm", "gemma3": "pre_feedforward_layernorm"}
_GEMMA_NORMS = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def default_dtype() -> mx.Dtype:
    """fp32 on the CPU (MLX has no fast half-precision matmuls there), fp16 on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.float16


def load_gguf(path: str | Path, dtype: mx.Dtype | None = None) -> tuple[nn.Module, Any]:
    """(mlx-lm model, TokenizerWrapper) for a llama / qwen2 / gemma3 GGUF file; float weights (and
    the scales of quantized ones) in `dtype` (default_dtype())."""
    import gguf

    path, dtype = Path(path), dtype or default_dtype()
    reader = gguf.GGUFReader(path)
    meta = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    arch = meta["general.architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path.name}: GGUF architecture {arch!r} is not supported (kvmlx reads {', '.join(ARCHITECTURES)})")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path.name}: per-dimension RoPE frequencies (rope_freqs) are not supported")
    config = _config(arch, meta, tensors)
    weights, bits = {}, {}
    for name, t in tensors.items():
        target = _param_name(arch, name)
        if t.tensor_type.name in _QUANTIZED:
            module = target.rsplit(".", 1)[0]
            weights.update({f"{module}.{k}": v for k, v in _affine(t).items()})
            bits[module] = _QUANTIZED[t.tensor_type.name][0]
        else:
            weights[target] = _float(t, gguf)
        if arch == "gemma3" and name.endswith("norm.weight"):
            weights[target] = weights[target] - 1.0
    if arch == "llama":
        _unpermute_qk(weights, config)
    model = _build(config, weights, bits, dtype)
    return model, _tokenizer(path)


def _value(field: Any) -> Any:
    v = field.contents()
    return v.item() if isinstance(v, np.generic) else v


def _config(arch: str, meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm ModelArgs fields (with transformers' model_type) from the GGUF metadata."""
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    heads = g("attention.head_count")
    hidden = g("embedding_length")
    config = {
        "model_type": {"gemma3": "gemma3_text"}.get(arch, arch),
        "hidden_size": hidden,
        "num_hidden_layers": g("block_count"),
        "intermediate_size": g("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv", heads),
        "head_dim": g("attention.key_length", hidden // heads),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon"),
        # The embedding's rows: the token list can be shorter than the padded vocabulary.
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "max_position_embeddings": g("context_length"),
        "rope_theta": g("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if g("attention.sliding_window") is not None:
        config["sliding_window"] = g("attention.sliding_window")
    scaling = g("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"RoPE scaling {scaling!r} in GGUF metadata is not supported")
        config["rope_scaling"] = {"type": "linear", "factor": g("rope.scaling.factor")}
    return config


def _param_name(arch: str, name: str) -> str:
    base, suffix = name.rsplit(".", 1)
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        mapped = _LAYER_NAMES.get(part) or (_FFN_NORM[arch] if part == "ffn_norm" else _GEMMA_NORMS.get(part))
        if mapped is None:
            raise ValueError(f"GGUF tensor {name!r} has no counterpart in mlx-lm's {arch} model")
        return f"model.layers.{layer}.{mapped}.{suffix}"
    if base not in _TOP_NAMES:
        raise ValueError(f"GGUF tensor {name!r} has no counterpart in mlx-lm's {arch} model")
    return f"{_TOP_NAMES[base]}.{suffix}"


# --- tensor data --------------------------------------------------------------------------------

# type -> (bits, bytes per block). Block layouts (ggml-common.h): Q4_0 = fp16 d, 16 bytes of nibbles
# (value d * (q - 8)); Q4_1 = fp16 d, fp16 m, 16 bytes (d * q + m); Q8_0 = fp16 d, 32 int8 (d * q).
_QUANTIZED = {"Q4_0": (4, 18), "Q4_1": (4, 20), "Q8_0": (8, 34)}


def _float(t: Any, gguf: Any) -> np.ndarray:
    """A float or non-affine tensor as fp32, shaped [rows, cols] (GGUF lists dims innermost first)."""
    kind, data = t.tensor_type.name, np.asarray(t.data)
    if kind == "F32":
        arr = data.astype(np.float32)
    elif kind == "F16":
        arr = data.astype(np.float32)
    elif kind == "BF16":
        arr = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        arr = gguf.quants.dequantize(data, t.tensor_type)
    return arr.reshape(tuple(int(s) for s in reversed(t.shape)))


def _affine(t: Any) -> dict[str, np.ndarray]:
    """A Q4_0 / Q4_1 / Q8_0 tensor [rows, cols] -> MLX affine {"weight": codes uint32 [rows, cols*bits/32],
    "scales", "biases": fp16 [rows, cols/32]}, value = scale * code + bias (-8d, -128d are exact in fp16)."""
    kind, cols = t.tensor_type.name, int(t.shape[0])
    blocks = np.asarray(t.data, np.uint8).reshape(-1, cols // GROUP, _QUANTIZED[kind][1])
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    if kind == "Q8_0":
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint32)
        bias = (d.astype(np.float32) * -128).astype(np.float16)
    else:
        start = 4 if kind == "Q4_1" else 2
        qs = blocks[..., start:]
        # Byte j holds element j in its low nibble and element j + 16 in its high nibble.
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.uint32)
        bias = blocks[..., 2:4].copy().view(np.float16)[..., 0] if kind == "Q4_1" else (d.astype(np.float32) * -8).astype(np.float16)
    bits = _QUANTIZED[kind][0]
    rows = codes.shape[0]
    per_word = 32 // bits
    words = codes.reshape(rows, -1, per_word) << (bits * np.arange(per_word, dtype=np.uint32))
    return {"weight": words.sum(axis=-1, dtype=np.uint32), "scales": d, "biases": bias}


def _unpermute_qk(weights: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    """Undo llama.cpp's q/k row permutation (HF half-split RoPE -> interleaved): rows of head h are
    stored as (h, j, a) for HF row (h, a, j), a in {0, 1}, j < head_dim / 2."""
    d = config["head_dim"]
    for proj, heads in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
        gguf_row = np.arange(heads * d).reshape(heads, d // 2, 2).swapaxes(1, 2).reshape(-1)
        for i in range(config["num_hidden_layers"]):
            prefix = f"model.layers.{i}.self_attn.{proj}."
            for suffix in ("weight", "scales", "biases", "bias"):
                if prefix + suffix in weights:
                    weights[prefix + suffix] = weights[prefix + suffix][gguf_row]


# --- model and tokenizer ------------------------------------------------------------------------


def _build(config: dict[str, Any], weights: dict[str, np.ndarray], bits: dict[str, int], dtype: mx.Dtype) -> nn.Module:
    import importlib

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    arrays = {k: mx.array(v) if v.dtype == np.uint32 else mx.array(v).astype(dtype) for k, v in weights.items()}
    if hasattr(model, "sanitize"):
        arrays = model.sanitize(arrays)
    nn.quantize(model, class_predicate=lambda p, m: {"group_size": GROUP, "bits": bits[p]} if p in bits else False)
    model.load_weights(list(arrays.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


def _tokenizer(path: Path) -> Any:
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import AutoTokenizer

    return TokenizerWrapper(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
