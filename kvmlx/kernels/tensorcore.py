"""Decode attention on matrix units: the fast splits of 2/4/8-bit caches as m16n8k16 MMAs (CUDA dialect).

The FMA body (bodies.SPLIT) spends ~380 instructions per thread per row at head dim 128, G 4: every
query head's dot product runs on the CUDA cores. This body (TC_SPLIT) gives the products to the
tensor cores and keeps only the unpacking (about 1.5 instructions per code) and the softmax on the
CUDA cores. It takes the same inputs and writes the same pm / pl / pc as a fast (GEN 0) split, so the
general splits and the reduce are unchanged. CUDA only: it uses mma.sync (kvmlx.kernels.dialect's
CUDA header, kv_mma); Metal keeps the FMA body (its simdgroup_matrix form is not written).

Layout (one warp; lane = 4 gq + tq; a 16-row tile is two 8-row n-tiles):
- Scores S [16 heads x 8 rows] = Q [16 heads x 16 dims] K^T [16 dims x 8 rows] per k-step. Heads
  8-15 are zero (G <= 8). Thread tq owns KDB / 4 dims of every K block of KDB dims (a token-axis
  group, or the whole row for channel-axis keys) and gives the MMA 4 of them per k-step, taken
  straight from a packed word: (w >> 2 j KB) & mask holds codes 2j and 2j + 16 / KB in its two
  16-bit lanes, which kv_mma::code turns into exact operand values (no code moves between lanes).
  The query fragment holds q at the same dims in the same order. Token axis: one accumulator per
  group, score = s C + b sum(q). Channel axis: q s is the query fragment, rebuilt per token group,
  and the score is C + q . b.
- Values acc^T [16 dims x 8 heads] += V^T [16 dims x 16 rows] (P s)^T [16 rows x 8 heads]. The
  score fragment of rows (2tq, 2tq + 1) and (8 + 2tq, 9 + 2tq), head gq, is exactly the (P s)^T
  fragment this thread supplies, scaled by V's group scale of those rows (one k-step per tile and
  group). V^T's fragment pairs two rows at one dim: __byte_perm interleaves two bytes of each row,
  then masks take one code of each row per 16-bit lane. Thread gq owns VGR / 8 dims of each group;
  m-tile gamma VGR / 16 + bp VMPB + i, slot s, is dim gamma VGR + (s % 8) VGR / 8 + bp 16 / VB + 2i
  + s / 8. The biases come back as sum over rows of p b, one per group and head.
- q and p s enter the MMAs as two operands each, high and low part (kv_mma::split): one bf16
  rounding of p s would cost 2^-9 of s c, which an outlier in a group makes large next to the value
  s c + b, so the H200 self-checks failed with one operand; with two they pass.
- Each warp walks its own contiguous quarter of the split in tiles of 16 rows (UT tiles per step,
  loads of all UT tiles issued first; with PF, issued one step ahead), with its own online softmax (rescaling skipped while no
  lane's maximum grows); the warps are merged through threadgroup memory as in bodies.SPLIT.

inputs / outputs: as bodies.SPLIT with GEN 0 (qf, kf, vf unused).
template T (the float tail's dtype), MT (MMA operand type: `mma_dtype`), D, G, NW (warps), UT
(tiles per step), PF (prefetch), KB, KCH, KGR, VB, VGR (bits, channel flag and group as
kvspec.spec.Quant).
"""

from __future__ import annotations

from kvspec.spec import Quant

