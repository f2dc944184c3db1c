"""The CUDA C++ decode kernel for 4-bit or 8-bit token-axis K and V (decode_quant.cu), behind `attend`.

It replaces the lean Triton split program for one decode query over 4-bit or 8-bit K and V (both the
same width) at head dim 64, 128 or 256 (group 64, no rotation, up to 8 query heads per KV head) and writes
the same partial slots, which the Triton reduce merges. Compiled once per device by NVRTC (the libnvrtc that CUDA builds of torch
ship), so it needs no CUDA toolkit. Everything else, and any GPU without the MMA it uses (sm_80+),
stays on the Triton kernels.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from kvspec.spec import Quant

from .support import on_device

SOURCE = Path(__file__).with_name("decode_quant.cu")
WARPS = 4  # decode_quant.cu's WARPS
Q_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # decode_quant.cu's q_kind


@dataclass(frozen=True)
class Build:
    """decode_quant.cu's compile-time configuration: each warp's ring holds `stages` steps of `tiles`
    tiles of 16 keys; `blocks_per_sm` is its __launch_bounds__ minimum and the blocks per
    multiprocessor `attend`'s splits aim for, unless that leaves splits of fewer than `short_split_keys`
    keys: then they aim for one (fewer, longer splits: fewer partials to write and merge)."""

    tiles: int
    stages: int
    blocks_per_sm: int
    short_split_keys: int = 0


# Per (code width, head dim), from benchmarks/sweep_cuda_decode.py on an H200 (Mistral heads). 4 bits,
# b8 x 32k: this 0.1072 ms, 1 tile x 4 stages 0.1153, 2 x 3 0.1117, 4 x 2 at 2 blocks 0.1077; 4 blocks (8
# splits) 0.1097. 8 bits (a 4,864-B tile: 3 blocks of 2 x 2 overflow the 227 KB), b8 x 32k / 128k:
# this 0.1609 / 0.5743 ms, 1 x 2 at 3 blocks 0.1624 / 0.5797, at 4 0.1633 / 0.5798, 1 x 3 at 3
# 0.1655 / 0.5844. Head dim 64 (95-96 registers), SmolLM2's heads (9 q / 3 kv), b8 x 32k / 128k: 4 bits
# this 0.0351 / 0.0875 ms (Triton 0.0623 / 0.2082), 5 blocks 0.0354 / 0.0883, 2 x 3 at 4 0.0368 / 0.0912,
# 1 x 3 at 4 0.0357 / 0.0959; 8 bits this 0.0460 / 0.1222 (Triton 0.0573 / 0.1867), 2 x 3 at 3 0.0461 /
# 0.1235, 1 x 3 at 4 0.0467 / 0.1245. Head dim 256, Gemma-3's heads (4 q / 1 kv), b8 x 32k / 128k / b1 x
# 32k: 4 bits (187 registers) this 0.0492 / 0.1087 / 0.0282 ms (Triton 0.0738 / 0.2414 / 0.0425), 2 x 3
# at 1 0.0443 / 0.1140 / 0.0285, 1 x 2 at 3 0.0484 / 0.1103 / 0.0298; 8 bits (a 9,216-B tile, 189
# registers) this 0.0592 / 0.1627 / 0.0314 (Triton 0.0764 / 0.2395 / 0.0539), 1 x 2 at 3 0.0638 / 0.1689
# / 0.0320, 1 x 3 at 2 0.0652 / 0.1725 / 0.0312. Splits of the 4-bit D 256 build (ms; the aim of 2
# blocks / 1 block per SM): b8 x 32k 32 splits 0.0494 / 16 0.0439; b32 x 4k 8 0.0345 / 4 0.0290; where the
# aim of 2 leaves >= 2,048 keys a split it wins: b8 x 128k 32 0.1097 / 16 0.1115, b32 x 32k 8 0.1068 / 4
# 0.1099, b32 x 128k 8 0.3313 / 4 0.3927.
BUILDS = {
    (4, 128): Build(tiles=2, stages=2, blocks_per_sm=3),
    (8, 128): Build(tiles=2, stages=2, blocks_per_sm=2),
    (4, 64): Build(tiles=2, stages=2, blocks_per_sm=4),
    (8, 64): Build(tiles=2, stages=2, blocks_per_sm=4),
    (4, 256): Build(tiles=2, stages=2, blocks_per_sm=2, short_split_keys=2048),
    (8, 256): Build(tiles=2, stages=2, blocks_per_sm=1),
}
# The head dims `attend` sends to the kernel: Mistral's 128, SmolLM2's and Qwen2.5's 64, Gemma-3's 256.
HEAD_DIMS = (64, 128, 256)


def tile_bytes(bits: int, d: int) -> int:
    """decode_quant.cu's TILE_BYTES (the build checks it): 16 rows of K codes and of V codes (rows padded
    against bank conflicts: K rows of 128 B or more by 16 B, V rows by 16 B), then K and V scales and biases
    (d / 64 fp16 each a row)."""
    row = d * bits // 8
    return 16 * ((row + 16 if row >= 128 else row) + row + 16) + 4 * 16 * (d // 64) * 2


def keys_per_step(bits: int, d: int) -> int:
    """A block's keys per step (its warps' tiles x 16 keys each): the grain of `attend`'s splits."""
    return WARPS * BUILDS[bits, d].tiles * 16


