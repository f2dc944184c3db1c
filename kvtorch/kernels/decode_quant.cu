// Split-K decode attention over 4-bit or 8-bit (BITS) token-axis K and V (head dim HEAD_DIM 64, 128 or 256,
// group 64, up to 8 query heads per KV head), in CUDA C++ with warp-level MMA (sm_80+; compiled at run time by NVRTC through
// kvtorch.kernels.cuda_decode). It writes the same partial slots as _attention_triton's lean split
// program, and the Triton reduce merges them.
//
// Why not Triton: tl.dot puts the (padded) query rows on the MMA's M side, so a 16-row tile of 4 real
// query heads wastes 3/4 of every MMA, and its layouts send dequantized tiles through shared memory
// (Triton's best int4 kernel: 0.176 ms at b8 x 32k on an H200, 40% of the copy bandwidth). Here keys
// sit on the M side: scores^T[16 keys, 8 queries] = K[16, 128] . q^T and out^T[128, 8] += V^T[128, 16
// keys] . P^T, with 4-bit words dequantized straight into the MMA's register fragments. Each warp
// walks its own keys through a ring of cp.async stages (no barrier in the loop); the 4 warps of a
// block merge once at the end.
//
// Fragment maps (m16n8k16, g = lane / 4, t = lane % 4). A dot over D does not depend on the order
// of D, so the K operand's k slots take whatever d order its words unpack to, and q follows. 4 bits:
//   K: lane (g, t) reads words 4t..4t+3 (d in [32t, 32t + 32)) of keys g and g + 8; chunk c (16 d)
//      takes word u = c / 2; slot 2t + e holds d = 32t + 8u + o + 4e and slot 2t + 8 + e holds
//      d = 32t + 8u + o + 1 + 4e, o = 0 for even c, 2 for odd c.
//   V: lane (g, t) reads words 2g, 2g + 1 (d in [16g, 16g + 16)) of keys 2t, 2t + 1, 2t + 8, 2t + 9;
//      row g of chunk c = 4w + i holds d = 16g + 2c (low nibble of byte i of word w) and row g + 8
//      d = 16g + 2c + 1 (high nibble). The accumulator's rows are those d: a lane ends with
//      out[16g, 16g + 16) of queries 2t, 2t + 1.
// 8 bits (byte i of word w holds d = 4w + i):
//   K: lane (g, t) reads words 8t..8t+7 (d in [32t, 32t + 32)) of keys g and g + 8; chunk c takes word c:
//      slots 2t, 2t + 1 hold d = 32t + 4c, + 1 and slots 2t + 8, 2t + 9 hold d = 32t + 4c + 2, + 3.
//   V: lane (g, t) reads words 4g..4g+3 (d in [16g, 16g + 16)) of keys 2t, 2t + 1, 2t + 8, 2t + 9;
//      chunk c = 2w + h: row g holds d = 16g + 2c (byte 2h of word w), row g + 8 d = 16g + 2c + 1 (byte
//      2h + 1): the 4-bit map's rows, so the accumulator and the merge are the same.
// Head dim 64 halves each lane's share: K words 2t, 2t + 1 (4 bits) or 4t..4t+3 (8 bits), d in
//   [16t, 16t + 16), 4 chunks; V word g (4 bits) or 2g, 2g + 1 (8 bits), d in [8g, 8g + 8), rows
//   d = 8g + 2c and + 1; one scale a row (the lanes' groups are all group 0).
// Head dim 256 doubles it: K words 8t..8t+7 (4 bits) or 16t..16t+15 (8 bits), d in [64t, 64t + 64) (group
//   t), 16 chunks; V words 4g..4g+3 (4 bits) or 8g..8g+7 (8 bits), d in [32g, 32g + 32), rows d = 32g + 2c
//   and + 1 (group g / 2).
//   P: the scores' accumulator (keys g, g + 8 x queries 2t, 2t + 1) becomes the P^T operand (keys 2t,
//      2t + 1, 2t + 8, 2t + 9 x query g) by one movmatrix transpose per 8 x 8 half.
//
// Dequantization rounds as the Triton PTX path does: n + 1024 in fp16 by one LOP3 per two codes (the
// exponent trick; 8 bits: one PRMT per two K codes, and per four V codes one PRMT gathering two keys'
// bytes, one LOP3, one PRMT), an exact fp16 FMA back to n, then fma(n, scale, bias) rounded once to fp16.
// Instructions per 16 keys and warp (SASS, sm_90): ~390, 240 of them dequantization (128 HFMA2, 76
// LOP3, 25 PRMT): 3 per 2 codes is the floor of this rounding, so what is left is latency, which the
// ring (2 stages of 2 tiles) and two MMA chains per score tile hide: b8 x 32k 0.1075 ms, b8 x 128k
// 0.337 ms (84% of the copy bandwidth), H200 (benchmarks/README.md).

typedef unsigned int u32;
typedef unsigned short u16;

