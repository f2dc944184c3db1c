"""Decode attention on the GPU: kvtorch's Triton kernels over compressed caches vs torch SDPA in bf16.

One decode step (one query per sequence) over a cache of `context` tokens. Default (a one-shot of
about 2 minutes on an H200): Mistral-7B's KV shape (32 q / 8 kv heads, D 128) at batch 1/8 x
context 4k/32k, plus batch 8 x 32k for SmolLM2-135M (9/3, D 64), Qwen2.5-0.5B (14/2, D 64) and
Gemma-3-270m (4/1, D 256); --full runs batch 1/8/32 x 4k/32k/128k for every model. Methods:
- sdpa-bf16: torch SDPA over bf16 K/V (enable_gqa, no repeated K/V);
- dequant-sdpa: dequantize the whole INT4 history, then SDPA (what transformers' QuantizedCache does);
- int8 / int4 / int2 (g64, token axis) and rank32 (bf16 coefficients): kvtorch.kernels.attention.
Times are medians of CUDA-event timings of CUDA-graph replays after warm-up, with L2 flushed before
each replay (each layer's cache is cold in a real decode step). Bytes count every input read once and
the output written once; "% roof" is those bytes at the measured device-to-device copy bandwidth
over the time, "roof x" the bytes ratio sdpa-bf16 / method (the speedup a memory-bound kernel gets).
Each kernel output is checked against the plain-torch reference at the first shape of each model.

    python benchmarks/bench_decode_attention.py --budget-s 150
Writes benchmarks/results/decode_attention_<gpu>.json (and $OUT/ when OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvspec.spec import LowRank, Quant  # noqa: E402
from kvtorch import ops  # noqa: E402
from kvtorch.attention import Part  # noqa: E402
from kvtorch.kernels import cuda_decode  # noqa: E402
from kvtorch.kernels.attention import attend, attention_reference, default_block  # noqa: E402
from kvtorch.kernels.quantize import quantize_pair, quantize_rows, stored_arrays  # noqa: E402

MODELS = {  # name: (q heads, kv heads, head dim)
    "mistral-7b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
    "qwen2.5-0.5b": (14, 2, 64),
    "gemma-3-270m": (4, 1, 256),
}
METHODS = ("sdpa-bf16", "dequant-sdpa", "int8", "int4", "int2", "rank32")
# (keys per block, warps, pipeline stages, 4-bit PTX dequantization) tried at the tuning shape (--tune);
# without it every shape runs attend's own shape-dependent default (default_block, _splits).
CONFIGS = {"int4": [(64, 2, 3, True), (128, 4, 3, True), (128, 8, 3, True), (64, 4, 3, True), (64, 4, 3, False)],
           "rank32": [(64, 4, 3, False), (128, 8, 3, False)],
           "int8": [(64, 2, 3, False), (128, 4, 3, False), (64, 4, 3, False), (128, 8, 3, False)],
           "int2": [(64, 2, 3, False), (64, 4, 3, False), (128, 8, 3, False)]}
MEMORY_LIMIT = 40 * 2**30  # bytes of K/V (bf16) one shape may allocate
DEQUANT_LIMIT = 2**28  # K elements above which dequant-sdpa's int64 unpacking would not fit
DEVICE = "cuda"
MAX_REL_ERR = 2e-2  # relative L2 error vs the plain-torch reference that a tuned config must stay under


def nbytes(*xs) -> int:
    return sum(x.numel() * x.element_size() for x in xs if x is not None)


def compressed_part(method: str, b: int, hkv: int, t: int, d: int, gen: torch.Generator) -> Part:
    """Random stored arrays for `method`; the newest token sits in the float chunk, as after an append."""
    dev = DEVICE
    floats = torch.randn(b, hkv, 1, d, device=dev, generator=gen).bfloat16()
    split = torch.tensor([t], device=dev)
    if method == "rank32":
        basis = torch.linalg.qr(torch.randn(hkv, d, d, device=dev, generator=gen)).Q[..., :32].contiguous()
        coeffs = torch.randn(b, hkv, t, 32, device=dev, generator=gen).bfloat16()
        return Part(LowRank(rank=32, basis="random"), d, t, {"coeffs": coeffs}, basis, floats, t - 1, split)
    bits = int(method[3:])
    words = d * bits // 32
    codes = torch.randint(-2**31, 2**31 - 1, (b, hkv, t, words), device=dev, dtype=torch.int32, generator=gen)
    scales = (torch.rand(b, hkv, t, d // 64, device=dev, generator=gen) * 0.5 / (2**bits - 1) + 1e-3).half()
    biases = (torch.rand(b, hkv, t, d // 64, device=dev, generator=gen) - 0.75).half()
    return Part(Quant(bits=bits), d, t, {"codes": codes, "scales": scales, "biases": biases}, None, floats, t - 1,
                split)


def part_bytes(p: Part) -> int:
    return nbytes(*p.arrays.values(), p.floats, p.basis)


def timed(fn, flush: torch.Tensor | None, reps: int, graph: bool = True, clear=None) -> float:
    """Median ms of `fn` as a CUDA-graph replay (or an eager call), L2 flushed before each (by zeroing
    `flush`, or by calling `clear`), after about WARMUP_MS of untimed runs."""
    clear = clear or flush.zero_
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            fn()
        run = cuda_graph.replay
    else:
        run = fn
    run()
    warm_up(run, clear)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        clear()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


# The clocks ramp up again after each pause of the host (building inputs, a reference check): without
# this, the first timing of a fresh shape read 7-12% slower than a repeat (H200, int4 / int8 decode at
# b8 x 32k and 128k, medians of 50 replays).
WARMUP_MS = 30.0


def warm_up(run, clear) -> None:
    """Run `run` (after `clear`, the L2 flush) untimed for about WARMUP_MS, judged by one timed run."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    clear()
    run()
    end.record()
    torch.cuda.synchronize()
    for _ in range(min(2000, int(WARMUP_MS / max(start.elapsed_time(end), 1e-3)))):
        clear()
        run()


