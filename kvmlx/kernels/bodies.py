"""Kernel bodies, written once for both dialects (names from kvmlx/kernels/dialect.py's preludes).

QUANTIZE: kvspec quantization and packing, one thread per output uint32 word.
  inputs  params int32 [4] = (H, M, total words, 0); x [B, H, M, D] float (any strides, unit last)
  outputs codes uint32 [B, H, M, W]; scales, biases fp16 [B, H, M, D/GROUP] (CHAN 0) or
          [B, H, M/GROUP, D] (CHAN 1)
  template T (x dtype), D, BITS, GROUP, CHAN, W
  Each thread recomputes the fp32 min/max of the groups its codes belong to (cheap next to a
  launch), then follows kvspec.reference.quant op by op: bias = fp16(min), scale = fp16(max(max -
  bias, 0) / L) by correctly rounded division, code = clamp(rint((x - bias) / scale), 0, L).
  A code straddling two words (3 bits) is written in part by each word's thread.

SPLIT: one split of split-K decode attention (one query per sequence) for G query heads of one KV
head, over key rows [start, stop) of the split.
  GEN 0 ("fast" splits): rows below min(nk, nv), all compressed.
  GEN 1 ("general" splits): rows from gen_lo on, each K (V) row compressed iff row < nk (nv), else
  read from the float tail kf (vf), whose row 0 is position kfs (vfs).
  inputs  params int32 [12] = (nk, nv, kfs, vfs, T, chunk_fast, chunk_gen, gen_lo, S_fast, S_gen,
          Hkv, bits of the fp32 qmul = scale * log2 e); qc [B, Hq, KW] fp32 or the query dtype
          (queries in K's stored space: rotated, projected or as given; the kernel multiplies by
          qmul; any strides, unit last); qf [B, Hq, D] (the queries as given); kc uint32 codes [B, Hkv, n, *]
          or float coefficients; ks, kb fp16 scales/biases; kf float tail [B, Hkv, Tf, D]; the same
          for V.
  outputs (per split s, head g) pm, pl fp32 [B * Hkv * S * G]: running max (log2 domain) and sum;
          pc fp32 [B * Hkv * S * G * VW]: unnormalized p . V (V's stored space); GEN 1 adds
          pf fp32 [B * Hkv * S * G * D]: p . V over V's float rows.
  template T, D, G, DPT, TPR, NT, U, GEN, KB, KW, KGR, KCH, VB, VW, VGR, VCH (bits 16 = float
  coefficients of width KW / VW; group and channel flags as kvspec.spec.Quant)
  Layout: a row is read by TPR threads (D / DPT, or the stored width / DPT in fast splits: rank-r
  rows need r / DPT), each owning DPT consecutive dims, so a SIMD group reads 32 / TPR consecutive
  rows' packed words at once. Each loop step first issues the loads of U rows per thread (packed
  words and scales stay in registers until used: the loop is otherwise latency-bound), then scores
  the U rows, takes one online-softmax step for them and accumulates their values. Scores fold the
  group scale and bias into the dot product: q . (s c + b) = s (q . c) + b sum(q); V's bias is
  accumulated once per row (sum of p b) instead of per element. Row slots are combined through SIMD
  shuffles, then threadgroup memory.

REDUCE: combine the splits of one (batch, query head) and normalize.
  inputs  params int32 [3] = (S_fast, S_gen, G); pm, pl, pc (fast); gm, gl, gc, gf (general)
  outputs out OT [B, Hq, 1, D] (VPLAIN: p . V over all rows, in the query dtype; else p . V over
          V's float rows, fp32) and outc fp32 [B, Hq, VW] (VPLAIN 0: the compressed rows' p . V,
          still in V's stored space)
  template D, VW, VPLAIN, OT
"""

from __future__ import annotations

