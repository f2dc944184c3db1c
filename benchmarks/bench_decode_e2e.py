"""End-to-end decoding on the GPU: tokens/s and peak memory of a Mistral-7B-shaped model per KV cache.

The model is transformers' MistralForCausalLM built from a Mistral-7B MistralConfig with RANDOM
weights in bf16 (no checkpoint is loaded: speed and memory depend on shapes, not on weight values).
For each cache (bf16 transformers DynamicCache with SDPA, and kvtorch.make_cache caches int8, int4,
rank32) and context (4k, 32k tokens): prefill the context in chunks, then time greedy decode steps
with CUDA events (medians), record peak GPU memory, and the share of a decode step that
quantize-append (kvtorch.kernels.quantize, K and V of every layer) takes.

The kvtorch caches must run the Triton kernels (kvtorch.kernels registers them with
kvtorch.attention when imported); if none is registered this script says so and exits, since the
plain-torch reference attention would be measured instead. Quantize-append is not wired into
kvtorch.store yet (it quantizes with kvtorch.ops), so its share is measured with the kernel directly.

    python benchmarks/bench_decode_e2e.py --out benchmarks/results   # writes decode_e2e_<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHES = ("bf16-sdpa", "int8-bf16", "int4-bf16", "rank32-random-bf16")


def kernels_wired() -> bool:
    """Whether kvtorch's compressed attention dispatches to a registered kernel (importing
    kvtorch.kernels registers them, as kvtorch.attention does on its first CUDA call)."""
    import kvtorch.attention
    import kvtorch.kernels  # noqa: F401

    return bool(getattr(kvtorch.attention, "_KERNELS", None))


def mistral_7b_random():
    """Mistral-7B's shapes (32 layers, 32 q / 8 kv heads, D 128, 14336 MLP) with random bf16 weights."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=32000, max_position_embeddings=131072,
                           sliding_window=None, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def make(model, name: str):
    from transformers import DynamicCache

    import kvtorch

    return DynamicCache(config=model.config) if name == "bf16-sdpa" else kvtorch.make_cache(model, name)


@torch.no_grad()
def run(model, name: str, context: int, steps: int, chunk: int) -> dict:
    cache = make(model, name)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device="cuda")
    for lo in range(0, context, chunk):
        out = model(ids[:, lo : lo + chunk], past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in times[2:])
    return dict(cache=name, context=context, step_ms=ms, tokens_per_s=1000 / ms,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def append_ms(model, name: str) -> float | None:
    """GPU time of quantize-append for one decoded token: K and V of every layer."""
    from kvspec import parse
    from kvtorch.kernels.quantize import quantize_rows

    if name == "bf16-sdpa":
        return None
    spec = parse(name)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    x = torch.randn(1, cfg.num_key_value_heads, 1, d, device="cuda", dtype=torch.bfloat16)
    basis = torch.linalg.qr(torch.randn(cfg.num_key_value_heads, d, d, device="cuda")).Q[..., :32].contiguous()

    def step():
        for _ in range(cfg.num_hidden_layers):
            for t in (spec.k, spec.v):
                quantize_rows(x, t, spec.float_dtype, basis)

    step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caches", nargs="+", default=list(CACHES))
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 32768])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk length")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode_e2e needs a CUDA GPU")
    if not kernels_wired():
        sys.exit("skipped: kvtorch's caches do not use the Triton kernels yet (kvtorch.attention.register_kernel("
                 "kvtorch.kernels.attention.attention_kernel) is not called), so this would time the plain-torch "
                 "reference attention; wire the kernels, then rerun")
    import transformers
    import triton

    model = mistral_7b_random()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: Mistral-7B-shaped model with RANDOM bf16 weights (no checkpoint); torch {torch.__version__}, "
          f"transformers {transformers.__version__}, triton {triton.__version__}", flush=True)
    rows = []
    for name in args.caches:
        share = append_ms(model, name)
        for context in args.contexts:
            row = run(model, name, context, args.steps, args.chunk)
            if share is not None:
                row["append_ms"] = share
                row["append_share_pct"] = 100 * share / row["step_ms"]
            rows.append(row)
            print(f"  {name:20s} {context:6d} tokens: {row['tokens_per_s']:7.1f} tok/s, step {row['step_ms']:.2f} ms, "
                  f"peak {row['peak_gib']:.1f} GiB" + (f", append {row['append_share_pct']:.1f}%" if share else ""),
                  flush=True)
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode_e2e_{gpu.replace(' ', '_').lower()}.json"
    meta = dict(gpu=gpu, model="Mistral-7B shape, random bf16 weights", torch=torch.__version__,
                transformers=transformers.__version__, triton=triton.__version__, command=" ".join(sys.argv))
    path.write_text(json.dumps(dict(meta, rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
