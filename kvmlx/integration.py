"""Wiring kvmlx caches into loaded mlx-lm models: `make_cache`, the attention dispatch, model facts.

mlx-lm model files do `from .base import scaled_dot_product_attention` and call it with `cache=`,
so the name each model module looks up is replaced (once per module) by a dispatcher that sends
kvmlx LayerCaches to kvmlx attention and everything else to mlx-lm's own function unchanged.
mlx_lm is imported lazily: importing kvmlx must not import transformers (and through it torch).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from kvspec.budget import ModelShape
from kvspec.cachefile import config_fingerprint
from kvspec.grammar import parse
from kvspec.reference.lowrank import make_basis
from kvspec.spec import KVSpec, LowRank, SpecError

from .cache import LayerCache, ModelCache

_ORIGINAL = "_kvmlx_original"


def make_cache(model: Any, spec: KVSpec | str, bases: dict[str, list[Any]] | None = None) -> ModelCache:
    """The layer caches of `spec` for a loaded mlx-lm model (pass as `prompt_cache=` to mlx-lm).

    bases: {"k"|"v": [L][Hkv, D, r']} (r' >= r; the first r columns are used) for low-rank tensors;
    bases of kind random / identity / hadamard are made when left out, PCA ones must be given
    (`kvmlx calibrate`, or Runner.activations). Sliding-window layers keep their window in float.
    """
    spec = parse(spec) if isinstance(spec, str) else spec
    shape, windows = model_shape(model), model_windows(model)
    spec.check_head_dim(shape.head_dim)
    install_attention(model)
    layer_bases = _layer_bases(spec, shape, bases or {})
    caches = [LayerCache(spec, {w: b[i] for w, b in layer_bases.items()}, window, i) for i, window in enumerate(windows)]
    return ModelCache(caches, spec, fingerprint(model), shape)


def _layer_bases(spec: KVSpec, shape: ModelShape, given: dict[str, list[Any]]) -> dict[str, list[np.ndarray]]:
    out = {}
    for which, t in spec.tensors().items():
        if not isinstance(t, LowRank):
            continue
        if which in given:
            layers = [np.asarray(b, np.float32)[..., : t.rank] for b in given[which]]
            if len(layers) != shape.layers or layers[0].shape != (shape.kv_heads, shape.head_dim, t.rank):
                raise SpecError(
                    f"{which.upper()} bases must be {shape.layers} arrays [{shape.kv_heads}, {shape.head_dim}, >={t.rank}], "
                    f"got {len(layers)} of shape {layers[0].shape if layers else None}"
                )
            out[which] = layers
        elif t.basis == "pca":
            raise SpecError(f"{which.upper()} rank {t.rank} uses PCA bases: calibrate them first (`kvmlx calibrate`)")
        else:
            out[which] = [default_basis(t, shape.kv_heads, shape.head_dim)] * shape.layers
    return out


def default_basis(t: LowRank, kv_heads: int, head_dim: int) -> np.ndarray:
    """[Hkv, D, r] fp32 basis of a data-free kind (random seeded by the head index, as the golden
    vectors make them), the same for every layer."""
    return np.stack([make_basis(t.basis, head_dim, seed=h)[:, : t.rank] for h in range(kv_heads)]).astype(np.float32)


# --- the attention dispatch ---------------------------------------------------------------------


def install_attention(model: Any) -> None:
    """Route `scaled_dot_product_attention` in every module defining the model's classes through
    kvmlx (idempotent). Raises if the model computes attention some other way."""
    patched = False
    for name in {type(m).__module__ for m in model.modules()}:
        module = sys.modules.get(name)
        current = getattr(module, "scaled_dot_product_attention", None)
        if current is None:
            continue
        if not hasattr(current, _ORIGINAL):
            module.scaled_dot_product_attention = _dispatcher(current)
        patched = True
    if not patched:
        raise ValueError(f"{type(model).__module__} does not call mlx-lm's scaled_dot_product_attention; kvmlx cannot serve it")
    _register_for_prompt_files()


def _dispatcher(original: Callable[..., Any]) -> Callable[..., Any]:
    def scaled_dot_product_attention(queries, keys, values, *args, **kwargs):
        cache = kwargs["cache"] if "cache" in kwargs else (args[0] if args else None)
        if not isinstance(cache, LayerCache):
            return original(queries, keys, values, *args, **kwargs)
        if kwargs.get("sinks") is not None:
            raise ValueError("kvmlx caches do not support attention sinks")
        scale = kwargs["scale"] if "scale" in kwargs else args[1]
        return cache.attend(queries, keys, values, scale)

    setattr(scaled_dot_product_attention, _ORIGINAL, original)
    return scaled_dot_product_attention


def _register_for_prompt_files() -> None:
    # mlx_lm.models.cache.load_prompt_cache rebuilds caches by class name from its own namespace.
    from mlx_lm.models import cache

    cache.__dict__.setdefault(LayerCache.__name__, LayerCache)


# --- model facts --------------------------------------------------------------------------------


def model_windows(model: Any) -> list[int | None]:
    """Per layer: the sliding window, or None for full attention (read off mlx-lm's own caches)."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    windows = []
    for i, c in enumerate(make_prompt_cache(model)):
        if isinstance(c, RotatingKVCache):
            windows.append(c.max_size)
        elif type(c) is KVCache:
            windows.append(None)
        else:
            raise ValueError(f"layer {i} of {type(model).__module__} uses a {type(c).__name__}; kvmlx serves attention layers only")
    return windows


def model_type(model: Any) -> str:
    """The config's model_type (transformers' name, which the fingerprint uses)."""
    return getattr(model, "model_type", None) or model.args.model_type


def model_shape(model: Any) -> ModelShape:
    """Layers, KV heads and head dim (from the attention modules), and the sliding windows."""
    dims = set()
    for layer in model.layers:
        attn = layer.self_attn
        kv_heads = attn.n_kv_heads
        # Not every model stores head_dim; k_proj's output features are kv_heads * head_dim.
        head_dim = getattr(attn, "head_dim", None) or attn.k_proj.weight.shape[0] // kv_heads
        dims.add((kv_heads, head_dim))
    if len(dims) != 1:
        raise ValueError(f"kvmlx needs one KV shape for every layer, got {sorted(dims)}")
    (kv_heads, head_dim), = dims
    windows = model_windows(model)
    sliding = [w for w in windows if w is not None]
    return ModelShape(len(windows), kv_heads, head_dim, len(sliding), max(sliding) if sliding else None)


def fingerprint(model: Any) -> str:
    """kvspec.cachefile.config_fingerprint of a loaded model (the facts transformers' config gives)."""
    shape = model_shape(model)
    return config_fingerprint(model_type(model), shape, vocab_size(model), tuple(model_windows(model)))


def vocab_size(model: Any) -> int:
    args = model.args
    return int(getattr(args, "vocab_size", None) or args.text_config["vocab_size"])
