"""Sweep of the CUDA decode kernel's build (kvtorch/kernels/decode_quant.cu) per code width and head
dim: tiles per warp step, ring stages and blocks per multiprocessor (its __launch_bounds__ and the
splits `attend` aims for), plus explicit split counts, at Mistral-7B heads (or --heads) against torch
SDPA bf16 and the Triton kernels' default.

What `kvtorch.kernels.cuda_decode.BUILDS` cites comes from this sweep. Each variant is checked against
the plain-torch reference at every shape (relative L2 error printed); times are medians of CUDA-graph
replays with L2 flushed (bench_decode_attention.timed).

    python benchmarks/sweep_cuda_decode.py --bits 8 --shapes 8,32768 8,131072 1,32768 \
        --variants 2,2,2 1,3,3 --splits 0 8
    python benchmarks/sweep_cuda_decode.py --heads 9,3,64 --bits 4   # SmolLM2's heads
Variant: "TILES,STAGES,BLOCKS_PER_SM". Splits 0: `attend`'s own choice. A head dim not yet in
cuda_decode.HEAD_DIMS is let through for the sweep (said so in the output).
Writes benchmarks/results/cuda_decode_sweep_<gpu>.json (records appended; and $OUT/ when OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode_attention as bda  # noqa: E402

from kvtorch.kernels import cuda_decode  # noqa: E402
from kvtorch.kernels.attention import attend, attention_reference  # noqa: E402


def parse_variant(text: str, bits: int, d: int) -> cuda_decode.Build:
    """'2,2,3' -> a build of (tiles, stages, blocks per SM); its blocks' rings must fit an H100/H200
    multiprocessor's 227 KB."""
    tiles, stages, blocks = (int(x) for x in text.split(","))
    ring = cuda_decode.ring_bytes(bits, d, tiles, stages)
    if tiles < 1 or stages < 2 or blocks < 1 or ring * blocks > 227 * 1024:
        raise SystemExit(f"variant {text!r}: tiles >= 1, stages >= 2, blocks >= 1 and blocks x ring within 227 KB "
                         f"({blocks} x {ring:,} B asked at {bits} bits, D {d})")
    return cuda_decode.Build(tiles, stages, blocks)


def sweep_shape(b: int, t: int, heads: tuple[int, int, int], bits: int, variants, splits_list, reps: int, flush,
                copy_tbps: float) -> list[dict]:
    """Every variant x split count at batch b x context t: one row each."""
    hq, hkv, d = heads
    q, qpos, gen, sdpa = bda.query_and_sdpa(b, t, heads, flush, reps)
    kp, vp = (bda.compressed_part(f"int{bits}", b, hkv, t, d, gen) for _ in range(2))
    moved = bda.nbytes(q) + bda.part_bytes(kp) + bda.part_bytes(vp) + b * hq * d * 4
    ref = attention_reference(q, qpos, kp, vp, scale=d**-0.5)
    why = cuda_decode.refusal(q, kp, vp)
    if why:
        raise SystemExit(f"the CUDA kernel refuses b{b} x {t}: {why}")
    triton_ms = bda.timed(lambda: attend(q, qpos, kp, vp, scale=d**-0.5, cuda=False), flush, reps)
    print(f"b{b} x {t}: sdpa-bf16 {sdpa:.4f} ms, triton int{bits} {triton_ms:.4f} ms")
    rows = []
    for text, build in variants:
        cuda_decode.BUILDS[bits, d] = build  # `attend` plans and builds this variant (each build cached apart)
        for splits in splits_list:
            fn = lambda s=splits: attend(q, qpos, kp, vp, scale=d**-0.5, splits=s or None)
            err = ((fn() - ref).norm() / ref.norm()).item()
            ms = bda.timed(fn, flush, reps)
            rows.append(dict(bits=bits, heads=list(heads), batch=b, context=t, variant=text, splits=splits or "default", ms=ms, x_sdpa=sdpa / ms,
                             x_triton=triton_ms / ms, pct_of_copy=100 * moved / ms / 1e9 / copy_tbps, rel_err=err,
                             sdpa_ms=sdpa, triton_ms=triton_ms))
            print(f"  tiles,stages,blocks {text:8s} splits {splits or 'default':>7}: {ms:.4f} ms  "
                  f"x{sdpa / ms:4.2f} SDPA  x{triton_ms / ms:4.2f} Triton  {rows[-1]['pct_of_copy']:5.1f}% of copy  "
                  f"err {err:.1e}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["8,32768", "8,131072", "1,32768"], help="BATCH,CONTEXT")
    ap.add_argument("--bits", type=int, choices=[4, 8], default=4)
    ap.add_argument("--heads", default="32,8,128", help="QUERY_HEADS,KV_HEADS,HEAD_DIM (default: Mistral-7B's)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="TILES,STAGES,BLOCKS_PER_SM (default: the width's build in cuda_decode.BUILDS)")
    ap.add_argument("--splits", nargs="+", type=int, default=[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--kernel", default="", help="what the records measure (a commit or a change), stored with them")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    heads = tuple(int(x) for x in args.heads.split(","))
    d = heads[2]
    if (args.bits, d) not in cuda_decode.BUILDS:
        raise SystemExit(f"no build of the kernel for {args.bits} bits at head dim {d}: {sorted(cuda_decode.BUILDS)}")
    if d not in cuda_decode.HEAD_DIMS:
        print(f"head dim {d} is not yet in cuda_decode.HEAD_DIMS (attend keeps it on Triton): let through here")
        cuda_decode.HEAD_DIMS = (*cuda_decode.HEAD_DIMS, d)
    default = cuda_decode.BUILDS[args.bits, d]
    texts = args.variants or [f"{default.tiles},{default.stages},{default.blocks_per_sm}"]
    variants = [(text, parse_variant(text, args.bits, d)) for text in texts]
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    copy_tbps = bda.copy_bandwidth(flush)
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {copy_tbps:.2f} TB/s; {heads[0]} q / {heads[1]} kv heads, D {d}, int{args.bits} g64")
    rows = []
    for shape in args.shapes:
        b, t = (int(x) for x in shape.split(","))
        rows += sweep_shape(b, t, heads, args.bits, variants, args.splits, args.reps, flush, copy_tbps)
        torch.cuda.empty_cache()
    name = f"cuda_decode_sweep_{gpu.lower().replace(' ', '_')}.json"
    record = dict(gpu=gpu, torch=torch.__version__, kernel=args.kernel, copy_tbps=copy_tbps,
                  command=" ".join(sys.argv), rows=rows)
    folders = {args.out.resolve()} | ({Path(os.environ["OUT"]).resolve()} if os.environ.get("OUT") else set())
    for folder in folders:  # a set: --out $OUT must not append the record twice
        path = folder / name
        old = json.loads(path.read_text()) if path.exists() else {"records": []}
        old["records"].append(record)
        path.write_text(json.dumps(old, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
