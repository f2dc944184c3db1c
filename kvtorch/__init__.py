"""kvtorch: kvspec KV caches for transformers models on PyTorch (the torch backend of kvmlx).

Public names (the same as kvmlx's; see docs/BACKENDS.md): `make_cache`, `save_cache`, `load_cache`,
`load_model`, `ops`, `Runner`. Supports transformers >= 5.0, < 6. Names that need transformers are
imported on first use, so `kvtorch.ops` stays light.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "make_cache": "kvtorch.cache",
    "KVCache": "kvtorch.cache",
    "save_cache": "kvtorch.cachefile",
    "load_cache": "kvtorch.cachefile",
    "load_model": "kvtorch.loading",
    "Runner": "kvtorch.runner",
    "ops": "kvtorch.ops",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'kvtorch' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if name == "ops" else getattr(module, name)
