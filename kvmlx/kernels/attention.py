"""Fused decode attention over a compressed cache (bodies SPLIT + REDUCE), and its dispatcher.

One query per sequence (Tq = 1): q [B, Hq, 1, D] over K/V `Fetched` views (kvmlx.store), quantized
(2/3/4/8 bits, token or channel axis, optionally rotated) or low rank (float or quantized
coefficients). The queries are scaled by scale * log2(e) and moved to K's stored space (rotate(q),
or q P: "rank space") with MLX ops; the split kernel reads the packed words in place (cache views
keep their strides), the reduce kernel merges the splits; the compressed rows' output is moved back
from V's stored space (unrotate, or (p C) P^T) with MLX ops. GQA: the G = Hq / Hkv query heads of a
KV head share one threadgroup, so K/V are read once and never repeated.

`decode_attention(q, k, v, scale, window)` has kvmlx.attention.KERNELS' signature: None where it
refuses (prefill, sliding windows, float tensors, shapes in `refusal`), else the output, by the
kernels once they checked themselves (kvmlx.kernels.selfcheck) or by the reference.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
import numpy as np

from kvspec.spec import KVSpec, LowRank, Quant
from kvspec.tolerances import assert_close, spec_tolerance

from .. import ops
from ..store import Fetched, TensorStore
from . import bodies, tensorcore
from .launch import Launch
from .selfcheck import SelfChecked

LOG2E = 1.4426950408889634
# Launch shape, chosen on the H200 (benchmarks/results/mlx_kernels_nvidia_h200-variants.json, int4 at
# batch 8 x 32k): 128-thread groups fit 2-3 per multiprocessor at the 150-220 registers a thread holds
# (16 dims, unroll 4, 128 threads: 0.45-0.50 ms; 16 dims, unroll 2, 256 threads: 0.54); 1,584 or 2,048
# groups instead of 528 made no difference beyond the run-to-run spread.
THREADS = 128
UNROLL = 4  # rows per thread whose loads are in flight together (see bodies.SPLIT's fetch)
DPT_SMALL_G, DPT_NARROW, DPT_LARGE_G = 16, 8, 4  # see dpt_for
TARGET_GROUPS = 528  # threadgroups to aim at (4 per multiprocessor of an H200)
MAX_GENERAL = 16


def _fmt(t) -> tuple[int, int, int]:
    """(bits, or 16 for float coefficients; group; channel axis) of a tensor spec."""
    q = t if isinstance(t, Quant) else t.coeff
    return (16, 1, 0) if q is None else (q.bits, q.group, int(q.axis == "channel"))


def _width(t, d: int) -> int:
    return t.rank if isinstance(t, LowRank) else d


def dpt_for(g: int, width: int) -> int:
    """Dims per thread for G query heads per KV head over stored rows of `width` (K's or V's, the
    wider). A thread keeps G x DPT query values and as many accumulators in registers. H200, int4,
    batch 8 x 32k, Mistral heads (benchmarks/results/mlx_kernels_nvidia_h200*.json): 16 dims 0.45-0.48
    ms, 8 dims 0.51-0.55; rank-32 rows the other way round (0.33-0.38 at 8, 0.39-0.43 at 16)."""
    if g > 4:
        return DPT_LARGE_G
    return DPT_SMALL_G if width >= 128 else DPT_NARROW


def threads_per_row(d: int, dpt: int, kw: int, vw: int, general: bool) -> int:
    """Threads reading one key row. Fast splits cover the stored width only (a rank-32 row takes 32 /
    DPT threads, not D / DPT); general splits also read float rows of D. Powers of two only: the
    score is reduced by butterfly shuffles."""
    tpr = (d if general else max(kw, vw)) // dpt
    return tpr if tpr & (tpr - 1) == 0 else d // dpt


def refusal(q: mx.array, k: Fetched, v: Fetched, window: int | None) -> str | None:
    """Why the decode kernel does not take this call (None: it does)."""
    b, hq, tq, d = q.shape
    hkv = k.floats.shape[1]
    if tq != 1 or k.tokens - k.q_start != 1:
        return "prefill (more than one query per sequence) runs on the reference"
    if window is not None:
        return "sliding-window layers run on the reference"
    if not all(isinstance(t.spec, (Quant, LowRank)) for t in (k, v)):
        return "float tensors run on the reference"
    if d not in (32, 64, 128, 256) or hq % hkv or hq // hkv > 16:
        return f"head dim {d} with {hq} query heads over {hkv} KV heads"
    dpt = dpt_for(hq // hkv, max(_width(k.spec, d), _width(v.spec, d)))
    for name, t in (("K", k), ("V", v)):
        bits, group, chan = _fmt(t.spec)
        if _width(t.spec, d) % dpt or (bits != 16 and not chan and group % dpt):
            return f"{name}: rows of {_width(t.spec, d)} or groups of {group} do not split into {dpt}-dim slices"
        if chan and isinstance(t.spec, LowRank):
            return f"{name}: channel-axis coefficients"
        if t.n and t.float_start > t.n:
            return f"{name}: float rows start after the compressed ones"
        if any(a.size < 8 for a in t.compressed.values()):
            return f"{name}: compressed arrays too small for the kernel"
    if k.floats.dtype not in (mx.float16, mx.bfloat16) or v.floats.dtype != k.floats.dtype:
        return f"float tails of {k.floats.dtype} / {v.floats.dtype}"
    return None


def _dummy(dtype) -> mx.array:
    return mx.zeros((1, 1, 1, 8), dtype)


def _tensor_inputs(t: Fetched, prefix: str, dtype) -> dict[str, mx.array]:
    """c (codes or coefficients), s, b (scales, biases) and f (float rows) of one tensor."""
    c = t.compressed
    code = c.get("codes", c.get("coeffs")) if t.n else None
    return {
        f"{prefix}c": code if code is not None else _dummy(mx.uint32 if _fmt(t.spec)[0] != 16 else dtype),
        f"{prefix}s": c["scales"] if t.n and "scales" in c else _dummy(mx.float16),
        f"{prefix}b": c["biases"] if t.n and "biases" in c else _dummy(mx.float16),
        f"{prefix}f": t.floats if t.floats.shape[2] else _dummy(dtype),
    }


def _splits(rows: int, granule: int, bh: int, cap: int) -> tuple[int, int]:
    """(splits, rows per split) covering `rows` in whole granules, aiming at TARGET_GROUPS threadgroups."""
    if rows <= 0:
        return 0, granule
    want = max(1, min(cap, -(-TARGET_GROUPS // bh), -(-rows // granule)))
    per_split = -(-rows // want)
    chunk = -(-per_split // granule) * granule
    return -(-rows // chunk), chunk


def tensor_cores(dialect: str | None, k: Fetched, v: Fetched, d: int, g: int) -> bool:
    """Whether the fast splits run on matrix units (tensorcore.TC_SPLIT): CUDA dialect, a
    configuration it takes, and KVMLX_TENSOR_CORES not "off"."""
    if dialect != "cuda" or os.environ.get("KVMLX_TENSOR_CORES", "on").lower() in ("0", "off", "false", "no"):
        return False
    return tensorcore.refusal(k.spec, v.spec, d, g, _dtype_name(k.floats.dtype)) is None


def _dtype_name(dtype) -> str:
    return "fp16" if dtype == mx.float16 else "bf16"


def split_launches(q: mx.array, k: Fetched, v: Fetched, scale: float,
                   dialect: str | None = None) -> tuple[Launch, Launch, dict]:
    """The fast and general split launches of one decode call, plus what the reduce needs.
    q [B, Hq, 1, D]; inputs must pass `refusal`. A launch with 0 splits is not run. In the CUDA
    dialect the fast splits of configurations tensorcore.refusal takes run TC_SPLIT."""
    b, hq, _, d = q.shape
    hkv = k.floats.shape[1]
    g = hq // hkv
    kw, vw = _width(k.spec, d), _width(v.spec, d)
    dpt = dpt_for(g, max(kw, vw))
    dtype = k.floats.dtype
    # The kernels scale q themselves (qmul) and read it through its strides, so plain keys need no
    # op on q (the reshape drops the size-1 query axis: a view). Rotation and projection are linear.
    qf = q.reshape(b, hq, d)
    qc = qf
    if isinstance(k.spec, Quant) and k.spec.rotation is not None:
        qc = ops.rotate(qf.astype(mx.float32), k.spec.rotation)
    elif isinstance(k.spec, LowRank):
        qc = ops.project(qf.astype(mx.float32).reshape(b, hkv, g, d), k.basis).reshape(b, hq, kw)
    gen_lo = min(k.n, v.n)
    tpr = {gen: threads_per_row(d, dpt, kw, vw, bool(gen)) for gen in (0, 1)}
    granule = {gen: THREADS // tpr[gen] * UNROLL for gen in (0, 1)}
    tc = tensor_cores(dialect, k, v, d, g)
    if tc:
        granule[0] = 16 * tensorcore.WARPS * tensorcore.tiles_for(d)
    s_fast, c_fast = _splits(gen_lo, granule[0], b * hkv, 1 << 16)
    s_gen, c_gen = _splits(k.tokens - gen_lo, granule[1], b * hkv, MAX_GENERAL)
    qmul = int(np.array(scale * LOG2E, np.float32).view(np.int32))
    params = mx.array([k.n, v.n, k.float_start, v.float_start, k.tokens, c_fast, c_gen, gen_lo, s_fast, s_gen, hkv, qmul],
                      mx.int32)
    inputs = {"params": params, "qc": qc, "qf": qf, **_tensor_inputs(k, "k", dtype), **_tensor_inputs(v, "v", dtype)}
    kb, kgr, kch = _fmt(k.spec)
    vb, vgr, vch = _fmt(v.spec)
    launches = []
    for gen, splits in ((0, s_fast), (1, s_gen)):
        n_out = b * hkv * max(splits, 1) * g
        outputs = {"pm": ((n_out,), mx.float32), "pl": ((n_out,), mx.float32), "pc": ((n_out * vw,), mx.float32),
                   "pf": ((n_out * d if gen else 1,), mx.float32)}
        template = [("T", dtype), ("D", d), ("G", g), ("DPT", dpt), ("TPR", tpr[gen]), ("NT", THREADS),
                    ("U", UNROLL), ("GEN", gen), ("KB", kb), ("KW", kw), ("KGR", kgr), ("KCH", kch), ("VB", vb),
                    ("VW", vw), ("VGR", vgr), ("VCH", vch)]
        if tc and not gen:
            nt = 32 * tensorcore.WARPS
            mt = ops.float_dtype(tensorcore.mma_dtype(k.spec, v.spec, _dtype_name(dtype)))
            tc_template = [("T", dtype), ("MT", mt), ("D", d), ("G", g), ("NW", tensorcore.WARPS),
                           ("UT", tensorcore.tiles_for(d)), ("PF", int(tensorcore.prefetch_for(d))), ("KB", kb),
                           ("KCH", kch), ("KGR", kgr), ("VB", vb), ("VGR", vgr)]
            launches.append(Launch("kvmlx_split_tc", tensorcore.TC_SPLIT, inputs, outputs, tc_template,
                                   grid=(max(splits, 1) * nt, b * hkv, 1), threadgroup=(nt, 1, 1)))
            continue
        launches.append(Launch("kvmlx_split", bodies.SPLIT, inputs, outputs, template,
                               grid=(max(splits, 1) * THREADS, b * hkv, 1), threadgroup=(THREADS, 1, 1)))
    plain = isinstance(v.spec, Quant) and v.spec.rotation is None
    meta = {"splits": (s_fast, s_gen), "shape": (b, hq, d), "vw": vw, "g": g, "plain": plain, "dtype": q.dtype}
    return launches[0], launches[1], meta


def reduce_launch(fast: dict[str, mx.array], general: dict[str, mx.array], meta: dict) -> Launch:
    """Merge the splits' outputs (`Launch.run` dicts of the split launches; unused ones may be any
    float32 arrays of 8+ elements) into out [B, Hq, 1, D] (in q's dtype when V is plain, else fp32
    plus outc [B, Hq, VW])."""
    b, hq, d = meta["shape"]
    vw, plain = meta["vw"], meta["plain"]
    s_fast, s_gen = meta["splits"]
    params = mx.array([s_fast, s_gen, meta["g"]], mx.int32)
    inputs = {"params": params, "pm": fast["pm"], "pl": fast["pl"], "pc": fast["pc"],
              "gm": general["pm"], "gl": general["pl"], "gc": general["pc"], "gf": general["pf"]}
    out_dtype = meta["dtype"] if plain else mx.float32
    outputs = {"out": ((b, hq, 1, d), out_dtype), "outc": ((1,) if plain else (b, hq, vw), mx.float32)}
    return Launch("kvmlx_reduce", bodies.REDUCE, inputs, outputs,
                  [("D", d), ("VW", vw), ("VPLAIN", int(plain)), ("OT", out_dtype)],
                  grid=(d, b * hq, 1), threadgroup=(d, 1, 1))


_EMPTY = {name: mx.zeros((8,), mx.float32) for name in ("pm", "pl", "pc", "pf")}


def run_decode(dialect: str, q: mx.array, k: Fetched, v: Fetched, scale: float) -> mx.array:
    """The kernels' output [B, Hq, 1, D] in q's dtype (inputs must pass `refusal`)."""
    fast, general, meta = split_launches(q, k, v, scale, dialect)
    s_fast, s_gen = meta["splits"]
    parts = [launch.run(dialect) if splits else _EMPTY for launch, splits in ((fast, s_fast), (general, s_gen))]
    out = reduce_launch(*parts, meta).run(dialect)
    if meta["plain"]:
        return out["out"]
    b, hq, d = meta["shape"]
    c = out["outc"]
    if isinstance(v.spec, Quant):
        c = ops.unrotate(c, v.spec.rotation)
    else:
        c = ops.reconstruct(c.reshape(b, hq // meta["g"], meta["g"], -1), v.basis).reshape(b, hq, d)
    return (out["out"] + c.reshape(b, hq, 1, d)).astype(q.dtype)


# --- the dispatcher -------------------------------------------------------------------------------


def _probe(key: tuple):
    """A decode step of the same configuration: 2 sequences, a float tail of 5 tokens, odd lengths,
    a constant stretch and an outlier channel; random orthonormal bases for low-rank tensors."""
    kspec, vspec, d, g, hkv, dtype = key
    rng = np.random.default_rng(d * 7 + g)
    group = max([t.group for t in (kspec, vspec) if isinstance(t, Quant)] + [16])
    tokens = 3 * group + 9
    fetched = []
    for t in (kspec, vspec):
        x = rng.standard_normal((2, hkv, tokens, d)).astype(np.float32)
        x[0, 0, 3:20] = 0.5
        x[1, :, :, 5] *= 30.0
        basis = None
        if isinstance(t, LowRank):
            basis = mx.array(np.linalg.qr(rng.standard_normal((hkv, d, t.rank)))[0].astype(np.float32))
        store = TensorStore(t, 5, dtype, basis)
        store.append(mx.array(x[:, :, :-1]))
        fetched.append(store.append(mx.array(x[:, :, -1:])))
    q = mx.array(rng.standard_normal((2, hkv * g, 1, d)).astype(np.float32)).astype(ops.float_dtype(dtype))
    return q, fetched[0], fetched[1], 1.0 / math.sqrt(d)


def _reference(key, q, k, v, scale):
    from ..attention import reference_attention

    return reference_attention(q, k, v, scale)


def _kernel(dialect, key, q, k, v, scale):
    return run_decode(dialect, q, k, v, scale)


def _compare(key, got: mx.array, want: mx.array) -> str | None:
    kspec, vspec, *_, dtype = key
    try:
        assert_close(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)),
                     spec_tolerance(KVSpec(k=kspec, v=vspec), dtype), "decode output")
    except AssertionError as e:
        return str(e)
    return None


CHECKED = SelfChecked("decode_attention", _kernel, _reference, _probe, _compare)


def decode_attention(q: mx.array, k: Fetched, v: Fetched, scale: float, window: int | None = None) -> mx.array | None:
    """kvmlx.attention.KERNELS entry: None where `refusal` says no, else the (checked) kernels' output."""
    if refusal(q, k, v, window) is not None:
        return None
    key = (k.spec, v.spec, q.shape[-1], q.shape[1] // k.floats.shape[1], k.floats.shape[1], _dtype_name(k.floats.dtype))
    return CHECKED(key, q, k, v, scale)
