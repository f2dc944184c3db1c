"""Compile a CUDA translation unit with NVRTC, as MLX's CUDA backend does (no GPU needed).

MLX (mlx/backend/cuda/jit_module.cpp) calls nvrtcCompileProgram with --device-as-default-execution-space,
--gpu-architecture=sm_XY(a) and include paths for its device headers, CCCL and the CUDA runtime
headers. Here: KVMLX_NVRTC_LIB names libnvrtc.so (from the nvidia-cuda-nvrtc wheel) and
KVMLX_NVRTC_INCLUDE a ':'-separated list of include directories holding
mlx/backend/cuda/device/{utils,complex}.cuh and config.h (from MLX's source), CCCL (cuda/std/...) and
the CUDA runtime headers (cuda_fp16.h, cuda_bf16.h). `available()` says why not when they are missing.
"""

from __future__ import annotations

import ctypes
import os

ARCH = "compute_90a"  # what MLX asks for on an H200 (compute capability 9.0, "a" from 9 on)


def available() -> str | None:
    """None when NVRTC and the include directories are configured, else why not."""
    lib = os.environ.get("KVMLX_NVRTC_LIB")
    if not lib or not os.path.exists(lib):
        return "set KVMLX_NVRTC_LIB to libnvrtc.so (pip install nvidia-cuda-nvrtc into a scratch venv)"
    inc = os.environ.get("KVMLX_NVRTC_INCLUDE", "")
    if not any(os.path.exists(os.path.join(d, "mlx/backend/cuda/device/utils.cuh")) for d in inc.split(":") if d):
        return "set KVMLX_NVRTC_INCLUDE to include dirs with mlx/backend/cuda/device/utils.cuh, CCCL and CUDA headers"
    return None


def compile_ptx(source: str, name: str = "kernel.cu") -> tuple[bool, str]:
    """(ok, log or PTX) of compiling `source` for ARCH."""
    nv = ctypes.CDLL(os.environ["KVMLX_NVRTC_LIB"])
    prog = ctypes.c_void_p()
    check = lambda rc, what: rc == 0 or (_ for _ in ()).throw(RuntimeError(f"{what} failed: {rc}"))  # noqa: E731
    check(nv.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None), "create")
    args = [b"--device-as-default-execution-space", f"--gpu-architecture={ARCH}".encode()]
    args += [f"--include-path={d}".encode() for d in os.environ["KVMLX_NVRTC_INCLUDE"].split(":") if d]
    argv = (ctypes.c_char_p * len(args))(*args)
    rc = nv.nvrtcCompileProgram(prog, len(args), argv)
    size = ctypes.c_size_t()
    nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value + 1)
    nv.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))
        return False, log.value.decode(errors="replace")
    nv.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value + 1)
    nv.nvrtcGetPTX(prog, ptx)
    nv.nvrtcDestroyProgram(ctypes.byref(prog))
    return True, ptx.value.decode(errors="replace") + "\n// log:\n" + log.value.decode(errors="replace")