QUANTIZE = """
{{INDEX}}
const int H = params[0], M = params[1], total = params[2];
const int idx = kv_bx * 256 + kv_tid;
if (idx >= total) return;
constexpr int L = (1 << BITS) - 1;
constexpr int NG = CHAN ? 0 : D / GROUP;
const int w = idx % W;
const int t = (idx / W) % M;
const int bh = idx / (W * M);
const int64_t xb = (int64_t)(bh / H) * x_strides[0] + (int64_t)(bh % H) * x_strides[1];
const int64_t xr = xb + (int64_t)t * x_strides[2];
int i0 = (32 * w) / BITS;
int i1 = KV_MIN((32 * w + 31) / BITS, D - 1);
uint32_t word = 0u;
int last = -1;
float s32 = 0.0f, b32 = 0.0f;
for (int i = i0; i <= i1; ++i) {
  const int grp = CHAN ? i : i / GROUP;
  if (grp != last) {
    float lo = 3.0e38f, hi = -3.0e38f;
    for (int e = 0; e < GROUP; ++e) {
      const int64_t off = CHAN ? xb + (int64_t)((t / GROUP) * GROUP + e) * x_strides[2] + i
                               : xr + grp * GROUP + e;
      const float v = static_cast<float>(x[off]);
      lo = KV_MIN(lo, v);
      hi = KV_MAX(hi, v);
    }
    const kv_half bias = KV_TO_HALF(lo);
    const float span = KV_MAX(hi - static_cast<float>(bias), 0.0f);
    const kv_half scale = KV_TO_HALF(KV_DIV_RN(span, (float)L));
    s32 = static_cast<float>(scale);
    b32 = static_cast<float>(bias);
    last = grp;
    const bool first_of_group = CHAN ? (t % GROUP == 0) : (i % GROUP == 0);
    if (first_of_group && (i * BITS) / 32 == w) {
      const int64_t so = CHAN ? ((int64_t)bh * (M / GROUP) + t / GROUP) * D + i : ((int64_t)bh * M + t) * NG + grp;
      scales[so] = scale;
      biases[so] = bias;
    }
  }
  const float v = static_cast<float>(x[xr + i]);
  float q = KV_RINT(KV_DIV_RN(v - b32, s32 > 0.0f ? s32 : 1.0f));
  q = s32 > 0.0f ? KV_MIN(KV_MAX(q, 0.0f), (float)L) : 0.0f;
  const uint32_t c = (uint32_t)q;
  const int off = i * BITS - 32 * w;
  word |= off >= 0 ? (c << off) : (c >> (-off));
}
codes[(int64_t)idx] = word;
"""

# Fetch of one thread's slice of row `rowc` of a compressed tensor (@ = K or V, $ = k or v) into
# the registers of unroll slot u: packed words ($_w), token-axis scale and bias ($_sv, $_bv),
# channel-axis scale and bias pairs as raw fp16 bits ($_sw, $_bw), or float coefficients ($_f).
# Nothing here uses a loaded value, so the loads of all U rows are in flight together.
_FETCH = """
{
  const int64_t rb = (int64_t)b * $c_strides[0] + (int64_t)h * $c_strides[1] + (int64_t)rowc * $c_strides[2];
  if (@B == 16) {
    for (int k = 0; k < DPT; ++k)
      $_f[u][k % @FL] = (j * DPT < @W) ? static_cast<float>($c[rb + j * DPT + k]) : 0.0f;
  } else {
    constexpr int WORDS = (@W * @B + 31) / 32;
    const int w0 = (j * DPT * @B) / 32;
    if (j * DPT >= @W) {
      for (int i = 0; i < @NWL; ++i) $_w[u][i] = 0u;
    } else if (@NWL == 4 && (DPT * @B) % 128 == 0) {
      const uint4 x4 = KV_LOAD4($c + rb + w0);
      $_w[u][0] = x4.x; $_w[u][1 % @NWL] = x4.y; $_w[u][2 % @NWL] = x4.z; $_w[u][3 % @NWL] = x4.w;
    } else if (@NWL == 2 && (DPT * @B) % 64 == 0) {
      const uint2 x2 = KV_LOAD2($c + rb + w0);
      $_w[u][0] = x2.x; $_w[u][1 % @NWL] = x2.y;
    } else {
      for (int i = 0; i < @NWL; ++i) $_w[u][i] = (w0 + i < WORDS) ? kv_word($c[rb + w0 + i]) : 0u;
    }
    const int64_t sb = (int64_t)b * $s_strides[0] + (int64_t)h * $s_strides[1];
    if (@CH) {
      const int64_t so = sb + (int64_t)(rowc / @GR) * $s_strides[2] + KV_MIN(j * DPT, @W - DPT);
      for (int i = 0; i < @SWN; ++i) { $_sw[u][i] = KV_LOAD1($s + so + 2 * i); $_bw[u][i] = KV_LOAD1($b + so + 2 * i); }
    } else {
      const int64_t so = sb + (int64_t)rowc * $s_strides[2] + KV_MIN(j * DPT, @W - 1) / @GR;
      $_sv[u] = static_cast<float>($s[so]);
      $_bv[u] = static_cast<float>($b[so]);
    }
  }
}
"""

