"""The two dialects a kernel body is emitted in: Metal (mx.fast.metal_kernel) and CUDA (mx.fast.cuda_kernel).

A body (kvmlx/kernels/bodies.py) is written once against a handful of names that each dialect's
prelude defines: KV_SHARED (threadgroup memory), KV_BARRIER(), KV_SHFL_XOR (butterfly exchange inside
a 32-wide SIMD group / warp), KV_EXP2, KV_DIV_RN (correctly rounded fp32 division), KV_RINT (round
half to even), KV_AS_FLOAT (bit cast), KV_TO_HALF (fp32 -> fp16, to nearest even), KV_MAX/KV_MIN,
KV_LOAD1/2/4 (loads of 1, 2, 4 uint32 words from any pointer), KV_HALF_LO/HI (the fp16 in the low /
high half of a word, as float), kv_half (the fp16 type), and the thread indices
kv_tid, kv_bx, kv_by (thread in threadgroup, threadgroup x / y) set by `{{INDEX}}` at the top of
the body. `render` substitutes the `{{NAME}}` placeholders and refuses leftovers.

How MLX wraps what we hand it (read from mlx/backend/common/metal_kernel.cpp and
mlx/backend/cuda/custom_kernel.cpp, MLX 0.32):
- Metal: source = MLX's metal utils + header + `template <...> [[kernel]] void custom_kernel_<name>(
  const device T* in [[buffer(i)]], ..., device T* out, <attributes the body mentions>) { body }`;
  template args are template parameters; grid is in threads (dispatch_threads), threadgroup = min
  of (threadgroup, grid) per axis. Inputs of fewer than 8 elements are `constant`, not `device`.
  Default math mode "safe" (no fast math).
- CUDA: `#include "mlx/backend/cuda/device/utils.cuh"` + `<cooperative_groups.h>` + header, then
  `namespace mlx::core::cu { __global__ void custom_kernel_<name><hash>(const T* in, [Shape in_shape,
  Strides in_strides,] ..., T* out) { constexpr int N = ...; using T = ...; body } }`, compiled by
  NVRTC with --device-as-default-execution-space --gpu-architecture=sm_XY(a); grid is in threads:
  blocks = ceil(grid / threadgroup), block = min(threadgroup, grid) per axis.
In both, `<input>_strides` in the body makes MLX pass that input's strides (elements), which lets
the kernels read sliced cache views in place (ensure_row_contiguous=False).
"""

from __future__ import annotations

import re

DIALECTS = ("metal", "cuda")

_COMMON = """
// Macros (both dialects, any operand types): an argument may run twice, so never pass a shuffle.
#define KV_MAX(a, b) ((a) > (b) ? (a) : (b))
#define KV_MIN(a, b) ((a) < (b) ? (a) : (b))
// A packed word; other types only appear in branches a float-coefficient instantiation never takes.
inline uint32_t kv_word(uint32_t w) { return w; }
template <typename X> inline uint32_t kv_word(X) { return 0u; }
"""

def _mma_ops(cxx: str, ptx: str, magic: int, one: int, neg_magic: int) -> str:
    """kv_mma<cxx>'s code() and mma() (CUDA header below): PTX on the GPU, the tests' warp emulator
    under KV_EMULATED_SIMT. magic / one / neg_magic: the 16-bit patterns of M, 1 and -M in `ptx`
    (bf16: M = 128, so codes below 128 fit its 7 mantissa bits; fp16: M = 1024, below 1024)."""
    m, o, n = (f"0x{x:04X}{x:04X}u" for x in (magic, one, neg_magic))
    return f"""  static __device__ inline uint32_t code(uint32_t r) {{  // c < M's mantissa unit: M + c exact, then - M
#ifdef KV_EMULATED_SIMT
    return kv_emu_fma2<{cxx}>(r | {m}, {o}, {n});
#else
    uint32_t d;
    asm("fma.rn.{ptx}x2 %0, %1, %2, %3;" : "=r"(d) : "r"(r | {m}), "r"({o}), "r"({n}));
    return d;
#endif
  }}
  static __device__ inline void mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {{
#ifdef KV_EMULATED_SIMT
    kv_emu_mma<{cxx}>(c, a0, a1, a2, a3, b0, b1);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.{ptx}.{ptx}.f32 {{%0,%1,%2,%3}}, {{%4,%5,%6,%7}}, {{%8,%9}}, {{%0,%1,%2,%3}};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
  }}"""


