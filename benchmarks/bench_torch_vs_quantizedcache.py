"""kvtorch caches vs transformers' own QuantizedCache (quanto backend) on the bundled SmolLM2.

Same model, same tokens, both fed token by token (QuantizedCache re-quantizes its whole history when
its float residual overflows, so only token-by-token feeding is what its decoding computes):
- NLL and perplexity over the first --tokens tokens of BBC News;
- decode tokens/s of greedy generation after a --prompt-tokens prompt;
- cache bytes at the end.
Needs `pip install optimum-quanto` beside kvmlx[torch].

    python benchmarks/bench_torch_vs_quantizedcache.py --tokens 256
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import kvtorch


def nll_token_by_token(model, ids: list[int], cache) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(len(ids) - 1):
            logits = model(input_ids=torch.tensor([[ids[i]]]), past_key_values=cache, use_cache=True).logits[0, -1]
            out.append(float(-torch.log_softmax(logits.float(), -1)[ids[i + 1]]))
    return np.array(out)


def decode_speed(model, prompt: list[int], cache, steps: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
        tok = int(logits.argmax())
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
            tok = int(logits.argmax())
    return steps / (time.perf_counter() - t0)


def cache_bytes(cache) -> int:
    """Bytes actually held: kvtorch's stored arrays; for quanto, packed codes plus fp32 scales and
    shifts (its QTensors report their dequantized size as numel())."""
    if isinstance(cache, kvtorch.KVCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if hasattr(value, "_scale"):  # quanto WeightQBitsTensor: PackedTensor codes, scale, shift
                parts = (value._data._data, value._scale, value._shift)
            elif isinstance(value, torch.Tensor):
                parts = (value,)
            else:
                continue
            total += sum(t.numel() * t.element_size() for t in parts)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/torch_vs_quantizedcache-smollm2-135m-cpu.json")
    ap.add_argument("--note", default="2-core x86_64 CPU, shared machine")
    args = ap.parse_args()
    from transformers import DynamicCache, QuantizedCache

    # Imported here: bench_decode_e2e imports cache_bytes on a GPU machine where the CLI is not installed.
    from kvmlx_cli import corpora

    model, tok = kvtorch.load_model("smollm2-135m", device="cpu")
    ids = tok(corpora.load("bbc").text("eval")[: 8 * max(args.tokens, args.prompt_tokens)]).input_ids
    caches = {
        "transformers DynamicCache (fp32)": lambda: DynamicCache(config=model.config),
        "transformers QuantizedCache quanto int4 g64 res0": lambda: QuantizedCache("quanto", model.config, nbits=4, q_group_size=64, residual_length=0),
        "transformers QuantizedCache quanto int4 g64 res128": lambda: QuantizedCache("quanto", model.config, nbits=4, q_group_size=64, residual_length=128),
        "transformers QuantizedCache quanto int2 g64 res128": lambda: QuantizedCache("quanto", model.config, nbits=2, q_group_size=64, residual_length=128),
        "kvtorch fp16": lambda: kvtorch.make_cache(model, "fp16"),
        "kvtorch int4": lambda: kvtorch.make_cache(model, "int4"),
        "kvtorch int4-res128": lambda: kvtorch.make_cache(model, "int4-res128"),
        "kvtorch int4-kchan-res128": lambda: kvtorch.make_cache(model, "int4-kchan-res128"),
        "kvtorch int2-res128": lambda: kvtorch.make_cache(model, "int2-res128"),
        "kvtorch int2-kchan-res128": lambda: kvtorch.make_cache(model, "int2-kchan-res128"),
    }
    rows = []
    for name, make in caches.items():
        # kvtorch.make_cache switches attention to "kvmlx", which reads plain caches through SDPA.
        cache = make()
        nll = nll_token_by_token(model, ids[: args.tokens], cache)
        row = {"cache": name, "ppl": float(np.exp(nll.mean())), "nll": float(nll.mean()), "cache_bytes": cache_bytes(cache)}
        row["decode_tokens_per_s"] = decode_speed(model, ids[: args.prompt_tokens], make(), args.steps)
        rows.append(row)
        print(f"{name:55s} PPL {row['ppl']:8.3f}  KV {row['cache_bytes'] / 1e6:6.2f} MB  decode {row['decode_tokens_per_s']:6.1f} tok/s", flush=True)
    import transformers

    result = {
        "model": "smollm2-135m (Q4_1 GGUF dequantized to fp32)",
        "tokens": args.tokens,
        "prompt_tokens": args.prompt_tokens,
        "decode_steps": args.steps,
        "machine": f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} threads ({args.note})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": "python benchmarks/bench_torch_vs_quantizedcache.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