// KV_EMULATED_SIMT: compiled for the CPU by tests/kvtorch/simt_decode.py over the warp emulator of
// tests/kvmlx/simt_runtime.h. Each PTX helper below has a C++ twin with the same result; shared
// addresses are offsets into one static ring (the emulator runs blocks one at a time).
#ifdef KV_EMULATED_SIMT
#include <algorithm>
using std::max;
using std::min;
#define __launch_bounds__(...)
inline float __int_as_float(int i) { return __uint_as_float(static_cast<u32>(i)); }
inline void __syncwarp() {
    kv_simt::warp->bar.arrive_and_wait();
    kv_simt::check_converged();
    ++kv_simt::collectives;
}
#endif

#ifndef BITS
#define BITS 4  // code width of K and V: 4 or 8 (kvtorch passes it)
#endif
#if BITS != 4 && BITS != 8
#error "BITS must be 4 or 8"
#endif
#define WARPS 4
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 3  // blocks per multiprocessor the registers are budgeted for (kvtorch passes it)
#endif
#define TILE 16  // keys of one MMA tile (the MMA's M)
#ifndef HEAD_DIM
#define HEAD_DIM 128  // 64, 128 or 256 (kvtorch passes it)
#endif
#if HEAD_DIM != 64 && HEAD_DIM != 128 && HEAD_DIM != 256
#error "HEAD_DIM must be 64, 128 or 256"
#endif
#define D HEAD_DIM
#define LANE_D (D / 4)  // d a lane of q holds: [LANE_D t, LANE_D (t + 1))
#define GROUPS (D / 64)  // scales (and biases) a row
#define WORDS (D * BITS / 32)  // code words a row: 8 to 64
#define CHUNKS (WORDS / 4)     // 16-byte chunks a row: 2 to 16
#define ROWS_PER_PASS (32 / CHUNKS)  // rows a warp's 16-byte copies cover at once
#define NEG_INF_FINITE -1.0e30f  // a finite minus infinity, as _attention_triton.NEG

__device__ __forceinline__ u32 lop3_and_or(u32 x, u32 mask) {
#ifdef KV_EMULATED_SIMT
    return (x & mask) | 0x64006400u;
#else
    u32 r;  // (x & mask) | 0x64006400: a code in the low bits of an fp16 1024's mantissa
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(x), "r"(mask), "r"(0x64006400u));
    return r;
#endif
}

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
#ifdef KV_EMULATED_SIMT
    return kv_emu_fma2<__half>(a, b, c);
#else
    u32 r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
#endif
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) { return __byte_perm(a, b, sel); }

// Two codes in the low bytes of x's fp16 lanes, as 1024 + n -> fp16(n * scale + bias).
__device__ __forceinline__ u32 deq_byte(u32 x, u32 s2, u32 b2) {
    return hfma2(hfma2(x, 0x3c003c00u, 0xe400e400u), s2, b2);
}

// Two codes as 1024 + n (low nibbles) or 1024 + 16 n (high nibbles) -> fp16(n * scale + bias).
__device__ __forceinline__ u32 deq_lo(u32 x, u32 s2, u32 b2) {
    return hfma2(hfma2(lop3_and_or(x, 0x000f000fu), 0x3c003c00u, 0xe400e400u), s2, b2);  // x * 1 - 1024
}

