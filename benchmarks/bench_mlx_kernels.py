"""kvmlx's MLX custom kernels on a GPU (MLX's CUDA build on an H200; Metal on a Mac): verify, then time.

Sets KVMLX_KERNELS=on, so a Mac runs the Metal dialect too (by default only the CUDA dialect runs).
0. Isolate (CUDA): quantize, the fast and general split launches and the reduce each run once alone
   in a child process with a timeout; if a decode kernel fails or hangs there, steps 1-2 leave the
   decode kernels out and say so (the 2026-11-29 H200 runs stalled in the first decode self-check).
1. Verify: for each spec and shape, K/V from fresh random inputs (odd lengths, constant stretches,
   an outlier channel) go through a kvmlx cache on the GPU (quantize kernel): codes, scales, biases
   must equal kvspec.reference.compress bit for bit; one decode step through kvmlx.attention
   (fused decode kernel) must match kvspec.reference.attend (float64) and, where torch+CUDA+triton
   are present, kvtorch's Triton kernel on the same stored arrays, within kvspec.tolerances. Every
   kernel fallback (kvmlx.kernels self-check) is reported; the run says "fallbacks: 0" when none.
2. Time one decode step (Tq = 1) at Mistral-7B's shape (32 q / 8 kv heads, D 128) batch 8 x 32k and
   1 x 4k, and SmolLM2-135M (9/3, D 64) and Qwen2.5-0.5B (14/2, D 64) at batch 8 x 32k: kvmlx int8 /
   int4 / int2 / rank32 vs mx.fast.scaled_dot_product_attention bf16 vs mlx-lm's quantized path
   (two mx.quantized_matmul, as mlx_lm.models.base.quantized_scaled_dot_product_attention) vs
   kvtorch Triton. MLX times: median over reps of (mx.eval of CALLS independent calls, then
   mx.synchronize) / CALLS, after warm-up; torch times: CUDA events, median. Bytes count every
   input read once and the output written once; "roof" is those bytes at 4.19 TB/s (DEVICE.md).

    PYTHONPATH=. python benchmarks/bench_mlx_kernels.py [--skip-verify] [--variants fma,tc8x1,16x2x256]
(--variants adds rows kvmlx-<method>@<variant> next to the defaults: "fma" runs the FMA split body
where the tensor-core body (kvmlx.kernels.tensorcore, CUDA, 2/4/8-bit) would; "tcWxU" the
tensor-core body at W warps and U tiles per step ("tcWxUp": the next step's tiles prefetched);
"<dims per thread>x<unroll>x<threads>[x<target groups>]" the FMA body at those launch parameters
instead of kvmlx.kernels.attention's defaults.)
Writes benchmarks/results/mlx_kernels_<gpu>.json (and $OUT/ when OUT is set). A kernel that fails to
compile is printed in full with its generated source written next to the JSON; the rest still runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvmlx.attention import KERNELS as kattn_registry  # noqa: E402
from kvmlx.attention import compressed_attention  # noqa: E402
from kvmlx.kernels import attention as kattn  # noqa: E402
from kvmlx.kernels import quantize as kquant  # noqa: E402
from kvmlx.kernels import selfcheck, tensorcore  # noqa: E402
from kvmlx.store import Fetched, TensorStore  # noqa: E402
from kvspec import reference as R  # noqa: E402
from kvspec.grammar import parse  # noqa: E402
from kvspec.spec import LowRank, Quant  # noqa: E402
from kvspec.tolerances import Tol, assert_close, spec_tolerance  # noqa: E402

COPY_TBS = 4.19
VERIFY_SPECS = ["int2", "int3", "int4", "int8", "int4-kchan-res16", "int4-rot", "k8v4", "int4-g32", "rank32", "rank32-q4"]
VERIFY_SHAPES = [(2, 8, 2, 128, 1037, "bf16"), (1, 9, 3, 64, 777, "fp16"), (2, 14, 2, 64, 301, "bf16"),
                 (1, 4, 1, 256, 555, "bf16")]  # the last: Gemma-3 heads (D 256)
TIME_SHAPES = [("mistral-7b", 8, 32768, 32, 8, 128), ("mistral-7b", 1, 4096, 32, 8, 128),
               ("smollm2-135m", 8, 32768, 9, 3, 64), ("qwen2.5-0.5b", 8, 32768, 14, 2, 64)]
TIME_METHODS = ["mlx-sdpa-bf16", "mlxlm-quant4", "kvmlx-int8", "kvmlx-int4", "kvmlx-int2", "kvmlx-rank32",
                "triton-int4", "triton-int8", "triton-int2", "triton-rank32"]
OUT_DIR = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(msg, flush=True)


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:
        return mx.device_info().get("device_name", platform.processor())


def dump_sources(tag: str) -> None:
    """Write the CUDA/Metal translation units of a failing configuration, for the report."""
    dialect = selfcheck.current_dialect() or "cuda"
    try:
        s = parse(tag)
        q, k, v, scale = kattn._probe((s.k, s.v, 128, 4, 2, "bf16"))
        fast, general, meta = kattn.split_launches(q, k, v, scale, dialect)
        outs = {n: mx.zeros(shape, dt) for n, (shape, dt) in fast.outputs.items()}
        for i, launch in enumerate((fast, general, kattn.reduce_launch(outs, outs, meta))):
            path = OUT_DIR / f"mlx_kernel_source_{tag}_{i}.{'cu' if dialect == 'cuda' else 'metal'}"
            path.write_text(launch.translation_unit(dialect))
            log(f"  generated source: {path}")
    except Exception as e:
        log(f"  (could not write the generated source: {e})")


# --- 0. isolation: each kernel alone, in a child process with a timeout ----------------------------

# One launch of one kernel on inputs built by the MLX ops path (kernels off while building), so a
# kernel that never finishes is named instead of stalling the whole run (the H200 runs of 2026-11-29
# stalled in the first decode self-check).
_CHILD = """
import os, sys
os.environ["KVMLX_KERNELS"] = "off"
sys.path.insert(0, os.getcwd())
import mlx.core as mx
mx.set_default_device(mx.gpu)
from kvspec import parse
from kvmlx.kernels import attention as ka, quantize as kq
which, spec = sys.argv[1], parse(sys.argv[2])
if which == "quantize":
    out = kq.quantize_launch(mx.random.normal((1, 2, 64, 128)).astype(mx.bfloat16), 4, 64, "token").run("cuda")