def copy_bandwidth(flush: torch.Tensor) -> float:
    """Device-to-device copy bandwidth in TB/s, bytes read plus bytes written, by an SM kernel.

    Timed eagerly (a graph-captured copy becomes a slower memcpy node), the best of torch's copy
    kernel and an elementwise multiply: the 2026-11-29 run's multiply read 2.77 TB/s while
    ../shared/DEVICE.md measured 4.19 TB/s copying, and a low roof would overstate "% roof".
    """
    src = torch.empty(2**30, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    for _ in range(50):  # let the clocks ramp up from idle first
        dst.copy_(src)
    ms = min(timed(lambda: dst.copy_(src), flush, 20, graph=False),
             timed(lambda: torch.mul(src, 1.0, out=dst), flush, 20, graph=False))
    return 2 * src.numel() * src.element_size() / ms / 1e9


QUICK = [("mistral-7b", 1, 4096), ("mistral-7b", 1, 32768), ("mistral-7b", 8, 4096), ("mistral-7b", 8, 32768),
         ("smollm2-135m", 8, 32768), ("qwen2.5-0.5b", 8, 32768), ("gemma-3-270m", 8, 32768)]


def shape_points(args):
    grid = ([(m, b, t) for m in args.models for b in args.batches for t in args.contexts] if args.full
            else [p for p in QUICK if p[0] in args.models])
    for model, b, t in grid:
        hq, hkv, d = MODELS[model]
        if 2 * b * hkv * t * d * 2 > MEMORY_LIMIT:
            print(f"skip {model} b{b} t{t}: K/V over {MEMORY_LIMIT / 2**30:.0f} GiB")
            continue
        yield model, b, t, hq, hkv, d


def write_results(prefix: str, record: dict, out: Path) -> None:
    """record as `<prefix>_<gpu>.json` (gpu: record["gpu"], lower case, spaces as _) in `out` and in $OUT
    when set (the lent GPU's output folder)."""
    name = f"{prefix}_{record['gpu'].lower().replace(' ', '_')}.json"
    for folder in {out.resolve()} | ({Path(os.environ["OUT"]).resolve()} if os.environ.get("OUT") else set()):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(record, indent=1))
        print(f"wrote {folder / name}")