__device__ __forceinline__ u32 deq_hi(u32 x, u32 s2, u32 b2) {
    return hfma2(hfma2(lop3_and_or(x, 0x00f000f0u), 0x2c002c00u, 0xd400d400u), s2, b2);  // x / 16 - 64
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#ifdef KV_EMULATED_SIMT
    kv_emu_mma<__half>(c, a0, a1, a2, a3, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// An 8 x 8 matrix of 16-bit values (lane (g, t) holds row g, columns 2t, 2t + 1) transposed.
__device__ __forceinline__ u32 transpose8x8(u32 x) {
#ifdef KV_EMULATED_SIMT
    // lane (g, t) takes column g of rows 2t and 2t + 1: half g % 2 of lanes 8t + g / 2 and 8t + 4 + g / 2
    const int g = kv_simt::lane >> 2, t = kv_simt::lane & 3, shift = 16 * (g & 1);
    const u32 r0 = kv_simt::exchange(x, 8 * t + g / 2), r1 = kv_simt::exchange(x, 8 * t + 4 + g / 2);
    return ((r0 >> shift) & 0xffffu) | (((r1 >> shift) & 0xffffu) << 16);
#else
    u32 r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
    return r;
#endif
}

__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
#ifdef KV_EMULATED_SIMT
    return kv_simt::lane_bits<__half>(lo) | (static_cast<u32>(kv_simt::lane_bits<__half>(hi)) << 16);
#else
    u32 r;  // cvt packs its first source into the upper half
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

__device__ __forceinline__ float half_to_float(u16 bits) {
#ifdef KV_EMULATED_SIMT
    return __half2float(__ushort_as_half(bits));
#else
    float x;
    asm("{ .reg .f16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(x) : "h"(bits));
    return x;
#endif
}

__device__ __forceinline__ float ex2(float x) {
#ifdef KV_EMULATED_SIMT
    return exp2f(x);
#else
    float r;
    asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#endif
}

__device__ __forceinline__ float warp_max_over_g(float x) {  // over the 8 lanes of one t
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}

__device__ __forceinline__ float warp_sum_over_g(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 4);
    x += __shfl_xor_sync(0xffffffffu, x, 8);
    return x + __shfl_xor_sync(0xffffffffu, x, 16);
}

// A warp's ring of STAGES steps in shared memory, filled by cp.async STAGES - 1 steps ahead (deep
// enough to cover DRAM latency without holding the words in registers). A step is TILES tiles of 16
// keys; per tile: K code rows of 64 B; V code rows padded to 80 B (a lane reads 8 B of keys 2t + e:
// 64-B rows put the four t on the same banks); 8 bits: K and V rows of 128 B padded to 144 B (without,
// keys g and g + 1, and 2t and 2t + 2, meet on the same banks), as any row of 128 B or more (D 256);
// D 64: V rows 16 B longer likewise; scales and biases of K and V, 16 keys x GROUPS x fp16 each (4- or
// 8-byte copies: a head's rows need not be 16-byte aligned).
#ifndef STAGES
#define STAGES 2
#endif
#ifndef TILES
#define TILES 2  // tiles a step: one softmax update and one wait per 32 keys
#endif
#define STEP_KEYS (TILES * TILE)
#define ROW_BYTES (D * BITS / 8)
#define K_ROW (ROW_BYTES >= 128 ? ROW_BYTES + 16 : ROW_BYTES)  // D 128: 64 (4 bits), 144; D 256: 144, 272
#define V_ROW (ROW_BYTES + 16)                                 // D 128: 80 (4 bits), 144; D 256: 144, 272
#define K_BYTES (TILE * K_ROW)
#define V_BYTES (TILE * V_ROW)
#define SCALE_BYTES (TILE * GROUPS * 2)
#define TILE_BYTES (K_BYTES + V_BYTES + 4 * SCALE_BYTES)
#define STAGE_BYTES (TILES * TILE_BYTES)
#ifdef EXPECT_TILE_BYTES  // kvtorch.kernels.cuda_decode's mirror of the layout, which sizes the ring
static_assert(TILE_BYTES == EXPECT_TILE_BYTES, "cuda_decode.tile_bytes disagrees with the kernel's tile");
#endif
static_assert(WARPS * 8 * D * 4 <= WARPS * STAGES * STAGE_BYTES, "the warps' merge buffer must fit the rings");

#ifdef KV_EMULATED_SIMT
alignas(16) static unsigned char kv_smem[WARPS * STAGES * STAGE_BYTES];
inline u32 shared_address(const void* p) { return static_cast<u32>(static_cast<const unsigned char*>(p) - kv_smem); }

// Copies complete at once: the ring's waits and __syncwarp order them as on the GPU.
template <int N> inline void cp_async(u32 dst, const void* src, int bytes) {
    std::memset(kv_smem + dst, 0, N);
    std::memcpy(kv_smem + dst, src, bytes);
}
inline void cp_async_commit() {}
inline void cp_async_wait_ring() {}
inline void cp_async_wait_all() {}
template <typename X> inline X lds(u32 addr) {
    X x;
    std::memcpy(&x, kv_smem + addr, sizeof(X));
    return x;
}
#else
__device__ __forceinline__ u32 shared_address(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }

// bytes < N zero-fill the rest (rows past the range: their scores are masked, their values weigh 0)
template <int N> __device__ __forceinline__ void cp_async(u32 dst, const void* src, int bytes) {
    if (N == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes));
    } else if (N == 8) {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(bytes));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(bytes));
    }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

__device__ __forceinline__ void cp_async_wait_ring() { asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2)); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;"); }

template <typename X> __device__ __forceinline__ X lds(u32 addr);

template <> __device__ __forceinline__ u16 lds<u16>(u32 addr) {
    u16 r;
    asm volatile("ld.shared.u16 %0, [%1];" : "=h"(r) : "r"(addr));
    return r;
}

template <> __device__ __forceinline__ u32 lds<u32>(u32 addr) {
    u32 r;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(r) : "r"(addr));
    return r;
}

template <> __device__ __forceinline__ uint2 lds<uint2>(u32 addr) {
    uint2 r;
    asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "r"(addr));
    return r;
}

template <> __device__ __forceinline__ uint4 lds<uint4>(u32 addr) {
    uint4 r;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(addr));
    return r;
}
#endif