TC_SPLIT = """
{{INDEX}}
using MM = kv_mma<MT>;
constexpr uint32_t KMASK = ((1u << KB) - 1u) * 0x00010001u, VMASK = ((1u << VB) - 1u) * 0x00010001u;
constexpr int KHALF = 16 / KB;       // a K word's codes e and e + KHALF share one fragment register
constexpr int KDB = KCH ? D : KGR;   // K dims split among the 4 threads of a quad, per block
constexpr int NKB = D / KDB;         // K blocks (one score accumulator each)
constexpr int KWPT = KDB * KB / 128; // packed words per thread per K block
constexpr int KSPB = KDB / 16;       // k-steps per K block (8 / KB per word)
constexpr int NKS = NKB * KSPB;      // k-steps per row (D / 16)
constexpr int KNG = KCH ? 1 : NKB;   // token-axis K scales per row
constexpr int NVG = D / VGR;         // V groups
constexpr int VBY = VGR * VB / 64;   // packed V bytes per thread per group (VGR / 8 dims)
constexpr int VWPT = VBY >= 4 ? VBY / 4 : 1;  // words loaded per thread per group (2 bytes: half of one)
constexpr int VMPB = 8 / VB;         // m-tiles per byte pair
constexpr int NMT = D / 16;          // m-tiles of the value product
constexpr int NTH = NW * 32;
const int nk = params[0], nv = params[1], chunk = params[5], S = params[8], hkv = params[10];
const float qmul = KV_AS_FLOAT((uint32_t)params[11]);
const int lane = kv_tid % 32, warp = kv_tid / 32;
const int gq = lane / 4, tq = lane % 4;
const int b = kv_by / hkv, h = kv_by % hkv;
const int start = kv_bx * chunk;
const int stop = KV_MIN(start + chunk, KV_MIN(nk, nv));
const int wchunk = chunk / NW;  // a multiple of 16: the launch makes chunk a multiple of 16 NW UT
const int wstart = start + warp * wchunk;
const int wstop = KV_MIN(wstart + wchunk, stop);
const int64_t kcb = (int64_t)b * kc_strides[0] + (int64_t)h * kc_strides[1];
const int64_t ksb = (int64_t)b * ks_strides[0] + (int64_t)h * ks_strides[1];
const int64_t vcb = (int64_t)b * vc_strides[0] + (int64_t)h * vc_strides[1];
const int64_t vsb = (int64_t)b * vs_strides[0] + (int64_t)h * vs_strides[1];
// V bytes of this thread: group gamma, byte pair bp at word gamma VGR VB / 32 + vw0 + bp / 2 (VBY >= 4)
// or inside the shared word gamma VGR VB / 32 + vw0 at byte voff (VBY 2)
const int vw0 = gq * VBY / 4, voff = (gq * VBY) % 4;

// q of head gq at this thread's K dims: block beta, word omega, code e -> dim beta KDB + tq KDB/4 + (32 / KB) omega + e
float qv[NKB][KWPT][32 / KB];
for (int be = 0; be < NKB; ++be)
  for (int om = 0; om < KWPT; ++om)
    for (int e = 0; e < 32 / KB; ++e)
      qv[be][om][e] = gq < G ? static_cast<float>(qc[b * qc_strides[0] + (h * G + gq) * qc_strides[1] + be * KDB
                                                       + tq * (KDB / 4) + (32 / KB) * om + e]) * qmul : 0.0f;
// Query fragments (registers 0 and 2 of the MMA's A; 1 and 3 are heads 8-15: zero). k-step j of a
// word takes its codes (2j, 2j + KHALF) and (2j + 1, 2j + 1 + KHALF). Token axis: built once, with
// the per-block sums of the rounded values; channel axis: q s, per token group.
uint32_t qa[NKS][2][2];  // [k-step][A register 0 / 2][high part, low part]
float qs[NKB];
float kbias = 0.0f;
int kgroup = -1;
if (!KCH) {
  for (int be = 0; be < NKB; ++be) {
    float sum = 0.0f;
    for (int om = 0; om < KWPT; ++om)
      for (int j = 0; j < KHALF / 2; ++j) {
        const int st = be * KSPB + om * (KHALF / 2) + j;
        sum += MM::split(qa[st][0], qv[be][om][2 * j], qv[be][om][2 * j + KHALF]);
        sum += MM::split(qa[st][1], qv[be][om][2 * j + 1], qv[be][om][2 * j + 1 + KHALF]);
      }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    qs[be] = sum;
  }
}

float m_run = -1.0e30f, l_run = 0.0f;
float acc[NMT][4];
float vbias[NVG];
for (int mt = 0; mt < NMT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;
for (int ga = 0; ga < NVG; ++ga) vbias[ga] = 0.0f;

// One tile's fetch: K codes of rows 8 nu + gq, then scales and V codes of rows {2tq, 2tq+1, 8+2tq,
// 9+2tq}; rows past the warp's range read its last row (masked later), so the loads carry no branch.
struct Tile {
  uint32_t kw[2][NKB * KWPT];
  float ksc[4][KNG], kbi[4][KNG];
  uint32_t vw[4][NVG * VWPT];
  float vsc[4][NVG], vbi[4][NVG];
};
auto fetch = [&](Tile& tl, int t0) {
  for (int nu = 0; nu < 2; ++nu) {
    const int row = KV_MIN(t0 + 8 * nu + gq, wstop - 1);
    const int64_t rb = kcb + (int64_t)row * kc_strides[2];
    for (int be = 0; be < NKB; ++be) {
      const int w0 = be * (KDB * KB / 32) + tq * KWPT;
      if (KWPT % 4 == 0) {
        for (int i = 0; i < KWPT; i += 4) {
          const uint4 x = KV_LOAD4(kc + rb + w0 + i);
          tl.kw[nu][be * KWPT + i] = x.x; tl.kw[nu][be * KWPT + i + 1] = x.y;
          tl.kw[nu][be * KWPT + i + 2] = x.z; tl.kw[nu][be * KWPT + i + 3] = x.w;
        }
      } else if (KWPT == 2) {
        const uint2 x = KV_LOAD2(kc + rb + w0);
        tl.kw[nu][be * KWPT] = x.x; tl.kw[nu][be * KWPT + 1] = x.y;
      } else {
        tl.kw[nu][be * KWPT] = kc[rb + w0];
      }
    }
  }
  for (int i = 0; i < 4; ++i) {
    const int row = KV_MIN(t0 + 8 * (i / 2) + 2 * tq + i % 2, wstop - 1);
    if (!KCH) {
      const int64_t so = ksb + (int64_t)row * ks_strides[2];
      for (int be = 0; be < KNG; ++be) { tl.ksc[i][be] = static_cast<float>(ks[so + be]); tl.kbi[i][be] = static_cast<float>(kb[so + be]); }
    }
    const int64_t rb = vcb + (int64_t)row * vc_strides[2];
    for (int ga = 0; ga < NVG; ++ga) {
      const int w0 = ga * (VGR * VB / 32) + vw0;
      if (VWPT == 4) {
        const uint4 x = KV_LOAD4(vc + rb + w0);
        tl.vw[i][ga * VWPT] = x.x; tl.vw[i][ga * VWPT + 1 % VWPT] = x.y;
        tl.vw[i][ga * VWPT + 2 % VWPT] = x.z; tl.vw[i][ga * VWPT + 3 % VWPT] = x.w;
      } else if (VWPT == 2) {
        const uint2 x = KV_LOAD2(vc + rb + w0);
        tl.vw[i][ga * VWPT] = x.x; tl.vw[i][ga * VWPT + 1 % VWPT] = x.y;
      } else {
        tl.vw[i][ga * VWPT] = vc[rb + w0];
      }
    }
    const int64_t so = vsb + (int64_t)row * vs_strides[2];
    for (int ga = 0; ga < NVG; ++ga) { tl.vsc[i][ga] = static_cast<float>(vs[so + ga]); tl.vbi[i][ga] = static_cast<float>(vb[so + ga]); }
  }
};

// Every lane of a warp runs the same iterations (the bound is warp-uniform): shuffles and MMAs need all 32.
// PF: the next step's tiles are fetched before this step's are used, so their loads overlap its math.
Tile ahead[UT];
if (PF) {
  #pragma unroll
  for (int u = 0; u < UT; ++u) fetch(ahead[u], wstart + 16 * u);
}
for (int r0 = wstart; r0 < wstop; r0 += 16 * UT) {
  Tile tiles[UT];
  #pragma unroll
  for (int u = 0; u < UT; ++u) {
    if (PF) {
      tiles[u] = ahead[u];
      fetch(ahead[u], r0 + 16 * (UT + u));
    } else {
      fetch(tiles[u], r0 + 16 * u);
    }
  }
  #pragma unroll
  for (int u = 0; u < UT; ++u) {
    const int t0 = r0 + 16 * u;
    if (KCH && t0 / KGR != kgroup) {  // a new token group of channel-axis keys (warp-uniform)
      kgroup = t0 / KGR;
      const int64_t so = ksb + (int64_t)kgroup * ks_strides[2] + tq * (D / 4);
      float qb = 0.0f;
      for (int om = 0; om < KWPT; ++om) {
        float qsv[32 / KB];
        for (int e = 0; e < 32 / KB; e += 2) {
          const uint32_t sw = KV_LOAD1(ks + so + (32 / KB) * om + e), bw = KV_LOAD1(kb + so + (32 / KB) * om + e);
          qsv[e] = qv[0][om][e] * KV_HALF_LO(sw);
          qsv[e + 1] = qv[0][om][e + 1] * KV_HALF_HI(sw);
          qb += qv[0][om][e] * KV_HALF_LO(bw) + qv[0][om][e + 1] * KV_HALF_HI(bw);
        }
        for (int j = 0; j < KHALF / 2; ++j) {
          const int st = om * (KHALF / 2) + j;
          MM::split(qa[st][0], qsv[2 * j], qsv[2 * j + KHALF]);
          MM::split(qa[st][1], qsv[2 * j + 1], qsv[2 * j + 1 + KHALF]);
        }
      }
      qb += __shfl_xor_sync(0xffffffffu, qb, 1);
      qb += __shfl_xor_sync(0xffffffffu, qb, 2);
      kbias = qb;
    }
    // ---- scores of the tile's 16 rows for head gq: rows 8 nu + 2 tq + c sit in cs[nu][*][c]
    float cs[2][NKB][4];
    for (int nu = 0; nu < 2; ++nu)
      for (int be = 0; be < NKB; ++be) {
        cs[nu][be][0] = cs[nu][be][1] = cs[nu][be][2] = cs[nu][be][3] = 0.0f;
        for (int om = 0; om < KWPT; ++om) {
          const uint32_t w = tiles[u].kw[nu][be * KWPT + om];
          for (int j = 0; j < KHALF / 2; ++j) {
            const int st = be * KSPB + om * (KHALF / 2) + j;
            const uint32_t k0 = MM::code((w >> (2 * j * KB)) & KMASK), k1 = MM::code((w >> ((2 * j + 1) * KB)) & KMASK);
            MM::mma(cs[nu][be], qa[st][0][0], 0u, qa[st][1][0], 0u, k0, k1);
            MM::mma(cs[nu][be], qa[st][0][1], 0u, qa[st][1][1], 0u, k0, k1);
          }
        }
      }
    float p[4];
    float mx = -1.0e30f;
    for (int i = 0; i < 4; ++i) {
      const int nu = i / 2, c = i % 2;
      float s;
      if (KCH) {
        s = cs[nu][0][c] + kbias;
      } else {
        s = 0.0f;
        for (int be = 0; be < NKB; ++be)
          s += tiles[u].ksc[i][be] * cs[nu][be][c] + tiles[u].kbi[i][be] * qs[be];
      }
      p[i] = t0 + 8 * nu + 2 * tq + c < wstop ? s : -1.0e30f;
      mx = KV_MAX(mx, p[i]);
    }
    {
      const float o1 = __shfl_xor_sync(0xffffffffu, mx, 1);
      mx = KV_MAX(mx, o1);
      const float o2 = __shfl_xor_sync(0xffffffffu, mx, 2);
      mx = KV_MAX(mx, o2);
    }
    const float m_new = KV_MAX(m_run, mx);
    const float alpha = KV_EXP2(m_run - m_new);
    if (__any_sync(0xffffffffu, m_new > m_run)) {
      // acc's columns are heads 2tq and 2tq + 1, whose maxima live in lanes 8 tq and 8 tq + 4
      const float a0 = __shfl_sync(0xffffffffu, alpha, 8 * tq), a1 = __shfl_sync(0xffffffffu, alpha, 8 * tq + 4);
      for (int mt = 0; mt < NMT; ++mt) { acc[mt][0] *= a0; acc[mt][1] *= a1; acc[mt][2] *= a0; acc[mt][3] *= a1; }
      l_run *= alpha;
      for (int ga = 0; ga < NVG; ++ga) vbias[ga] *= alpha;
    }
    m_run = m_new;
    for (int i = 0; i < 4; ++i) { p[i] = KV_EXP2(p[i] - m_new); l_run += p[i]; }
    // ---- values: per group, (P s)^T as this thread's B fragment, V^T from byte-interleaved row pairs
    for (int ga = 0; ga < NVG; ++ga) {
      uint32_t b0[2], b1[2];
      MM::split(b0, p[0] * tiles[u].vsc[0][ga], p[1] * tiles[u].vsc[1][ga]);
      MM::split(b1, p[2] * tiles[u].vsc[2][ga], p[3] * tiles[u].vsc[3][ga]);
      vbias[ga] += p[0] * tiles[u].vbi[0][ga] + p[1] * tiles[u].vbi[1][ga] + p[2] * tiles[u].vbi[2][ga] + p[3] * tiles[u].vbi[3][ga];
      for (int bp = 0; bp < VBY / 2; ++bp) {
        const int wi = ga * VWPT + (VBY >= 4 ? bp / 2 : 0);
        const uint32_t sel = 0x5410u + 0x1111u * (uint32_t)(VBY >= 4 ? 2 * (bp % 2) : voff);
        const uint32_t x = __byte_perm(tiles[u].vw[0][wi], tiles[u].vw[1][wi], sel), y = __byte_perm(tiles[u].vw[2][wi], tiles[u].vw[3][wi], sel);
        for (int i = 0; i < VMPB; ++i) {
          const uint32_t a0 = MM::code((x >> (2 * i * VB)) & VMASK), a1 = MM::code((x >> ((2 * i + 1) * VB)) & VMASK);
          const uint32_t a2 = MM::code((y >> (2 * i * VB)) & VMASK), a3 = MM::code((y >> ((2 * i + 1) * VB)) & VMASK);
          MM::mma(acc[ga * (VGR / 16) + bp * VMPB + i], a0, a1, a2, a3, b0[0], b1[0]);
          MM::mma(acc[ga * (VGR / 16) + bp * VMPB + i], a0, a1, a2, a3, b0[1], b1[1]);
        }
      }
    }
  }
}

// ---- merge the quad's partial sums, then the warps through threadgroup memory
l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
for (int ga = 0; ga < NVG; ++ga) {
  vbias[ga] += __shfl_xor_sync(0xffffffffu, vbias[ga], 1);
  vbias[ga] += __shfl_xor_sync(0xffffffffu, vbias[ga], 2);
}
KV_SHARED float sm_m[NW * 8];
KV_SHARED float sm_l[NW * 8];
KV_SHARED float sm_c[NW * 8 * NVG];
KV_SHARED float sm_a[NW * G * D];
if (tq == 0 && gq < G) {
  sm_m[warp * 8 + gq] = m_run;
  sm_l[warp * 8 + gq] = l_run;
  for (int ga = 0; ga < NVG; ++ga) sm_c[(warp * 8 + gq) * NVG + ga] = vbias[ga];
}
// m-tile ga VGR/16 + bp VMPB + i, slot s: dim ga VGR + (s % 8) VGR/8 + bp 16/VB + 2i + s/8
for (int mt = 0; mt < NMT; ++mt) {
  const int ga = mt / (VGR / 16), bp = (mt % (VGR / 16)) / VMPB, i = mt % VMPB;
  const int dim = ga * VGR + (VGR / 8) * gq + bp * (16 / VB) + 2 * i;
  for (int c = 0; c < 4; ++c) {
    const int g = 2 * tq + c % 2;
    if (g < G) sm_a[(warp * G + g) * D + dim + c / 2] = acc[mt][c];
  }
}
KV_BARRIER();
const int64_t slot_base = ((int64_t)kv_by * S + kv_bx) * G;
for (int e = kv_tid; e < G * D; e += NTH) {
  const int g = e / D, d = e % D;
  float mx = -1.0e30f;
  for (int w = 0; w < NW; ++w) mx = KV_MAX(mx, sm_m[w * 8 + g]);
  float ls = 0.0f, as = 0.0f;
  for (int w = 0; w < NW; ++w) {
    const float f = KV_EXP2(sm_m[w * 8 + g] - mx);
    ls += f * sm_l[w * 8 + g];
    as += f * (sm_a[(w * G + g) * D + d] + sm_c[(w * 8 + g) * NVG + d / VGR]);
  }
  pc[(slot_base + g) * D + d] = as;
  if (d == 0) { pm[slot_base + g] = mx; pl[slot_base + g] = ls; }
}
"""