else:
    q, k, v, scale = ka._probe((spec.k, spec.v, 128, 4, 2, "bf16"))
    mx.eval(q, k.floats, v.floats, *k.compressed.values(), *v.compressed.values())
    fast, general, meta = ka.split_launches(q, k, v, scale, "cuda")
    if which == "reduce":
        zeros = {n: mx.zeros(shape, dt) for n, (shape, dt) in fast.outputs.items()}
        out = ka.reduce_launch(zeros, {n: mx.zeros(shape, dt) for n, (shape, dt) in general.outputs.items()}, meta).run("cuda")
    else:
        out = (fast if which == "split-fast" else general).run("cuda")
mx.eval(list(out.values()))
print("finished")
"""
ISOLATE = [("quantize", "int4"), ("split-fast", "int4"), ("split-general", "int4-res16"), ("reduce", "int4")]


def isolate(timeout_s: float) -> dict[str, str]:
    """kernel -> "ok", "timeout after N s" or the error, each run alone in a fresh process."""
    root = Path(__file__).resolve().parents[1]
    out = {}
    for which, spec in ISOLATE:
        try:
            r = subprocess.run([sys.executable, "-c", _CHILD, which, spec], cwd=root, capture_output=True,
                               text=True, timeout=timeout_s)
            out[which] = "ok" if "finished" in r.stdout else f"rc {r.returncode}: {r.stderr.strip()[-600:]}"
        except subprocess.TimeoutExpired:
            out[which] = f"timeout after {timeout_s:.0f} s"
        log(f"isolate {which:14s} ({spec}): {out[which]}")
    return out


# --- 1. verification ------------------------------------------------------------------------------


def hard(rng, b, h, t, d) -> np.ndarray:
    x = rng.standard_normal((b, h, t, d)).astype(np.float32)
    x[0, 0, 5:80] = 0.625  # constant groups on both axes
    x[-1, -1, :, 3] *= 40.0  # outlier channel
    return x


def verify_one(spec_str: str, shape, torch_mod) -> dict:
    b, hq, hkv, d, t, fdt = shape
    spec = parse(f"{spec_str}-{fdt}")
    rng = np.random.default_rng(hash((spec_str, shape)) % 2**32)
    xk, xv = hard(rng, b, hkv, t, d), hard(rng, b, hkv, t, d)
    bases = {w: np.linalg.qr(rng.standard_normal((hkv, d, ts.rank)))[0].astype(np.float32)
             for w, ts in (("k", spec.k), ("v", spec.v)) if isinstance(ts, LowRank)}
    q = rng.standard_normal((b, hq, 1, d)).astype(np.float32)
    res = {"spec": spec_str, "shape": list(shape)}
    fetched = []
    for w, x, ts in (("k", xk, spec.k), ("v", xv, spec.v)):
        store = TensorStore(ts, spec.residual, spec.float_dtype, mx.array(bases[w]) if w in bases else None)
        store.append(mx.array(x[:, :, : t - 1]))
        fetched.append(store.append(mx.array(x[:, :, t - 1 :])))
        want = R.compress(x, ts, spec.residual, spec.float_dtype, bases.get(w))
        for name, arr in store.compressed().items():
            if name != "coeffs":  # coefficients are projections (one-ulp differences allowed)
                why = selfcheck.bits_equal(arr, mx.array(getattr(want.quant, name)))
                # Hybrid codes quantize those projections, so a few may land one step apart; as in
                # tests/conformance they are checked through attention (vs_kvspec), not bit for bit.
                note = " (hybrid: not required)" if why and isinstance(ts, LowRank) else ""
                res[f"{w}_{name}"] = (why or "bit-exact") + note
    qm = mx.array(q).astype(fetched[0].floats.dtype)
    scale = 1.0 / math.sqrt(d)
    got = np.array(compressed_attention(qm, fetched[0], fetched[1], scale).astype(mx.float32))
    ks = R.compress(xk, spec.k, spec.residual, spec.float_dtype, bases.get("k"))
    vs = R.compress(xv, spec.v, spec.residual, spec.float_dtype, bases.get("v"))
    want = R.attend(np.array(qm.astype(mx.float32)), ks, vs, np.array([t - 1]), scale=scale, space="compressed")
    tol = spec_tolerance(spec, spec.float_dtype)
    try:
        assert_close(got, want, tol, "kvmlx vs kvspec")
        res["vs_kvspec"] = "ok"
    except AssertionError as e:
        res["vs_kvspec"] = str(e)
    if torch_mod is not None:
        res["vs_triton"] = triton_compare(torch_mod, qm, fetched, scale, got, want, tol)
    return res


def triton_compare(torch, qm, fetched, scale, got, want, tol) -> str:
    """kvtorch's Triton kernel on the same stored arrays (codes as int32 bits): within `tol` of the
    kvspec reference `want`, as kvmlx's `got` must be, hence within twice `tol` of `got`."""
    try:
        from benchmarks.bench_decode_attention import Part
        from kvtorch.kernels.attention import attend

        parts = []
        for f in fetched:
            arrays = {}
            for name, a in f.compressed.items():
                arr = np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)
                tt = torch.from_numpy(arr.view(np.int32) if arr.dtype == np.uint32 else arr).cuda()
                arrays[name] = tt.bfloat16() if a.dtype == mx.bfloat16 else tt
            floats = torch.from_numpy(np.array(f.floats.astype(mx.float32))).cuda().to(
                torch.bfloat16 if f.floats.dtype == mx.bfloat16 else torch.float16)
            basis = None if f.basis is None else torch.from_numpy(np.array(f.basis)).cuda()
            parts.append(Part(f.spec, f.n, arrays, basis, floats, f.float_start, torch.tensor(f.split).cuda()))
        qt = torch.from_numpy(np.array(qm.astype(mx.float32))).cuda().to(parts[0].floats.dtype)
        out = attend(qt, torch.tensor([fetched[0].tokens - 1]).cuda(), parts[0], parts[1], scale=scale).float().cpu().numpy()
        assert_close(out, want, tol, "kvtorch Triton vs kvspec")
        assert_close(got, out, Tol(2 * tol.atol, 2 * tol.rtol), "kvmlx vs kvtorch Triton")
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