// A lane's share of a tile's copies: 16-B chunk lane % CHUNKS of code rows lane / CHUNKS + ROWS_PER_PASS i
// (K and V); D 128 and 256: row lane % 16 of two scale arrays (K and V scales for lanes < 16, K and V
// biases above); D 64 (one fp16 a row): rows 2p, 2p + 1 (p = lane % 8) of array lane / 8 (K scales, K biases,
// V scales, V biases). Code rows are WORDS words and scale rows GROUPS fp16 apart (`cuda_decode.refusal`
// checks), so one pointer per array serves every row.
struct Sources {
    const u32* kc;
    const u32* vc;
    const u16* ksc;  // K scales or biases
    const u16* vsc;  // V scales or biases
    u32 k_dst, v_dst, s_dst;  // offsets in a tile
};

__device__ __forceinline__ Sources lane_sources(const u32* kc, const u16* ks, const u16* kb, const u32* vc,
                                                const u16* vs, const u16* vb, int lane) {
#if GROUPS >= 2
    const int key = lane / CHUNKS, j = lane % CHUNKS, skey = lane & 15, hi = lane >> 4;
#else
    const int key = lane / CHUNKS, j = lane % CHUNKS, pair = lane & 7, array = lane >> 3;
#endif
    Sources src;
    src.kc = kc + key * WORDS + 4 * j;
    src.vc = vc + key * WORDS + 4 * j;
#if GROUPS >= 2
    src.ksc = (hi ? kb : ks) + GROUPS * skey;
    src.vsc = (hi ? vb : vs) + GROUPS * skey;
#else
    src.ksc = (array == 0 ? ks : array == 1 ? kb : array == 2 ? vs : vb) + 2 * pair;
    src.vsc = src.ksc;  // one copy a lane: unused
#endif
    src.k_dst = key * K_ROW + 16 * j;
    src.v_dst = K_BYTES + key * V_ROW + 16 * j;
#if GROUPS >= 2
    src.s_dst = K_BYTES + V_BYTES + hi * SCALE_BYTES + 2 * GROUPS * skey;
#else
    src.s_dst = K_BYTES + V_BYTES + array * SCALE_BYTES + 4 * pair;
#endif
    return src;
}

// Copy keys [key0, key0 + STEP_KEYS) into the stage at shared address `dst`, from src's pointers at
// key0; rows past `last` (only in a range's final step) come as zeros, from a clamped (valid) address.
__device__ __forceinline__ void issue_step(u32 dst, const Sources& src, int key0, int last, int lane) {
    if (key0 + STEP_KEYS - 1 <= last) {
        #pragma unroll
        for (int u = 0; u < TILES; ++u) {
            const u32 tile = dst + u * TILE_BYTES;
            #pragma unroll
            for (int i = 0; i < TILE / ROWS_PER_PASS; ++i) {
                const int row = 16 * u + ROWS_PER_PASS * i;
                cp_async<16>(tile + src.k_dst + ROWS_PER_PASS * K_ROW * i, src.kc + row * WORDS, 16);
                cp_async<16>(tile + src.v_dst + ROWS_PER_PASS * V_ROW * i, src.vc + row * WORDS, 16);
            }
#if GROUPS >= 2
            cp_async<2 * GROUPS>(tile + src.s_dst, src.ksc + 16 * GROUPS * u, 2 * GROUPS);
            cp_async<2 * GROUPS>(tile + src.s_dst + 2 * SCALE_BYTES, src.vsc + 16 * GROUPS * u, 2 * GROUPS);
#else
            cp_async<4>(tile + src.s_dst, src.ksc + 16 * u, 4);
#endif
        }
        return;
    }
#if GROUPS >= 2
    const int key = lane / CHUNKS, skey = lane & 15;
#else
    const int key = lane / CHUNKS;
#endif
    #pragma unroll
    for (int u = 0; u < TILES; ++u) {
        const u32 tile = dst + u * TILE_BYTES;
        #pragma unroll
        for (int i = 0; i < TILE / ROWS_PER_PASS; ++i) {
            // rows past last read row last
            const int row = 16 * u + ROWS_PER_PASS * i, over = max(0, key0 + key + row - last);
            cp_async<16>(tile + src.k_dst + ROWS_PER_PASS * K_ROW * i, src.kc + (row - over) * WORDS, over ? 0 : 16);
            cp_async<16>(tile + src.v_dst + ROWS_PER_PASS * V_ROW * i, src.vc + (row - over) * WORDS, over ? 0 : 16);
        }
#if GROUPS >= 2
        const int over = max(0, key0 + skey + 16 * u - last);
        cp_async<2 * GROUPS>(tile + src.s_dst, src.ksc + GROUPS * (16 * u - over), over ? 0 : 2 * GROUPS);
        cp_async<2 * GROUPS>(tile + src.s_dst + 2 * SCALE_BYTES, src.vsc + GROUPS * (16 * u - over),
                             over ? 0 : 2 * GROUPS);
#else
        // rows 2p and 2p + 1: both, the first only, or none; none reads from row last rounded down to even
        const int first = key0 + 16 * u + 2 * (lane & 7), back = first <= last ? 0 : first - (last & ~1);
        cp_async<4>(tile + src.s_dst, src.ksc + 16 * u - back, first < last ? 4 : (first == last ? 2 : 0));
#endif
    }
}

