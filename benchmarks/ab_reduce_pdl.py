"""A/B of the reduce's launch in kvtorch's decode attention: a programmatic dependent launch (sm_90+,
`kvtorch.kernels.attention.PDL = True`, the default) against a plain one (False), per method and
shape, at the bundled models' and Mistral-7B's heads.

Each (heads, shape, method) is checked against the plain-torch reference under both settings, then
timed `--repeats` times alternating the two in one process (medians of CUDA-graph replays with L2
flushed: bench_decode_attention.timed); the table prints every repeat and the best of each.

    python benchmarks/ab_reduce_pdl.py
    python benchmarks/ab_reduce_pdl.py --heads 32,8,128 --shapes 8,32768 --methods int4 rank32

Writes benchmarks/results/reduce_pdl_ab_<gpu>.json (and into $OUT when set). Session 27's
`results/reduce_pdl_ab_nvidia_h200.txt` was printed by this loop before it wrote JSON.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode_attention as bda  # noqa: E402

from kvtorch.kernels import attention  # noqa: E402

HEADS = ["32,8,128", "9,3,64", "4,1,256"]  # Mistral-7B, SmolLM2-135M, Gemma-3-270m
MAX_REL_ERR = 2e-2  # relative L2 error vs the reference (int2's bound; the others sit far below)


def ab_rows(heads: tuple[int, int, int], b: int, t: int, methods, repeats: int, reps: int, flush) -> list[dict]:
    """Rows of one batch x context at `heads`: SDPA bf16's time and, per method, every repeat of both settings."""
    hq, hkv, d = heads
    q, qpos, gen, sdpa = bda.query_and_sdpa(b, t, heads, flush, reps)
    rows = []
    for method in methods:
        kp, vp = (bda.compressed_part(method, b, hkv, t, d, gen) for _ in range(2))
        ref = bda.attention_reference(q, qpos, kp, vp, scale=d**-0.5)
        run = functools.partial(bda.attend, q, qpos, kp, vp, scale=d**-0.5)
        times = {False: [], True: []}
        for rep in range(repeats):
            for pdl in (False, True):
                attention.PDL = pdl  # read at each call: a graph captured after this line launches this way
                if rep == 0:
                    err = ((run().float() - ref.float()).norm() / ref.float().norm()).item()
                    if err > MAX_REL_ERR:
                        raise SystemExit(f"{method} at {heads} b{b} x {t}, PDL {pdl}: relative error {err:.2e}")
                times[pdl].append(bda.timed(run, flush, reps))
        attention.PDL = True
        rows.append(dict(heads=list(heads), batch=b, context=t, method=method, sdpa_ms=sdpa, plain_ms=times[False],
                         pdl_ms=times[True], plain_best=min(times[False]), pdl_best=min(times[True])))
        print(f"D{d} {hq}/{hkv} b{b} x {t} {method:7s} sdpa {sdpa:.4f}  plain "
              + "/".join(f"{x:.4f}" for x in times[False]) + "  pdl " + "/".join(f"{x:.4f}" for x in times[True])
              + f"  best x{sdpa / min(times[False]):.2f} -> x{sdpa / min(times[True]):.2f} SDPA", flush=True)
        del kp, vp, run
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", nargs="+", default=HEADS, help="QUERY_HEADS,KV_HEADS,HEAD_DIM")
    ap.add_argument("--shapes", nargs="+", default=["8,32768", "1,32768", "8,4096"], help="BATCH,CONTEXT")
    ap.add_argument("--methods", nargs="+", default=["int4", "int8", "int2", "rank32"],
                    choices=["int4", "int8", "int2", "rank32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("needs a CUDA GPU of compute capability 9.0+ (programmatic dependent launch)")
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    gpu = torch.cuda.get_device_name()
    rows = []
    for text in args.heads:
        heads = tuple(int(x) for x in text.split(","))
        for shape in args.shapes:
            b, t = (int(x) for x in shape.split(","))
            rows += ab_rows(heads, b, t, args.methods, args.repeats, args.reps, flush)
    record = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv),
                  rows=rows)
    bda.write_results("reduce_pdl_ab", record, args.out)


if __name__ == "__main__":
    main()
