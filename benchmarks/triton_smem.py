"""Shared memory, registers and the lean loop's SASS instruction count of kvtorch's split-attention
kernel per (keys per block, warps, stages), compiled offline for a Hopper GPU (sm_90) on any machine:
no GPU needed.

Step 1 runs one decode call on CPU under TRITON_INTERPRET=1 to capture the kernel's argument types and
constexprs for a method and shape; step 2 (a fresh process, without the interpreter) compiles that
specialization with triton.compile for each config and prints what it asks for. An H200 gives a
program at most 232,448 B of shared memory; a config above that fails at launch there with
"OutOfResources: shared memory" (as int3 at D 128 with (64, 4, 3) did on 2026-11-29).

    python benchmarks/triton_smem.py int3 128 4 64,4,3 64,4,2 [--json PATH]
    (method int2/int3/int4/int8/rank32, head dim, query heads per KV head, configs)
Appends one record per config to PATH (default benchmarks/results/triton_smem_sm90.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H200_SMEM = 232_448
OUT = ROOT / "benchmarks" / "results" / "triton_smem_sm90.json"


def capture(method: str, d: int, g: int) -> dict:
    """Argument types and constexprs of the lean split launch for `method` at head dim d, G heads."""
    import torch

    import benchmarks.bench_decode_attention as bda
    from kvtorch.kernels import _attention_triton as at
    from kvtorch.kernels import attention as ka

    bda.DEVICE = "cpu"
    seen = {}

    class Capture:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def call(*args, **kw):
                if not kw.get("GENERAL", True):
                    seen.update(args=args, kw=kw)
                return self.fn[grid](*args, **kw)
            return call

    at._split_kernel = Capture(at._split_kernel)
    gen = torch.Generator().manual_seed(0)
    k, v = (bda.compressed_part(method, 1, 2, 300, d, gen) for _ in range(2))
    q = torch.randn(1, 2 * g, 1, d).bfloat16()
    ka.attend(q, torch.tensor([299]), k, v, scale=d ** -0.5, block=(16, 4, 1))
    types = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
             torch.int64: "*i64"}
    names = at._split_kernel.fn.arg_names
    signature, constexprs = {}, {}
    for name, a in zip(names, seen["args"]):
        if isinstance(a, torch.Tensor):
            signature[name] = types[a.dtype]
        elif isinstance(a, int):
            signature[name] = "i64" if abs(a) >= 2**31 else "i32"
        else:
            signature[name] = "fp32"
    for name in names[len(seen["args"]):]:
        signature[name] = "constexpr"
        value = seen["kw"][name]
        constexprs[name] = str(value) if name == "DOT" else value
    return {"signature": signature, "constexprs": constexprs}


def compile_configs(spec: dict, method: str, configs: list[tuple[int, int, int]]) -> list[dict]:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvtorch.kernels import _attention_triton as at

    base = dict(spec["constexprs"], MM_F32=False, PTX=method in ("int4", "int8"))
    base["DOT"] = tl.bfloat16 if "bf" in base["DOT"] else tl.float16
    rows = []
    for bn, warps, stages in configs:
        src = ASTSource(fn=at._split_kernel, signature=spec["signature"], constexprs=dict(base, BN=bn))
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        loop = sass_loop(kernel.asm["cubin"])
        per_element = loop["instructions"] * warps * 32 / (bn * (base["DK"] + base["DV"]))
        rows.append({"block": [bn, warps, stages], "shared_bytes": kernel.metadata.shared,
                     "fits_h200": kernel.metadata.shared <= H200_SMEM, "registers": loop["registers"],
                     "loop_instructions_per_warp": loop["instructions"],
                     "loop_instructions_per_element": per_element, "loop_opcodes": loop["opcodes"]})
    return rows


def sass_loop(cubin: bytes) -> dict:
    """Registers per thread and the largest loop of a compiled kernel's SASS (the lean loop over key
    blocks): instructions per warp per iteration and their opcodes, most frequent first. Offline
    compiles lack the device's divisibility specialization, so loads count unvectorized here."""
    import collections
    import re
    import tempfile

    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(bin_dir / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(bin_dir / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    instructions, labels = [], {}
    for line in sass.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(instructions)
        elif m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line):
            instructions.append(m.group(1))
    best = (0, 0, -1)  # (length, first, last) of the longest backward branch's body
    for i, text in enumerate(instructions):
        m = re.search(r"BRA\s.*?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), i + 1) <= i:
            best = max(best, (i - labels[m.group(1)] + 1, labels[m.group(1)], i))
    n, first, last = best
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                              for t in instructions[first:last + 1])
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)), "instructions": n,
            "opcodes": dict(ops.most_common(12))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method", help="int2, int3, int4, int8 or rank32")
    ap.add_argument("d", type=int, help="head dim")
    ap.add_argument("g", type=int, help="query heads per KV head")
    ap.add_argument("configs", nargs="*", default=["64,4,3"], help="keys per block,warps,stages")
    ap.add_argument("--json", type=Path, default=OUT, help="file the records are appended to")
    ap.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)  # step 1, in the child
    args = ap.parse_args()
    method, d, g, out_path = args.method, args.d, args.g, args.json
    if args.capture:
        print(json.dumps(capture(method, d, g)))
        return
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, method, str(d), str(g), "--capture"], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    spec = json.loads(out.stdout.strip().splitlines()[-1])
    import triton

    records = json.loads(out_path.read_text()) if out_path.exists() else []
    for row in compile_configs(spec, method, configs):
        record = {"method": method, "head_dim": d, "gqa": g, **row, "target": "cuda sm_90", "triton": triton.__version__}
        records.append(record)
        print(f"{method} D{d} G{g} block {tuple(row['block'])}: {row['shared_bytes']:,} B shared "
              f"({'fits' if row['fits_h200'] else 'exceeds'} the H200's {H200_SMEM:,}), {row['registers']} registers, "
              f"lean loop {row['loop_instructions_per_warp']} instructions per warp per block = "
              f"{row['loop_instructions_per_element']:.2f} per K/V element")
    out_path.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