def decode_inputs(b: int, t: int, heads: tuple[int, int, int]):
    """For the kernel sweeps: a decode query at position t - 1 (q [b, Hq, 1, D] bf16) and random bf16 K
    and V [b, Hkv, t, D], from a CUDA generator seeded b * 7 + t that the caller goes on drawing
    compressed parts from. Returns (q, q_pos, gen, k, v)."""
    hq, hkv, d = heads
    gen = torch.Generator(device="cuda").manual_seed(b * 7 + t)
    q = torch.randn(b, hq, 1, d, device="cuda", generator=gen).bfloat16()
    k, v = (torch.randn(b, hkv, t, d, device="cuda", generator=gen).bfloat16() for _ in range(2))
    return q, torch.tensor([t - 1], device="cuda"), gen, k, v


def query_and_sdpa(b: int, t: int, heads: tuple[int, int, int], flush: torch.Tensor, reps: int):
    """`decode_inputs` and torch SDPA bf16's ms over its K and V. Returns (q, q_pos, gen, sdpa_ms)."""
    q, q_pos, gen, k, v = decode_inputs(b, t, heads)
    sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, scale=heads[2]**-0.5, enable_gqa=True), flush, reps)
    return q, q_pos, gen, sdpa


def run_shape(model, b, t, hq, hkv, d, args, flush, config, check):
    gen = torch.Generator(device=DEVICE).manual_seed(b * 7 + t)
    q = torch.randn(b, hq, 1, d, device=DEVICE, generator=gen).bfloat16()
    qpos = torch.tensor([t - 1], device=DEVICE)
    scale = d**-0.5
    rows, base, base_bytes = [], None, None
    for method in args.methods:
        if method == "dequant-sdpa" and b * hkv * t * d > DEQUANT_LIMIT:
            continue
        try:
            if method in ("sdpa-bf16", "dequant-sdpa"):
                if method == "sdpa-bf16":
                    k = torch.randn(b, hkv, t, d, device=DEVICE, generator=gen).bfloat16()
                    v = torch.randn_like(k)
                    moved = nbytes(q, k, v) + nbytes(q)
                    fn = lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
                else:
                    kp, vp = (compressed_part("int4", b, hkv, t, d, gen) for _ in range(2))
                    moved = nbytes(q) + part_bytes(kp) + part_bytes(vp) + nbytes(q)

                    def fn(kp=kp, vp=vp):
                        kv = [ops.dequantize(p.arrays["codes"], p.arrays["scales"], p.arrays["biases"], 4, 64, "token", d)
                              .bfloat16() for p in (kp, vp)]
                        return F.scaled_dot_product_attention(q, kv[0], kv[1], scale=scale, enable_gqa=True)
            else:
                kp, vp = (compressed_part(method, b, hkv, t, d, gen) for _ in range(2))
                moved = nbytes(q) + part_bytes(kp) + part_bytes(vp) + b * hq * d * 4
                cfg = config.get(method)
                # An explicit config is a Triton launch; the default takes the CUDA kernel where it applies.
                fn = lambda kp=kp, vp=vp, c=cfg: attend(
                    q, qpos, kp, vp, scale=scale, block=c and c[:3], ptx=c[3] if c else True, cuda=c is None)
                if check:
                    ref = attention_reference(q, qpos, kp, vp, scale=scale)
                    err = ((fn() - ref).norm() / ref.norm()).item()
            # ops.dequantize copies index tables to the device on each call: no graph capture.
            ms = timed(fn, flush, args.reps, graph=method != "dequant-sdpa")
        except torch.OutOfMemoryError:
            print(f"  {model} b{b} t{t} {method}: out of memory")
            torch.cuda.empty_cache()
            continue
        row = dict(model=model, batch=b, context=t, method=method, ms=ms, bytes=moved, tbps=moved / ms / 1e9,
                   roof_ms=moved / args.copy_tbps / 1e9)
        if method == "sdpa-bf16":
            base_bytes = moved
        row["roof_x"] = base_bytes / moved if base_bytes else None
        if method not in ("sdpa-bf16", "dequant-sdpa"):
            on_cuda = method not in config and cuda_decode.refusal(q, kp, vp) is None
            row["kernel"] = "cuda (decode_quant.cu)" if on_cuda else "triton"
            row["config"] = list(config[method]) if method in config else list(
                default_block(kp.spec, vp.spec, d, b * hkv, t)) + ["default"]
            if check:
                row["rel_err_vs_reference"] = err
        if method == "sdpa-bf16":
            base = ms
        row["speedup_vs_sdpa"] = base / ms if base else None
        row["pct_of_roof"] = 100 * row["roof_ms"] / ms
        rows.append(row)
        print(f"  {model:13s} b{b:<3d} t{t:<7d} {method:13s} {ms:8.4f} ms {row['tbps']:5.2f} TB/s "
              f"x{row['speedup_vs_sdpa'] or 0:5.2f} (roof x{row['roof_x'] or 0:5.2f}) {row['pct_of_roof']:5.1f}% of roof"
              f" {row.get('kernel', '')}",
              flush=True)
        del fn
        torch.cuda.empty_cache()
    return rows