def ring_bytes(bits: int, d: int, tiles: int, stages: int) -> int:
    """A block's dynamic shared memory: its warps' rings of `stages` steps of `tiles` tiles."""
    return WARPS * stages * tiles * tile_bytes(bits, d)


def _spec_refusal(t) -> str | None:
    if not isinstance(t, Quant) or t.bits not in (4, 8) or t.axis != "token":
        return "not a 4-bit or 8-bit token-axis quantizer"
    if t.group != 64:
        return f"group {t.group}, not 64"
    if t.rotation is not None:
        return "rotated (the kernel has no Hadamard transform)"
    return None


def device_refusal(q: torch.Tensor) -> str | None:
    """Why the kernel cannot run on q's device (None: a CUDA GPU of compute capability 8.0+)."""
    if not q.is_cuda:
        return "not a CUDA tensor"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "the kernel's MMA needs compute capability 8.0+"
    return None


def refusal(q: torch.Tensor, k, v) -> str | None:
    """Why the CUDA kernel cannot take the lean launch of this attention (None: it can): one query,
    both parts token-axis of one width (4 or 8 bits) at group 64 without rotation, a head dim in
    HEAD_DIMS, G <= 8, a CUDA GPU of compute capability 8.0+ with torch's NVRTC, and storage the
    kernel's vector loads can read."""
    why = device_refusal(q)
    if why:
        return why
    b, hq, tq, d = q.shape
    if tq != 1 or d not in HEAD_DIMS:
        return f"{tq} queries of head dim {d}: decode at head dims {', '.join(map(str, HEAD_DIMS))} only"
    if q.dtype not in Q_KINDS:
        return f"q is {q.dtype}"
    hkv = k.floats.shape[1]
    if hq // hkv > 8:
        return f"{hq // hkv} query heads per KV head (at most 8)"
    for name, part in (("K", k), ("V", v)):
        why = _spec_refusal(part.spec)
        if why:
            return f"{name}: {why}"
        # cp.async copies 16-byte chunks of code rows (d * bits / 32 words) and 4- or 8-byte runs of scale
        # and bias rows (d / 64 fp16 each: pairs of rows at D 64, one row at D 128 and 256)
        codes, scales, biases = (part.arrays.get(n) for n in ("codes", "scales", "biases"))
        if codes is None or scales is None or biases is None:
            return f"{name}: no stored codes yet"
        words = d * part.spec.bits // 32
        if codes.stride(-1) != 1 or codes.stride(-2) != words or any(s % 4 for s in codes.stride()[:2]) \
                or codes.data_ptr() % 16:
            return f"{name}: code rows are not contiguous and 16-byte aligned"
        align = max(4, d // 32)
        for x in (scales, biases):
            if x.stride(-1) != 1 or x.stride(-2) != d // 64:
                return f"{name}: scale or bias rows are not contiguous runs of {d // 64} fp16"
            if any(2 * s % align for s in x.stride()[:2]) or x.data_ptr() % align:
                return (f"{name}: scale or bias heads do not start {align}-byte aligned (an odd head stride or "
                        "offset)")
        if max(codes.stride(0), scales.stride(0)) >= 2**31:
            return f"{name}: strides beyond 32 bits"
    if k.spec.bits != v.spec.bits:
        return f"K of {k.spec.bits} bits and V of {v.spec.bits}: the kernel takes one width for both"
    return None


def nvrtc_cubin(source: str, arch: str, options: tuple[str, ...] = (), lib: ctypes.CDLL | None = None) -> bytes:
    """source compiled to a cubin for sm_{arch} by NVRTC: `lib`, or the libnvrtc that torch loads (no
    toolkit needed: decode_quant.cu includes no headers)."""
    if lib is None:
        from torch.cuda._utils import _get_nvrtc_library

        lib = _get_nvrtc_library()
    prog = ctypes.c_void_p()
    _nvrtc_check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), SOURCE.name.encode(), 0, None, None))
    opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17", *(o.encode() for o in options)]
    try:
        if lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)):
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile {SOURCE.name} for sm_{arch}:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        _nvrtc_check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _nvrtc_check(lib, lib.nvrtcGetCUBIN(prog, cubin))
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _nvrtc_check(lib, code: int) -> None:
    if code:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC: {lib.nvrtcGetErrorString(code).decode()}")


