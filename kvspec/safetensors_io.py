"""Minimal safetensors reader/writer in NumPy, with bfloat16 held as raw uint16 bits.

The safetensors layout: 8-byte little-endian header length N, N bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the data.
kvspec writes it itself so that it needs neither torch nor the safetensors package, and so that
loading can check every offset and size instead of trusting the file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

DTYPES = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "U32": np.uint32, "I32": np.int32, "I64": np.int64}
_NAMES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.uint32): "U32",
          np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}
MAX_HEADER = 100 * 2**20


class FileFormatError(ValueError):
    """A file that is not a well-formed safetensors file."""


def write(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str], bf16: frozenset[str] = frozenset()) -> None:
    """Write tensors (names in `bf16` are uint16 arrays of bfloat16 bits) with string metadata."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        dtype = "BF16" if name in bf16 else _NAMES.get(arr.dtype)
        if dtype is None or (dtype == "BF16" and arr.dtype != np.uint16):
            raise TypeError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    # A private temporary name, then an atomic rename: a reader (another process calibrating the same
    # bases, a crash mid-write) never sees a partial file.
    path = Path(path)
    tmp = path.with_name(f"{path.name}.part{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
    tmp.replace(path)


def read(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """Read (tensors, dtype names, metadata); raise FileFormatError on anything inconsistent."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise FileFormatError(f"{path}: too short to be a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise FileFormatError(f"{path}: header length {n} does not fit the file ({len(data)} bytes); truncated?")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + n :]
    tensors, dtypes, end = {}, {}, 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0]):
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FileFormatError(f"{path}: entry {name!r} lacks dtype/shape/data_offsets") from None
        if dtype not in DTYPES:
            raise FileFormatError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        np_dtype = np.dtype(DTYPES[dtype]).newbyteorder("<")
        count = int(np.prod(shape, dtype=np.int64))
        if begin != end or stop - begin != count * np_dtype.itemsize or stop > len(body):
            raise FileFormatError(f"{path}: tensor {name!r} has inconsistent offsets {begin}..{stop} (file damaged?)")
        tensors[name] = np.frombuffer(body[begin:stop], dtype=np_dtype).reshape(shape).copy()
        dtypes[name] = dtype
        end = stop
    if end != len(body):
        raise FileFormatError(f"{path}: {len(body) - end} bytes after the last tensor (file damaged?)")
    return tensors, dtypes, {str(k): str(v) for k, v in metadata.items()}