def tune(args, flush) -> tuple[dict, list[dict]]:
    """Best config per kernel method at Mistral-7B's shape, batch 8 x 32k (the issue's targets)."""
    b, t = 8, 32768
    hq, hkv, d = MODELS["mistral-7b"]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(b, hq, 1, d, device=DEVICE, generator=gen).bfloat16()
    qpos = torch.tensor([t - 1], device=DEVICE)
    best, trials = {}, []
    for method in (m for m in args.methods if m in ("int8", "int4", "int2", "rank32")):
        parts = [compressed_part(method, b, hkv, t, d, gen) for _ in range(2)]
        ref = attention_reference(q, qpos, *parts, scale=d**-0.5)
        results = []
        for cfg in CONFIGS[method]:
            fn = lambda c=cfg, p=parts: attend(q, qpos, *p, scale=d**-0.5, block=c[:3], ptx=c[3])
            # A config must compute the right thing before its time counts.
            err = ((fn() - ref).norm() / ref.norm()).item()
            ms = timed(fn, flush, args.reps) if err < MAX_REL_ERR else float("inf")
            results.append((ms, cfg))
            trials.append(dict(method=method, config=list(cfg), ms=ms, rel_err=err, model="mistral-7b", batch=b,
                               context=t))
            print(f"  tune {method} {cfg}: {ms:.4f} ms, rel err {err:.1e}", flush=True)
        best[method] = min(results)[1]
    return best, trials