# Unpack of unroll slot u into xv[DPT]: dequantized values, or with @FOLD the raw codes, leaving the
# token-axis scale and bias in x_s / x_b for the caller to fold into its dot product.
_UNPACK = """
{
  if (@B == 16) {
    for (int k = 0; k < DPT; ++k) xv[k] = $_f[u][k % @FL];
  } else {
    constexpr int BITSPT = DPT * @B;
    constexpr uint32_t MASK = (1u << @B) - 1u;
    const int lead = (j * BITSPT) % 32;  // 0 unless BITSPT is not a multiple of 32
    for (int k = 0; k < DPT; ++k) {
      uint32_t c;
      if (BITSPT % 32 == 0) {
        c = $_w[u][((k * @B) / 32) % @NWL] >> ((k * @B) % 32);
      } else if (32 % BITSPT == 0) {
        c = $_w[u][0] >> (lead + k * @B);
      } else {  // 3 bits: the slice spans two words
        c = (uint32_t)(((((uint64_t)$_w[u][1 % @NWL]) << 32) | $_w[u][0]) >> (lead + k * @B));
      }
      xv[k] = KV_AS_FLOAT((c & MASK) | 0x4B000000u) - 8388608.0f;
    }
    if (@CH) {
      for (int k = 0; k < DPT; ++k) {
        const uint32_t sw = $_sw[u][(k / 2) % @SWN], bw = $_bw[u][(k / 2) % @SWN];
        xv[k] = xv[k] * (k % 2 ? KV_HALF_HI(sw) : KV_HALF_LO(sw)) + (k % 2 ? KV_HALF_HI(bw) : KV_HALF_LO(bw));
      }
    } else {
      x_s = $_sv[u];
      x_b = $_bv[u];
      if (!@FOLD) for (int k = 0; k < DPT; ++k) xv[k] = xv[k] * x_s + x_b;
    }
  }
}
"""

# Per-tensor registers of the U fetched rows; those a configuration does not use are single
# dummies the compiler drops. NWL: words per thread slice (2 for 3 bits: a slice may span two).
_DECLARE = """
constexpr int @NWL = @B == 16 ? 1 : ((DPT * @B) % 32 == 0 ? (DPT * @B) / 32 : (32 % (DPT * @B) == 0 ? 1 : 2));
constexpr int @FL = @B == 16 ? DPT : 1;
constexpr int @SWN = @CH ? DPT / 2 : 1;
constexpr bool @FOLD = @B != 16 && !@CH;
uint32_t $_w[U][@NWL];
uint32_t $_sw[U][@SWN], $_bw[U][@SWN];
float $_sv[U], $_bv[U];
float $_f[U][@FL];
"""


def _for(tensor: str, text: str) -> str:
    """A _FETCH / _UNPACK / _DECLARE template for tensor "k" or "v" ("@" -> K / V, "$" -> k / v)."""
    return text.replace("@", tensor.upper()).replace("$", tensor)


