"""Run a kvmlx launch on the CPU: the translation unit MLX would compile (launch.py), built with
g++ against simt_runtime.h (one std::thread per GPU thread, warp collectives and mma.sync
emulated), so CI checks what the kernels compute, not only that NVRTC accepts them. The Metal
dialect's unit builds the same way over metal_shim.h (Metal's names mapped onto the emulator): no
Metal compiler runs here, so that checks its arithmetic and indexing, not that Metal accepts it.

`run(launch, dialect)` returns what `Launch.run(dialect)` would: output name -> mx.array. Inputs are passed
as contiguous copies with their own strides (the kernels read through strides, so values, not
layouts, are what is tested). Slow (seconds per launch): small probes only. A kernel that stops
making warp-level progress for TIMEOUT_S seconds ends the run with a message (a divergent
collective hangs a GPU too).
"""

from __future__ import annotations

import ctypes
from functools import cache

import mlx.core as mx
import numpy as np

from kvmlx.kernels import dialect as dialects
from kvmlx.kernels.launch import CUDA_TYPES, METAL_TYPES, Launch, _uses

from . import simt_build

CACHE = simt_build.CACHE
TIMEOUT_S = 60.0
NDIM = 10  # Shape / Strides slots, as MLX's MAX_NDIM

_STUBS = {
    "mlx/backend/cuda/device/utils.cuh": '#include "simt_runtime.h"\nnamespace mlx::core::cu {\n'
                                         f"using Shape = std::array<int32_t, {NDIM}>;\n"
                                         f"using Strides = std::array<int64_t, {NDIM}>;\n}}\n",
    "cooperative_groups.h": "",
}
_NP = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.uint32: np.uint32,
       mx.int32: np.int32}


available = simt_build.available


def _launcher(launch: Launch, source: str) -> str:
    """extern "C" kv_launch(buffers, shapes, strides, ndims, grid, block) calling the kernel."""
    args, i = [], 0
    for name, arr in launch.inputs.items():
        args.append(f"(const {CUDA_TYPES[arr.dtype]}*)p[{i}]")
        if arr.ndim:
            if _uses(source, name, "shape"):
                args.append(f"kv_shape(sh + {NDIM} * {i})")
            if _uses(source, name, "strides"):
                args.append(f"kv_strides(st + {NDIM} * {i})")
            if _uses(source, name, "ndim"):
                args.append(f"nd[{i}]")
        i += 1
    for _, dtype in launch.outputs.values():
        args.append(f"({CUDA_TYPES[dtype]}*)p[{i}]")
        i += 1
    return f"""
static mlx::core::cu::Shape kv_shape(const int32_t* s) {{ mlx::core::cu::Shape r{{}}; for (int i = 0; i < {NDIM}; ++i) r[i] = s[i]; return r; }}
static mlx::core::cu::Strides kv_strides(const int64_t* s) {{ mlx::core::cu::Strides r{{}}; for (int i = 0; i < {NDIM}; ++i) r[i] = s[i]; return r; }}
extern "C" int kv_launch(void** p, const int32_t* sh, const int64_t* st, const int* nd, const unsigned* grid,
                         const unsigned* block, double timeout_s) {{
  return kv_simt::launch({{grid[0], grid[1], grid[2]}}, {{block[0], block[1], block[2]}}, [&]() {{
    mlx::core::cu::custom_kernel_{launch.name}({", ".join(args)});
  }}, timeout_s);
}}
"""


