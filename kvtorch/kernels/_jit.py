"""Triton device functions shared by the kvtorch kernels (imported only where triton is installed).

Bit layout (kvspec.reference.quant): code i of a row occupies bits [i*b, i*b + b) of the row's
little-endian bit stream of uint32 words, least significant bit first. torch holds the words as
int32 with the same bits; these helpers bitcast to uint32 so that shifts are logical.
"""

from __future__ import annotations

import triton
import triton.language as tl

# 2^23 as the exponent/mantissa pattern of an fp32: OR-ing a code below 2^23 into its mantissa gives
# the float 2^23 + code exactly, which avoids the slow integer-to-float conversion unit.
MAGIC_BITS = tl.constexpr(0x4B000000)
MAGIC = tl.constexpr(8388608.0)


@triton.jit
def bit_or(a, b):
    return a | b


@triton.jit
def rint_half_even(y):
    """Round fp32 y to the nearest integer, ties to even (exact for 0 <= y < 2^23; callers clamp
    negative and larger values to [0, 2^bits - 1], where the result is the same)."""
    r = tl.floor(y)
    f = y - r  # exact: y and floor(y) share the binade or f is y itself
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


@triton.jit
def round_bf16(x):
    """fp32 x rounded to the nearest bfloat16 (ties to even), as fp32: kvspec.reference.floats'
    bit trick, used because Triton 3.6's interpreter truncates fp32 -> bf16 casts."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def fwht_rows(x, ROWS: tl.constexpr, D: tl.constexpr, LOG_D: tl.constexpr):
    """Unnormalized Walsh-Hadamard transform of each row of x [ROWS, D] (fp32, Sylvester order).

    The butterfly stages of kvspec.reference.rotation.fwht, stage h = 2^i pairs (j, j + h) inside
    blocks of 2h as (a + b, a - b): the same IEEE additions, hence the same bits.
    """
    for i in tl.static_range(LOG_D):
        y = tl.permute(tl.reshape(x, (ROWS, D >> (i + 1), 2, 1 << i)), (0, 1, 3, 2))
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (ROWS, D))
    return x


@triton.jit
def spread_words(x, LOGC: tl.constexpr):
    """[..., WP] -> [..., WP, 2, ..., 2] (LOGC new axes), each word copied in place: the shape that
    `codes_of_words` gives, so per-word values (scales) line up with the codes without data movement."""
    for _ in tl.static_range(LOGC):
        x = tl.join(x, x)
    return x


@triton.jit
def codes_of_words(words, BITS: tl.constexpr):
    """Codes of uint32 words [BN, WP] (2, 4 or 8 bits) as exact fp32 integers [BN, WP, 2, ..., 2].

    Each level joins the words with themselves shifted right by 16, 8, 4, 2 bits, so the code at
    flat index j = 2^(L-1) a_1 + ... + a_L of a word has been shifted by BITS * j: reshaping to
    [BN, WP * 32 / BITS] gives the codes in stream order. Joins stay inside a thread's registers.
    """
    LOGC: tl.constexpr = 4 if BITS == 2 else (3 if BITS == 4 else 2)
    x = words
    for level in tl.static_range(LOGC):
        x = tl.join(x, x >> (16 >> level))
    return ((x & ((1 << BITS) - 1)) | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC


@triton.jit
def load_words(ptr, rows, row_mask, stride_row, WP: tl.constexpr, W: tl.constexpr):
    """Words [BN, WP] (uint32) of packed rows `rows` (row_mask [BN]); words >= W read as 0."""
    wi = tl.arange(0, WP)
    return tl.load(ptr + rows[:, None] * stride_row + wi[None, :],
                   mask=row_mask[:, None] & (wi < W)[None, :], other=0).to(tl.uint32, bitcast=True)


@triton.jit
def codes3(ptr, rows, row_mask, stride_row, DP: tl.constexpr, DREAL: tl.constexpr):
    """3-bit codes [BN, DP] as exact fp32 integers; a code straddling two words reads both."""
    d = tl.arange(0, DP)
    bit = d * 3
    sh = (bit % 32).to(tl.uint32)
    base = ptr + rows[:, None] * stride_row + (bit // 32)[None, :]
    m = row_mask[:, None] & (d < DREAL)[None, :]
    lo = tl.load(base, mask=m, other=0).to(tl.uint32, bitcast=True)
    hi = tl.load(base + 1, mask=m & (sh > 29)[None, :], other=0).to(tl.uint32, bitcast=True)
    c = ((lo >> sh[None, :]) | (hi << ((32 - sh) & 31)[None, :])) & 7
    return (c | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC


@triton.jit
def pack_codes(c, BT: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr):
    """Pack uint32 codes c [BT, DP] into words [BT, DP * BITS / 32] (uint32; DP % 32 == 0 for 3 bits).

    Codes occupy disjoint bits, so OR-reducing the shifted codes of a word assembles it.
    """
    if BITS == 3:
        # 32 codes fill exactly 3 words; word k of a block takes the bits of codes i with
        # 3i - 32k in (-3, 32) (a code that straddles contributes its low bits to k, high to k + 1).
        NB: tl.constexpr = DP // 32
        i = tl.arange(0, 32)
        k = tl.arange(0, 4)
        delta = i[None, :] * 3 - k[:, None] * 32
        left = (delta >= 0) & (delta < 32)
        right = (delta < 0) & (delta > -3)
        c4 = tl.reshape(c, (BT, NB, 1, 32))
        part = tl.where(left[None, None], c4 << (delta & 31).to(tl.uint32)[None, None],
                        tl.where(right[None, None], c4 >> ((0 - delta) & 31).to(tl.uint32)[None, None], 0))
        return tl.reduce(part, 3, bit_or)  # [BT, NB, 4]: the 4th word of each block is unused
    else:
        CPW: tl.constexpr = 32 // BITS
        sh = (tl.arange(0, CPW) * BITS).to(tl.uint32)
        return tl.reduce(tl.reshape(c, (BT, DP // CPW, CPW)) << sh[None, None, :], 2, bit_or)


def _dequant_ptx(mask: int, cuts: list[str]) -> str:
    """PTX that writes output k ($k) from cut k: the cut leaves two codes in the 16-bit lanes of x as
    fp16 magic + code (lop3 with `mask` and 0x64 high bytes: 1024 + code, exact), then code =
    fma(x, 1, -1024) and value = fma(code, scale, bias), two lanes per op. With n cuts the inputs are
    words $n and $n+1 ({w0}, {w1} in a cut), scales $n+2 and biases $n+3."""
    n = len(cuts)
    lines = ["{", ".reg .b32 x, m, g, n, o;",
             f"mov.b32 m, 0x{mask:08X}; mov.b32 g, 0x64006400; mov.b32 n, 0xE400E400; mov.b32 o, 0x3C003C00;"]
    for k, cut in enumerate(cuts):
        lines.append(f"{cut.format(w0=f'${n}', w1=f'${n + 1}')} fma.rn.f16x2 x, x, o, n; "
                     f"fma.rn.f16x2 ${k}, x, ${n + 2}, ${n + 3};")
    return " ".join(lines + ["}"])


# 4 bits, one word given twice (both elements of the pack): output k holds codes (k, k + 4), cut
# out of the word shifted by 4k.
DEQUANT4_PAIRS_F16 = tl.constexpr(_dequant_ptx(0x000F000F, ["lop3.b32 x, {w0}, m, g, 0xEA;"] + [
    f"shr.b32 x, {{w0}}, {4 * k}; lop3.b32 x, x, m, g, 0xEA;" for k in range(1, 4)]))
# 8 bits, two words: prmt gathers byte k of word 0 into result byte 0 and byte k of word 1 (index
# 4 + k) into result byte 2.
DEQUANT8_F16 = tl.constexpr(_dequant_ptx(0x00FF00FF, [
    f"prmt.b32 x, {{w0}}, {{w1}}, {(4 + k) << 8 | k:#06x}; lop3.b32 x, x, m, g, 0xEA;" for k in range(4)]))
# 4 bits, two words: output j holds code j of each (byte j // 2 of both gathered as for 8 bits, the
# high nibble shifted down for odd j), so each lane depends on its own word only.
DEQUANT4_F16 = tl.constexpr(_dequant_ptx(0x000F000F, [
    f"prmt.b32 x, {{w0}}, {{w1}}, {(4 + j // 2) << 8 | j // 2:#06x};" + (" shr.b32 x, x, 4;" if j % 2 else "")
    + " lop3.b32 x, x, m, g, 0xEA;" for j in range(8)]))


@triton.jit
def _dequant4_pair_outputs(words, s, b):
    """DEQUANT4_PAIRS_F16 on each word given twice: outputs k [BN, WP, 2], lane e = code k + 4e."""
    return tl.inline_asm_elementwise(
        DEQUANT4_PAIRS_F16, "=r,=r,=r,=r,r,r,r,r", [tl.join(words, words), tl.join(s, s), tl.join(b, b)],
        dtype=(tl.float16,) * 4, is_pure=True, pack=2)


@triton.jit
def dequant4_pairs(words, s, b):
    """4-bit words [BN, WP] (int32) with per-word fp16 scale and bias [BN, WP] -> fp16 values
    [BN, WP * 8] in pair order: column 8w + 2k + e holds code k + 4e of word w (`stream_order` undoes it).

    Both lanes of each output register come from one word, so neighbouring columns share a
    register and the tile reaches shared memory without 16-bit shuffles. The lanes assume the pack
    Triton forms is the joined word's two copies; in a layout that pairs other elements the values
    are wrong (value tiles in `value_order` at D 128: relative error 5e-3 on the H200), which
    `dequant4_words` does not assume. dequant4_mma shares the PTX and is checked bit for bit on the
    GPU in the key tiles' layout (tests/kvtorch/test_dequant_ptx.py, test_kernels_attention.py)."""
    o0, o1, o2, o3 = _dequant4_pair_outputs(words, s, b)
    x = tl.join(tl.join(o0, o2), tl.join(o1, o3))  # [BN, WP, e, a, b]: output k = 2a + b
    return tl.reshape(tl.permute(x, (0, 1, 3, 4, 2)), (words.shape[0], words.shape[1] * 8))