// src's pointers `keys` keys further.
__device__ __forceinline__ void advance(Sources& src, int keys) {
    src.kc += keys * WORDS;
    src.vc += keys * WORDS;
    src.ksc += keys * GROUPS;
    src.vsc += keys * GROUPS;
}

// Scores of one tile at shared address `tile` (keys key0 + g: sc[0, 1], key0 + g + 8: sc[2, 3]; queries
// 2t, 2t + 1), in log2 units, -inf past `end`. Two accumulator chains halve the MMA dependency chain.
__device__ __forceinline__ void tile_scores(float (&sc)[4], u32 tile, const u32 (&qb)[D / 16][2], float q_mul, int key0,
                                            int end, int g, int t) {
    u32 kw[2][WORDS / 4], ks[2], kb[2];
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
#if WORDS >= 16
        #pragma unroll
        for (int x = 0; x < WORDS / 16; ++x) {
            const uint4 w = lds<uint4>(tile + (g + 8 * h) * K_ROW + 4 * (WORDS / 4) * t + 16 * x);
            kw[h][4 * x] = w.x;
            kw[h][4 * x + 1] = w.y;
            kw[h][4 * x + 2] = w.z;
            kw[h][4 * x + 3] = w.w;
        }
#else
        const uint2 w = lds<uint2>(tile + (g + 8 * h) * K_ROW + 8 * t);  // 4 bits at D 64: 2 words a lane
        kw[h][0] = w.x;
        kw[h][1] = w.y;
#endif
        // the group of d in [LANE_D t, LANE_D (t + 1))
        const u32 a = tile + K_BYTES + V_BYTES + ((g + 8 * h) * GROUPS + (GROUPS == 4 ? t : GROUPS == 2 ? t >> 1 : 0)) * 2;
        ks[h] = __byte_perm(lds<u16>(a), 0, 0x1010);
        kb[h] = __byte_perm(lds<u16>(a + SCALE_BYTES), 0, 0x1010);
    }
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    #pragma unroll
    for (int c = 0; c < D / 16; ++c) {
#if BITS == 4
        const u32 w0 = (c & 1) ? kw[0][c >> 1] >> 8 : kw[0][c >> 1];
        const u32 w1 = (c & 1) ? kw[1][c >> 1] >> 8 : kw[1][c >> 1];
        mma(acc[c & 1], deq_lo(w0, ks[0], kb[0]), deq_lo(w1, ks[1], kb[1]), deq_hi(w0, ks[0], kb[0]),
            deq_hi(w1, ks[1], kb[1]), qb[c][0], qb[c][1]);
#else
        // bytes 0, 1 (slots 2t, 2t + 1) and 2, 3 (slots 2t + 8, 2t + 9) under fp16 1024's high byte
        const u32 lo0 = prmt(kw[0][c], 0x64646464u, 0x4140), hi0 = prmt(kw[0][c], 0x64646464u, 0x4342);
        const u32 lo1 = prmt(kw[1][c], 0x64646464u, 0x4140), hi1 = prmt(kw[1][c], 0x64646464u, 0x4342);
        mma(acc[c & 1], deq_byte(lo0, ks[0], kb[0]), deq_byte(lo1, ks[1], kb[1]), deq_byte(hi0, ks[0], kb[0]),
            deq_byte(hi1, ks[1], kb[1]), qb[c][0], qb[c][1]);
#endif
    }
    const float neg_inf = -__int_as_float(0x7f800000);
    const bool in0 = key0 + g < end, in1 = key0 + g + 8 < end;
    sc[0] = in0 ? (acc[0][0] + acc[1][0]) * q_mul : neg_inf;
    sc[1] = in0 ? (acc[0][1] + acc[1][1]) * q_mul : neg_inf;
    sc[2] = in1 ? (acc[0][2] + acc[1][2]) * q_mul : neg_inf;
    sc[3] = in1 ? (acc[0][3] + acc[1][3]) * q_mul : neg_inf;
}

