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
          Hkv, 0); qc fp32 [B, Hq, KW] (queries in K's stored space: rotated or projected, times
          scale * log2 e); qf fp32 [B, Hq, D] (plain, same factor); kc uint32 codes [B, Hkv, n, *]
          or float coefficients; ks, kb fp16 scales/biases; kf float tail [B, Hkv, Tf, D]; the same
          for V.
  outputs (per split s, head g) pm, pl fp32 [B * Hkv * S * G]: running max (log2 domain) and sum;
          pc fp32 [B * Hkv * S * G * VW]: unnormalized p . V (V's stored space); GEN 1 adds
          pf fp32 [B * Hkv * S * G * D]: p . V over V's float rows.
  template T, D, G, DPT, NT, U, GEN, KB, KW, KGR, KCH, VB, VW, VGR, VCH (bits 16 = float
  coefficients of width KW / VW; group and channel flags as kvspec.spec.Quant)
  Layout: a row is read by TPR = D / DPT threads, each owning DPT consecutive dims, so a SIMD group
  reads 32 / TPR consecutive rows' packed words at once. Scores fold the group scale and bias into
  the dot product: q . (s c + b) = s (q . c) + b sum(q). The running max is updated lazily (only
  when a score exceeds it), and V's bias is accumulated once per row (sum of p b) instead of per
  element. Row slots are combined through SIMD shuffles, then threadgroup memory.

REDUCE: combine the splits of one (batch, query head) and normalize.
  inputs  params int32 [4] = (S_fast, S_gen, G, 0); pm, pl, pc (fast); gm, gl, gc, gf (general)
  outputs out fp32 [B, Hq, D] (VPLAIN: p . V over all rows; else p . V over V's float rows) and
          outc fp32 [B, Hq, VW] (VPLAIN 0: the compressed rows' p . V, still in V's stored space)
  template D, VW, VPLAIN
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

# Loads of one thread's slice of row `row` of a compressed tensor X (K or V): fills xv[DPT] with
# the dequantized values (or, with XFOLD, the raw codes and x_s / x_b for the caller to fold).
_ROW = """
{
  const int64_t rb = (int64_t)b * X_strides[0] + (int64_t)h * X_strides[1];
  if (XB == 16) {
    for (int k = 0; k < DPT; ++k)
      xv[k] = (j * DPT < XW) ? static_cast<float>(Xc[rb + (int64_t)row * Xc_strides[2] + j * DPT + k]) : 0.0f;
  } else {
    constexpr int BITSPT = DPT * (XB == 16 ? 1 : XB);
    constexpr int NWL = (BITSPT + 31) / 32 + (BITSPT % 32 ? 1 : 0);
    constexpr int WORDS = (XW * (XB == 16 ? 1 : XB) + 31) / 32;
    const int bit0 = j * BITSPT;
    const int w0 = bit0 / 32;
    const int lead = BITSPT % 32 ? bit0 % 32 : 0;
    const int64_t cb = rb + (int64_t)row * Xc_strides[2] + w0;
    uint32_t wd[NWL];
    if (j * DPT >= XW) {
      for (int i = 0; i < NWL; ++i) wd[i] = 0u;
    } else if (NWL == 4 && BITSPT % 128 == 0) {
      const uint4 u = KV_LOAD4(Xc + cb);
      wd[0] = u.x; wd[1 % NWL] = u.y; wd[2 % NWL] = u.z; wd[3 % NWL] = u.w;
    } else if (NWL == 2 && BITSPT % 64 == 0) {
      const uint2 u = KV_LOAD2(Xc + cb);
      wd[0] = u.x; wd[1 % NWL] = u.y;
    } else {
      for (int i = 0; i < NWL; ++i) wd[i] = (w0 + i < WORDS) ? kv_word(Xc[cb + i]) : 0u;
    }
    for (int k = 0; k < DPT; ++k) {
      const int bit = lead + k * XB;
      const int wi = bit / 32, sh = bit % 32;
      uint32_t c = wd[wi] >> sh;
      if (sh + XB > 32) c |= wd[KV_MIN(wi + 1, NWL - 1)] << (32 - sh);
      xv[k] = KV_AS_FLOAT((c & ((1u << XB) - 1u)) | 0x4B000000u) - 8388608.0f;
    }
    if (XCH) {
      const int64_t sb = (int64_t)b * Xs_strides[0] + (int64_t)h * Xs_strides[1] + (int64_t)(row / XGR) * Xs_strides[2];
      for (int k = 0; k < DPT; ++k) {
        const int d = KV_MIN(j * DPT + k, XW - 1);
        xv[k] = xv[k] * static_cast<float>(Xs[sb + d]) + static_cast<float>(Xb[sb + d]);
      }
    } else {
      const int64_t sb = (int64_t)b * Xs_strides[0] + (int64_t)h * Xs_strides[1] + (int64_t)row * Xs_strides[2]
                         + KV_MIN(j * DPT, XW - 1) / XGR;
      x_s = static_cast<float>(Xs[sb]);
      x_b = static_cast<float>(Xb[sb]);
      if (!XFOLD) for (int k = 0; k < DPT; ++k) xv[k] = xv[k] * x_s + x_b;
    }
  }
}
"""


def _row(tensor: str, fold: bool) -> str:
    """_ROW for K or V; with `fold`, token-axis scales stay out of xv (x_s, x_b)."""
    p = tensor.upper()
    text = _ROW.replace("XFOLD", "1" if fold else "0")
    for suffix in ("B", "W", "GR", "CH"):
        text = text.replace(f"X{suffix}", f"{p}{suffix}")
    for arr in ("c", "s", "b"):
        text = text.replace(f"X{arr}[", f"{tensor}{arr}[").replace(f"X{arr}_strides", f"{tensor}{arr}_strides")
        text = text.replace(f"X{arr} +", f"{tensor}{arr} +")
    return text.replace("X_strides", f"{tensor}c_strides")


# Score of one row for every head: reduce the thread's partial dot products over the TPR threads.
_SCORE_REDUCE = """
for (int g = 0; g < G; ++g)
  for (int o = 1; o < TPR; o <<= 1) sc[g] += KV_SHFL_XOR(sc[g], o);
"""

# Online softmax step for one row with scores sc[G]; rescales only when a maximum grows.
_SOFTMAX = """
for (int g = 0; g < G; ++g) {
  if (sc[g] > m[g]) {
    const float a = KV_EXP2(m[g] - sc[g]);
    l[g] *= a; pb[g] *= a;
    for (int k = 0; k < DPT; ++k) acc[g][k] *= a;
    if (GEN) for (int k = 0; k < DPT; ++k) accf[g][k % FD] *= a;
    m[g] = sc[g];
  }
  p[g] = KV_EXP2(sc[g] - m[g]);
  l[g] += p[g];
}
"""

SPLIT = (
    """
{{INDEX}}
constexpr int TPR = D / DPT;
constexpr int RS = NT / TPR;
constexpr int NWARP = NT / 32;
constexpr int FD = GEN ? DPT : 1;  // float-tail slices exist in general splits only
constexpr bool KFOLD = KB != 16 && !KCH;
constexpr bool VFOLD = VB != 16 && !VCH;
const int nk = params[0], nv = params[1], kfs = params[2], vfs = params[3], tend = params[4];
const int hkv = params[10];
const int S = GEN ? params[9] : params[8];
const int j = kv_tid % TPR, slot = kv_tid / TPR;
const int lane = kv_tid % 32, warp = kv_tid / 32;
const int b = kv_by / hkv, h = kv_by % hkv;
const int chunk = GEN ? params[6] : params[5];
const int start = (GEN ? params[7] : 0) + kv_bx * chunk;
const int stop = KV_MIN(start + chunk, GEN ? tend : KV_MIN(nk, nv));
const int64_t qrow = (int64_t)b * hkv * G + (int64_t)h * G;

float qk[G][DPT];
float qsum[G];
float qfl[G][FD];
float m[G], l[G], pb[G], sc[G], p[G];
float acc[G][DPT];
float accf[G][FD];
for (int g = 0; g < G; ++g) {
  qsum[g] = 0.0f;
  for (int k = 0; k < DPT; ++k) {
    qk[g][k] = (j * DPT < KW) ? qc[(qrow + g) * KW + j * DPT + k] : 0.0f;
    qsum[g] += qk[g][k];
    acc[g][k] = 0.0f;
  }
  if (GEN) for (int k = 0; k < DPT; ++k) { qfl[g][k % FD] = qf[(qrow + g) * D + j * DPT + k]; accf[g][k % FD] = 0.0f; }
  m[g] = -1.0e30f; l[g] = 0.0f; pb[g] = 0.0f;
}

// The loop bound is the same for every thread: the shuffles inside need all 32 lanes of a warp
// (a slot that left early would hang __shfl_xor_sync on a partial last split).
for (int r0 = start; r0 < stop; r0 += RS * U) {
  for (int u = 0; u < U; ++u) {
    const int row = r0 + slot + u * RS;
    const bool live = row < stop;
    float xv[DPT];
    float x_s = 0.0f, x_b = 0.0f;
    // ---- scores
    const bool kcomp = !GEN || row < nk;
    if (live && kcomp) {
"""
    + _row("k", True)
    + """
      for (int g = 0; g < G; ++g) {
        float d0 = 0.0f;
        for (int k = 0; k < DPT; ++k) d0 += qk[g][k] * xv[k];
        sc[g] = KFOLD ? d0 * x_s + x_b * qsum[g] : d0;
      }
    } else if (GEN && live) {
      const int64_t fb = (int64_t)b * kf_strides[0] + (int64_t)h * kf_strides[1] + (int64_t)(row - kfs) * kf_strides[2];
      for (int g = 0; g < G; ++g) {
        float d0 = 0.0f;
        for (int k = 0; k < DPT; ++k) d0 += qfl[g][k % FD] * static_cast<float>(kf[fb + j * DPT + k]);
        sc[g] = d0;
      }
    } else {
      for (int g = 0; g < G; ++g) sc[g] = 0.0f;
    }
"""
    + _SCORE_REDUCE
    + """
    if (!live) for (int g = 0; g < G; ++g) sc[g] = -1.0e30f;
"""
    + _SOFTMAX
    + """
    // ---- values
    const bool vcomp = !GEN || row < nv;
    if (live && vcomp) {
"""
    + _row("v", True)
    + """
      for (int g = 0; g < G; ++g) {
        const float ps = VFOLD ? p[g] * x_s : p[g];
        for (int k = 0; k < DPT; ++k) acc[g][k] += ps * xv[k];
        if (VFOLD) pb[g] += p[g] * x_b;
      }
    } else if (GEN && live) {
      const int64_t fb = (int64_t)b * vf_strides[0] + (int64_t)h * vf_strides[1] + (int64_t)(row - vfs) * vf_strides[2];
      for (int k = 0; k < DPT; ++k) {
        const float x = static_cast<float>(vf[fb + j * DPT + k]);
        for (int g = 0; g < G; ++g) accf[g][k % FD] += p[g] * x;
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
  out[(int64_t)bq * D + d] = (ac + af) * inv;
} else {
  out[(int64_t)bq * D + d] = af * inv;
  if (d < VW) outc[(int64_t)bq * VW + d] = ac * inv;
}
"""