# --- 2. timing ------------------------------------------------------------------------------------


def mlx_time(fn, reps: int = 15, calls: int = 10) -> float:
    """Median ms per call (see module docstring)."""
    for _ in range(3):
        mx.eval(fn())
    mx.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(calls)])
        mx.synchronize()
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def decode_fetched(method: str, b: int, t: int, hkv: int, d: int):
    """Random stored arrays of one decode step, contiguous, in the state kvmlx.store hands attention
    after appending the newest token with no residual window: all t tokens compressed (the newest
    too: its query's split is n_quantized(t) = t) and an empty float tail, so no general split runs
    (as in kvtorch's decode, which bench_decode_attention times). Until 2026-11-29 evening the newest
    token sat in a float tail here, which added a general split that real decode never launches."""
    floats = mx.zeros((b, hkv, 0, d), mx.bfloat16)
    if method == "rank32":
        basis = mx.linalg.qr(mx.random.normal((hkv, d, d)), stream=mx.cpu)[0][..., :32]
        comp = {"coeffs": mx.random.normal((b, hkv, t, 32)).astype(mx.bfloat16)}
        spec = LowRank(rank=32, basis="random")
    else:
        bits = int(method[3:])
        comp = {"codes": mx.random.randint(0, 2**30, (b, hkv, t, d * bits // 32)).astype(mx.uint32),
                "scales": (mx.random.uniform(shape=(b, hkv, t, d // 64)) * 0.5 / (2**bits - 1) + 1e-3).astype(mx.float16),
                "biases": (mx.random.uniform(shape=(b, hkv, t, d // 64)) - 0.75).astype(mx.float16)}
        spec, basis = Quant(bits=bits), None
    f = Fetched(spec, d, t, comp, basis, t, floats, t - 1, t, np.array([t]))
    mx.eval(f.floats, *comp.values(), *([basis] if basis is not None else []))
    return f


def nbytes(*arrays) -> int:
    return sum(a.nbytes for a in arrays if a is not None)


def time_shape(model, b, t, hq, hkv, d, torch_mod) -> list[dict]:
    rows = []
    q = mx.random.normal((b, hq, 1, d)).astype(mx.bfloat16)
    scale = 1.0 / math.sqrt(d)
    g = hq // hkv
    for method in TIME_METHODS:
        row = {"model": model, "batch": b, "context": t, "method": method}
        try:
            if method == "mlx-sdpa-bf16":
                k, v = (mx.random.normal((b, hkv, t, d)).astype(mx.bfloat16) for _ in range(2))
                mx.eval(k, v)
                row["ms"] = mlx_time(lambda k=k, v=v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale))
                row["bytes"] = nbytes(q, k, v, q)
                del k, v
            elif method == "mlxlm-quant4":
                kq = mx.quantize(mx.random.normal((b, hkv, t, d)).astype(mx.bfloat16), group_size=64, bits=4)
                vq = mx.quantize(mx.random.normal((b, hkv, t, d)).astype(mx.bfloat16), group_size=64, bits=4)
                mx.eval(kq, vq)

                def mlxlm(kq=kq, vq=vq):  # mlx_lm.models.base.quantized_scaled_dot_product_attention
                    qg = (q * scale).reshape(b, hkv, g, 1, d)
                    kk = tuple(a[:, :, None] for a in kq)
                    vv = tuple(a[:, :, None] for a in vq)
                    s = mx.quantized_matmul(qg, *kk, transpose=True, group_size=64, bits=4)
                    p = mx.softmax(s, axis=-1, precise=True)
                    return mx.quantized_matmul(p, *vv, transpose=False, group_size=64, bits=4).reshape(b, hq, 1, d)

                row["ms"] = mlx_time(mlxlm)
                row["bytes"] = nbytes(q, *kq, *vq, q)
            elif method.startswith("kvmlx-"):
                if kattn.decode_attention not in kattn_registry:
                    raise RuntimeError("decode kernels failed in isolation (see 'isolated')")
                # "kvmlx-int4@8x4x128x2048": the FMA split body at 8 dims per thread, unroll 4, 128 threads,
                # aiming at 2048 groups, instead of kattn's defaults (dpt_for, UNROLL, THREADS, TARGET_GROUPS);
                # "@fma": the FMA body at its defaults; "@tc8x1": the tensor-core body at 8 warps, 1 tile per step.
                spec_name, _, variant = method[6:].partition("@")
                kf, vf = decode_fetched(spec_name, b, t, hkv, d), decode_fetched(spec_name, b, t, hkv, d)
                defaults = (kattn.dpt_for, kattn.UNROLL, kattn.THREADS, kattn.TARGET_GROUPS)
                tc_defaults = (tensorcore.WARPS, tensorcore.TILES, tensorcore.PREFETCH)
                if variant.startswith("tc"):  # tcWxU, or tcWxUp: with the next step's tiles prefetched
                    tensorcore.WARPS, tensorcore.TILES = map(int, variant[2:].rstrip("p").split("x"))
                    tensorcore.PREFETCH = variant.endswith("p")
                elif variant:
                    os.environ["KVMLX_TENSOR_CORES"] = "off"
                if variant and variant[0].isdigit():
                    given = list(map(int, variant.split("x")))
                    dpt, unroll, threads, groups = given + [defaults[1], defaults[2], defaults[3]][len(given) - 1:]
                    kattn.dpt_for = lambda g, width, dpt=dpt: dpt
                    kattn.UNROLL, kattn.THREADS, kattn.TARGET_GROUPS = unroll, threads, groups
                try:
                    if kattn.refusal(q, kf, vf, None):
                        raise RuntimeError(kattn.refusal(q, kf, vf, None))
                    dialect = selfcheck.current_dialect()
                    row["ms"] = mlx_time(lambda kf=kf, vf=vf, dialect=dialect: kattn.run_decode(dialect, q, kf, vf, scale))
                    # Each launch alone (inputs prepared once), to attribute the whole call: the fast
                    # split (the bytes), the general split (the float tail) and the reduce.
                    fast, general, meta = kattn.split_launches(q, kf, vf, scale, dialect)
                    has_general = meta["splits"][1] > 0  # a float tail: none in decode_fetched's state
                    reduce = kattn.reduce_launch(fast.run(dialect), general.run(dialect) if has_general else kattn._EMPTY,
                                                 meta)
                    launches = [("split", fast), ("reduce", reduce)] + [("general", general)] * has_general
                    for part, launch in launches:
                        row[f"{part}_ms"] = mlx_time(lambda launch=launch, dialect=dialect:
                                                     list(launch.run(dialect).values())[0])
                finally:
                    kattn.dpt_for, kattn.UNROLL, kattn.THREADS, kattn.TARGET_GROUPS = defaults
                    tensorcore.WARPS, tensorcore.TILES, tensorcore.PREFETCH = tc_defaults
                    os.environ.pop("KVMLX_TENSOR_CORES", None)
                row["bytes"] = nbytes(q, q, *(a for f in (kf, vf) for a in (*f.compressed.values(), f.floats)))
            elif torch_mod is not None:
                row.update(triton_time(torch_mod, method[7:], b, t, hq, hkv, d))
            else:
                continue
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            log(f"{model} b{b} x {t} {method}: {row['error']}")
            traceback.print_exc()
            if method.startswith("kvmlx-"):
                dump_sources(method[6:].partition("@")[0])
        if "ms" in row:
            row["tb_s"] = row["bytes"] / row["ms"] / 1e9
            row["roof_ms"] = row["bytes"] / (COPY_TBS * 1e9)
        rows.append(row)
        for part in ("split", "general", "reduce"):
            if f"{part}_ms" in row:
                rows.append({**row, "method": f"{method}:{part}", "ms": row[f"{part}_ms"],
                             "tb_s": row["bytes"] / row[f"{part}_ms"] / 1e9})
        mx.clear_cache()
    sdpa = next((r["ms"] for r in rows if r["method"] == "mlx-sdpa-bf16" and "ms" in r), None)
    for r in rows:
        if sdpa and "ms" in r:
            r["speedup_vs_mlx_sdpa"] = sdpa / r["ms"]
    return rows


def triton_time(torch, method: str, b, t, hq, hkv, d) -> dict:
    from benchmarks.bench_decode_attention import compressed_part, part_bytes
    from kvtorch.kernels.attention import attend

    gen = torch.Generator(device="cuda").manual_seed(0)
    kp, vp = compressed_part(method, b, hkv, t, d, gen), compressed_part(method, b, hkv, t, d, gen)
    qt = torch.randn(b, hq, 1, d, device="cuda", generator=gen).bfloat16()
    pos = torch.tensor([t - 1], device="cuda")
    fn = lambda kp=kp, vp=vp: attend(qt, pos, kp, vp, scale=1.0 / math.sqrt(d))  # noqa: E731
    for _ in range(3):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(20)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    out = {"ms": statistics.median(s.elapsed_time(e) for s, e in ev), "bytes": part_bytes(kp) + part_bytes(vp) + 2 * qt.numel() * 2}
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=200, help="start no new timing shape after this many seconds")
    ap.add_argument("--isolate-timeout-s", type=float, default=60, help="limit for each kernel's isolated run")
    ap.add_argument("--variants", default="", help="also time the kvmlx kernels at these FMA-body dims per thread "
                    "x unroll x threads per group x target groups, e.g. 16x2x256,8x4x128x2048 (a shorter form keeps "
                    "the defaults of the rest), 'fma' (the FMA body at its defaults), or tensor-core warps x tiles "
                    "per step, e.g. tc8x1")
    ap.add_argument("--skip-verify", action="store_true", help="time only (verification takes ~250 s on an H200)")
    ap.add_argument("--verify-specs", default=",".join(VERIFY_SPECS), help="specs to verify, comma-separated")
    args = ap.parse_args()
    budget = args.budget_s
    for variant in filter(None, args.variants.split(",")):
        methods = ("int4",) if variant[0].isalpha() else ("int8", "int4", "int2", "rank32")  # tc / fma: 4-bit only
        TIME_METHODS.extend(f"kvmlx-{m}@{variant}" for m in methods)
    os.environ.setdefault("KVMLX_KERNELS", "on")  # Metal runs only when switched on; this script is its check
    t_start = time.time()
    if selfcheck.refusal() is None or "default device" in (selfcheck.refusal() or ""):
        mx.set_default_device(mx.gpu)
    try:
        import torch

        torch_mod = torch if torch.cuda.is_available() else None
    except ImportError:
        torch_mod = None
    meta = {"gpu": gpu_name(), "mlx": mx.__version__, "dialect": selfcheck.current_dialect(),
            "kernels_refusal": selfcheck.refusal(), "python": platform.python_version(),
            "torch": getattr(torch_mod, "__version__", None), "command": " ".join([sys.executable, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    log(json.dumps(meta))
    isolated = isolate(args.isolate_timeout_s) if meta["dialect"] == "cuda" else {}
    if any(v != "ok" for k, v in isolated.items() if k != "quantize"):
        # A decode kernel that hangs would stall every check after it: verify and time without them.
        kattn_registry.remove(kattn.decode_attention)
        log("decode kernels failed in isolation: verifying quantize only, timing baselines only")
    verify = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for shape in [] if args.skip_verify else VERIFY_SHAPES:
            for spec in args.verify_specs.split(","):
                try:
                    r = verify_one(spec, shape, torch_mod)
                except Exception as e:
                    r = {"spec": spec, "shape": list(shape), "error": f"{type(e).__name__}: {e}"}
                    traceback.print_exc()
                verify.append(r)
                log(f"verify {spec:18s} {shape}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("spec", "shape")))
    fallbacks = {f"{k}": v for c in (kattn.CHECKED, kquant.CHECKED) for k, v in c.fallbacks().items()}
    fallbacks.update({f"warning {i}": str(w.message) for i, w in enumerate(caught)
                      if issubclass(w.category, selfcheck.KernelFallback)})
    log(f"fallbacks: {len(kattn.CHECKED.fallbacks()) + len(kquant.CHECKED.fallbacks())}")
    for k, v in fallbacks.items():
        log(f"  {k}: {v}")
        if "decode" in k or "split" in v:
            dump_sources("int4")
    rows = []
    for shape in TIME_SHAPES:
        if time.time() - t_start > budget:
            log("time budget reached; skipping the remaining shapes")
            break
        rows += time_shape(*shape, torch_mod)
    result = {"meta": meta, "isolated": isolated, "verify": verify, "fallbacks": fallbacks, "timing": rows,
              "seconds": time.time() - t_start}
    name = f"mlx_kernels_{meta['gpu'].lower().replace(' ', '_').replace('nvidia_', 'nvidia_')}.json"
    OUT_DIR.mkdir(exist_ok=True)
    paths = [OUT_DIR / "mlx_kernels_nvidia_h200.json" if "h200" in name else OUT_DIR / name]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / paths[0].name)
    for p in paths:
        p.write_text(json.dumps(result, indent=1, default=str))
    print_table(rows)
    targets(rows)
    log(f"wrote {', '.join(map(str, paths))} in {time.time() - t_start:.0f} s")


def print_table(rows) -> None:
    log(f"\n{'model':14s} {'shape':>10s} {'method':24s} {'ms':>8s} {'TB/s':>6s} {'x sdpa':>7s} {'roof ms':>8s}")
    for r in rows:
        shape = f"{r['batch']}x{r['context'] // 1024}k"
        if "ms" in r:
            log(f"{r['model']:14s} {shape:>10s} {r['method']:24s} {r['ms']:8.3f} {r['tb_s']:6.2f} "
                f"{r.get('speedup_vs_mlx_sdpa', float('nan')):7.2f} {r['roof_ms']:8.3f}")
        else:
            log(f"{r['model']:14s} {shape:>10s} {r['method']:24s} {r.get('error', 'skipped')[:60]}")


def targets(rows) -> None:
    get = lambda m: next((r.get("ms") for r in rows if r["model"] == "mistral-7b" and r["batch"] == 8  # noqa: E731
                          and r["method"] == m), None)
    sdpa, mine, triton = get("mlx-sdpa-bf16"), get("kvmlx-int4"), get("triton-int4")
    if sdpa and mine:
        log(f"target int4 >= 4x MLX SDPA bf16 at b8 x 32k: {sdpa / mine:.2f}x ({'met' if sdpa / mine >= 4 else 'missed'})")
    if triton and mine:
        log(f"target int4 time within 80% of kvtorch Triton: Triton/kvmlx = {triton / mine:.2f} "
            f"({'met' if triton / mine >= 0.8 else 'missed'})")


if __name__ == "__main__":
    main()
