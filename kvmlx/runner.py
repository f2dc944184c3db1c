"""The MLX `Runner` the CLI drives (docs/BACKENDS.md): perplexity, chat and calibration through a kvspec cache.

Every method feeds tokens through the cache it is given, so what `nll` measures is what decoding
with that cache computes (chunked prefill follows the same protocol as token-by-token decoding).
Decoding is greedy. Batch size 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from kvspec.budget import ModelShape
from kvspec.models import DEFAULT_MODEL
from kvspec.spec import KVSpec

from .cache import ModelCache
from .integration import fingerprint, make_cache, model_shape, model_windows
from .loading import load_model

ACTIVATION_CHUNK = 512
DEVICES = {"cpu": "cpu", "gpu": "gpu", "metal": "gpu", "cuda": "gpu"}


class Runner:
    """A loaded mlx-lm model plus what the CLI asks of it. model: alias, hub id, directory or .gguf;
    device: "cpu" or "gpu" (also "metal" / "cuda"); default: MLX's default device."""

    backend = "mlx"

    def __init__(self, model: str = DEFAULT_MODEL, device: str | None = None) -> None:
        if device is not None:
            if device not in DEVICES:
                raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
            mx.set_default_device(mx.cpu if DEVICES[device] == "cpu" else mx.gpu)
        self._setup(model, *load_model(model))

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any = None, name: str = "model") -> Runner:
        """A Runner around an already loaded mlx-lm model (tokenizer needed for text methods)."""
        runner = cls.__new__(cls)
        runner._setup(name, model, tokenizer)
        return runner

    def _setup(self, name: str, model: Any, tokenizer: Any) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.shape: ModelShape = model_shape(model)
        self.windows: tuple[int | None, ...] = tuple(model_windows(model))
        self.fingerprint: str = fingerprint(model)

    @property
    def device(self) -> str:
        return "cpu" if mx.default_device() == mx.cpu else "gpu"

    @property
    def max_context(self) -> int | None:
        return getattr(self.model.args, "max_position_embeddings", None)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as the tokenizer encodes a document (with its BOS, if it adds one)."""
        return list(self.tokenizer.encode(text))

    def new_cache(self, spec: KVSpec | str, bases: dict[str, list[Any]] | None = None) -> ModelCache:
        return make_cache(self.model, spec, bases)

    def cache_bytes(self, cache: ModelCache) -> int:
        """Bytes the cache's stored tokens occupy (as kvspec.budget.kv_bytes counts; bases excluded)."""
        return cache.nbytes

    def save_cache(self, cache: ModelCache, path: str) -> None:
        """Write `cache` in the kvspec cache-file format (readable by either backend)."""
        from .cachefile import save_cache

        save_cache(cache, path, self.name)

    def load_cache(self, path: str) -> ModelCache:
        """A cache saved for this model (by either backend); refused with the reason otherwise."""
        from .cachefile import load_cache

        return load_cache(path, self.model)

    def cache_tokens(self, cache: ModelCache) -> int:
        return cache.offset

    def _forward(self, tokens: Sequence[int], cache: Any) -> mx.array:
        """Logits [m, V] (fp32) of feeding `tokens` after what `cache` holds."""
        logits = self.model(mx.array([list(tokens)]), cache=cache)[0].astype(mx.float32)
        if isinstance(cache, ModelCache) and cache.token_ids is not None:
            cache.token_ids += [int(t) for t in tokens]
        return logits

    def nll(self, tokens: Sequence[int], cache: ModelCache, chunk: int) -> np.ndarray:
        """Negative log-likelihood [T - 1] (float64) of token t+1 given tokens <= t, fed through
        `cache` (which starts empty) in chunks of `chunk` tokens; the cache ends holding all T."""
        tokens = [int(t) for t in tokens]
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 token, got {chunk}")
        out = np.empty(max(len(tokens) - 1, 0), dtype=np.float64)
        for a in range(0, len(tokens), chunk):
            b = min(a + chunk, len(tokens))
            logits = self._forward(tokens[a:b], cache)
            targets = tokens[a + 1 : b + 1]
            if not targets:  # the last token is fed so that the cache holds all T; it predicts nothing
                mx.eval(logits)
                continue
            logp = logits[: len(targets)] - mx.logsumexp(logits[: len(targets)], axis=-1, keepdims=True)
            picked = mx.take_along_axis(logp, mx.array(targets)[:, None], axis=-1)[:, 0]
            out[a : a + len(targets)] = -np.array(picked).astype(np.float64)
        return out

    def greedy(self, tokens: Sequence[int], cache: ModelCache, n: int) -> list[int]:
        """Feed `tokens` through `cache`, then decode n tokens greedily (the last one is not fed)."""
        return list(self._decode(tokens, cache, n, stop=()))

    def _decode(self, tokens: Sequence[int], cache: Any, n: int, stop: Sequence[int]) -> Iterator[int]:
        logits = self._forward(tokens, cache)
        for step in range(n):
            tok = int(mx.argmax(logits[-1]).item())
            if tok in stop:
                return
            yield tok
            if step + 1 < n:
                logits = self._forward([tok], cache)

    def stream_chat(self, messages: list[dict[str, str]], cache: ModelCache, max_tokens: int) -> Iterator[str]:
        """Greedy reply to `messages` (chat template applied), streamed as text pieces.

        A cache that already holds the start of this conversation is reused: only the new tokens are
        fed. A cache holding something else is reset and the whole prompt is fed.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.name} has no chat template (a base model?); chat with an instruct model")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        held = cache.token_ids or []
        if cache.offset != len(held) or ids[: len(held)] != held or len(ids) == len(held):
            cache.reset()
            held = []
        detok = self.tokenizer.detokenizer
        detok.reset()
        for tok in self._decode(ids[len(held) :], cache, max_tokens, stop=tuple(self.tokenizer.eos_token_ids)):
            detok.add_token(tok)
            # Reading last_segment consumes it.
            if piece := detok.last_segment:
                yield piece
        detok.finalize()
        if piece := detok.last_segment:
            yield piece

    def activations(self, tokens: Sequence[int]) -> dict[str, list[np.ndarray]]:
        """Post-RoPE keys and values {"k": [L][Hkv, N, D], "v": ...} (fp32) of `tokens`, for calibration.

        Runs the model with mlx-lm's plain KVCache on every layer (sliding layers still attend over
        their window: the model asks the cache for a windowed mask) in chunks, then reads it."""
        from mlx_lm.models.cache import KVCache

        cache = [KVCache() for _ in self.model.layers]
        tokens = [int(t) for t in tokens]
        for a in range(0, len(tokens), ACTIVATION_CHUNK):
            mx.eval(self._forward(tokens[a : a + ACTIVATION_CHUNK], cache)[-1], [c.state for c in cache])
        return {
            which: [np.array(getattr(c, attr)[0, :, : c.offset].astype(mx.float32)) for c in cache]
            for which, attr in (("k", "keys"), ("v", "values"))
        }

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def peak_memory(self) -> int | None:
        """Peak bytes MLX allocated since `reset_peak_memory` (on the CPU, that is host memory)."""
        return int(mx.get_peak_memory())
