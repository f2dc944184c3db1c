"""Triton kernels of kvtorch.kernels.attention: split-K attention over packed K/V, then a reduce.

Split kernel, grid (splits, B * Hkv, query blocks). A program takes BQ queries x all G query heads
of one KV head as ROWS rows of one tile (GQA without repeating K/V; ROWS >= 16 for tl.dot), walks
a key range in blocks of BN keys with an online softmax (exp2, the scale folded into q), and writes
its partial max m, sum l and accumulators to its slot: acc_c over compressed values (in their
stored space: rotated or rank-r) and, for GENERAL programs, acc_f over float values. The kernel is
launched twice, as two specializations: the lean one (GENERAL=False) covers the keys below every
row's split, all read compressed; the GENERAL one covers the rest (the float tail, and per-query
splits during chunked prefill), reading both forms and picking per (row, key). Two launches keep
the lean loop's registers low. Reduce kernel, grid (B * Hq, Tq): one query head's slots merged at
once, acc_c mapped back (unrotate or times P_v^T), acc_f added, normalized.

Packed tiles are dequantized in fp32 (code * scale + bias, codes turned into floats by the
exponent trick) and fed to tl.dot in the float dtype with fp32 accumulation; on CUDA with fp16 dots,
4- and 8-bit token-axis tiles take inline PTX instead (two fp16 lanes per op, one rounding: _jit's
dequant4_mma, dequant4_pairs, dequant4_words, dequant8_words). Key tiles of 2- and 4-bit words come in
MMA order (a thread's operand columns are whole words, so the key tile reaches the MMA from registers,
not through shared memory), and q's key columns are put in that order first (a dot over D does not
depend on the order of D). Value tiles come in value order where a thread's output columns can be 8
stream neighbours (D = 64 x warps: 2- and 8-bit words, 4-bit at D 128 and 256; the tile skips shared
memory too), else 4-bit ones in pair order (both lanes of a register from one word); the value
accumulator goes back to stream order at the end.

Instruction budget (SASS of the lean loop compiled offline for sm_90 with Triton 3.6: triton.compile
with GPUTarget("cuda", 90, 32), then the bundled cuobjdump; instructions per thread per loop
iteration over the K and V elements a thread covers; D 128, group 64, GQA 4 padded to 16 rows;
compiled without the device's argument specialization, which benchmarks/triton_smem.py now applies:
with it int4 (128, 4, 3) counts 5.05, (64, 2, 3) 4.91, int8 (64, 2, 3) 5.46, registers as on the H200):
int4 PTX, BN 128, 8 warps: 6.75 per element (128 regs; PRMT 0.53, register moves 0.64, packed FMA
0.5, LOP3/SHF 0.44, shared-memory traffic ~0.3, HMMA 0.125, the 16-row online softmax ~0.75);
BN 64, 2 warps: 7.57, and 5.74 in pair order (PRMT 443 -> ~0 per warp and block); int4 without
PTX, BN 64: 9.0; int8, BN 64: 7.9 (2 warps: 9.15, or 7.47 with its PTX path); int2, BN 128: 8.9;
rank32 (bf16 coefficients): 5.9 per coefficient. An H200 issues about 33e12 thread-instructions/s,
so at 4.1 TB/s a 4.5-bit cache is memory-bound only below about 4.5 per element (int8: 9). Yet the
pair order's 24% fewer instructions moved int4's time by 1.3% on the H200 (b8 x 32k, each at its
best block, A/B in one session: 0.2429 -> 0.2397 ms), and neither did 4 warps per scheduler at 128
registers (keys on the MMA's M side, Hopper wgmma: 0.2416 ms): the L1/shared-memory unit is 79% busy
(DRAM 27%) with the fp16 tiles' trip through shared memory, 1.8x int8's store wavefronts (narrower
stores) and half of them bank conflicts (ncu, benchmarks/results/ncu_decode_attention_nvidia_h200.txt).
Key tiles in MMA order took int4 from 0.240 to 0.185 ms (b8 x 32k, (64, 2, 3)); value tiles in value
order took int8 from 0.208 to 0.195 (ncu: shared-store wavefronts 10.9M -> 1.9M, L1 67% -> 47%, DRAM
57% -> 63%). 4-bit value tiles in value order need a PTX whose lanes read their own words
(dequant4_words: one PRMT per output register more than dequant4_pairs, whose two lanes assume one
word given twice, which Triton's layout there does not keep: wrong values) and lost at 8 splits (0.189
vs 0.185), but their 22.5 KB of shared memory (38.9 in pair order) let 6 programs share a
multiprocessor, and at 12 splits they win: 0.176 ms (ncu: L1 69% -> 54%, issue 0.51 -> 0.62 per
scheduler, shared-store requests 1.65M -> 0.49M). A PTX taking codes 2k and 2k + 1 of one word per
register (no repacking before the MMA: 1193 loop instructions vs 1240) made ptxas take 255 registers
and lost at D 128 (keys: 0.197 vs 0.186 ms) while winning at D 256 b8 x 32k (0.068 vs 0.0745); not kept.
Measured against what a factored loop would cost (never dequantize: scores = sum_g s_g (q_g . c_g)
+ b_g sum(q_g), values as (p s_g) . c_g + p . b_g, codes as 1024 + c in fp16 lanes, two per LOP3):
unpacking 0.875 per element for K, 1.375 for V (V pairs two keys per mma register: one PRMT per
two codes), ~3.9 per element in all. Prototypes of it showed two traps: Triton's joins of 16-bit
lanes compile to register moves (~1.4 per element), and a value dot with N = 16 (one group of lane-split columns)
under 8 warps is computed redundantly by every warp (255 registers, spills): each dot must keep
N >= 8 x warps, i.e. value codes unpacked to whole groups in stream order.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._jit import (
    codes3,
    codes_of_words,
    dequant4_mma,
    dequant4_pairs,
    dequant4_words,
    dequant8_words,
    fwht_rows,
    load_words,
    mma_order,
    round_bf16,
    spread_words,
    stream_order,
    value_order,
    value_stream_order,
)
from .support import patch_interpreter

patch_interpreter()

NEG = tl.constexpr(-1.0e30)  # a finite "minus infinity" for running maxima, so empty ranges give weights 0, not NaN
# Column orders of a tile (`_tile`'s ORDER)
STREAM = tl.constexpr(0)
PAIRS = tl.constexpr(1)
MMA = tl.constexpr(2)
VALUES = tl.constexpr(3)


@triton.jit
def _group_scales(s_ptr, b_ptr, ss_n, offs, ok, BN: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                  CHANNEL: tl.constexpr, DP: tl.constexpr, DREAL: tl.constexpr):
    """Token-axis scales and biases [BN, DP / GROUP] (fp16) of rows `offs`; placeholders otherwise.

    Loaded apart from the codes so the lean loop can fetch them one block ahead: they are too small
    for Triton's asynchronous copies, and a plain load used at once would stall on memory latency.
    """
    if BITS == 0 or CHANNEL:
        s = tl.zeros((BN, 1), tl.float16)
        b = s
    else:
        NG: tl.constexpr = DP // GROUP
        j = tl.arange(0, NG)
        idx = offs[:, None] * ss_n + j[None, :]
        m = ok[:, None] & (j < DREAL // GROUP)[None, :]
        s = tl.load(s_ptr + idx, mask=m, other=0.0)
        b = tl.load(b_ptr + idx, mask=m, other=0.0)
    return s, b


@triton.jit
def _per_word(x, BN: tl.constexpr, WP: tl.constexpr):
    """Per-group values [BN, NG] repeated for each word of their group: [BN, WP]."""
    NG: tl.constexpr = x.shape[1]
    return tl.reshape(tl.broadcast_to(x[:, :, None], (BN, NG, WP // NG)), (BN, WP))


@triton.jit
def _tile(c_ptr, s_ptr, b_ptr, sc_n, ss_n, offs, ok, gs, gb, BITS: tl.constexpr, GROUP: tl.constexpr,
          CHANNEL: tl.constexpr, DP: tl.constexpr, DREAL: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr,
          MM_F32: tl.constexpr, PTX: tl.constexpr, ORDER: tl.constexpr, WARPS: tl.constexpr):
    """Rows `offs` [BN] of a compressed tensor as a [BN, DP] tile in the dot dtype (0 where not ok;
    fp32 under MM_F32, where `_mm` rounds). PTX: 4- and 8-bit token-axis tiles dequantize in inline PTX.
    ORDER of a token-axis tile's columns: STREAM, PAIRS (4-bit PTX: dequant4_pairs'), MMA (`mma_order`,
    2- and 4-bit words, DP a multiple of 4 words) or VALUES (`value_order` for a P V dot over WARPS
    warps, DP = 64 x WARPS).

    BITS 0: float coefficients [n, DREAL]. Otherwise codes [n, W] with fp16 scales/biases of shape
    [n, DREAL / GROUP] (token axis: given as gs, gb by `_group_scales`) or [n / GROUP, DREAL]
    (channel axis: loaded here).
    """
    d = tl.arange(0, DP)
    if BITS == 0:
        x = tl.load(c_ptr + offs[:, None] * sc_n + d[None, :],
                    mask=ok[:, None] & (d < DREAL)[None, :], other=0.0).to(tl.float32)
    elif CHANNEL:
        if BITS == 3:
            c = codes3(c_ptr, offs, ok, sc_n, DP, DREAL)
        else:
            c = tl.reshape(codes_of_words(load_words(c_ptr, offs, ok, sc_n, DP * BITS // 32, DREAL * BITS // 32),
                                          BITS), (BN, DP))
        srow = (offs // GROUP)[:, None] * ss_n + d[None, :]
        s = tl.load(s_ptr + srow, mask=ok[:, None], other=0.0).to(tl.float32)
        b = tl.load(b_ptr + srow, mask=ok[:, None], other=0.0).to(tl.float32)
        x = c * s + b
    elif BITS == 3:
        NG3: tl.constexpr = DP // GROUP
        c = tl.reshape(codes3(c_ptr, offs, ok, sc_n, DP, DREAL), (BN, NG3, GROUP))
        x = tl.reshape(c * gs.to(tl.float32)[:, :, None] + gb.to(tl.float32)[:, :, None], (BN, DP))
    elif PTX and BITS == 4:
        WP4: tl.constexpr = DP // 8
        words = load_words(c_ptr, offs, ok, sc_n, WP4, DREAL // 8).to(tl.int32, bitcast=True)
        if ORDER == MMA:
            x = dequant4_mma(words, _per_word(gs, BN, WP4), _per_word(gb, BN, WP4))
        elif ORDER == PAIRS:
            x = dequant4_pairs(words, _per_word(gs, BN, WP4), _per_word(gb, BN, WP4))
        else:
            x = dequant4_words(words, _per_word(gs, BN, WP4), _per_word(gb, BN, WP4))
    elif PTX and BITS == 8:
        WP8: tl.constexpr = DP // 4
        words = load_words(c_ptr, offs, ok, sc_n, WP8, DREAL // 4).to(tl.int32, bitcast=True)
        x = dequant8_words(words, _per_word(gs, BN, WP8), _per_word(gb, BN, WP8))
    else:
        # Token axis: a group spans whole words; each word's scale and bias are spread over its
        # codes in registers.
        WP: tl.constexpr = DP * BITS // 32
        LOGC: tl.constexpr = 4 if BITS == 2 else (3 if BITS == 4 else 2)
        s = spread_words(_per_word(gs.to(tl.float32), BN, WP), LOGC)
        b = spread_words(_per_word(gb.to(tl.float32), BN, WP), LOGC)
        c = codes_of_words(load_words(c_ptr, offs, ok, sc_n, WP, DREAL * BITS // 32), BITS)
        x = tl.reshape(c * s + b, (BN, DP))
        if ORDER == MMA:
            x = mma_order(x, BN, DP, 32 // BITS)
    if ORDER == VALUES:
        x = value_order(x, BN, DP, WARPS)
    if MM_F32:
        return x
    return x.to(DOT)


@triton.jit
def _mm(a, b, DOT: tl.constexpr, MM_F32: tl.constexpr):
    """a [M, K] @ b [K, N] with operands in the dot dtype and fp32 accumulation. MM_F32 (bf16 under
    Triton 3.6's interpreter, whose bf16 dots and casts are wrong) rounds the operands to bf16 by
    bit arithmetic and multiplies them in fp32: the same products, as the GPU forms them."""
    if MM_F32:
        return tl.dot(round_bf16(a.to(tl.float32)), round_bf16(b.to(tl.float32)), input_precision="ieee")
    return tl.dot(a.to(DOT), b.to(DOT))


@triton.jit
def _float_tile(f_ptr, sf_n, f_start, offs, ok, D: tl.constexpr, RING: tl.constexpr):
    """Float rows at positions `offs` of a tensor whose float rows start at position f_start, or,
    with RING, sit in a ring of RING rows (position s at row s % RING; callers ask live rows only)."""
    d = tl.arange(0, D)
    if RING > 0:
        i = offs % RING
        live = ok
    else:
        i = offs - f_start
        live = ok & (i >= 0)
    return tl.load(f_ptr + i[:, None] * sf_n + d[None, :], mask=live[:, None], other=0.0)


# Arguments that move with every decode step: Triton would specialize each on divisibility by 16 and
# compile a new variant the first time it crosses a multiple (a stall of ~1 s mid-generation). The
# positions and splits are views of kvtorch.store's position table at the step's offset, so their
# 16-byte alignment changes from step to step too.
@triton.jit(do_not_specialize=["k_fstart", "v_fstart", "T_end", "lo", "chunk", "slot0", "S"],
            do_not_specialize_on_alignment=["pos_ptr", "ksplit_ptr", "vsplit_ptr"])
def _split_kernel(
    q_ptr, sq_b, sq_h, sq_t, pos_ptr, ksplit_ptr, vsplit_ptr,
    kc_ptr, skc_b, skc_h, skc_n, ks_ptr, kb_ptr, sks_b, sks_h, sks_n, kf_ptr, skf_b, skf_h, skf_n, k_fstart,
    vc_ptr, svc_b, svc_h, svc_n, vs_ptr, vb_ptr, svs_b, svs_h, svs_n, vf_ptr, svf_b, svf_h, svf_n, v_fstart,
    kaux_ptr, k_norm, pm_ptr, pl_ptr, pc_ptr, pf_ptr, flag_ptr,
    Hkv, G, Tq, T_end, lo, chunk, slot0, S, NQB, qk_scale,
    D: tl.constexpr, LOG_D: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, ROWS: tl.constexpr,
    BN: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_CHANNEL: tl.constexpr,
    K_XFORM: tl.constexpr, DK: tl.constexpr, DK_REAL: tl.constexpr, V_BITS: tl.constexpr,
    V_GROUP: tl.constexpr, V_CHANNEL: tl.constexpr, DV: tl.constexpr, DV_REAL: tl.constexpr, DOT: tl.constexpr,
    MM_F32: tl.constexpr, GENERAL: tl.constexpr, PTX: tl.constexpr, RING: tl.constexpr, WARPS: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # the reduce, a programmatic dependent launch, may start its launch (it waits for our writes)
        gdc_launch_dependents()
    pid_s, bh, pid_q = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // Hkv).to(tl.int64)
    kvh = (bh % Hkv).to(tl.int64)
    r = tl.arange(0, ROWS)
    qi, gi = r // GP, r % GP
    t = pid_q * BQ + qi
    row_ok = (gi < G) & (qi < BQ) & (t < Tq)
    d = tl.arange(0, D)

    q = tl.load(q_ptr + b * sq_b + (kvh * G + gi)[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32) * qk_scale
    if K_XFORM == 1:
        qk = fwht_rows(q * tl.load(kaux_ptr + d)[None, :], ROWS, D, LOG_D) * k_norm
    elif K_XFORM == 2:
        rk = tl.arange(0, DK)
        basis = tl.load(kaux_ptr + kvh * D * DK_REAL + d[:, None] * DK_REAL + rk[None, :],
                        mask=(rk < DK_REAL)[None, :], other=0.0)
        qk = tl.dot(q, basis, input_precision="tf32")  # rounded to the dot dtype next anyway
    else:
        qk = q
    # Key tiles of 2- or 4-bit words in MMA order (whole words per thread: the tile reaches the MMA from
    # registers); q's columns follow them (a dot over D ignores the order). Value tiles in value order
    # where each thread's columns are 8 neighbours (D = 64 x warps) and it was measured faster on an
    # H200 (b8 x 32k: int8 D 128 0.194-0.196 ms vs 0.207-0.208, int4 D 256 0.0745 vs 0.0777, int2
    # (64, 2, 3) 0.282 vs 0.291; int4 D 128 0.176 vs 0.187 at 12 splits, which its smaller shared
    # memory allows), else pairs (4-bit PTX) or stream order.
    K_ORDER: tl.constexpr = MMA if ((K_BITS == 2 and DK % 64 == 0) or (K_BITS == 4 and DK % 32 == 0)) \
        and not K_CHANNEL else STREAM
    V_WORDS: tl.constexpr = (V_BITS == 2 or V_BITS == 8 or (V_BITS == 4 and DV >= 128)) and not V_CHANNEL
    V_ORDER: tl.constexpr = VALUES if V_WORDS and DV == 64 * WARPS \
        else (PAIRS if PTX and V_BITS == 4 and not V_CHANNEL else STREAM)
    if K_ORDER == MMA:
        qk = mma_order(qk, ROWS, DK, 32 // K_BITS)
    qf = q
    # fp16 operands hold |x| <= 65504: a query whose entries could overflow there is scaled by a power
    # of two (exact), and its scores multiplied back by q_mul after each dot. Usually q_mul = 1.
    q_max = tl.maximum(tl.max(tl.abs(qk)), tl.max(tl.abs(qf)))
    q_shift = tl.maximum(tl.ceil(tl.log2(q_max + 1.0e-30)) - 14.0, 0.0)
    q_mul = tl.exp2(q_shift)
    qk, qf = qk * tl.exp2(-q_shift), qf * tl.exp2(-q_shift)
    if not MM_F32:
        qk, qf = qk.to(DOT), qf.to(DOT)

    # Positions and splits as int32: offsets inside one head's rows fit, and 32-bit index math is cheaper.
    pos = tl.load(pos_ptr + t, mask=row_ok, other=0).to(tl.int32)
    spk = tl.load(ksplit_ptr + t, mask=row_ok, other=0).to(tl.int32)
    spv = tl.load(vsplit_ptr + t, mask=row_ok, other=0).to(tl.int32)
    # Positions increase and splits never decrease along the queries (the protocol's n_quantized(p + 1)),
    # so the block's extremes sit at its first and last query.
    t_first = pid_q * BQ
    t_last = tl.minimum(t_first + BQ, Tq) - 1
    sk_min, sk_max = tl.load(ksplit_ptr + t_first).to(tl.int32), tl.load(ksplit_ptr + t_last).to(tl.int32)
    sv_min, sv_max = tl.load(vsplit_ptr + t_first).to(tl.int32), tl.load(vsplit_ptr + t_last).to(tl.int32)
    n_lo = tl.minimum(sk_min, sv_min)
    # A ring (static float tail): the GENERAL range starts at the block's smallest split.
    start = (n_lo if GENERAL and RING > 0 else lo) + pid_s * chunk
    stop = tl.minimum(tl.minimum(start + chunk, T_end), tl.load(pos_ptr + t_last).to(tl.int32) + 1)

    kc_ptr += b * skc_b + kvh * skc_h
    ks_ptr += b * sks_b + kvh * sks_h
    kb_ptr += b * sks_b + kvh * sks_h
    vc_ptr += b * svc_b + kvh * svc_h
    vs_ptr += b * svs_b + kvh * svs_h
    vb_ptr += b * svs_b + kvh * svs_h
    kf_ptr += b * skf_b + kvh * skf_h
    vf_ptr += b * svf_b + kvh * svf_h

    m_i = tl.full((ROWS,), NEG, tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc_c = tl.zeros((ROWS, DV), tl.float32)
    idx = ((bh.to(tl.int64) * Tq + t) * S + slot0 + pid_s) * GP + gi
    dv = tl.arange(0, DV)
    if GENERAL:
        # Keys some row reads in float: both forms, chosen per (row, key) by the row's split.
        acc_f = tl.zeros((ROWS, D), tl.float32)
        gen_start = tl.maximum(start, n_lo)
        for n0 in range(gen_start, stop, BN):
            offs = n0 + tl.arange(0, BN)
            ok = offs < stop
            use_kc = offs[None, :] < spk[:, None]
            use_vc = offs[None, :] < spv[:, None]
            kok = ok & (offs < sk_max)
            gs, gb = _group_scales(ks_ptr, kb_ptr, sks_n, offs, kok, BN, K_BITS, K_GROUP, K_CHANNEL, DK, DK_REAL)
            kt = _tile(kc_ptr, ks_ptr, kb_ptr, skc_n, sks_n, offs, kok, gs, gb, K_BITS, K_GROUP,
                       K_CHANNEL, DK, DK_REAL, BN, DOT, MM_F32, PTX, K_ORDER, WARPS)
            kf = _float_tile(kf_ptr, skf_n, k_fstart, offs, ok & (offs >= sk_min), D, RING)
            s = tl.where(use_kc, _mm(qk, tl.trans(kt), DOT, MM_F32), _mm(qf, tl.trans(kf), DOT, MM_F32)) * q_mul
            s = tl.where(ok[None, :] & (offs[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vok = ok & (offs < sv_max)
            gs, gb = _group_scales(vs_ptr, vb_ptr, svs_n, offs, vok, BN, V_BITS, V_GROUP, V_CHANNEL, DV, DV_REAL)
            vt = _tile(vc_ptr, vs_ptr, vb_ptr, svc_n, svs_n, offs, vok, gs, gb, V_BITS, V_GROUP,
                       V_CHANNEL, DV, DV_REAL, BN, DOT, MM_F32, PTX, V_ORDER, WARPS)
            vf = _float_tile(vf_ptr, svf_n, v_fstart, offs, ok & (offs >= sv_min), D, RING)
            acc_c = acc_c * alpha[:, None] + _mm(tl.where(use_vc, p, 0.0), vt, DOT, MM_F32)
            acc_f = acc_f * alpha[:, None] + _mm(tl.where(use_vc, 0.0, p), vf, DOT, MM_F32)
            m_i = m_new
        has_f = gen_start < stop
        tl.store(pf_ptr + idx[:, None] * D + d[None, :], acc_f, mask=row_ok[:, None] & has_f)
        flag = has_f.to(tl.int32)
    else:
        # Keys every row reads compressed (s < n_lo <= split <= p + 1, so causality holds too).
        fast_end = tl.minimum(stop, n_lo)
        offs = start + tl.arange(0, BN)
        ks_n, kb_n = _group_scales(ks_ptr, kb_ptr, sks_n, offs, offs < fast_end, BN, K_BITS, K_GROUP, K_CHANNEL, DK,
                                   DK_REAL)
        vs_n, vb_n = _group_scales(vs_ptr, vb_ptr, svs_n, offs, offs < fast_end, BN, V_BITS, V_GROUP, V_CHANNEL, DV,
                                   DV_REAL)
        for n0 in range(start, fast_end, BN):
            offs = n0 + tl.arange(0, BN)
            ok = offs < fast_end
            # Scales of this block were fetched last iteration; fetch the next block's now.
            ks_c, kb_c, vs_c, vb_c = ks_n, kb_n, vs_n, vb_n
            nxt = offs + BN
            ks_n, kb_n = _group_scales(ks_ptr, kb_ptr, sks_n, nxt, nxt < fast_end, BN, K_BITS, K_GROUP, K_CHANNEL,
                                       DK, DK_REAL)
            vs_n, vb_n = _group_scales(vs_ptr, vb_ptr, svs_n, nxt, nxt < fast_end, BN, V_BITS, V_GROUP, V_CHANNEL,
                                       DV, DV_REAL)
            kt = _tile(kc_ptr, ks_ptr, kb_ptr, skc_n, sks_n, offs, ok, ks_c, kb_c, K_BITS, K_GROUP, K_CHANNEL, DK,
                       DK_REAL, BN, DOT, MM_F32, PTX, K_ORDER, WARPS)
            s = tl.where(ok[None, :], _mm(qk, tl.trans(kt), DOT, MM_F32) * q_mul, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = _tile(vc_ptr, vs_ptr, vb_ptr, svc_n, svs_n, offs, ok, vs_c, vb_c, V_BITS, V_GROUP, V_CHANNEL, DV,
                       DV_REAL, BN, DOT, MM_F32, PTX, V_ORDER, WARPS)
            acc_c = acc_c * alpha[:, None] + _mm(p, vt, DOT, MM_F32)
            m_i = m_new
        flag = tl.full([], 0, tl.int32)
    if V_ORDER == PAIRS:
        acc_c = stream_order(acc_c, ROWS, DV)  # value columns came in dequant4_pairs' order
    elif V_ORDER == VALUES:
        acc_c = value_stream_order(acc_c, ROWS, DV, WARPS)
    tl.store(pm_ptr + idx, m_i, mask=row_ok)
    tl.store(pl_ptr + idx, l_i, mask=row_ok)
    tl.store(pc_ptr + idx[:, None] * DV + dv[None, :], acc_c, mask=row_ok[:, None])
    # acc_f is written only by splits that read float keys; the flag tells the reduce which.
    tl.store(flag_ptr + (bh * NQB + pid_q) * S + slot0 + pid_s, flag)


@triton.jit
def _reduce_kernel(
    pm_ptr, pl_ptr, pc_ptr, pf_ptr, flag_ptr, out_ptr, so_b, so_h, so_t, vaux_ptr, v_norm,
    Hkv, G, Tq, S, NQB,
    D: tl.constexpr, LOG_D: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr,
    DV: tl.constexpr, DV_REAL: tl.constexpr, V_XFORM: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr,
):
    # One program per query head and query: every slot's partials [SP, DV] load as one tile, so the
    # loads are all in flight at once (a loop over slots chained 32 load latencies at batch 1: the
    # reduce took 14.6 us beside a 35.9 us split, Mistral heads x 32k keys, H200).
    # Its own launch, in parallel over heads: merging in the split kernel's last program of each KV
    # head (an atomic arrival counter) lost at every shape measured (rank32 b8 x 32k 0.0850 vs 0.0836
    # ms, where this kernel takes 4.4 us; int4 0.258 vs 0.177: 247 registers instead of 168).
    if PDL:  # launched before the split kernels finished: their partials are visible after this wait
        gdc_wait()
    bhg, t = tl.program_id(0), tl.program_id(1)
    bh, gi = bhg // G, bhg % G
    b = (bh // Hkv).to(tl.int64)
    kvh = (bh % Hkv).to(tl.int64)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    sl = tl.arange(0, SP)
    live = sl < S
    row = ((bh.to(tl.int64) * Tq + t) * S + sl) * GP + gi
    m = tl.load(pm_ptr + row, mask=live, other=NEG)
    w = tl.exp2(m - tl.max(m, axis=0))
    l_i = tl.sum(w * tl.load(pl_ptr + row, mask=live, other=0.0), axis=0)
    # acc_f exists only in slots whose split read float keys (the flag).
    has_f = live & (tl.load(flag_ptr + (bh * NQB + t // BQ) * S + sl, mask=live, other=0) != 0)
    pc = tl.load(pc_ptr + row[:, None] * DV + dv[None, :], mask=live[:, None], other=0.0)
    pf = tl.load(pf_ptr + row[:, None] * D + d[None, :], mask=has_f[:, None], other=0.0)
    inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    acc_c = tl.sum(pc * w[:, None], axis=0) * inv  # [DV]
    acc_f = tl.sum(pf * w[:, None], axis=0) * inv  # [D]
    if V_XFORM == 1:
        out = tl.reshape(fwht_rows(tl.reshape(acc_c, (1, D)), 1, D, LOG_D), (D,)) * v_norm * tl.load(vaux_ptr + d)
    elif V_XFORM == 2:
        # (acc_c P_v^T)[d] = sum_j acc_c[j] P_v[d, j], P_v read straight from the basis [Hkv, D, r].
        pt = tl.load(vaux_ptr + kvh * D * DV_REAL + d[None, :] * DV_REAL + dv[:, None],
                     mask=(dv < DV_REAL)[:, None], other=0.0)
        out = tl.sum(acc_c[:, None] * pt, axis=0)
    else:
        out = acc_c
    out += acc_f
    tl.store(out_ptr + b * so_b + (kvh * G + gi) * so_h + t * so_t + d, out)