// o += V^T P^T of one tile at shared address `tile`; pb0, pb1: P^T's fragments (keys 0-7, 8-15).
__device__ __forceinline__ void tile_values(float (&o)[D / 16][4], u32 tile, u32 pb0, u32 pb1, int g, int t) {
    u32 vw[WORDS / 8][4], vs[2], vb[2];  // [word][key 2t, 2t + 1, 2t + 8, 2t + 9]
    #pragma unroll
    for (int p = 0; p < 2; ++p) {
        u32 s[2], b[2];
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int key = 2 * t + 8 * p + e;
            const u32 row = tile + K_BYTES + key * V_ROW + 4 * (WORDS / 8) * g;  // d in [D g / 8, D (g + 1) / 8)
#if WORDS == 8
            vw[0][2 * p + e] = lds<u32>(row);
#elif WORDS == 16
            const uint2 w = lds<uint2>(row);
            vw[0][2 * p + e] = w.x;
            vw[1][2 * p + e] = w.y;
#else
            #pragma unroll
            for (int x = 0; x < WORDS / 32; ++x) {
                const uint4 w = lds<uint4>(row + 16 * x);
                vw[4 * x][2 * p + e] = w.x;
                vw[4 * x + 1][2 * p + e] = w.y;
                vw[4 * x + 2][2 * p + e] = w.z;
                vw[4 * x + 3][2 * p + e] = w.w;
            }
#endif
            const u32 a = tile + K_BYTES + V_BYTES + 2 * SCALE_BYTES +
                          (key * GROUPS + (GROUPS == 4 ? g >> 1 : GROUPS == 2 ? g >> 2 : 0)) * 2;
            s[e] = lds<u16>(a);
            b[e] = lds<u16>(a + SCALE_BYTES);
        }
        vs[p] = __byte_perm(s[0], s[1], 0x5410);  // the pair's two keys, one per fp16 lane
        vb[p] = __byte_perm(b[0], b[1], 0x5410);
    }
#if BITS == 4
    #pragma unroll
    for (int w = 0; w < WORDS / 8; ++w) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            // byte i of keys (2t, 2t + 1) and of (2t + 8, 2t + 9) into bytes 0 and 2: one code pair per nibble
            const u32 sel = i | (i << 4) | ((4 + i) << 8) | ((4 + i) << 12);
            const u32 x0 = prmt(vw[w][0], vw[w][1], sel), x1 = prmt(vw[w][2], vw[w][3], sel);
            mma(o[4 * w + i], deq_lo(x0, vs[0], vb[0]), deq_hi(x0, vs[0], vb[0]), deq_lo(x1, vs[1], vb[1]),
                deq_hi(x1, vs[1], vb[1]), pb0, pb1);
        }
    }
#else
    #pragma unroll
    for (int w = 0; w < WORDS / 8; ++w) {
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            // bytes 2h, 2h + 1 of the pair's two keys: (a0, a1, b0, b1); row g takes (a0, b0), row g + 8 (a1, b1)
            const u32 sel = h ? 0x7632u : 0x5410u;
            const u32 x0 = prmt(vw[w][0], vw[w][1], sel), x1 = prmt(vw[w][2], vw[w][3], sel);
            mma(o[2 * w + h], deq_byte(lop3_and_or(x0, 0x00ff00ffu), vs[0], vb[0]),
                deq_byte(prmt(x0, 0x64646464u, 0x4341), vs[0], vb[0]),
                deq_byte(lop3_and_or(x1, 0x00ff00ffu), vs[1], vb[1]),
                deq_byte(prmt(x1, 0x64646464u, 0x4341), vs[1], vb[1]), pb0, pb1);
        }
    }
#endif
}

// One step of one warp over keys [key0, key0 + STEP_KEYS) in the stage at `stage`: scores, one online
// softmax update, values.
__device__ __forceinline__ void attend_step(u32 stage, const u32 (&qb)[D / 16][2], float q_mul, int key0, int end,
                                            int g, int t, float& m0, float& m1, float& l0, float& l1,
                                            float (&o)[D / 16][4]) {
    float sc[TILES][4];
    float x0 = -__int_as_float(0x7f800000), x1 = x0;
    #pragma unroll
    for (int u = 0; u < TILES; ++u) {
        tile_scores(sc[u], stage + u * TILE_BYTES, qb, q_mul, key0 + u * TILE, end, g, t);
        x0 = fmaxf(x0, fmaxf(sc[u][0], sc[u][2]));
        x1 = fmaxf(x1, fmaxf(sc[u][1], sc[u][3]));
    }
    const float mn0 = fmaxf(m0, warp_max_over_g(x0)), mn1 = fmaxf(m1, warp_max_over_g(x1));
    // Rescale only when some running maximum grew (rare after the first keys): exact, as alpha = 1 otherwise.
    if (__any_sync(0xffffffffu, mn0 > m0 || mn1 > m1)) {
        const float a0 = ex2(m0 - mn0), a1 = ex2(m1 - mn1);
        l0 *= a0;
        l1 *= a1;
        #pragma unroll
        for (int c = 0; c < D / 16; ++c) {
            o[c][0] *= a0;
            o[c][1] *= a1;
            o[c][2] *= a0;
            o[c][3] *= a1;
        }
        m0 = mn0;
        m1 = mn1;
    }
    #pragma unroll
    for (int u = 0; u < TILES; ++u) {
        const float p0 = ex2(sc[u][0] - m0), p1 = ex2(sc[u][1] - m1), p2 = ex2(sc[u][2] - m0), p3 = ex2(sc[u][3] - m1);
        l0 += p0 + p2;
        l1 += p1 + p3;
        tile_values(o, stage + u * TILE_BYTES, transpose8x8(pack_half2(p0, p1)), transpose8x8(pack_half2(p2, p3)), g,
                    t);
    }
}

