"""Decode attention (Mistral-7B heads, batch 8 x 32k) with fp16 vs bf16 dot operands for bf16 caches.

kvtorch's Triton kernel gives bf16 caches of quantized K and V fp16 operands
(`kvtorch.kernels.attention.fp16_operands`); this times every block config of int8 and int4 both
ways in one process (bf16 operands by patching that function), twice for int8's two usual configs,
so a difference between operand types is told apart from machine-to-machine spread.

    python benchmarks/bench_dot_operands.py      # CUDA; ~25 s on an H200
Prints one line per (round, operands, method, config); results/dot_operands_nvidia_h200.txt holds a run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.bench_decode_attention as bda  # noqa: E402
import kvtorch.kernels.attention as ka  # noqa: E402

ROUNDS = [  # (block configs per method, methods)
    ({"int8": [(64, 4, 3, False), (128, 8, 3, False), (64, 8, 3, False), (128, 4, 3, False), (32, 4, 3, False)],
      "int4": [(128, 8, 3, True), (64, 4, 3, True)]}, ["int8", "int4"]),
    ({"int8": [(64, 4, 3, False), (128, 8, 3, False)]}, ["int8"]),
]


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_dot_operands needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    fp16 = ka.fp16_operands
    for rnd, (configs, methods) in enumerate(ROUNDS):
        for name, choose in (("fp16", fp16), ("bf16", lambda k, v: False)):
            ka.fp16_operands = choose  # attend looks it up at each call
            bda.CONFIGS.update(configs)
            _, trials = bda.tune(SimpleNamespace(methods=methods, reps=30), flush)
            for t in trials:
                print(f"round {rnd} {name} {t['method']} {tuple(t['config'])} {t['ms']:.4f} ms "
                      f"rel_err {t['rel_err']:.1e}", flush=True)
    ka.fp16_operands = fp16


if __name__ == "__main__":
    main()