def build_defines(bits: int, d: int, build: Build | None = None) -> tuple[str, ...]:
    """decode_quant.cu's compile-time configuration as NVRTC options (build: BUILDS[bits, d] by
    default); the kernel checks its tile against `tile_bytes`, which sizes the ring."""
    build = build or BUILDS[bits, d]
    return (f"-DBITS={bits}", f"-DHEAD_DIM={d}", f"-DMIN_BLOCKS={build.blocks_per_sm}", f"-DTILES={build.tiles}",
            f"-DSTAGES={build.stages}", f"-DEXPECT_TILE_BYTES={tile_bytes(bits, d)}")


@functools.lru_cache(maxsize=16)
def _kernel(device_index: int, bits: int, d: int, build: Build):
    """decode_quant_split loaded on one GPU, compiled for its architecture (about a second, once per
    width, head dim and build), with its shared-memory limit raised to the ring's size."""
    from torch.cuda._utils import _cuda_load_module

    major, minor = torch.cuda.get_device_capability(device_index)
    cubin = nvrtc_cubin(SOURCE.read_text(), f"{major}{minor}", build_defines(bits, d, build))
    with torch.cuda.device(device_index):
        kernel = _cuda_load_module(cubin, ["decode_quant_split"])["decode_quant_split"]
        kernel.set_shared_memory_config(ring_bytes(bits, d, build.tiles, build.stages))
    return kernel


def _kernel_for(device: torch.device, bits: int, d: int):
    """The kernel for `bits` and head dim `d` loaded on `device` (a CUDA device; the tests swap in their
    CPU emulation here)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _kernel(index, bits, d, BUILDS[bits, d])


def _int64(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int64 else x.long()


def launch(q: torch.Tensor, q_pos: torch.Tensor, k, v, *, qk_scale: float, splits: int, chunk: int, slots: int,
           end: int, pm: torch.Tensor, pl: torch.Tensor, pc: torch.Tensor, flag: torch.Tensor) -> None:
    """Write slots [0, splits) of the partials (kernels.attention's layout: m, l [B * Hkv, slots, GP],
    outputs [.., DV]) for keys [i * chunk, (i + 1) * chunk) of split i, up to the query's position,
    `end` and the parts' splits. q [B, Hq, 1, D] fp16, bf16 or fp32 (must pass `refusal`); qk_scale:
    the softmax scale times log2(e), as the Triton split kernel takes it."""
    b, hq, _, d = q.shape
    hkv = k.floats.shape[1]
    g = hq // hkv
    gp = 1 << (g - 1).bit_length()
    kc, ks, kb = (k.arrays[n] for n in ("codes", "scales", "biases"))
    vc, vs, vb = (v.arrays[n] for n in ("codes", "scales", "biases"))
    bits = k.spec.bits
    build = BUILDS[bits, d]
    kernel = _kernel_for(q.device, bits, d)
    args = [q, q.stride(0), q.stride(1), Q_KINDS[q.dtype], _int64(q_pos), _int64(k.split), _int64(v.split),
            kc, kc.stride(0), kc.stride(1), ks, kb, ks.stride(0), ks.stride(1),
            vc, vc.stride(0), vc.stride(1), vs, vb, vs.stride(0), vs.stride(1),
            pm, pl, pc, flag, hkv, g, gp, end, chunk, slots, float(qk_scale)]
    with on_device(q):
        kernel(grid=(splits, b * hkv, 1), block=(WARPS * 32, 1, 1), args=args,
               shared_mem=ring_bytes(bits, d, build.tiles, build.stages))

