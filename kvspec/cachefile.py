"""The cache file: a compressed KV cache saved by one backend and loaded by any other.

A safetensors file (never pickle). Tensors, per layer i and tensor x in {k, v}:
    layers.{i}.{x}.codes / .scales / .biases / .coeffs   the compressed tokens (kvspec.layout)
    layers.{i}.{x}.tail                                  float tokens [B, Hkv, held - n, D]
    layers.{i}.{x}.basis                                 low-rank basis [Hkv, D, r] (fp32)
    token_ids                                            int32 [B, T], when the producer knows them
Float tensors are F16 or BF16 as the spec's float dtype says; codes U32; scales/biases F16.
A sliding-window layer (window W) keeps its last min(T, W) tokens uncompressed, in the tail.
Metadata (all strings): format, format_version, spec, model, config_fingerprint, tokens, batch,
kv_heads, head_dim, windows (JSON list, null for full-attention layers), producer, checksum
(sha256 over every tensor's name, dtype, shape and bytes, in name order).
`load` checks all of it and refuses a damaged or mismatched file with the reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import safetensors_io
from .budget import ModelShape
from .grammar import format as format_spec
from .grammar import parse
from .layout import compressed_shapes, n_quantized
from .spec import Float, KVSpec, LowRank, SpecError, TensorSpec

FORMAT = "kvspec-cache"
FORMAT_VERSION = 1


class CacheFileError(ValueError):
    """A cache file that is damaged, of another format version, or made for another model or spec."""


@dataclass(frozen=True)
class CacheHeader:
    """What a cache file says about itself. windows: per layer, None or the sliding window."""

    spec: str
    model: str
    config_fingerprint: str
    tokens: int
    batch: int
    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]
    producer: str
    format_version: int = FORMAT_VERSION

    @property
    def layers(self) -> int:
        return len(self.windows)

    def kvspec(self) -> KVSpec:
        return parse(self.spec)


Layer = dict[str, dict[str, np.ndarray]]  # {"k": {"codes": ..., "tail": ...}, "v": {...}}


def config_fingerprint(model_type: str, shape: ModelShape, vocab_size: int, windows: tuple[int | None, ...]) -> str:
    """sha256 of the model facts a cache depends on; both backends compute it from their configs."""
    facts = {
        "model_type": model_type,
        "layers": shape.layers,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": vocab_size,
        "windows": list(windows),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def layer_tensor_spec(spec: KVSpec, window: int | None, which: str) -> TensorSpec:
    """Sliding-window layers are kept uncompressed (their window bounds their size)."""
    return Float() if window is not None else spec.tensors()[which]


def expected_arrays(header: CacheHeader) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor name a valid file holds, with its shape and safetensors dtype."""
    spec = header.kvspec()
    spec.check_head_dim(header.head_dim)
    fdt = "F16" if spec.float_dtype == "fp16" else "BF16"
    b, h, d = header.batch, header.kv_heads, header.head_dim
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for i, window in enumerate(header.windows):
        held = header.tokens if window is None else min(header.tokens, window)
        for which in ("k", "v"):
            t = layer_tensor_spec(spec, window, which)
            n = n_quantized(t, spec.residual, held)
            prefix = f"layers.{i}.{which}."
            for name, dims in compressed_shapes(t, b, h, n, d).items():
                out[prefix + name] = (dims, {"codes": "U32", "coeffs": fdt}.get(name, "F16"))
            out[prefix + "tail"] = ((b, h, held - n, d), fdt)
            if isinstance(t, LowRank):
                out[prefix + "basis"] = ((h, d, t.rank), "F32")
    return out


