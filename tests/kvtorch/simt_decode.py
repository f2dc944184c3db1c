"""Run kvtorch's CUDA decode kernel (decode_quant.cu) on the CPU: the same source, built with g++ over
the warp emulator of tests/kvmlx/simt_runtime.h (one std::thread per GPU thread; shuffles, votes,
mma.sync and fp16x2 FMAs emulated) with KV_EMULATED_SIMT, where each PTX helper has a C++ twin. CI
thereby checks what the kernel computes, not only that NVRTC compiles it.

`kernel()` returns an object called like the NVRTC-loaded kernel (`cuda_decode.launch` passes it the
same grid, block and argument list), so a test swaps it in for `cuda_decode._kernel_for` and runs
`attend` on CPU tensors end to end (the reduce on Triton's interpreter). Slow: small shapes only.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from kvtorch.kernels import cuda_decode

from ..kvmlx import simt_build

TIMEOUT_S = 120.0

# decode_quant_split's parameters in order, by kind: tensors p[i], integers n[i], the one double
LAUNCHER = r"""
extern "C" int kv_launch(void** p, const long long* n, double qk_scale, const unsigned* grid, double timeout_s) {
  return kv_simt::launch({grid[0], grid[1], 1}, {WARPS * 32, 1, 1}, [&]() {
    decode_quant_split(p[0], (int)n[0], (int)n[1], (int)n[2], (const long long*)p[1], (const long long*)p[2],
                      (const long long*)p[3], (const u32*)p[4], (int)n[3], (int)n[4], (const u16*)p[5],
                      (const u16*)p[6], (int)n[5], (int)n[6], (const u32*)p[7], (int)n[7], (int)n[8],
                      (const u16*)p[8], (const u16*)p[9], (int)n[9], (int)n[10], (float*)p[10], (float*)p[11],
                      (float*)p[12], (int*)p[13], (int)n[11], (int)n[12], (int)n[13], (int)n[14], (int)n[15],
                      (int)n[16], qk_scale);
  }, timeout_s);
}
"""


available = simt_build.available


def translation_unit(defines: tuple[str, ...]) -> str:
    """What g++ builds: the runtime, the launcher's defines, the kernel source, the entry point."""
    macros = "".join(f"#define {d[2:].replace('=', ' ')}\n" for d in defines)
    return f'#include "simt_runtime.h"\n{macros}' + cuda_decode.SOURCE.read_text() + LAUNCHER


class EmulatedKernel:
    """decode_quant_split on the emulator, called as torch's NVRTC kernel object is."""

    def __init__(self, defines: tuple[str, ...]):
        self.lib = simt_build.shared_library(translation_unit(defines))
        self.launches = 0

    def __call__(self, grid, block, args, shared_mem=0):
        assert tuple(block) == (cuda_decode.WARPS * 32, 1, 1) and grid[2] == 1, (grid, block)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
        (scale,) = [a for a in args if isinstance(a, float)]
        assert len(tensors) == 14 and len(ints) == 17, (len(tensors), len(ints))
        assert all(t.device.type == "cpu" for t in tensors)
        ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
        rc = self.lib.kv_launch(ptrs, (ctypes.c_longlong * len(ints))(*ints), ctypes.c_double(scale),
                                (ctypes.c_uint * 2)(grid[0], grid[1]), ctypes.c_double(TIMEOUT_S))
        if rc:
            raise RuntimeError(f"emulated decode_quant_split returned {rc}")
        self.launches += 1


@cache
def kernel(bits: int, d: int = 128) -> EmulatedKernel:
    """The emulated kernel for `bits` at head dim `d`, with the configuration kvtorch compiles for the GPU."""
    return EmulatedKernel(cuda_decode.build_defines(bits, d))
