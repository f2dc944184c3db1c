// A CPU stand-in for the CUDA device code the kvmlx kernels use (tests/kvmlx/simt.py): every GPU
// thread of a block is a std::thread; warp collectives (shuffles, votes, mma.sync) meet at a
// per-warp barrier, __syncthreads at a per-block barrier; blocks run one after another, so
// __shared__ arrays can be function statics. Numerics follow CUDA: fp16 / bf16 conversions round
// to nearest even, mma.sync multiplies exactly and accumulates in fp32 (in another order than the
// tensor cores, within the kernels' tolerances).
#pragma once
#include <array>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <unistd.h>
#include <vector>

#define KV_EMULATED_SIMT 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __shared__ static

struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
struct kv_dim3 { unsigned x = 0, y = 0, z = 0; };

inline uint32_t kv_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __fdiv_rn(float a, float b) { return a / b; }

struct __half {
  _Float16 v;
  __half() = default;
  explicit __half(float f) : v(static_cast<_Float16>(f)) {}
  operator float() const { return static_cast<float>(v); }
};
struct __half2 { __half x, y; };
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __ushort_as_half(unsigned short u) { __half h; std::memcpy(&h, &u, 2); return h; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }

struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  explicit __nv_bfloat16(float f) {  // round to nearest even (no NaN inputs in these kernels)
    const uint32_t u = kv_bits(f);
    bits = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const { return __uint_as_float(static_cast<uint32_t>(bits) << 16); }
};
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__nv_bfloat16(lo), __nv_bfloat16(hi)}; }

inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}

namespace kv_simt {
struct Warp {
  explicit Warp(int n) : lanes(n), live(n), bar(n) {}
  const int lanes;
  std::atomic<int> live;  // lanes that have not returned from the kernel
  std::barrier<> bar;
  uint64_t slot[32];
  uint32_t a[32][4], b[32][2];
};
struct Block {
  explicit Block(int n) : bar(n) {
    for (int w = 0; w < n; w += 32) warps.push_back(std::make_unique<Warp>(n - w < 32 ? n - w : 32));
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};
inline thread_local Block* block = nullptr;
inline thread_local Warp* warp = nullptr;
inline thread_local int lane = 0;
inline std::atomic<long> collectives{0};  // progress, for the watchdog

// A full-mask collective needs every lane of the warp: one that returned while others still
// shuffle is a divergent collective (undefined on the GPU, where it hung the H200 on 2026-11-29).
inline void check_converged() {
  if (warp->live.load() < warp->lanes) {
    std::fprintf(stderr, "kv_simt: divergent warp collective: %d of %d lanes had returned\n",
                 warp->lanes - warp->live.load(), warp->lanes);
    std::fflush(stderr);
    _exit(4);
  }
}

template <typename X> X exchange(X v, int src) {
  static_assert(sizeof(X) <= 8, "exchange of a value wider than 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(X));
  warp->slot[lane] = u;
  warp->bar.arrive_and_wait();
  check_converged();
  const uint64_t r = warp->slot[src & 31];
  warp->bar.arrive_and_wait();
  ++collectives;
  X out;
  std::memcpy(&out, &r, sizeof(X));
  return out;
}

template <typename X> float lane_value(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xFFFFu);
  X x;
  std::memcpy(&x, &bits, 2);
  return static_cast<float>(x);
}
template <typename X> uint16_t lane_bits(float f) {
  const X x(f);
  uint16_t u;
  std::memcpy(&u, &x, 2);
  return u;
}
}  // namespace kv_simt

inline thread_local kv_dim3 threadIdx, blockIdx;

template <typename X> X __shfl_xor_sync(unsigned, X v, int m) { return kv_simt::exchange(v, kv_simt::lane ^ m); }
template <typename X> X __shfl_sync(unsigned, X v, int src) { return kv_simt::exchange(v, src); }
inline int __any_sync(unsigned, int p) {
  int any = 0;
  for (int i = 0; i < 32; ++i) any |= kv_simt::exchange(p, i);
  return any != 0;
}
inline void __syncthreads() { kv_simt::block->bar.arrive_and_wait(); }

// fma.rn.{bf16,f16}x2 d, a, b, c: per 16-bit lane, a * b + c rounded once to X.
template <typename X> uint32_t kv_emu_fma2(uint32_t a, uint32_t b, uint32_t c) {
  using namespace kv_simt;
  uint32_t d = 0;
  for (int h = 0; h < 2; ++h) {
    const double r = static_cast<double>(lane_value<X>(a, h)) * lane_value<X>(b, h) + lane_value<X>(c, h);
    d |= static_cast<uint32_t>(lane_bits<X>(static_cast<float>(r))) << (16 * h);
  }
  return d;
}

// mma.sync.aligned.m16n8k16.row.col.f32.X.X.f32 with C = D: every lane deposits its fragments, then
// computes its own four outputs from the whole warp's (PTX ISA fragment layouts for m16n8k16).
template <typename X> void kv_emu_mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                      uint32_t b1) {
  using namespace kv_simt;
  const int l = lane;
  warp->a[l][0] = a0; warp->a[l][1] = a1; warp->a[l][2] = a2; warp->a[l][3] = a3;
  warp->b[l][0] = b0; warp->b[l][1] = b1;
  warp->bar.arrive_and_wait();
  check_converged();
  auto A = [&](int r, int k) {  // row r (0-15), column k (0-15)
    const int owner = 4 * (r % 8) + (k % 8) / 2;
    return lane_value<X>(warp->a[owner][(r >= 8) + 2 * (k >= 8)], k % 2);
  };
  auto B = [&](int k, int n) {
    const int owner = 4 * n + (k % 8) / 2;
    return lane_value<X>(warp->b[owner][k >= 8], k % 2);
  };
  const int g = l / 4, t = l % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i / 2), n = 2 * t + i % 2;
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
    out[i] = acc;
  }
  warp->bar.arrive_and_wait();
  ++collectives;
  for (int i = 0; i < 4; ++i) c[i] = out[i];
}

