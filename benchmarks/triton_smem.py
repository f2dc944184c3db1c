"""Shared memory, registers and the lean loop's SASS instruction count of kvtorch's split-attention
kernel per (keys per block, warps, stages), compiled offline for a Hopper GPU (sm_90) on any machine:
no GPU needed.

Step 1 runs one decode call on CPU under TRITON_INTERPRET=1 and records the lean launch's arguments and
constexprs for a method and shape; step 2 (a fresh process, without the interpreter) specializes those
arguments with Triton's own binder, as a launch on the device does (16-byte aligned pointers, integers
divisible by 16), compiles that for each config and prints what it asks for: registers and shared
memory as the H200 reported them for the same launches (int4 (128, 4, 3): 168 registers; int8
(64, 2, 3): 188), the loop's instructions and its shared-memory accesses by width. An H200 gives a
program at most 232,448 B of shared memory; a config above that fails at launch there with
"OutOfResources: shared memory" (as int3 at D 128 with (64, 4, 3) did on 2026-11-29).

    python benchmarks/triton_smem.py int3 128 4 64,4,3 64,4,2 [--json PATH] [--dump DIR]
    (method int2/int3/int4/int8/rank32, head dim, query heads per KV head, configs)
Appends one record per config to PATH (default benchmarks/results/triton_smem_sm90.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H200_SMEM = 232_448
OUT = ROOT / "benchmarks" / "results" / "triton_smem_sm90.json"


def capture(method: str, d: int, g: int, out: str) -> None:
    """Record the lean split launch (arguments, constexprs) for `method` at head dim d, G heads into `out`."""
    import torch

    import benchmarks.bench_decode_attention as bda
    from kvtorch.kernels import _attention_triton as at
    from kvtorch.kernels import attention as ka
    from kvtorch.kernels.offline import plain

    bda.DEVICE = "cpu"
    seen = {}

    class Capture:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def call(*args, **kw):
                if not kw.get("GENERAL", True):
                    seen.update(args=args, kw=plain(kw))
                return self.fn[grid](*args, **kw)
            return call

    at._split_kernel = Capture(at._split_kernel)
    gen = torch.Generator().manual_seed(0)
    k, v = (bda.compressed_part(method, 1, 2, 300, d, gen) for _ in range(2))
    q = torch.randn(1, 2 * g, 1, d).bfloat16()
    ka.attend(q, torch.tensor([299]), k, v, scale=d ** -0.5, block=(16, 4, 1))
    torch.save(seen, out)


def compile_configs(path: str, method: str, configs: list[tuple[int, int, int]], dump: Path | None = None) -> list[dict]:
    """triton.compile the recorded launch for sm_90 per config, its arguments specialized by Triton's own
    binder as a launch on the device specializes them (16-byte aligned pointers, multiples of 16).
    dump: a folder that gets each config's TTGIR, PTX and SASS (METHOD-BN-WARPS-STAGES.ttgir, ...)."""
    import torch
    import triton.language as tl

    from kvtorch.kernels import _attention_triton as at
    from kvtorch.kernels.offline import compile_launch, restored, specialize

    seen = torch.load(path, weights_only=False)
    kw = restored(seen["kw"])
    kw.update(MM_F32=False, PTX=method in ("int4", "int8"), DOT=tl.float16)
    rows = []
    for bn, warps, stages in configs:
        kernel = compile_launch(*specialize(at._split_kernel, seen["args"],
                                            dict(kw, BN=bn, WARPS=warps, num_warps=warps, num_stages=stages)))
        sass = disassemble(kernel.asm["cubin"])
        loop = sass_loop(kernel.asm["cubin"], sass)
        if dump:
            stem = dump / f"{method}-{bn}-{warps}-{stages}"
            stem.with_suffix(".ttgir").write_text(kernel.asm["ttgir"])
            stem.with_suffix(".ptx").write_text(kernel.asm["ptx"])
            stem.with_suffix(".sass").write_text(sass)
        per_element = loop["instructions"] * warps * 32 / (bn * (kw["DK"] + kw["DV"]))
        rows.append({"block": [bn, warps, stages], "shared_bytes": kernel.metadata.shared,
                     "fits_h200": kernel.metadata.shared <= H200_SMEM, "registers": loop["registers"],
                     "loop_instructions_per_warp": loop["instructions"],
                     "loop_instructions_per_element": per_element, "loop_opcodes": loop["opcodes"],
                     "loop_shared_accesses": loop["shared"]})
    return rows


def _tool_output(tool: str, flag: str, cubin: bytes) -> str:
    """What `tool FLAG cubin` prints, for one of the CUDA binary tools bundled with Triton."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(path), flag, f.name], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes) -> str:
    """SASS of a cubin (the nvdisasm bundled with Triton)."""
    return _tool_output("nvdisasm", "-c", cubin)


def sass_loop(cubin: bytes, sass: str) -> dict:
    """Registers per thread (from the cubin) and the largest loop of its SASS `sass` (the lean loop over key
    blocks): instructions per warp per iteration, their opcodes (most frequent first) and the
    shared-memory accesses by opcode with width (STS.128, LDSM...)."""
    import collections
    import re

    usage = _tool_output("cuobjdump", "--dump-resource-usage", cubin)
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
    full = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in instructions[first:last + 1]]
    ops = collections.Counter(op.split(".")[0] for op in full)
    shared = collections.Counter(op for op in full if op.split(".")[0] in ("STS", "LDS", "LDSM", "STSM"))
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)), "instructions": n,
            "opcodes": dict(ops.most_common(12)), "shared": dict(shared.most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method", help="int2, int3, int4, int8 or rank32")
    ap.add_argument("d", type=int, help="head dim")
    ap.add_argument("g", type=int, help="query heads per KV head")
    ap.add_argument("configs", nargs="*", default=["64,4,3"], help="keys per block,warps,stages")
    ap.add_argument("--json", type=Path, default=OUT, help="file the records are appended to")
    ap.add_argument("--dump", type=Path, help="folder for each config's TTGIR, PTX and SASS")
    ap.add_argument("--capture", help=argparse.SUPPRESS)  # step 1, in the child: where to record the launch
    args = ap.parse_args()
    method, d, g, out_path = args.method, args.d, args.g, args.json
    if args.capture:
        capture(method, d, g, args.capture)
        return
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        launch = str(Path(tmp) / "launch.pt")
        subprocess.run([sys.executable, __file__, method, str(d), str(g), "--capture", launch], env=env, cwd=ROOT,
                       check=True, capture_output=True, text=True)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
        rows = compile_configs(launch, method, configs, args.dump)
    import triton

    records = json.loads(out_path.read_text()) if out_path.exists() else []
    for row in rows:
        record = {"method": method, "head_dim": d, "gqa": g, **row, "target": "cuda sm_90", "specialized": "as a device launch (Triton binder)",
                  "triton": triton.__version__}
        records.append(record)
        print(f"{method} D{d} G{g} block {tuple(row['block'])}: {row['shared_bytes']:,} B shared "
              f"({'fits' if row['fits_h200'] else 'exceeds'} the H200's {H200_SMEM:,}), {row['registers']} registers, "
              f"lean loop {row['loop_instructions_per_warp']} instructions per warp per block = "
              f"{row['loop_instructions_per_element']:.2f} per K/V element; shared accesses {row['loop_shared_accesses']}")
    out_path.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