@triton.jit
def dequant4_mma(words, s, b):
    """4-bit words [BN, WP] (int32) with per-word fp16 scale and bias [BN, WP] -> fp16 values
    [BN, WP * 8] in MMA order (`mma_columns`): a key tile the MMA reads from registers.

    The same PTX as dequant4_pairs; only the columns the outputs land in differ."""
    o0, o1, o2, o3 = _dequant4_pair_outputs(words, s, b)
    return mma_columns(o0, o1, o2, o3)


@triton.jit
def mma_columns(o0, o1, o2, o3):
    """Outputs k of DEQUANT4_PAIRS_F16 ([BN, WP, 2]: lane e holds code k + 4e of word w) -> [BN, WP * 8]
    with code k + 4e of word w = 4a + c in column 32a + 16e + 4c + k. A dot operand of 16-bit values
    (kWidth 4) gives a thread 4 consecutive columns of every 16: here those are 4 codes of one word,
    so Triton carries the dot operand's layout back to the words' load and the tile skips shared
    memory (as 8-bit words do in stream order); in pair order 8 consecutive columns from one word span
    two threads' columns and the tile went through shared memory (benchmarks/triton_smem.py: STS.128
    per warp and block 32 -> 16)."""
    x = tl.join(tl.join(o0, o1), tl.join(o2, o3))  # [BN, WP, e, l, h]: output k = 2h + l
    BN: tl.constexpr = o0.shape[0]
    WP: tl.constexpr = o0.shape[1]
    x = tl.reshape(x, (BN, WP // 4, 4, 2, 2, 2))  # [BN, a, c, e, l, h]
    return tl.reshape(tl.permute(x, (0, 1, 3, 2, 5, 4)), (BN, WP * 8))


@triton.jit
def mma_order(x, R: tl.constexpr, D: tl.constexpr, CPW: tl.constexpr):
    """Columns of x [R, D] from stream order to the MMA order of key tiles whose words hold CPW codes:
    stream column CPW w + 4t + r of word w = 4a + c goes to 4 CPW a + 16t + 4c + r, so a thread's 4
    operand columns of each 16 (a 16-bit dot operand, kWidth 4) are 4 codes of one word. The order of
    `mma_columns` (CPW 8); CPW 4 (8-bit words) is stream order itself."""
    T: tl.constexpr = CPW // 4
    return tl.reshape(tl.permute(tl.reshape(x, (R, D // (4 * CPW), 4, T, 4)), (0, 1, 3, 2, 4)), (R, D))


@triton.jit
def value_order(x, R: tl.constexpr, D: tl.constexpr, WARPS: tl.constexpr):
    """Columns of a value tile x [R, D] from stream order to the order in which a P V dot over WARPS
    warps (all along the output columns) hands them out: each warp takes every WARPS-th 8 columns and
    thread g of 8 column g of each, so stream columns S (8 w + g) + r (S = D / (8 WARPS)) go to
    8 (WARPS r + w) + g: a thread's columns are S neighbours of one stream row, which (S = 8 4-bit
    codes or 2 8-bit words) it loads whole. `value_stream_order` undoes it on the accumulator."""
    S: tl.constexpr = D // (8 * WARPS)
    return tl.reshape(tl.permute(tl.reshape(x, (R, WARPS, 8, S)), (0, 3, 1, 2)), (R, D))


@triton.jit
def value_stream_order(x, R: tl.constexpr, D: tl.constexpr, WARPS: tl.constexpr):
    """The inverse of `value_order`."""
    S: tl.constexpr = D // (8 * WARPS)
    return tl.reshape(tl.permute(tl.reshape(x, (R, S, WARPS, 8)), (0, 2, 3, 1)), (R, D))


@triton.jit
def stream_order(x, R: tl.constexpr, D: tl.constexpr):
    """Columns of x [R, D] from `dequant4_pairs`' order (column 8w + 2k + e holds stream column 8w + k + 4e)
    back to stream order."""
    return tl.reshape(tl.permute(tl.reshape(x, (R, D // 8, 4, 2)), (0, 1, 3, 2)), (R, D))


@triton.jit
def dequant4_words(words, s, b):
    """4-bit words [BN, WP] (int32) with per-word fp16 scale and bias [BN, WP] -> fp16 values
    [BN, WP * 8] in stream order. Each lane of the PTX reads its own word, so Triton may pair any two
    elements of a thread (dequant4_pairs' lanes assume the pair is one word twice): value tiles in
    `value_order` need that freedom."""
    o = tl.inline_asm_elementwise(
        DEQUANT4_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, s, b], dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    # out j holds code j of each word; joins put them in stream order 8w + j (j = 4a + 2b + c for the
    # inner, middle and outer join's index).
    x = tl.join(tl.join(tl.join(o[0], o[4]), tl.join(o[2], o[6])), tl.join(tl.join(o[1], o[5]), tl.join(o[3], o[7])))
    return tl.reshape(x, (words.shape[0], words.shape[1] * 8))


@triton.jit
def dequant8_words(words, s, b):
    """8-bit words [BN, WP] (int32) with per-word fp16 scale and bias [BN, WP] -> fp16 values
    [BN, WP * 4] in stream order (1024 + code is exact in fp16 up to 1023: the magic of the 4-bit path)."""
    o0, o1, o2, o3 = tl.inline_asm_elementwise(
        DEQUANT8_F16, "=r,=r,=r,=r,r,r,r,r", [words, s, b], dtype=(tl.float16,) * 4, is_pure=True, pack=2)
    # out k holds code k of each word; joins put them in stream order 4w + k (k = 2e0 + e1).
    x = tl.join(tl.join(o0, o2), tl.join(o1, o3))
    return tl.reshape(x, (words.shape[0], words.shape[1] * 4))