# Scores of the U rows for every head: reduce each thread's partial dot products over the TPR
# threads of its row (the U x G butterflies are independent, so their latencies overlap).
_SCORE_REDUCE = """
for (int o = 1; o < TPR; o <<= 1)
  for (int u = 0; u < U; ++u)
    for (int g = 0; g < G; ++g) sc[u][g] += KV_SHFL_XOR(sc[u][g], o);
"""

# Online softmax over the U rows at once: one max update (and rescale, when a maximum grows) per
# head, then sc[u][g] becomes the row's weight p.
_SOFTMAX = """
for (int g = 0; g < G; ++g) {
  float mx = m[g];
  for (int u = 0; u < U; ++u) mx = KV_MAX(mx, sc[u][g]);
  if (mx > m[g]) {
    const float a = KV_EXP2(m[g] - mx);
    l[g] *= a; pb[g] *= a;
    for (int k = 0; k < DPT; ++k) acc[g][k] *= a;
    if (GEN) for (int k = 0; k < DPT; ++k) accf[g][k % FD] *= a;
    m[g] = mx;
  }
  for (int u = 0; u < U; ++u) {
    sc[u][g] = KV_EXP2(sc[u][g] - m[g]);
    l[g] += sc[u][g];
  }
}
"""

SPLIT = (
    """
{{INDEX}}
constexpr int RS = NT / TPR;
constexpr int NWARP = NT / 32;
constexpr int FD = GEN ? DPT : 1;  // float-tail slices exist in general splits only
const int nk = params[0], nv = params[1], kfs = params[2], vfs = params[3], tend = params[4];
const int hkv = params[10];
const float qmul = KV_AS_FLOAT((uint32_t)params[11]);
const int S = GEN ? params[9] : params[8];
const int j = kv_tid % TPR, slot = kv_tid / TPR;
const int lane = kv_tid % 32, warp = kv_tid / 32;
const int b = kv_by / hkv, h = kv_by % hkv;
const int chunk = GEN ? params[6] : params[5];
const int start = (GEN ? params[7] : 0) + kv_bx * chunk;
const int stop = KV_MIN(start + chunk, GEN ? tend : KV_MIN(nk, nv));

float qk[G][DPT];
float qsum[G];
float qfl[G][FD];
float m[G], l[G], pb[G];
float acc[G][DPT];
float accf[G][FD];
for (int g = 0; g < G; ++g) {
  qsum[g] = 0.0f;
  for (int k = 0; k < DPT; ++k) {
    qk[g][k] = (j * DPT < KW) ? static_cast<float>(qc[b * qc_strides[0] + (h * G + g) * qc_strides[1] + j * DPT + k]) * qmul : 0.0f;
    qsum[g] += qk[g][k];
    acc[g][k] = 0.0f;
  }
  if (GEN)
    for (int k = 0; k < DPT; ++k) {
      qfl[g][k % FD] = static_cast<float>(qf[b * qf_strides[0] + (h * G + g) * qf_strides[1] + j * DPT + k]) * qmul;
      accf[g][k % FD] = 0.0f;
    }
  m[g] = -1.0e30f; l[g] = 0.0f; pb[g] = 0.0f;
}
"""
    + _for("k", _DECLARE)
    + _for("v", _DECLARE)
    + """
// The loop bound is the same for every thread: the shuffles inside need all 32 lanes of a warp
// (a slot that left early would hang __shfl_xor_sync on a partial last split).
for (int r0 = start; r0 < stop; r0 += RS * U) {
  // ---- fetch U rows of K and V. Fast splits clamp rows past the end to the last row (read, then
  // masked out), so their loads carry no branch and all are in flight before any is used.
  #pragma unroll  // fetch registers are indexed by u: a rolled loop would put them in local memory
  for (int u = 0; u < U; ++u) {
    const int row = r0 + slot + u * RS;
    const int rowc = GEN ? row : KV_MIN(row, stop - 1);
    if (GEN ? (row < stop && row < nk) : true)
"""
    + _for("k", _FETCH)
    + """
    if (GEN ? (row < stop && row < nv) : true)
"""
    + _for("v", _FETCH)
    + """
  }
  // ---- scores of the U rows, then one softmax step, then their values
  float sc[U][G];
  #pragma unroll
  for (int u = 0; u < U; ++u) {
    const int row = r0 + slot + u * RS;
    float xv[DPT];
    float x_s = 0.0f, x_b = 0.0f;
    if (GEN ? (row < stop && row < nk) : true) {
"""
    + _for("k", _UNPACK)
    + """
      for (int g = 0; g < G; ++g) {
        float d0 = 0.0f;
        for (int k = 0; k < DPT; ++k) d0 += qk[g][k] * xv[k];
        sc[u][g] = KFOLD ? d0 * x_s + x_b * qsum[g] : d0;
      }
    } else if (GEN && row < stop) {
      const int64_t fb = (int64_t)b * kf_strides[0] + (int64_t)h * kf_strides[1] + (int64_t)(row - kfs) * kf_strides[2];
      for (int g = 0; g < G; ++g) {
        float d0 = 0.0f;
        for (int k = 0; k < DPT; ++k) d0 += qfl[g][k % FD] * static_cast<float>(kf[fb + j * DPT + k]);
        sc[u][g] = d0;
      }
    } else {
      for (int g = 0; g < G; ++g) sc[u][g] = 0.0f;
    }
  }
"""
    + _SCORE_REDUCE
    + """
  for (int u = 0; u < U; ++u)
    for (int g = 0; g < G; ++g) sc[u][g] = r0 + slot + u * RS < stop ? sc[u][g] : -1.0e30f;
"""
    + _SOFTMAX
    + """
  #pragma unroll
  for (int u = 0; u < U; ++u) {
    const int row = r0 + slot + u * RS;
    float xv[DPT];
    float x_s = 0.0f, x_b = 0.0f;
    if (GEN ? (row < stop && row < nv) : true) {
"""
    + _for("v", _UNPACK)
    + """
      for (int g = 0; g < G; ++g) {
        const float ps = VFOLD ? sc[u][g] * x_s : sc[u][g];
        for (int k = 0; k < DPT; ++k) acc[g][k] += ps * xv[k];
        if (VFOLD) pb[g] += sc[u][g] * x_b;
      }
    } else if (GEN && row < stop) {
      const int64_t fb = (int64_t)b * vf_strides[0] + (int64_t)h * vf_strides[1] + (int64_t)(row - vfs) * vf_strides[2];
      for (int k = 0; k < DPT; ++k) {
        const float x = static_cast<float>(vf[fb + j * DPT + k]);
        for (int g = 0; g < G; ++g) accf[g][k % FD] += sc[u][g] * x;
      }
    }
  }
}

// ---- combine the row slots: inside each SIMD group by shuffles, then across groups in memory
for (int g = 0; g < G; ++g) {
  if (VFOLD) for (int k = 0; k < DPT; ++k) acc[g][k] += pb[g];
  float mw = m[g];
  // The shuffle goes into its own variable: inside KV_MAX (a macro) it would run twice, the second
  // time only in lanes whose compare failed, and a full-mask shuffle in divergent lanes deadlocks.
  for (int o = TPR; o < 32; o <<= 1) {
    const float other = KV_SHFL_XOR(mw, o);
    mw = KV_MAX(mw, other);
  }
  const float a = KV_EXP2(m[g] - mw);
  l[g] *= a;
  for (int k = 0; k < DPT; ++k) acc[g][k] *= a;
  if (GEN) for (int k = 0; k < DPT; ++k) accf[g][k % FD] *= a;
  for (int o = TPR; o < 32; o <<= 1) {
    l[g] += KV_SHFL_XOR(l[g], o);
    for (int k = 0; k < DPT; ++k) acc[g][k] += KV_SHFL_XOR(acc[g][k], o);
    if (GEN) for (int k = 0; k < DPT; ++k) accf[g][k % FD] += KV_SHFL_XOR(accf[g][k % FD], o);
  }
  m[g] = mw;
}
constexpr int SMW = (VW > D ? VW : D);
KV_SHARED float sm_m[NWARP * G];
KV_SHARED float sm_l[NWARP * G];
KV_SHARED float sm_a[NWARP * G * SMW];
const bool writer = lane < TPR;
if (writer) {
  for (int g = 0; g < G; ++g) {
    sm_m[warp * G + g] = m[g];
    sm_l[warp * G + g] = l[g];
    for (int k = 0; k < DPT; ++k)
      if (j * DPT + k < VW) sm_a[(warp * G + g) * SMW + j * DPT + k] = acc[g][k];
  }
}
KV_BARRIER();
const int64_t slot_base = ((int64_t)kv_by * S + kv_bx) * G;
for (int e = kv_tid; e < G * SMW; e += NT) {
  const int g = e / SMW, d = e % SMW;
  float mx = -1.0e30f;
  for (int w = 0; w < NWARP; ++w) mx = KV_MAX(mx, sm_m[w * G + g]);
  float ls = 0.0f, as = 0.0f;
  for (int w = 0; w < NWARP; ++w) {
    const float f = KV_EXP2(sm_m[w * G + g] - mx);
    ls += f * sm_l[w * G + g];
    as += f * sm_a[(w * G + g) * SMW + d];
  }
  if (d < VW) pc[(slot_base + g) * VW + d] = as;
  if (d == 0) { pm[slot_base + g] = mx; pl[slot_base + g] = ls; }
}
if (GEN) {
  KV_BARRIER();
  if (writer)
    for (int g = 0; g < G; ++g)
      for (int k = 0; k < DPT; ++k) sm_a[(warp * G + g) * SMW + j * DPT + k] = accf[g][k % FD];
  KV_BARRIER();
  for (int e = kv_tid; e < G * D; e += NT) {
    const int g = e / D, d = e % D;
    float mx = -1.0e30f;
    for (int w = 0; w < NWARP; ++w) mx = KV_MAX(mx, sm_m[w * G + g]);
    float as = 0.0f;
    for (int w = 0; w < NWARP; ++w) as += KV_EXP2(sm_m[w * G + g] - mx) * sm_a[(w * G + g) * SMW + d];
    pf[(slot_base + g) * D + d] = as;
  }
}
"""
)

