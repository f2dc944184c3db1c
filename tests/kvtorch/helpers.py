"""Shared test inputs for kvtorch: spec grids, bases, chunkings, stored arrays as NumPy."""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import kvspec
from kvspec import reference as R
from kvspec.reference.lowrank import make_basis

# Every bits / group / axis / rotation / rank / hybrid / residual / float dtype kind, mixed K and V.
SPECS = [
    "fp16", "bf16", "int8", "int4", "int3-g32", "int2-g128", "int4-rot7", "int3-chan-g32-res5",
    "k2v4-kchan-res3", "k4v2-kchan-rot3-res16", "int4-res9-bf16", "k16v4", "rank16-random",
    "rank24-identity-q8", "rank32-q3-g32-hadamard", "k8vrank16-q4-random", "krank8vint4-rot-identity",
    "rank16-random-res4-bf16",
]


def bases_for(spec: kvspec.KVSpec, dim: int, heads: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-head random bases [H, D, r] (fp32) for the spec's low-rank tensors."""
    out = {}
    for which, t in spec.tensors().items():
        if isinstance(t, kvspec.LowRank):
            out[which] = np.stack([make_basis("random", dim, seed=seed + h)[:, : t.rank] for h in range(heads)]).astype(np.float32)
    return out


def chunking(rng: np.random.Generator, tokens: int) -> list[int]:
    """Random chunk sizes summing to `tokens`: single tokens, short and long chunks."""
    sizes, left = [], tokens
    while left:
        size = int(min(left, rng.choice([1, 1, 2, 5, 17, 40])))
        sizes.append(size)
        left -= size
    return sizes


def reference_arrays(s: R.Stored) -> dict[str, np.ndarray]:
    out = {"tail": s.tail}
    if s.quant is not None:
        out.update(codes=s.quant.codes, scales=s.quant.scales, biases=s.quant.biases)
    if s.coeffs is not None:
        out["coeffs"] = s.coeffs
    return out


def nvrtc_library() -> ctypes.CDLL:
    """libnvrtc from the nvidia-cuda-nvrtc wheel (the test extra), to compile CUDA sources without a GPU;
    skips the test where it is missing."""
    spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nvidia-cuda-nvrtc-cu12 is not installed (pip install nvidia-cuda-nvrtc-cu12): no NVRTC on a CPU")
    libs = sorted(Path(next(iter(spec.submodule_search_locations)), "lib").glob("libnvrtc.so.*"))
    if not libs:
        pytest.skip("the nvidia-cuda-nvrtc package has no libnvrtc.so here")
    return ctypes.CDLL(str(libs[0]))


def cuobjdump_tool() -> Path:
    """Triton's bundled cuobjdump, to read a cubin's SASS and resource use; skips the test where it is missing."""
    triton = importlib.util.find_spec("triton")
    if triton is None:
        pytest.skip("triton is not installed: its cuobjdump reads the cubin")
    tool = Path(next(iter(triton.submodule_search_locations)), "backends", "nvidia", "bin", "cuobjdump")
    if not tool.exists():
        pytest.skip(f"no cuobjdump at {tool}")
    return tool
