// The Metal Shading Language names that kvmlx's Metal dialect (kvmlx/kernels/dialect.py) and MLX's
// kernel signature (kvmlx/kernels/launch.py, _metal_unit) use, over the CPU warp emulator of
// simt_runtime.h: a 32-wide SIMD group is a warp, a threadgroup a block. Address spaces vanish
// (threadgroup memory becomes static, as __shared__ does there: blocks run one after another).
// What g++ accepts here a Metal compiler may still refuse: this checks what the code computes.
#pragma once
#include <bit>
#include "simt_runtime.h"

#define device
#define constant
#define threadgroup static

typedef unsigned short ushort;
struct uint3 { uint32_t x, y, z; };
using half = __half;
using float16_t = __half;
using bfloat16_t = __nv_bfloat16;

template <typename T, typename U> inline T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type between types of different sizes");
  T t;
  std::memcpy(&t, &u, sizeof(T));
  return t;
}

namespace metal {
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) { __syncthreads(); }
template <typename X> X simd_shuffle_xor(X v, ushort m) { return kv_simt::exchange(v, kv_simt::lane ^ m); }
inline float exp2(float x) { return std::exp2(x); }
inline float rint(float x) { return std::rint(x); }
namespace precise {
inline float divide(float a, float b) { return a / b; }
}  // namespace precise
}  // namespace metal
