"""Decode steps as CUDA graph replays: `GraphDecoder(model, cache, capacity).step(ids)`.

A decode step of a transformers model launches a few hundred small kernels, and eager PyTorch spends
host time on each: on the lent H200's host a Mistral-7B-shaped step took 58 ms in eager mode with
transformers' bf16 DynamicCache, while its bytes take about 4.5 ms to read. A CUDA graph replays the
recorded launches with no host work per kernel.

The cache must keep its shapes and pointers from step to step:
- a kvtorch `KVCache`, made static here (`KVCache.make_static`: storage for `capacity` tokens, each
  token compressed at a row the device holds, or first held in a ring of float rows while a
  residual window or a channel-axis group keeps it in float; attention planned over the whole
  storage and stopped at the query's position and splits, which it reads on the device); every
  layer must compress K and V (no fp16/bf16 tensors, no float sliding-window layers);
- or transformers' `StaticCache` (the bf16 baseline; its length lives on the device too).
Prefill eagerly first. The first `step` runs eagerly on a side stream (compiling kernels and settling
allocations), then records the step; later steps copy the token ids in and replay. Positions live on
the device and advance inside the graph; the host counters of a kvtorch cache are advanced after
each replay, and its non-finite flags are read every kvtorch.store.CHECK_EVERY steps. `release()`
frees the graph and lets the cache take chunks of any length again (the next turn's prompt).
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .integration import cache_argument, causal_masks_only
from .store import CHECK_EVERY

# One side stream per device for every decoder's eager first step. torch gives each new stream its
# own cuBLAS workspace (32 MiB on an H200) and keeps it for the process's life: a stream per decoder
# kept 32 MiB per chat reply (H200, 2026-11-30: +32.0 MiB allocated after each GraphDecoder run).
_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def _warmup_stream() -> torch.cuda.Stream:
    device = torch.cuda.current_device()
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


class GraphDecoder:
    """One-token decode steps of `model` with `cache` replayed from a CUDA graph.

    capacity: tokens the cache may hold in all (prompt and every step). Batch rows share positions
    (no padding), as `model(ids, cache=...)` with a plain decode does."""

    def __init__(self, model, cache, capacity: int):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA GPU; it is on {device}")
        tokens = int(cache.get_seq_length())
        if tokens == 0:
            raise ValueError("prefill the cache (an eager forward over the prompt) before decoding from a graph")
        if isinstance(cache, KVCache):
            cache.make_static(capacity)
        elif type(cache).__name__ == "StaticCache":
            if cache.get_max_length() < capacity:
                raise ValueError(f"the StaticCache holds {cache.get_max_length()} tokens, fewer than capacity {capacity}")
        else:
            raise TypeError(
                f"GraphDecoder needs a kvtorch KVCache or transformers' StaticCache, not {type(cache).__name__}: "
                "its shapes change with every token"
            )
        self.model, self.cache, self.capacity, self.tokens = model, cache, capacity, tokens
        self.arg = cache_argument(model)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.ids: torch.Tensor | None = None  # static input [B, 1]
        self.positions: torch.Tensor | None = None  # static [B, 1], advanced inside the graph
        self.logits: torch.Tensor | None = None  # static output [B, V]

    def _forward(self) -> torch.Tensor:
        with causal_masks_only():  # no padding here: the kvmlx layers need no mask
            out = self.model(input_ids=self.ids, position_ids=self.positions, use_cache=True, **{self.arg: self.cache})
        self.positions.add_(1)
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Append token ids [B, 1] and return the next-token logits [B, V] (fp32 or the model's dtype).

        The returned tensor is the graph's output buffer: the next step overwrites it (clone to keep)."""
        if self.tokens >= self.capacity:
            raise ValueError(f"the cache is full ({self.capacity} tokens); make a GraphDecoder with a larger capacity")
        if self.graph is None:
            logits = self._first_step(ids)
        else:
            if ids.shape != self.ids.shape:
                raise ValueError(f"token ids {tuple(ids.shape)}; this graph was recorded for {tuple(self.ids.shape)}")
            self.ids.copy_(ids)
            self.graph.replay()
            if isinstance(self.cache, KVCache):
                self.cache.advance(1)
            logits = self.logits
        self.tokens += 1
        if isinstance(self.cache, KVCache) and self.tokens % CHECK_EVERY == 0:
            self.cache.check_pending()
        return logits

    def release(self) -> None:
        """Free the graph and hand the cache back for any use (a kvtorch cache grows again: the next
        prompt or turn can be fed eagerly, and another GraphDecoder made for its reply)."""
        self.graph = self.logits = None
        if isinstance(self.cache, KVCache):
            self.cache.make_growing()

    def _first_step(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the step eagerly on a side stream (a real step: it appends), then record it."""
        if ids.ndim != 2 or ids.shape[1] != 1:
            raise ValueError(f"token ids must be [batch, 1]; got {tuple(ids.shape)}")
        self.ids = ids.clone()
        self.positions = torch.full_like(self.ids, self.tokens)
        side = _warmup_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._forward().clone()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records only: the cache and positions are not touched
            self.logits = self._forward()
        self.graph = graph
        return logits