// Query head h's output at d, merged over the block's warps, and (at d 0) its maximum and sum: slot
// `slot` + h of the partials.
__device__ __forceinline__ void merge_warps(const float (&sm_m)[WARPS][8], const float (&sm_l)[WARPS][8],
                                            const float (*sm_o)[8][D], int h, int d, long long slot, float* pm,
                                            float* pl, float* pc) {
    float mx = NEG_INF_FINITE;
    #pragma unroll
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_m[w][h]);
    float l = 0.0f, acc = 0.0f;
    #pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        const float a = ex2(sm_m[w][h] - mx);
        l += a * sm_l[w][h];
        acc += a * sm_o[w][h][d];
    }
    pc[(slot + h) * D + d] = acc;
    if (d == 0) {
        pm[slot + h] = mx;
        pl[slot + h] = l;
    }
}

// Grid (splits, B * Hkv), WARPS warps. Strides (batch, head) in elements; rows of WORDS code words
// (16-byte aligned) and of 2 fp16 scales or biases (group 64), contiguous along the keys. Writes slot
// pid_s of the lean launch's partials: m, l [(bh * S + pid_s) * GP + head] and the unnormalized
// output [.., D].
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS) decode_quant_split(
    const void* __restrict__ q, int sq_b, int sq_h, int q_kind,
    const long long* __restrict__ pos, const long long* __restrict__ ksplit, const long long* __restrict__ vsplit,
    const u32* __restrict__ kc, int skc_b, int skc_h, const u16* __restrict__ ks, const u16* __restrict__ kb,
    int sks_b, int sks_h, const u32* __restrict__ vc, int svc_b, int svc_h, const u16* __restrict__ vs,
    const u16* __restrict__ vb, int svs_b, int svs_h,
    float* __restrict__ pm, float* __restrict__ pl, float* __restrict__ pc, int* __restrict__ flag,
    int Hkv, int G, int GP, int T_end, int chunk, int S, double qk_scale_arg) {
    const float qk_scale = (float)qk_scale_arg;  // launchers pass Python floats as doubles
#ifdef KV_EMULATED_SIMT
    unsigned char* smem = kv_smem;
#else
    extern __shared__ __align__(16) unsigned char smem[];  // WARPS * STAGES * STAGE_BYTES (dynamic: > 48 KB)
#endif
    float(*sm_o)[8][D] = reinterpret_cast<float(*)[8][D]>(smem);  // after the loop
    __shared__ float sm_m[WARPS][8], sm_l[WARPS][8];
    const int pid_s = blockIdx.x, bh = blockIdx.y;
    const int b = bh / Hkv, kvh = bh % Hkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

    // The lean program's range for one query at pos[0]: keys every row reads compressed.
    const int start = pid_s * chunk;
    const int stop = min(min(start + chunk, T_end), (int)pos[0] + 1);
    const int end = min(stop, (int)min(ksplit[0], vsplit[0]));

    // q of head kvh * G + g (zero rows past G) times qk_scale, scaled down by a power of two where an
    // entry could overflow fp16 (the Triton kernel's q_shift, over the block's heads).
    float qv[LANE_D];
    float amax = 0.0f;
    const long long q_off = (long long)b * sq_b + (long long)(kvh * G + g) * sq_h + LANE_D * t;
    #pragma unroll
    for (int j = 0; j < LANE_D; ++j) {
        float x = 0.0f;
        if (g < G) {
            if (q_kind == 2) {
                x = static_cast<const float*>(q)[q_off + j];
            } else {
                const u16 bits = static_cast<const u16*>(q)[q_off + j];
                x = q_kind == 1 ? __uint_as_float((u32)bits << 16) : half_to_float(bits);  // bf16: a shift
            }
        }
        qv[j] = x * qk_scale;
        amax = fmaxf(amax, fabsf(qv[j]));
    }
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    amax = warp_max_over_g(amax);
    const float shift = fmaxf(ceilf(log2f(amax + 1.0e-30f)) - 14.0f, 0.0f);
    const float q_mul = exp2f(shift), down = exp2f(-shift);
    u32 qb[D / 16][2];
    #pragma unroll
    for (int c = 0; c < D / 16; ++c) {  // q's d in the order of the K fragments' slots (the maps above)
#if BITS == 4
        const int j = 8 * (c >> 1) + 2 * (c & 1);
        qb[c][0] = pack_half2(qv[j] * down, qv[j + 4] * down);
        qb[c][1] = pack_half2(qv[j + 1] * down, qv[j + 5] * down);
#else
        qb[c][0] = pack_half2(qv[4 * c] * down, qv[4 * c + 1] * down);
        qb[c][1] = pack_half2(qv[4 * c + 2] * down, qv[4 * c + 3] * down);
#endif
    }

    const u32* kcp = kc + (long long)b * skc_b + (long long)kvh * skc_h;
    const u16* ksp = ks + (long long)b * sks_b + (long long)kvh * sks_h;
    const u16* kbp = kb + (long long)b * sks_b + (long long)kvh * sks_h;
    const u32* vcp = vc + (long long)b * svc_b + (long long)kvh * svc_h;
    const u16* vsp = vs + (long long)b * svs_b + (long long)kvh * svs_h;
    const u16* vbp = vb + (long long)b * svs_b + (long long)kvh * svs_h;

    float m0 = NEG_INF_FINITE, m1 = NEG_INF_FINITE, l0 = 0.0f, l1 = 0.0f;
    float o[D / 16][4];
    #pragma unroll
    for (int c = 0; c < D / 16; ++c) o[c][0] = o[c][1] = o[c][2] = o[c][3] = 0.0f;
    // Warp w takes steps w, w + WARPS, ... of STEP_KEYS keys: its i-th in stage i % STAGES.
    const int all_steps = end > start ? (end - start + STEP_KEYS - 1) / STEP_KEYS : 0, last = end - 1;
    const int steps = all_steps > warp ? (all_steps - warp + WARPS - 1) / WARPS : 0;
    const u32 ring = shared_address(smem) + warp * STAGES * STAGE_BYTES;
    // src walks the warp's copies: at its first step, one step further after each issue.
    Sources src = lane_sources(kcp, ksp, kbp, vcp, vsp, vbp, lane);
    advance(src, start + warp * STEP_KEYS);
    #pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
        if (i < steps) {
            issue_step(ring + i * STAGE_BYTES, src, start + (warp + i * WARPS) * STEP_KEYS, last, lane);
            advance(src, WARPS * STEP_KEYS);
        }
        cp_async_commit();
    }
    for (int i = 0; i < steps; ++i) {
        cp_async_wait_ring();
        __syncwarp();  // the other lanes' copies of step i are visible; stage (i - 1) % STAGES is read
        const int ahead = i + STAGES - 1;
        if (ahead < steps) {
            issue_step(ring + (ahead % STAGES) * STAGE_BYTES, src, start + (warp + ahead * WARPS) * STEP_KEYS, last,
                       lane);
            advance(src, WARPS * STEP_KEYS);
        }
        cp_async_commit();
        attend_step(ring + (i % STAGES) * STAGE_BYTES, qb, q_mul, start + (warp + i * WARPS) * STEP_KEYS, end, g, t,
                    m0, m1, l0, l1, o);
    }
    cp_async_wait_all();
