"""The transformers attention function "kvmlx": attention reads the compressed cache, not a rebuilt history.

Supported: transformers >= 5.0, < 6 (checked on 5.17 and 5.24); architectures whose attention
modules call `cache.update(k, v, layer_idx)` and then the registered attention interface with those
tensors (llama, mistral, qwen2, gemma3 including its sliding layers, gpt2 and other models written
that way).

How attention finds the cache: `KVCache.update` appends the chunk to the layer store and binds
(layer, the returned key and value tensors, the chunk's `Part`s) for this thread. The attention
function takes the binding when it is handed exactly those tensor objects, and runs
`compressed_attention`; handed other tensors (no cache, a DynamicCache) it is plain SDPA. If a
binding is left unread, the model's attention did not go through this function, and the next update
raises instead of letting a layer attend to the chunk alone.

Masks: "kvmlx" registers SDPA's boolean mask function, so a padded batch arrives as a mask over
exactly the key columns the layer reads (KVLayer.get_mask_sizes); causality and sliding windows
are applied from positions either way (so `causal_masks_only` may drop a mask known to hold no padding).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass

import torch

from .attention import compressed_attention
from .store import Chunk

NAME = "kvmlx"
_local = threading.local()


@dataclass
class Binding:
    layer_idx: int
    key: torch.Tensor
    value: torch.Tensor
    chunk: Chunk
    window: int | None


def bind(layer_idx: int, key: torch.Tensor, value: torch.Tensor, chunk: Chunk, window: int | None) -> None:
    """Record the chunk a KVCache layer just stored; the next attention call on (key, value) reads it."""
    finish()
    _local.binding = Binding(layer_idx, key, value, chunk, window)


def clear() -> None:
    """Drop any pending binding (after an exception interrupted a forward)."""
    _local.binding = None


def finish() -> None:
    """After a forward: raise if the last layer's stored chunk was never read by "kvmlx" attention."""
    pending = getattr(_local, "binding", None)
    _local.binding = None
    if pending is not None:
        raise RuntimeError(
            f"layer {pending.layer_idx}: attention did not read the kvmlx cache; the model must run with "
            f"attn_implementation={NAME!r} (kvtorch.make_cache sets it)"
        )


@contextlib.contextmanager
def causal_masks_only():
    """Within: the model runs without a padding mask (kvtorch.graphs), so any mask transformers builds
    for a layer reading a kvmlx cache is causal only, which this attention applies from positions:
    it is dropped. (transformers materializes such masks while a CUDA graph is captured, sized by
    the host's token count at capture, which later replays would reuse.)"""
    _local.causal_only = True
    try:
        yield
    finally:
        _local.causal_only = False


def _take(module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor) -> Binding | None:
    b = getattr(_local, "binding", None)
    if b is None:
        return None
    if b.key is key and b.value is value:
        _local.binding = None
        return b
    if getattr(module, "layer_idx", None) == b.layer_idx:
        _local.binding = None
        raise RuntimeError(
            f"layer {b.layer_idx}: attention got other tensors than the kvmlx cache returned; "
            f"{type(module).__name__} transforms K/V between cache.update and attention, which kvtorch does not support"
        )
    return None


def kvmlx_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D] -> ([B, Tq, Hq, D], None)."""
    b = _take(module, key, value)
    if b is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, softcap=softcap, **kwargs,
        )
    if dropout:
        raise ValueError("kvmlx attention does not support dropout (it serves inference caches)")
    if sliding_window is not None and sliding_window != b.window:
        raise ValueError(f"layer {b.layer_idx}: attention asks for window {sliding_window}, the cache layer has {b.window}")
    if getattr(_local, "causal_only", False):
        attention_mask = None
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise TypeError(f"kvmlx attention expects a boolean mask (True = attend), got {attention_mask.dtype}")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    c = b.chunk
    out = compressed_attention(query, c.q_pos, c.k, c.v, scale=scale, window=b.window, softcap=softcap, mask=attention_mask)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def cache_argument(model) -> str:
    """The keyword `model.forward` takes its cache by: `cache` (transformers 5.24), `past_key_values` (earlier 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def register() -> None:
    """Register the "kvmlx" attention (and its mask: SDPA's boolean mask) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, kvmlx_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def install(model) -> None:
    """Make `model` run its attention through "kvmlx" (plain SDPA whenever no kvmlx cache is used)."""
    register()
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise ValueError(
            f"{type(model).__name__} cannot switch its attention implementation, so it cannot read a kvmlx cache"
        )