# Launch shape (H200, int4 at batch 8 x 32k, Mistral heads, split alone; same run, 2026-11-29 evening,
# benchmarks/results/mlx_kernels_nvidia_h200-tc-prefetch.json): 4 warps x 1 tile with the next step's
# tile prefetched 0.233 ms, 4 x 2 without 0.264, 4 x 2 prefetched 0.327 (248 registers at 1 tile with
# prefetch: 2 tiles spill). SmolLM2 heads 0.089 vs 0.107; Qwen heads 0.085 vs 0.065 (its spread between
# runs is ~20%). The kernel is latency-bound, so overlapping one tile's loads with the math pays.
WARPS = 4  # warps per threadgroup, each over its own quarter of the split
TILES = 1  # 16-row tiles whose loads one step issues together
PREFETCH = True  # fetch the next step's tiles during this step's math


def tiles_for(d: int) -> int:
    """Tiles per step: TILES, but 1 for rows of 256 (two tiles' fetch registers spill there)."""
    return TILES if d <= 128 else 1


def prefetch_for(d: int) -> bool:
    """Prefetch: PREFETCH for rows up to 128 (rows of 256 spill even without it)."""
    return PREFETCH and d <= 128


def mma_dtype(kspec: Quant, vspec: Quant, dtype: str) -> str:
    """The MMA operand type: the cache's float dtype, or fp16 where 8-bit codes need its 10-bit
    mantissa (1024 + c is exact for c < 1024; bf16's 128 + c only for c < 128)."""
    return "fp16" if 8 in (kspec.bits, vspec.bits) else dtype