#if !defined(KV_EMULATED_SIMT) && __CUDA_ARCH__ >= 900 && HEAD_DIM == 64
    // The reduce (a programmatic dependent launch) may launch once every block is here; it waits for our
    // writes. H200, A/B in one process: D 64 b1 / b8 x 32k int4 0.0163 / 0.0353 -> 0.0156 / 0.0346 ms; at
    // D 128 no gain (b8 x 32k int4 0.0999 -> 0.1003) and a loss at b8 x 4k (0.0280 -> 0.0293), and a
    // trigger at the kernel's start lost there too (int8 b8 x 32k 0.1592 -> 0.1633).
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    __syncthreads();  // the rings become the merge buffers

    // Merge the warps: running maxima and sums per query, outputs per (query, d).
    l0 = warp_sum_over_g(l0);
    l1 = warp_sum_over_g(l1);
    if (g == 0) {
        sm_m[warp][2 * t] = m0;
        sm_m[warp][2 * t + 1] = m1;
        sm_l[warp][2 * t] = l0;
        sm_l[warp][2 * t + 1] = l1;
    }
    #pragma unroll
    for (int c = 0; c < D / 16; ++c) {  // rows D g / 8 + 2c and + 1 of the V fragments (the maps above)
        sm_o[warp][2 * t][D / 8 * g + 2 * c] = o[c][0];
        sm_o[warp][2 * t + 1][D / 8 * g + 2 * c] = o[c][1];
        sm_o[warp][2 * t][D / 8 * g + 2 * c + 1] = o[c][2];
        sm_o[warp][2 * t + 1][D / 8 * g + 2 * c + 1] = o[c][3];
    }
    __syncthreads();
    const long long slot = ((long long)bh * S + pid_s) * GP;
#if D > WARPS * 32
    // D 256: every head at d = thread, then at thread + 128
    for (int d = threadIdx.x; d < D; d += WARPS * 32) {
        for (int h = 0; h < G; ++h) merge_warps(sm_m, sm_l, sm_o, h, d, slot, pm, pl, pc);
    }
#else
    // thread (h0, d): heads h0, h0 + WARPS * 32 / D, ... at d (D 128: every head at d = thread)
    const int d = D == 128 ? (int)threadIdx.x : (int)threadIdx.x % D;
    for (int h = D == 128 ? 0 : (int)threadIdx.x / D; h < G; h += WARPS * 32 / D) {
        merge_warps(sm_m, sm_l, sm_o, h, d, slot, pm, pl, pc);
    }
#endif
    if (threadIdx.x == 0) flag[(long long)bh * S + pid_s] = 0;
}
