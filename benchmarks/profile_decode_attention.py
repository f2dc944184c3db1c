"""Where the decode-attention kernel's time goes, from Nsight Compute's per-instruction samples.

Two commands:
- `launch METHOD [--batch B --context T]`: one decode attention at Mistral-7B heads (32 q / 8 kv, D 128)
  over random stored arrays (bench_decode_attention.compressed_part), three calls; METHOD is a
  kvtorch cache (int8 / int4 / int2 / rank32) or sdpa (torch SDPA bf16). Run it under ncu (CUDA):
      ncu --clock-control none --set full --import-source yes -k regex:_split_kernel --launch-skip 2 \
          --launch-count 1 -o int4 python benchmarks/profile_decode_attention.py launch int4
      ncu -i int4.ncu-rep --page source --csv --print-source sass > int4.sass.csv
- `report FILE.csv`: the stall reasons over all warp samples, executed instructions by opcode (with
  each opcode's share of the samples) and the most-sampled instructions, from that source-page CSV.

The 2026-11-30 H200 profile (b8 x 32k, the lean split kernel) is in
results/ncu_decode_attention_nvidia_h200.txt.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

STALL_PREFIX = "stall_"
SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def _opcode(sass: str) -> str:
    """The opcode of a SASS line without predicate and modifiers: '@P1 IMAD.MOV.U32 R1, ...' -> 'IMAD'."""
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def report(path: Path, top: int = 15) -> str:
    """Tables of stall reasons, opcodes and hot instructions from ncu's `--page source --csv` output."""
    rows = list(csv.reader(path.open()))
    header_at = next((i for i, r in enumerate(rows) if "Address" in r and "Source" in r), None)
    if header_at is None:
        raise ValueError(f"{path}: no 'Address'/'Source' header: not ncu's source page (--page source --csv)")
    header, data = rows[header_at], [r for r in rows[header_at + 1 :] if len(r) == len(rows[header_at])]
    col = {name: i for i, name in enumerate(header)}
    stalls = [h for h in header if h.startswith(STALL_PREFIX) and "Not Issued" not in h]
    if not stalls or SAMPLES not in col or EXECUTED not in col:
        raise ValueError(f"{path}: no stall or execution columns (profile with --set full --import-source yes)")
    by_reason, by_op, samples_by_op = Counter(), Counter(), Counter()
    for r in data:
        for h in stalls:
            by_reason[h] += _number(r[col[h]])
        op = _opcode(r[col["Source"]])
        by_op[op] += _number(r[col[EXECUTED]])
        samples_by_op[op] += _number(r[col[SAMPLES]])
    n_samples, n_exec = sum(by_reason.values()) or 1.0, sum(by_op.values()) or 1.0
    out = [f"{path.name}: {int(n_samples):,} warp samples, {int(n_exec):,} warp instructions executed",
           "", "stall reason                   % of samples"]
    out += [f"  {h[len(STALL_PREFIX):]:28s} {100 * v / n_samples:5.1f}" for h, v in by_reason.most_common() if v]
    out += ["", "opcode       % of instructions  % of samples"]
    out += [f"  {k:10s} {100 * v / n_exec:10.1f} {100 * samples_by_op[k] / n_samples:13.1f}"
            for k, v in by_op.most_common(top)]
    out += ["", "most-sampled instructions (% of samples, top two reasons)"]
    for r in sorted(data, key=lambda r: -_number(r[col[SAMPLES]]))[:top]:
        reasons = sorted(((_number(r[col[h]]), h[len(STALL_PREFIX):]) for h in stalls), reverse=True)[:2]
        why = ", ".join(f"{name} {100 * v / n_samples:.1f}" for v, name in reasons if v)
        out.append(f"  {100 * _number(r[col[SAMPLES]]) / n_samples:5.1f}  {r[col['Source']].strip()[:56]:56s} {why}")
    return "\n".join(out)


def launch(method: str, batch: int, context: int, block: tuple[int, int, int] | None = None,
           splits: int | None = None) -> None:
    """Three decode attentions of `method` at Mistral-7B heads (ncu profiles the third); block and
    splits as kvtorch.kernels.attention.attend takes them (default: its launch policy)."""
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        sys.exit("launch needs CUDA (it is what ncu profiles); `report` runs anywhere")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_decode_attention as bda

    hq, hkv, d = bda.MODELS["mistral-7b"]
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(batch, hq, 1, d, device="cuda", generator=gen).bfloat16()
    if method == "sdpa":
        k, v = (torch.randn(batch, hkv, context, d, device="cuda", generator=gen).bfloat16() for _ in range(2))
        fn = lambda: F.scaled_dot_product_attention(q, k, v, scale=d**-0.5, enable_gqa=True)  # noqa: E731
    else:
        kp, vp = (bda.compressed_part(method, batch, hkv, context, d, gen) for _ in range(2))
        qpos = torch.tensor([context - 1], device="cuda")
        fn = lambda: bda.attend(q, qpos, kp, vp, scale=d**-0.5, block=block, splits=splits)  # noqa: E731
    for _ in range(3):
        fn()
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("launch", help="one decode attention for ncu to profile (CUDA)")
    lp.add_argument("method", choices=["int8", "int4", "int2", "rank32", "sdpa"])
    lp.add_argument("--batch", type=int, default=8)
    lp.add_argument("--context", type=int, default=32768)
    lp.add_argument("--block", help="keys per block, warps, stages: '32,1,3' (default: the launch policy)")
    lp.add_argument("--splits", type=int, help="key splits (default: the launch policy)")
    rp = sub.add_parser("report", help="tables from ncu's source-page CSV")
    rp.add_argument("csv", type=Path)
    rp.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    if args.command == "launch":
        block = tuple(int(x) for x in args.block.split(",")) if args.block else None
        launch(args.method, args.batch, args.context, block, args.splits)
    else:
        print(report(args.csv, args.top))


if __name__ == "__main__":
    main()