REDUCE = """
{{INDEX}}
const int sf = params[0], sg = params[1], G = params[2];
const int d = kv_tid;
const int bq = kv_by;
const int bh = bq / G, g = bq % G;
float mx = -1.0e30f;
for (int s = 0; s < sf; ++s) mx = KV_MAX(mx, pm[((int64_t)bh * sf + s) * G + g]);
for (int s = 0; s < sg; ++s) mx = KV_MAX(mx, gm[((int64_t)bh * sg + s) * G + g]);
float ls = 0.0f, ac = 0.0f, af = 0.0f;
for (int s = 0; s < sf; ++s) {
  const int64_t i = ((int64_t)bh * sf + s) * G + g;
  const float f = KV_EXP2(pm[i] - mx);
  ls += f * pl[i];
  if (d < VW) ac += f * pc[i * VW + d];
}
for (int s = 0; s < sg; ++s) {
  const int64_t i = ((int64_t)bh * sg + s) * G + g;
  const float f = KV_EXP2(gm[i] - mx);
  ls += f * gl[i];
  if (d < VW) ac += f * gc[i * VW + d];
  af += f * gf[i * D + d];
}
const float inv = 1.0f / ls;
if (VPLAIN) {
  out[(int64_t)bq * D + d] = static_cast<OT>((ac + af) * inv);
} else {
  out[(int64_t)bq * D + d] = static_cast<OT>(af * inv);
  if (d < VW) outc[(int64_t)bq * VW + d] = ac * inv;
}
"""