def _checksum(tensors: dict[str, np.ndarray], dtypes: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{dtypes[name]}|{list(arr.shape)}|".encode())
        digest.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()


def save(path: str | Path, header: CacheHeader, layers: list[Layer], token_ids: np.ndarray | None = None) -> None:
    """Write a cache file; the arrays are checked against the header first (BF16 as uint16 bits)."""
    if len(layers) != header.layers:
        raise CacheFileError(f"{len(layers)} layers given, header says {header.layers}")
    canonical = format_spec(parse(header.spec))
    header = CacheHeader(**{**header.__dict__, "spec": canonical})
    tensors = {f"layers.{i}.{w}.{n}": a for i, layer in enumerate(layers) for w, arrs in layer.items() for n, a in arrs.items()}
    if token_ids is not None:
        tensors["token_ids"] = np.asarray(token_ids, dtype=np.int32)
    expected = expected_arrays(header)
    dtypes = _check_arrays(tensors, expected, header, path, numpy_dtypes=True)
    meta = {
        "format": FORMAT,
        "format_version": str(header.format_version),
        "spec": header.spec,
        "model": header.model,
        "config_fingerprint": header.config_fingerprint,
        "tokens": str(header.tokens),
        "batch": str(header.batch),
        "kv_heads": str(header.kv_heads),
        "head_dim": str(header.head_dim),
        "windows": json.dumps(list(header.windows)),
        "producer": header.producer,
        "checksum": _checksum(tensors, dtypes),
    }
    safetensors_io.write(path, tensors, meta, bf16=frozenset(k for k, v in dtypes.items() if v == "BF16"))


def _check_arrays(tensors, expected, header, path, numpy_dtypes: bool) -> dict[str, str]:
    dtypes = {}
    for name, arr in tensors.items():
        if name == "token_ids":
            if arr.shape != (header.batch, header.tokens):
                raise CacheFileError(f"{path}: token_ids has shape {arr.shape}, expected {(header.batch, header.tokens)}")
            dtypes[name] = "I32"
            continue
        if name not in expected:
            raise CacheFileError(f"{path}: unexpected tensor {name!r} for spec {header.spec}")
        dims, dtype = expected[name]
        if tuple(arr.shape) != dims:
            raise CacheFileError(f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, spec {header.spec} needs {dims}")
        want = {"U32": np.uint32, "F16": np.float16, "BF16": np.uint16, "F32": np.float32}[dtype]
        if numpy_dtypes and arr.dtype != want:
            raise CacheFileError(f"{path}: tensor {name!r} is {arr.dtype}, expected {np.dtype(want)} ({dtype})")
        dtypes[name] = dtype
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CacheFileError(f"{path}: missing {len(missing)} tensors for spec {header.spec}, e.g. {missing[0]!r}")
    return dtypes


def load(
    path: str | Path,
    *,
    expect_fingerprint: str | None = None,
    expect_spec: str | None = None,
) -> tuple[CacheHeader, list[Layer], np.ndarray | None]:
    """Read and validate a cache file; returns (header, layers, token_ids or None)."""
    path = Path(path)
    if not path.is_file():
        raise CacheFileError(f"{path}: no such cache file")
    try:
        tensors, dtypes, meta = safetensors_io.read(path)
    except safetensors_io.FileFormatError as e:
        raise CacheFileError(str(e)) from None
    if meta.get("format") != FORMAT:
        raise CacheFileError(f"{path}: not a kvspec cache file (format {meta.get('format')!r})")
    try:
        version = int(meta["format_version"])
        header = CacheHeader(
            spec=meta["spec"],
            model=meta["model"],
            config_fingerprint=meta["config_fingerprint"],
            tokens=int(meta["tokens"]),
            batch=int(meta["batch"]),
            kv_heads=int(meta["kv_heads"]),
            head_dim=int(meta["head_dim"]),
            windows=tuple(json.loads(meta["windows"])),
            producer=meta["producer"],
            format_version=version,
        )
        expected = expected_arrays(header)
    except (KeyError, ValueError, TypeError, SpecError) as e:
        raise CacheFileError(f"{path}: bad metadata ({type(e).__name__}: {e})") from None
    if version != FORMAT_VERSION:
        raise CacheFileError(f"{path}: format version {version}, this kvspec reads version {FORMAT_VERSION}")
    got = {name: dtypes[name] for name in tensors}
    for name, (_, dtype) in expected.items():
        if name in got and got[name] != dtype:
            raise CacheFileError(f"{path}: tensor {name!r} is {got[name]}, expected {dtype}")
    _check_arrays(tensors, expected, header, path, numpy_dtypes=False)
    if _checksum(tensors, got) != meta.get("checksum"):
        raise CacheFileError(f"{path}: checksum mismatch: the tensor data is damaged")
    if expect_fingerprint is not None and expect_fingerprint != header.config_fingerprint:
        raise CacheFileError(
            f"{path}: made for model {header.model!r} with another configuration; load it with that model"
        )
    if expect_spec is not None and format_spec(parse(expect_spec)) != header.spec:
        raise CacheFileError(f"{path}: holds a {header.spec} cache, not {expect_spec}; pass --kv {header.spec}")
    layers: list[Layer] = [{"k": {}, "v": {}} for _ in range(header.layers)]
    for name, arr in tensors.items():
        if name == "token_ids":
            continue
        _, i, which, field = name.split(".")
        layers[int(i)][which][field] = arr
    return header, layers, tensors.get("token_ids")
