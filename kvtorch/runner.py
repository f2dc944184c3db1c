"""The torch `Runner` the CLI drives (docs/BACKENDS.md): perplexity, chat and calibration through a kvspec cache.

Every method feeds tokens through the cache it is given, so what `nll` measures is what decoding
with that cache computes (prefill in chunks follows the same protocol as token-by-token decoding).
Decoding is greedy. Batch size 1. On one CUDA GPU, replies from caches whose every layer compresses
K and V (no fp16/bf16 tensors, no float sliding-window layers; residual windows are fine) decode
from a CUDA graph (kvtorch.graphs; KVMLX_CUDA_GRAPHS=0 keeps them eager).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvspec.budget import ModelShape
from kvspec.models import DEFAULT_MODEL
from kvspec.spec import KVSpec

from . import integration
from .cache import Bases, KVCache, make_cache
from .graphs import GraphDecoder
from .loading import load_model
from .model_info import model_info, text_config

ACTIVATION_CHUNK = 512
# Greedy replies of at least this many tokens decode from a CUDA graph where one can serve
# (kvtorch.graphs): recording costs about one eager step, each eager step ~45-65 ms of host time on
# the H200's host for a 7B model against ~8 ms replayed.
GRAPH_MIN_STEPS = 16
# SDPA backends for one-token steps: not cuDNN's, which plans anew for every key length (torch 2.11, H200:
# an eager bf16 decode step of a 4-layer Mistral-shaped model took 37.8 ms with it, 3.1 without).
DECODE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Runner:
    """A loaded transformers model plus what the CLI asks of it. model: alias, hub id, dir or .gguf."""

    backend = "torch"

    def __init__(self, model: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype | None = None):
        self._setup(model, *load_model(model, device, dtype))

    @classmethod
    def wrap(cls, model, tokenizer=None, name: str = "model") -> Runner:
        """A Runner around an already loaded transformers model (tokenizer needed for text methods)."""
        runner = cls.__new__(cls)
        runner._setup(name, model.eval(), tokenizer)
        return runner

    def _setup(self, name: str, model, tokenizer) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.info = model_info(self.model.config)
        integration.install(self.model)
        self.cache_arg = integration.cache_argument(self.model)

    @property
    def shape(self) -> ModelShape:
        return self.info.shape

    @property
    def windows(self) -> tuple[int | None, ...]:
        return self.info.windows

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    @property
    def max_context(self) -> int | None:
        return getattr(text_config(self.model.config), "max_position_embeddings", None)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as the tokenizer encodes a document (with its BOS, if it adds one)."""
        return list(self.tokenizer.encode(text))

    def new_cache(self, spec: KVSpec | str, bases: Bases | None = None) -> KVCache:
        return make_cache(self.model, spec, bases)

    def save_cache(self, cache: KVCache, path: str) -> None:
        """Write `cache` in the kvspec cache-file format (readable by either backend)."""
        from .cachefile import save_cache

        save_cache(cache, path, self.name)

    def load_cache(self, path: str) -> KVCache:
        """A cache saved for this model (by either backend); refused with the reason otherwise."""
        from .cachefile import load_cache

        return load_cache(path, self.model)

    def cache_tokens(self, cache: KVCache) -> int:
        """Tokens the cache has seen (sliding layers hold fewer, as their window says)."""
        return cache.get_seq_length()

    def cache_bytes(self, cache: KVCache) -> int:
        """Bytes the cache's stored tokens occupy (as kvspec.budget.kv_bytes counts; bases excluded)."""
        return cache.nbytes()

    @torch.no_grad()
    def _forward(self, tokens: Sequence[int], cache) -> torch.Tensor:
        """Logits [m, V] (fp32, or fp64 for an fp64 model) of feeding `tokens` after what `cache` holds."""
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)[None]
        backends = sdpa_kernel(DECODE_SDPA) if len(tokens) == 1 else contextlib.nullcontext()
        try:
            with backends:
                logits = self.model(input_ids=ids, use_cache=True, **{self.cache_arg: cache}).logits[0]
        except BaseException:
            integration.clear()
            raise
        integration.finish()
        if isinstance(cache, KVCache):
            cache.token_ids = (cache.token_ids or []) + [int(t) for t in tokens]
        return logits if logits.dtype == torch.float64 else logits.float()

    def nll(self, tokens: Sequence[int], cache: KVCache, chunk: int) -> np.ndarray:
        """Negative log-likelihood [T - 1] (float64) of token t+1 given tokens <= t, fed through
        `cache` (which starts empty) in chunks of `chunk` tokens; the cache ends holding all T."""
        tokens = [int(t) for t in tokens]
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 token, got {chunk}")
        out = np.empty(max(len(tokens) - 1, 0), dtype=np.float64)
        for a in range(0, len(tokens), chunk):
            b = min(a + chunk, len(tokens))
            logp = torch.log_softmax(self._forward(tokens[a:b], cache), dim=-1)
            targets = torch.as_tensor(tokens[a + 1 : b + 1], dtype=torch.long, device=logp.device)
            picked = logp[: len(targets)].gather(-1, targets[:, None])[:, 0]
            out[a : a + len(targets)] = -picked.double().cpu().numpy()
        return out

    def greedy(self, tokens: Sequence[int], cache: KVCache, n: int) -> list[int]:
        """Feed `tokens` through `cache`, then decode n tokens greedily (the last one is not fed)."""
        return list(self._decode(tokens, cache, n, stop=()))

    def _decode(self, tokens: Sequence[int], cache, n: int, stop: Sequence[int]) -> Iterator[int]:
        logits = self._forward(tokens, cache)
        decoder = self._graph_decoder(cache, n)
        try:
            for step in range(n):
                tok = int(logits[-1].argmax())
                if tok in stop:
                    return
                yield tok
                if step + 1 < n:
                    logits = self._forward([tok], cache) if decoder is None else self._replay(decoder, tok, cache)
        finally:
            if decoder is not None:
                decoder.release()  # the cache takes the next turn's prompt again

    def _graph_decoder(self, cache, n: int) -> GraphDecoder | None:
        """A CUDA-graph decoder for n steps where one serves: a model on one GPU, a kvtorch cache whose
        layers all compress K and V (KVCache.make_static), at least GRAPH_MIN_STEPS steps,
        and KVMLX_CUDA_GRAPHS not "0". Otherwise None (eager steps)."""
        if (n < GRAPH_MIN_STEPS or os.environ.get("KVMLX_CUDA_GRAPHS", "1") == "0" or not isinstance(cache, KVCache)
                or len(self._gpus()) != 1 or any(p.device.type != "cuda" for p in self.model.parameters())):
            return None
        try:
            return GraphDecoder(self.model, cache, cache.get_seq_length() + n)
        except ValueError:  # a float K/V or layer, or a kernel refuses the shapes: eager steps
            return None  # (KVCache.make_static changes no layer when it refuses)

    def _replay(self, decoder: GraphDecoder, tok: int, cache: KVCache) -> torch.Tensor:
        """One decode step from the graph: logits [1, V] as `_forward` gives them."""
        logits = decoder.step(torch.tensor([[tok]], dtype=torch.long, device=self.device))
        cache.token_ids = (cache.token_ids or []) + [tok]
        return logits if logits.dtype == torch.float64 else logits.float()

    def stream_chat(self, messages: list[dict[str, str]], cache: KVCache, max_tokens: int) -> Iterator[str]:
        """Greedy reply to `messages` (chat template applied), streamed as text pieces.

        A cache that already holds the start of this conversation is reused: only the new tokens are
        fed. A cache holding something else is reset and the whole prompt is fed.
        """
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{self.name}'s tokenizer has no chat template (a base model?); chat needs an instruct model")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(self.tokenizer.encode(prompt, add_special_tokens=False))
        held = cache.token_ids or []
        if cache.get_seq_length() != len(held) or ids[: len(held)] != held or len(ids) == len(held):
            cache.reset()  # another conversation (or nothing new to feed): start over
            held = []
        generated, shown, text = [], "", ""
        for tok in self._decode(ids[len(held) :], cache, max_tokens, stop=self._stop_ids()):
            generated.append(tok)
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            # An incomplete UTF-8 sequence decodes to U+FFFD; wait for the rest of it.
            if not text.endswith("\ufffd"):
                yield text[len(shown) :]
                shown = text
        if len(text) > len(shown):  # the reply ended inside a multi-byte character
            yield text[len(shown) :]

    def _stop_ids(self) -> set[int]:
        ids = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if source is not None:
                ids.update(source if isinstance(source, (list, tuple)) else [source])
        return ids

    @torch.no_grad()
    def activations(self, tokens: Sequence[int]) -> dict[str, list[np.ndarray]]:
        """Post-RoPE keys and values {"k": [L][Hkv, N, D], "v": ...} (fp32) of `tokens`, for calibration.

        Runs the model with a plain DynamicCache (full history on every layer) in chunks, then reads it.
        """
        from transformers import DynamicCache

        cache = DynamicCache()
        tokens = [int(t) for t in tokens]
        for a in range(0, len(tokens), ACTIVATION_CHUNK):
            self._forward(tokens[a : a + ACTIVATION_CHUNK], cache)
        return {
            which: [getattr(layer, attr)[0].float().cpu().numpy() for layer in cache.layers]
            for which, attr in (("k", "keys"), ("v", "values"))
        }

    @property
    def placement(self) -> dict[str, int] | None:
        """Decoder layers per device for a model sharded by a device map ({"cuda:0": 15, ...}); None otherwise."""
        device_map = getattr(self.model, "hf_device_map", None) or {}
        counts: dict[str, int] = {}
        for module, device in device_map.items():
            if re.search(r"\.layers\.\d+$", module):
                name = f"cuda:{device}" if isinstance(device, int) else str(device)
                counts[name] = counts.get(name, 0) + 1
        return counts or None

    def _gpus(self) -> list[torch.device]:
        """The CUDA devices holding parameters (several under a device map)."""
        if not torch.cuda.is_available():
            return []
        return sorted({p.device for p in self.model.parameters() if p.device.type == "cuda"}, key=str)

    def reset_peak_memory(self) -> None:
        for gpu in self._gpus():
            torch.cuda.reset_peak_memory_stats(gpu)

    def peak_memory(self) -> int | None:
        """Peak bytes allocated since `reset_peak_memory`, summed over the model's GPUs; None on CPU."""
        gpus = self._gpus()
        return sum(int(torch.cuda.max_memory_allocated(g)) for g in gpus) if gpus else None
