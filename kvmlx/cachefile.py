"""`save_cache` / `load_cache`: a ModelCache in the kvspec cache-file format (kvspec.cachefile).

Files are exchangeable with kvtorch: the same tensor names, dtypes and shapes, and a config
fingerprint both backends compute from the model's facts (kvmlx.integration.fingerprint).
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kvspec import cachefile
from kvspec.cachefile import CacheHeader, layer_tensor_spec
from kvspec.grammar import format as format_spec
from kvspec.layout import compressed_shapes

from .cache import LayerCache, ModelCache
from .integration import fingerprint as model_fingerprint
from .integration import install_attention, model_shape, model_windows


def save_cache(cache: ModelCache, path: str | Path, model_name: str, token_ids: Any = None) -> None:
    """Write `cache` (from make_cache / load_cache) to `path`; token_ids [T] or [1, T] default to
    the ids the cache tracked while being fed, when it tracked all of them."""
    tokens = cache.offset
    if token_ids is None and cache.token_ids is not None and len(cache.token_ids) == tokens:
        token_ids = cache.token_ids
    tails = [c.k.tail.view() for c in cache if c.k.tail.data is not None]
    batch = tails[0].shape[0] if tails else 1
    header = CacheHeader(
        spec=format_spec(cache.spec),
        model=model_name,
        config_fingerprint=cache.fingerprint,
        tokens=tokens,
        batch=batch,
        kv_heads=cache.shape.kv_heads,
        head_dim=cache.shape.head_dim,
        windows=tuple(c.window for c in cache),
        producer=f"kvmlx {version('kvmlx')} (mlx {mx.__version__})",
    )
    layers = [{w: _layer_arrays(c, w, header) for w in ("k", "v")} for c in cache]
    ids = None if token_ids is None else np.asarray(token_ids, np.int32).reshape(batch, tokens)
    cachefile.save(path, header, layers, ids)


def _layer_arrays(c: LayerCache, which: str, header: CacheHeader) -> dict[str, np.ndarray]:
    store = c.k if which == "k" else c.v
    arrays = {name: _to_numpy(a) for name, a in store.arrays().items()}
    # An empty part (no compressed tokens yet) is still written, with zero rows.
    t = layer_tensor_spec(c.spec, c.window, which)
    fdt = np.float16 if c.spec.float_dtype == "fp16" else np.uint16
    empty = {**compressed_shapes(t, header.batch, header.kv_heads, store.n, header.head_dim),
             "tail": (header.batch, header.kv_heads, 0, header.head_dim)}
    for name, shape in empty.items():
        if name not in arrays:
            arrays[name] = np.zeros(shape, {"codes": np.uint32, "scales": np.float16, "biases": np.float16}.get(name, fdt))
    return arrays


def _to_numpy(a: mx.array) -> np.ndarray:
    """bf16 as its uint16 bits (how kvspec.safetensors_io holds BF16); everything else as is."""
    return np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)


def load_cache(path: str | Path, model: Any) -> ModelCache:
    """Read a cache file made for `model` (refused with the reason if it was made for another)."""
    header, layers, token_ids = cachefile.load(path, expect_fingerprint=model_fingerprint(model))
    spec = header.kvspec()
    if list(header.windows) != model_windows(model):
        raise cachefile.CacheFileError(f"{path}: sliding windows {header.windows} do not match the model's")
    install_attention(model)
    caches = []
    for i, (window, arrays) in enumerate(zip(header.windows, layers)):
        bases = {w: a["basis"] for w, a in arrays.items() if "basis" in a}
        layer = LayerCache(spec, bases, window, i)
        if header.tokens:
            layer.k.load(_from_numpy(arrays["k"], spec.float_dtype), header.tokens)
            layer.v.load(_from_numpy(arrays["v"], spec.float_dtype), header.tokens)
            layer.offset = header.tokens
        caches.append(layer)
    out = ModelCache(caches, spec, header.config_fingerprint, model_shape(model))
    out.token_ids = None if token_ids is None else [int(t) for t in np.asarray(token_ids)[0]]
    return out


def _from_numpy(arrays: dict[str, np.ndarray], float_dtype: str) -> dict[str, mx.array]:
    out = {}
    for name, a in arrays.items():
        if name == "basis":
            continue
        out[name] = mx.array(a).view(mx.bfloat16) if a.dtype == np.uint16 and float_dtype == "bf16" else mx.array(a)
    return out