def _metal_launcher(launch: Launch, source: str) -> str:
    """The same entry point for the Metal unit: template arguments spelled out, inputs of rank 0 by
    reference, strides and shapes as pointers, thread positions from the emulator's indices."""
    targs = ", ".join(("true" if v else "false") if isinstance(v, bool) else str(v) if isinstance(v, int)
                      else METAL_TYPES[v] for _, v in launch.template)
    args, i = [], 0
    for name, arr in launch.inputs.items():
        kind = METAL_TYPES[arr.dtype]
        args.append(f"({kind}*)p[{i}]" if arr.ndim else f"*({kind}*)p[{i}]")
        if arr.ndim:
            args += [arg for what, arg in (("shape", f"sh + {NDIM} * {i}"), ("strides", f"st + {NDIM} * {i}"),
                                           ("ndim", f"nd[{i}]")) if _uses(source, name, what)]
        i += 1
    for _, dtype in launch.outputs.values():
        args.append(f"({METAL_TYPES[dtype]}*)p[{i}]")
        i += 1
    for attr, index in (("thread_position_in_threadgroup", "threadIdx"), ("threadgroup_position_in_grid", "blockIdx")):
        if attr in source:
            args.append(f"uint3{{{index}.x, {index}.y, {index}.z}}")
    name = f"custom_kernel_{launch.name}" + (f"<{targs}>" if targs else "")
    return f"""
extern "C" int kv_launch(void** p, const int32_t* sh, const int64_t* st, const int* nd, const unsigned* grid,
                         const unsigned* block, double timeout_s) {{
  return kv_simt::launch({{grid[0], grid[1], grid[2]}}, {{block[0], block[1], block[2]}}, [&]() {{
    {name}({", ".join(args)});
  }}, timeout_s);
}}
"""


def translation_unit(launch: Launch, dialect: str) -> str:
    """What g++ builds for `launch` in `dialect`: MLX's unit plus the emulator's entry point."""
    source = dialects.render(launch.body, dialect)[1]
    if dialect == "metal":
        return '#include "metal_shim.h"\n' + launch.translation_unit("metal") + _metal_launcher(launch, source)
    return launch.translation_unit("cuda") + _launcher(launch, source)


@cache
def _library(unit: str) -> ctypes.CDLL:
    """The shared object of one translation unit, with MLX's headers stubbed (simt_build caches it)."""
    inc = CACHE / "include"
    for rel, text in _STUBS.items():
        (inc / rel).parent.mkdir(parents=True, exist_ok=True)
        (inc / rel).write_text(text)
    return simt_build.shared_library(unit, (inc,))


def _host(a: mx.array) -> np.ndarray:
    """A contiguous host copy with the kernel's element type (bf16 as its uint16 bits)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


def run(launch: Launch, dialect: str = "cuda") -> dict[str, mx.array]:
    """The outputs of `launch` computed by the emulated kernel of `dialect`."""
    if dialect == "metal" and any(g % t for g, t in zip(launch.grid, launch.threadgroup)):
        raise ValueError("Metal dispatches non-uniform threadgroups for such a grid; the emulator runs whole blocks only")
    lib = _library(translation_unit(launch, dialect))
    hosts = [_host(a) for a in launch.inputs.values()]
    outs = [np.zeros(shape, _NP[dtype]) for shape, dtype in launch.outputs.values()]
    n = len(hosts) + len(outs)
    ptrs = (ctypes.c_void_p * n)(*[h.ctypes.data for h in hosts + outs])
    shapes = np.zeros((n, NDIM), np.int32)
    strides = np.zeros((n, NDIM), np.int64)
    ndims = np.zeros(n, np.int32)
    for i, h in enumerate(hosts):
        shapes[i, : h.ndim] = h.shape
        strides[i, : h.ndim] = [s // h.itemsize for s in h.strides]
        ndims[i] = h.ndim
    # MLX's grid is in threads: blocks = ceil(grid / threadgroup), block = min(threadgroup, grid) per axis.
    block = [min(t, g) for t, g in zip(launch.threadgroup, launch.grid)]
    grid = [-(-g // t) for g, t in zip(launch.grid, launch.threadgroup)]
    rc = lib.kv_launch(ptrs, shapes.ctypes.data_as(ctypes.c_void_p), strides.ctypes.data_as(ctypes.c_void_p),
                       ndims.ctypes.data_as(ctypes.c_void_p), (ctypes.c_uint * 3)(*grid),
                       (ctypes.c_uint * 3)(*block), ctypes.c_double(TIMEOUT_S))
    if rc:
        raise RuntimeError(f"{launch.name}: emulated launch returned {rc}")
    result = {}
    for (name, (_, dtype)), o in zip(launch.outputs.items(), outs):
        arr = mx.array(o)
        result[name] = arr.view(mx.bfloat16) if dtype == mx.bfloat16 else arr
    return result
