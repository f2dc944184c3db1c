"""Host time of one eager decode step of one layer: kvtorch's cache update and attention, on a CUDA GPU.

Eager decoding of small batches is bound by the host: the GPU finishes a layer's kernels before
Python has launched the next ones (`bench_decode_e2e.py`: int4 eager 48-55 ms per 32-layer step
where a CUDA graph replays it in 7-16). This measures where that host time goes, per layer and step,
from loops of calls without synchronization (each call's GPU work is a few microseconds, so the loop
runs at the host's pace): the whole step (LayerStore.append + kvtorch.attention.compressed_attention
on a one-token chunk), the append alone, the attention alone, one relaunch of the split-attention
Triton kernel with the same arguments (Triton's launcher), and two plain torch calls as the host's
unit costs. The whole-model comparison with bf16 eager decoding is bench_decode_e2e.py's. Times
are medians of --repeats loops of --calls calls.

    python benchmarks/bench_decode_host.py                       # Mistral-7B heads, 1 x 4k
    python benchmarks/bench_decode_host.py --specs int4 int8 int4-kchan-res128 --batch 8
Writes benchmarks/results/decode_host_<gpu>.json (and $OUT/ when OUT is set).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def host_us(fn, calls: int, repeats: int) -> float:
    """Median over `repeats` loops of the host microseconds per call of fn (no synchronization inside a loop)."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append(1e6 * (time.perf_counter() - t0) / calls)
    torch.cuda.synchronize()
    return statistics.median(times)


def kvtorch_row(spec_text: str, b: int, hq: int, hkv: int, d: int, context: int, calls: int, repeats: int) -> dict:
    """Host us per layer-step of a kvtorch cache layer (spec_text) after a `context`-token prefill."""
    import kvtorch.kernels  # noqa: F401 (registers the attention kernel)
    import kvtorch.kernels._attention_triton as kat
    from kvspec import parse
    from kvspec.budget import ModelShape
    from kvspec.cachefile import layer_tensor_spec
    from kvtorch.attention import compressed_attention
    from kvtorch.cache import resolve_bases
    from kvtorch.model_info import ModelInfo
    from kvtorch.store import LayerStore

    spec = parse(spec_text)
    # Low-rank tensors: the basis kind's per-head bases, as kvtorch.make_cache makes them (one layer).
    info = ModelInfo("bench", ModelShape(layers=1, kv_heads=hkv, head_dim=d), 0, (None,))
    bases = {which: layers[0].cuda() for which, layers in resolve_bases(spec, info, None).items()}
    store = LayerStore(layer_tensor_spec(spec, None, "k"), layer_tensor_spec(spec, None, "v"), spec.residual,
                       spec.float_dtype, bases, where="layer 0")
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv = torch.randn(b, hkv, context, d, device="cuda", generator=gen).bfloat16()
    store.append(kv, kv)
    q = torch.randn(b, hq, 1, d, device="cuda", generator=gen).bfloat16()
    k1 = torch.randn(b, hkv, 1, d, device="cuda", generator=gen).bfloat16()
    scale = d**-0.5

    def step():
        chunk = store.append(k1, k1)
        return compressed_attention(q, chunk.q_pos, chunk.k, chunk.v, scale=scale)

    row = dict(cache=spec_text, step_us=host_us(step, calls, repeats),
               append_us=host_us(lambda: store.append(k1, k1), calls, repeats))
    chunk = store.append(k1, k1)
    row["attention_us"] = host_us(lambda: compressed_attention(q, chunk.q_pos, chunk.k, chunk.v, scale=scale),
                                  calls, repeats)
    # The split kernel's launch as attention makes it, replayed with the same arguments.
    seen, kernel = {}, kat._split_kernel

    class Capture:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.setdefault("launch", (grid, args, kw))
                return kernel[grid](*args, **kw)
            return launch

    kat._split_kernel = Capture()
    try:
        compressed_attention(q, chunk.q_pos, chunk.k, chunk.v, scale=scale)
    finally:
        kat._split_kernel = kernel
    grid, args, kw = seen["launch"]
    row["split_launch_us"] = host_us(lambda: kernel[grid](*args, **kw), calls, repeats)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", nargs="+", default=["int4", "int8", "int4-kchan-res128", "rank32-random"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--heads", nargs=3, type=int, default=[32, 8, 128], metavar=("HQ", "HKV", "D"))
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_host.py needs a CUDA GPU (it times the host side of GPU launches)")
    import triton

    hq, hkv, d = args.heads
    x = torch.randn(args.batch, hkv, 1, d, device="cuda").bfloat16()
    units = dict(torch_op_us=host_us(lambda: x.add(1), args.calls, args.repeats),
                 torch_view_us=host_us(lambda: x[:, :, 0:1], args.calls, args.repeats))
    rows = [kvtorch_row(s, args.batch, hq, hkv, d, args.context, args.calls, args.repeats) for s in args.specs]
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, host {platform.processor() or platform.machine()}: one layer's decode step, "
          f"B {args.batch}, {hq} q / {hkv} kv heads, D {d}, after {args.context} tokens; host us per call "
          f"(a torch op {units['torch_op_us']:.1f}, a view {units['torch_view_us']:.1f})")
    print(f"{'cache':26s} {'step':>7s} {'append':>7s} {'attention':>9s} {'split launch':>12s}")
    for r in rows:
        print(f"{r['cache']:26s} {r['step_us']:7.1f} {r['append_us']:7.1f} {r['attention_us']:9.1f} "
              f"{r['split_launch_us']:12.1f}")
    record = dict(gpu=gpu, cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(),
                  command="benchmarks/bench_decode_host.py " + " ".join(sys.argv[1:]), batch=args.batch,
                  context=args.context, heads=args.heads, **units, rows=rows)
    name = f"decode_host_{gpu.lower().replace(' ', '_')}.json"
    for folder in {args.out, *([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])}:
        path = folder / name
        records = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(records + [record], indent=1))
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
