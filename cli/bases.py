"""Low-rank bases per model: calibrated once by PCA on calibration text, kept in the user cache.

File: bases/<model>-<fingerprint[:16]>.safetensors in kvspec.paths.cache_root() (~/.cache/kvmlx by
default) with tensors k.<layer> and v.<layer> [Hkv, D, D] (full bases, columns by decreasing energy,
so any rank takes the first r) and energy.k.<layer> / energy.v.<layer> [Hkv, D]; metadata names the
model, fingerprint and tokens used.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvspec import safetensors_io
from kvspec.paths import cache_root
from kvspec.reference.lowrank import pca_basis
from kvspec.spec import KVSpec, LowRank


def bases_path(model: str, fingerprint: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model)[-80:]
    return cache_root() / "bases" / f"{safe}-{fingerprint[:16]}.safetensors"


def calibrate(activations: dict[str, list[np.ndarray]], progress: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
    """activations {"k"|"v": [L][Hkv, N, D]} -> tensors {"k.<l>": [Hkv, D, D], "energy.k.<l>": [Hkv, D]}."""
    out = {}
    for which, layers in activations.items():
        for i, acts in enumerate(layers):
            pairs = [pca_basis(np.asarray(h, np.float64)) for h in acts]
            out[f"{which}.{i}"] = np.stack([b for b, _ in pairs]).astype(np.float32)
            out[f"energy.{which}.{i}"] = np.stack([e for _, e in pairs]).astype(np.float32)
            if progress:
                progress()
    return out


def save(path: Path, tensors: dict[str, np.ndarray], model: str, fingerprint: str, tokens: int, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "config_fingerprint": fingerprint, "tokens": str(tokens), "data": data}
    safetensors_io.write(path, tensors, meta)


def load(path: Path, fingerprint: str) -> dict[str, np.ndarray]:
    tensors, _, meta = safetensors_io.read(path)
    if meta.get("config_fingerprint") != fingerprint:
        raise ValueError(f"{path} holds bases for another model configuration ({meta.get('model')}); recalibrate")
    return tensors


def for_spec(tensors: dict[str, np.ndarray], spec: KVSpec, layers: int) -> dict[str, list[np.ndarray]]:
    """The PCA bases a spec needs: {"k"|"v": [L][Hkv, D, r]} for its low-rank tensors."""
    out = {}
    for which, t in spec.tensors().items():
        if isinstance(t, LowRank) and t.basis == "pca":
            out[which] = [tensors[f"{which}.{i}"][:, :, : t.rank] for i in range(layers)]
    return out


def needs_pca(spec: KVSpec) -> bool:
    return any(isinstance(t, LowRank) and t.basis == "pca" for t in spec.tensors().values())
