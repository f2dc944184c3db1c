"""Sweeps fanned out over GPUs, and a model sharded over them: speedup and identical results.

Runs, as a user would, through the CLI (one subprocess each, wall clock from start to exit):
1. `kvmlx sweep --gpus 1` and `kvmlx sweep --gpus 2` on the same model, corpus and budgets; every
   spec's PPL and per-spec token count must be identical (each spec runs whole on one GPU; the GPUs
   are of one kind), and the speedup is the ratio of the two wall times (model loads included).
2. `kvmlx ppl --device-map auto` (accelerate splits the layers over both GPUs; each layer's cache
   and kernels on its layer's GPU) against `kvmlx ppl --device cuda:0` on the same specs: the PPLs
   must agree to 1e-3 relative (different layer placement may pick other GEMM kernels), and the report
   must name both GPUs in `placement`.

    python benchmarks/bench_sweep_gpus.py --model smollm2-135m --max-tokens 8192   # nvidia-h200-x2
Writes benchmarks/results/sweep_gpus_<gpus>.json (and $OUT/ when OUT is set). Needs 2 CUDA GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from kvmlx_cli.app import main; main()"]
PPL_SPECS = "int8,int4,int4-kchan,rank32-q8"


def timed(args: list[str]) -> tuple[float, str]:
    """(wall seconds, stdout) of one CLI command; raises with its output if it fails."""
    start = time.perf_counter()
    done = subprocess.run(CLI + args, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall, done.stdout


def sweep(gpus: int, common: list[str], out: Path) -> tuple[float, dict]:
    wall, _ = timed(["sweep", *common, "--gpus", str(gpus), "--out", str(out / f"g{gpus}")])
    return wall, json.loads((out / f"g{gpus}.json").read_text())


def compare(a: list[dict], b: list[dict]) -> dict:
    """Per spec: |PPL difference| and whether PPL and token count are identical."""
    rows_b = {r["spec"]: r for r in b}
    diffs = {r["spec"]: abs(r["ppl"] - rows_b[r["spec"]]["ppl"]) for r in a if r["spec"] in rows_b}
    same = [r["spec"] for r in a if r["spec"] in rows_b and r["ppl"] == rows_b[r["spec"]]["ppl"]
            and r["tokens"] == rows_b[r["spec"]]["tokens"]]
    return {"specs": len(a), "in_both": len(diffs), "identical": len(same), "max_abs_ppl_diff": max(diffs.values(), default=None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="bbc")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--budgets", default="2.5,4.5,8.5")
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 CUDA GPUs; {torch.cuda.device_count()} visible")
    common = ["--model", args.model, "--data", args.data, "--max-tokens", str(args.max_tokens), "--budgets", args.budgets]
    result: dict = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
                    "command": " ".join(sys.argv), "model": args.model, "data": args.data, "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        walls, reports = {}, {}
        for gpus in (1, 2):
            walls[gpus], reports[gpus] = sweep(gpus, common, out)
            print(f"sweep --gpus {gpus}: {walls[gpus]:.1f} s, {len(reports[gpus]['results'])} specs, "
                  f"failures {reports[gpus]['failures']}", flush=True)
    result["sweep"] = {
        "budgets": args.budgets,
        "wall_s": {f"gpus{g}": round(w, 2) for g, w in walls.items()},
        "speedup": round(walls[1] / walls[2], 3),
        "workers": {f"gpus{g}": r["workers"] for g, r in reports.items()},
        "failures": {f"gpus{g}": r["failures"] for g, r in reports.items()},
        "agreement": compare(reports[1]["results"], reports[2]["results"]),
        "results_gpus2": [{k: r[k] for k in ("spec", "ppl", "delta_ppl_pct", "tokens", "tokens_per_s")} for r in reports[2]["results"]],
    }
    ppl_common = ["ppl", "--model", args.model, "--data", args.data, "--max-tokens", "4096", "--kv", PPL_SPECS, "--json"]
    ppl = {}
    for name, extra in (("one_gpu", ["--device", "cuda:0"]), ("device_map_auto", ["--device-map", "auto"])):
        wall, stdout = timed(ppl_common + extra)
        ppl[name] = {"wall_s": round(wall, 2), "report": json.loads(stdout.strip().splitlines()[-1])}
        print(f"ppl {name}: {wall:.1f} s, placement {ppl[name]['report'].get('placement')}", flush=True)
    one, split = (ppl[k]["report"]["results"] for k in ("one_gpu", "device_map_auto"))
    rel = {a["spec"]: abs(a["ppl"] - b["ppl"]) / a["ppl"] for a, b in zip(one, split)}
    result["ppl_device_map"] = {
        "specs": PPL_SPECS, "placement": ppl["device_map_auto"]["report"].get("placement"),
        "ppl_one_gpu": {r["spec"]: r["ppl"] for r in one}, "ppl_device_map": {r["spec"]: r["ppl"] for r in split},
        "max_rel_diff": max(rel.values()), "within_1e-3": max(rel.values()) <= 1e-3,
        "peak_memory_bytes": {k: [r["peak_memory_bytes"] for r in ppl[k]["report"]["results"]] for k in ppl},
        "wall_s": {k: ppl[k]["wall_s"] for k in ppl},
    }
    a = result["sweep"]["agreement"]
    print(f"\n| run | wall s | result |\n|---|---|---|\n"
          f"| sweep --gpus 1 | {walls[1]:.1f} | {a['specs']} specs |\n"
          f"| sweep --gpus 2 | {walls[2]:.1f} | speedup {result['sweep']['speedup']:.2f}x; "
          f"{a['identical']}/{a['specs']} PPLs identical (max diff {a['max_abs_ppl_diff']}) |\n"
          f"| ppl --device-map auto | {ppl['device_map_auto']['wall_s']:.1f} | {result['ppl_device_map']['placement']}; "
          f"max rel PPL diff vs one GPU {result['ppl_device_map']['max_rel_diff']:.2e} |")
    name = "sweep_gpus_" + "-".join(sorted({g.lower().replace("nvidia ", "").replace(" ", "-") for g in result["gpus"]})) + f"-x{len(result['gpus'])}.json"
    text = json.dumps(result, indent=1)
    (ROOT / "benchmarks/results" / name).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(text)
    print(f"wrote benchmarks/results/{name}")


if __name__ == "__main__":
    main()
