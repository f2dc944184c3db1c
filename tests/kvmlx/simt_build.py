"""Build a C++ translation unit over the warp emulator (simt_runtime.h, beside this file) into a
shared object with g++, cached on disk by the unit's hash: the one build step of tests/kvmlx/simt.py
(kvmlx's MLX launches) and tests/kvtorch/simt_decode.py (kvtorch's CUDA decode kernel). No MLX here."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("KVMLX_SIMT_CACHE", Path(tempfile.gettempdir()) / "kvmlx-simt"))


def available() -> str | None:
    """None when g++ (C++20) is there, else why the emulated kernels cannot run."""
    return None if shutil.which("g++") else "g++ is not installed: the CUDA kernels cannot be emulated"


def shared_library(unit: str, includes: tuple[Path, ...] = ()) -> ctypes.CDLL:
    """`unit` built once (g++ -O1, C++20, simt_runtime.h and `includes` on the path) and loaded; its
    entry point kv_launch returns int."""
    key = hashlib.sha256(unit.encode()).hexdigest()[:20]
    so = CACHE / f"{key}.so"
    if not so.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        src = CACHE / f"{key}.cpp"
        src.write_text(unit)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", *(f"-I{p}" for p in includes),
               f"-I{HERE}", str(src), "-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"g++ failed on {src}:\n{r.stderr[-4000:]}")
        tmp.replace(so)
    lib = ctypes.CDLL(str(so))
    lib.kv_launch.restype = ctypes.c_int
    return lib