def refusal(kspec, vspec, d: int, g: int, dtype: str) -> str | None:
    """Why TC_SPLIT does not take this configuration (None: it does)."""
    if not (isinstance(kspec, Quant) and isinstance(vspec, Quant)):
        return "low-rank tensors run on the FMA body"
    if kspec.bits not in (2, 4, 8) or vspec.bits not in (2, 4, 8):
        return "3-bit codes (they straddle words) run on the FMA body"
    if d not in (64, 128, 256) or g > 8:
        return f"head dim {d} with {g} query heads per KV head"
    if kspec.axis == "token" and (kspec.group > d or d % kspec.group or kspec.group * kspec.bits < 128):
        return f"K groups of {kspec.group} at {kspec.bits} bits (a thread's quarter of a group must be whole words)"
    if kspec.axis == "channel" and kspec.group % 16:
        return f"K token groups of {kspec.group} (tiles of 16 rows must not straddle one)"
    if vspec.axis != "token":
        return "channel-axis values run on the FMA body"
    if vspec.group > d or d % vspec.group or not 128 <= vspec.group * vspec.bits <= 1024:
        return f"V groups of {vspec.group} at {vspec.bits} bits (a thread takes an eighth of a group: 2 to 16 bytes)"
    if dtype not in ("bf16", "fp16"):
        return f"float dtype {dtype}"
    return None