namespace cooperative_groups {}

namespace kv_simt {
// Run `kernel` on a grid of blocks (one at a time), `threads` threads per block; 0 when it finished.
// The process ends with status 3 when no warp collective happened for `timeout_s` seconds (a hang)
// and 4 on a divergent collective.
inline int launch(kv_dim3 grid, kv_dim3 threads, const std::function<void()>& kernel, double timeout_s) {
  const int n = static_cast<int>(threads.x * threads.y * threads.z);
  std::atomic<bool> done{false};
  std::thread watchdog([&] {
    long seen = -1;
    auto last = std::chrono::steady_clock::now();
    while (!done) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      const long now_count = collectives.load();
      const auto now = std::chrono::steady_clock::now();
      if (now_count != seen) {
        seen = now_count;
        last = now;
      } else if (std::chrono::duration<double>(now - last).count() > timeout_s) {
        std::fprintf(stderr, "kv_simt: no warp collective for %.0f s: the kernel hangs\n", timeout_s);
        std::fflush(stderr);
        _exit(3);
      }
    }
  });
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(n);
        std::vector<std::thread> pool;
        pool.reserve(n);
        for (int i = 0; i < n; ++i)
          pool.emplace_back([&, i] {
            block = &blk;
            warp = blk.warps[i / 32].get();
            lane = i % 32;
            threadIdx = {static_cast<unsigned>(i % threads.x), static_cast<unsigned>((i / threads.x) % threads.y),
                         static_cast<unsigned>(i / (threads.x * threads.y))};
            blockIdx = {bx, by, bz};
            kernel();
            --warp->live;
            warp->bar.arrive_and_drop();  // as an exited GPU thread, it no longer holds the others back
            blk.bar.arrive_and_drop();
          });
        for (auto& th : pool) th.join();
      }
  done = true;
  watchdog.join();
  return 0;
}
}  // namespace kv_simt