HEADERS = {
    "metal": _COMMON + """
#define KV_SHARED threadgroup
#define KV_BARRIER() metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup)
#define KV_SHFL_XOR(v, m) metal::simd_shuffle_xor((v), (ushort)(m))
#define KV_EXP2(x) metal::exp2(x)
#define KV_DIV_RN(a, b) metal::precise::divide((a), (b))
#define KV_RINT(x) metal::rint(x)
#define KV_AS_FLOAT(u) as_type<float>(u)
#define KV_TO_HALF(x) static_cast<half>(x)
#define KV_LOAD1(p) (*((const device uint*)(p)))
#define KV_LOAD2(p) (*((const device uint2*)(p)))
#define KV_LOAD4(p) (*((const device uint4*)(p)))
#define KV_HALF_LO(w) static_cast<float>(as_type<half>((ushort)((w) & 0xFFFFu)))
#define KV_HALF_HI(w) static_cast<float>(as_type<half>((ushort)((w) >> 16)))
typedef half kv_half;
""",
    "cuda": _COMMON + """
#define KV_SHARED __shared__
#define KV_BARRIER() __syncthreads()
#define KV_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define KV_EXP2(x) exp2f(x)
#define KV_DIV_RN(a, b) __fdiv_rn((a), (b))
#define KV_RINT(x) rintf(x)
#define KV_AS_FLOAT(u) __uint_as_float(u)
#define KV_TO_HALF(x) __float2half_rn(x)
#define KV_LOAD1(p) (*reinterpret_cast<const uint32_t*>(p))
#define KV_LOAD2(p) (*reinterpret_cast<const uint2*>(p))
#define KV_LOAD4(p) (*reinterpret_cast<const uint4*>(p))
#define KV_HALF_LO(w) __half2float(__ushort_as_half((unsigned short)((w) & 0xFFFFu)))
#define KV_HALF_HI(w) __half2float(__ushort_as_half((unsigned short)((w) >> 16)))
typedef __half kv_half;
// Matrix units (kvmlx/kernels/tensorcore.py; no Metal form yet): D += A B on a warp's m16n8k16
// fragments, fp32 accumulation, operands as registers of two fp16 / bf16 values (low half first).
// code(r): two codes c (one per 16-bit lane, in the low bits) as exact operand values: OR-ing M's
// float pattern makes M + c (c fits M's mantissa below its unit), one packed FMA takes M off. (Left
// in, M's multiples swamp the fp32 accumulation: 1024 sum(q) beside q . c at fp16.)
// split: x = high + low, each rounded to the operand type (two MMAs then carry ~16 bits of x, not 8:
// one bf16 rounding of q or p s costs up to 2^-9 of a dequantized group's scale times its codes,
// which outlier groups make large next to the values); returns the four parts' fp32 sum.
// KV_EMULATED_SIMT: compiled for the CPU by the tests' warp emulator (tests/kvmlx/simt.py), which
// defines kv_emu_fma2 and kv_emu_mma in place of the PTX.
#define KV_MMA_SPLIT \
  static __device__ inline float split(uint32_t* r, float x0, float x1) { \
    r[0] = pack(x0, x1); \
    r[1] = pack(x0 - lo(r[0]), x1 - hi(r[0])); \
    return lo(r[0]) + hi(r[0]) + lo(r[1]) + hi(r[1]); \
  }
template <typename X> struct kv_mma;
template <> struct kv_mma<__nv_bfloat16> {
""" + _mma_ops("__nv_bfloat16", "bf16", 0x4300, 0x3F80, 0xC300) + """
  static __device__ inline uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ inline float lo(uint32_t r) { return __uint_as_float(r << 16); }
  static __device__ inline float hi(uint32_t r) { return __uint_as_float(r & 0xFFFF0000u); }
  KV_MMA_SPLIT
};
template <> struct kv_mma<__half> {
""" + _mma_ops("__half", "f16", 0x6400, 0x3C00, 0xE400) + """
  static __device__ inline uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ inline float lo(uint32_t r) { return __half2float(__ushort_as_half((unsigned short)(r & 0xFFFFu))); }
  static __device__ inline float hi(uint32_t r) { return __half2float(__ushort_as_half((unsigned short)(r >> 16))); }
  KV_MMA_SPLIT
};
""",
}

# Metal's indices are kernel attributes MLX adds when the body names them; CUDA has built-ins.
INDEX = {
    "metal": "const int kv_tid = (int)thread_position_in_threadgroup.x;\n"
             "const int kv_bx = (int)threadgroup_position_in_grid.x;\n"
             "const int kv_by = (int)threadgroup_position_in_grid.y;",
    "cuda": "const int kv_tid = (int)threadIdx.x;\n"
            "const int kv_bx = (int)blockIdx.x;\n"
            "const int kv_by = (int)blockIdx.y;",
}

_PLACEHOLDER = re.compile(r"\{\{[A-Z_]+\}\}")
_COMMENT = re.compile(r"[ \t]*//[^\n]*")


def strip_comments(text: str) -> str:
    """`text` without // comments, indentation and blank lines (the kernel texts hold no string
    literals). MLX rebuilds each custom kernel's source and hashes it on every call, so what it is
    sent is kept short."""
    return "\n".join(line.strip() for line in _COMMENT.sub("", text).splitlines() if line.strip()) + "\n"


_HEADERS_STRIPPED = {name: strip_comments(text) for name, text in HEADERS.items()}


def render(body: str, dialect: str) -> tuple[str, str]:
    """(header, source) of a kernel body in `dialect`, comments stripped; raises on a placeholder
    left unreplaced."""
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {DIALECTS}, got {dialect!r}")
    source = body.replace("{{INDEX}}", INDEX[dialect])
    left = _PLACEHOLDER.findall(source)
    if left:
        raise ValueError(f"unreplaced placeholders in the {dialect} body: {sorted(set(left))}")
    return _HEADERS_STRIPPED[dialect], strip_comments(source)


def build(name: str, body: str, inputs: list[str], outputs: list[str], dialect: str):
    """The mx.fast kernel object of `body` in `dialect` (compiled by MLX on first call)."""
    import mlx.core as mx

    header, source = render(body, dialect)
    if dialect == "metal":
        return mx.fast.metal_kernel(name=name, input_names=inputs, output_names=outputs, source=source,
                                    header=header, ensure_row_contiguous=False)
    return mx.fast.cuda_kernel(name=name, input_names=inputs, output_names=outputs, source=source,
                               header=header, ensure_row_contiguous=False)
