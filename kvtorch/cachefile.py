"""Saving and loading a KVCache in the kvspec cache-file format (any backend can read what this writes).

Tensors go through NumPy to kvspec.cachefile.save/load: codes as uint32 (the int32 words
reinterpreted), scales/biases fp16, tails and coefficients in the spec's float dtype (bf16 as uint16
bits), bases fp32. The file's fingerprint is kvspec.cachefile.config_fingerprint of the model config,
so a cache only loads into the model configuration it was made for.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from kvspec import cachefile
from kvspec.grammar import format as format_spec
from kvspec.spec import LowRank

from . import integration, ops
from .cache import KVCache
from .model_info import model_info


def _producer() -> str:
    try:
        own = version("kvmlx")
    except PackageNotFoundError:
        own = "unknown"
    return f"kvtorch {own} (torch {torch.__version__})"


def _to_numpy(name: str, a: torch.Tensor) -> np.ndarray:
    if name == "codes":
        return ops.words_to_numpy(a)
    a = a.detach().cpu().contiguous()
    if a.dtype == torch.bfloat16:
        return a.view(torch.int16).numpy().view(np.uint16)
    return a.numpy()


def _from_numpy(name: str, a: np.ndarray, float_dtype: str, device: torch.device) -> torch.Tensor:
    if name == "codes":
        return ops.words_from_numpy(a, device)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if name in ("tail", "coeffs") and float_dtype == "bf16":
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.to(device)


def save_cache(cache: KVCache, path: str | Path, model_name: str, token_ids=None) -> None:
    """Write `cache` to `path`. token_ids: the [B, T] (or [T]) tokens it holds; by default the ids
    the cache tracked while being fed (or loaded), when it tracked all of them (as kvmlx does)."""
    cache.check_pending()
    stores = cache.stores()
    if any(s is None for s in stores):
        raise ValueError("the cache is empty (or some layers never ran); nothing to save")
    tokens = {s.tokens for s in stores}
    if len(tokens) != 1:
        raise ValueError(f"layers hold different token counts {sorted(tokens)}; a forward pass was interrupted")
    tail = stores[0].k.tail.view()
    header = cachefile.CacheHeader(
        spec=format_spec(cache.spec),
        model=model_name,
        config_fingerprint=cache.info.fingerprint,
        tokens=tokens.pop(),
        batch=tail.shape[0],
        kv_heads=cache.info.shape.kv_heads,
        head_dim=cache.info.shape.head_dim,
        windows=cache.info.windows,
        producer=_producer(),
    )
    layers = [
        {w: {name: _to_numpy(name, a) for name, a in ts.export().items()} for w, ts in (("k", s.k), ("v", s.v))}
        for s in stores
    ]
    if token_ids is None and cache.token_ids is not None and len(cache.token_ids) == header.tokens:
        token_ids = cache.token_ids
    ids = None
    if token_ids is not None:
        ids = np.asarray(token_ids.cpu() if isinstance(token_ids, torch.Tensor) else token_ids, dtype=np.int32)
        ids = ids.reshape(header.batch, -1)
    cachefile.save(path, header, layers, ids)


def load_cache(path: str | Path, model) -> KVCache:
    """Read a cache file made for this model's configuration; the cache continues where it stopped.

    The tokens it holds, when recorded for batch 1, are on `cache.token_ids` (list, else None).
    Raises kvspec.cachefile.CacheFileError for a damaged file or another model's cache.
    """
    info = model_info(model.config)
    header, layers, token_ids = cachefile.load(path, expect_fingerprint=info.fingerprint)
    spec = header.kvspec()
    device = next(model.parameters()).device
    bases: dict[str, list] = {}
    for which, t in spec.tensors().items():
        if isinstance(t, LowRank):
            bases[which] = [
                None if "basis" not in layer[which] else torch.from_numpy(layer[which]["basis"]) for layer in layers
            ]
    cache = KVCache(spec, info, bases)
    for layer, arrays in zip(cache.layers, layers):
        layer.device = device
        layer.store = layer.new_store(device)
        for which, ts in (("k", layer.store.k), ("v", layer.store.v)):
            ts.restore({n: _from_numpy(n, a, spec.float_dtype, device) for n, a in arrays[which].items()}, header.tokens)
        layer.is_initialized = True
    if token_ids is not None and token_ids.shape[0] == 1:
        cache.token_ids = token_ids[0].tolist()
    integration.install(model)
    return cache
