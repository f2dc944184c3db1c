"""Launch-config sweep of kvtorch's decode attention on a CUDA GPU: (keys per block, warps, stages),
a register cap, key splits and the PTX dequantization, at one shape, against torch SDPA bf16.

What `kvtorch.kernels.attention.default_block` and `programs_per_sm` cite comes from this sweep. It
times the Triton kernels only (cuda=False): kernels.cuda_decode's CUDA kernel, which `attend` takes
by default for 4-bit decode at head dim 128, is timed by bench_decode_attention.py.
Each config's output is checked against the plain-torch reference (relative error printed); times
are medians of CUDA-graph replays with L2 flushed (bench_decode_attention.timed). Registers, spills
and shared memory are read from the compiled split kernel.

    python benchmarks/sweep_decode_launch.py --shape 8 32768 32 8 128 --methods int4 \
        --configs 64,2,3 128,4,3,splits=16 128,4,3,maxnreg=128 default,ptx=0
Config: "BN,WARPS,STAGES" or "default", then optional ",splits=N", ",maxnreg=N", ",ptx=0".
Writes benchmarks/results/decode_launch_<gpu>.json (records appended; and $OUT/ when OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode_attention as bda  # noqa: E402

import kvtorch.kernels._attention_triton as kat  # noqa: E402
from kvtorch.kernels.attention import attend, attention_reference  # noqa: E402


def parse_config(text: str) -> dict:
    """'128,4,3,splits=16' -> {'block': (128, 4, 3), 'splits': 16, 'maxnreg': None, 'ptx': True}."""
    parts = text.split(",")
    head, opts = (None, parts[1:]) if parts[0] == "default" else (parts[:3], parts[3:])
    cfg = {"block": tuple(int(x) for x in head) if head else None, "splits": None, "maxnreg": None, "ptx": True}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in ("splits", "maxnreg", "ptx"):
            raise SystemExit(f"unknown config option {key!r} in {text!r}; use splits=, maxnreg= or ptx=")
        cfg[key] = bool(int(value)) if key == "ptx" else int(value)
    return cfg


class CappedSplitKernel:
    """The split kernel with an optional register cap; remembers the last compiled kernel."""

    def __init__(self, kernel):
        self.kernel, self.maxnreg, self.last = kernel, None, None

    def __getitem__(self, grid):
        def launch(*args, **kw):
            if self.maxnreg:
                kw["maxnreg"] = self.maxnreg
            self.last = self.kernel[grid](*args, **kw)
            return self.last
        return launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs=5, type=int, default=[8, 32768, 32, 8, 128], metavar=("B", "T", "HQ", "HKV", "D"))
    ap.add_argument("--methods", nargs="+", default=["int4"], choices=["int8", "int4", "int2", "rank32"])
    ap.add_argument("--configs", nargs="+", default=["default"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--kernel", default="", help="what the records measure (a commit or a change), stored with them")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    configs = [(text, parse_config(text)) for text in args.configs]
    b, t, hq, hkv, d = args.shape
    capped = CappedSplitKernel(kat._split_kernel)
    kat._split_kernel = capped
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(b, hq, 1, d, device="cuda", generator=gen).bfloat16()
    qpos = torch.tensor([t - 1], device="cuda")
    kv = [torch.randn(b, hkv, t, d, device="cuda", generator=gen).bfloat16() for _ in range(2)]
    sdpa = bda.timed(lambda: F.scaled_dot_product_attention(q, *kv, scale=d**-0.5, enable_gqa=True), flush, args.reps)
    del kv[:]
    print(f"{torch.cuda.get_device_name()}  B {b} x T {t}, {hq} q / {hkv} kv heads, D {d}: sdpa-bf16 {sdpa:.4f} ms")
    rows = []
    for method in args.methods:
        kp, vp = (bda.compressed_part(method, b, hkv, t, d, gen) for _ in range(2))
        ref = attention_reference(q, qpos, kp, vp, scale=d**-0.5)
        for text, cfg in configs:
            capped.maxnreg = cfg["maxnreg"]
            fn = lambda cfg=cfg, kp=kp, vp=vp: attend(q, qpos, kp, vp, scale=d**-0.5, splits=cfg["splits"],
                                                      block=cfg["block"], ptx=cfg["ptx"], cuda=False)
            err = ((fn() - ref).norm() / ref.norm()).item()
            kernel = capped.last
            ms = bda.timed(fn, flush, args.reps)
            rows.append(dict(method=method, config=text, ms=ms, x_sdpa=sdpa / ms, registers=kernel.n_regs,
                             spills=kernel.n_spills, shared_bytes=kernel.metadata.shared, rel_err=err))
            print(f"  {method:6s} {text:28s} {ms:.4f} ms  x{sdpa / ms:4.2f}  {kernel.n_regs} regs, "
                  f"{kernel.n_spills} spills, {kernel.metadata.shared:,} B shared, err {err:.1e}")
    gpu = torch.cuda.get_device_name().lower().replace(" ", "_")
    record = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  kernel=args.kernel, command="benchmarks/sweep_decode_launch.py " + " ".join(sys.argv[1:]),
                  shape=args.shape,
                  sdpa_ms=sdpa, rows=rows)
    for folder in {args.out, *([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])}:
        path = folder / f"decode_launch_{gpu}.json"
        records = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(records + [record], indent=1))
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