def append_share(args, flush) -> list[dict]:
    """quantize-append of one decoded token (K and V of one layer, one launch as kvtorch.store makes it,
    and a launch each) vs that layer's INT4 attention."""
    out = []
    hq, hkv, d = MODELS[args.models[0]]
    t = Quant(bits=4)
    for b in args.batches:
        xs = tuple(torch.randn(b, hkv, 1, d, device=DEVICE).bfloat16() for _ in range(2))
        outs = tuple(stored_arrays(x, t, "bf16") for x in xs)
        ms = timed(lambda xs=xs, outs=outs: quantize_pair(xs, t, "bf16", (None, None), outs), flush, args.reps)
        ms_two = timed(lambda xs=xs, outs=outs: [quantize_rows(x, t, "bf16", out=o) for x, o in zip(xs, outs)],
                       flush, args.reps)
        out.append(dict(model=args.models[0], batch=b, ms_k_and_v=ms, ms_k_and_v_two_launches=ms_two))
        print(f"  quantize-append int4 b{b}: {ms:.4f} ms for K and V of one layer in one launch "
              f"({ms_two:.4f} in two)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--full", action="store_true", help="every model x --batches x --contexts, not the quick set")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32], help="with --full")
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 32768, 131072], help="with --full")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting new shapes after this many seconds")
    ap.add_argument("--tune", action="store_true", help="time CONFIGS at batch 8 x 32k and run the best everywhere")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode_attention needs a CUDA GPU (the kernels' CPU path is the Triton interpreter: far too slow)")
    import triton

    t_start = time.time()
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE)
    args.copy_tbps = copy_bandwidth(flush)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {args.copy_tbps:.2f} TB/s; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    config, trials = tune(args, flush) if args.tune else ({}, [])
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                command=" ".join(sys.argv), copy_tbps=args.copy_tbps, configs=config, tuning=trials)
    name = f"decode_attention_{gpu.replace(' ', '_').lower()}.json"
    dirs = [args.out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)

    def write():
        for d in dirs:
            (d / name).write_text(json.dumps(dict(meta, rows=rows), indent=1))

    rows, checked = [], set()
    for point in shape_points(args):
        if time.time() - t_start > args.budget_s:
            print(f"time budget of {args.budget_s:.0f} s reached: remaining shapes not run")
            meta["stopped_early"] = True
            break
        rows += run_shape(*point, args, flush, config, check=point[0] not in checked)
        checked.add(point[0])
        write()
    meta["append"] = append_share(args, flush)
    write()
    print("\nwrote " + ", ".join(str(d / name) for d in dirs) + "\n")
    print_table(rows)
    print_targets(rows, meta)


def print_table(rows) -> None:
    print(f"{'shape':32s} {'method':13s} {'ms':>9s} {'TB/s':>6s} {'x sdpa':>7s} {'roof x':>7s} {'% roof':>7s}")
    for r in rows:
        shape = f"{r['model']} b{r['batch']} t{r['context']}"
        print(f"{shape:32s} {r['method']:13s} {r['ms']:9.4f} {r['tbps']:6.2f} {r['speedup_vs_sdpa'] or 0:7.2f} "
              f"{r['roof_x'] or 0:7.2f} {r['pct_of_roof']:7.1f}")


TARGETS = {"int4": 3.2, "int8": 1.8, "rank32": 3.5}  # x over sdpa-bf16 at Mistral-7B b8 t32k (issue 5)
MISTRAL_LAYER_WEIGHT_BYTES = 7.24e9 * 2 / 32  # bf16 weights one decoder layer reads per decode step


def print_targets(rows, meta) -> None:
    """The issue's targets at Mistral-7B, batch 8, 32k tokens (skipped if that shape was not run)."""
    at = {r["method"]: r for r in rows if (r["model"], r["batch"], r["context"]) == ("mistral-7b", 8, 32768)}
    if not at:
        return
    print("\ntargets at mistral-7b b8 t32k:")
    for method, want in TARGETS.items():
        if method in at:
            r = at[method]
            print(f"  {method:7s} x{r['speedup_vs_sdpa']:.2f} vs sdpa (target >= {want}), "
                  f"{100 * r['tbps'] / meta['copy_tbps']:.0f}% of copy bandwidth (target >= 85%)")
    append = {a["batch"]: a["ms_k_and_v"] for a in meta.get("append", [])}
    if 8 in append and "int4" in at:
        layer = at["int4"]["ms"] + MISTRAL_LAYER_WEIGHT_BYTES / meta["copy_tbps"] / 1e9 + append[8]
        print(f"  quantize-append: {append[8]:.4f} ms per layer = {100 * append[8] / layer:.1f}% of a decode step's "
              f"layer (int4 attention + bf16 weights at the copy roof + append; target <= 3%)")


if __name__ == "__main__":
    main()
