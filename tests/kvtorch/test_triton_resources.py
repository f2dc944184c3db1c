"""The lean split launch's default configs fit an H200's shared memory (232,448 B per program),
checked by compiling the kernel offline for sm_90 (benchmarks/triton_smem.py; no GPU needed). 3-bit
tiles at D 128 asked 284,672 B with (64, 4, 3) and failed at launch on the H200 (2026-11-29)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# As in every kvtorch test module: on a CPU, triton must be imported with the interpreter on, or a
# later module's interpreted kernels fail in this worker. The compiles run in subprocesses without it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: no kernels to compile")

from kvspec.grammar import parse  # noqa: E402
from kvtorch.kernels.attention import default_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("d", [128, 256])
def test_the_default_3bit_block_fits_an_h200(tmp_path, d):
    t = parse("int3").k
    bn, warps, stages = default_block(t, t, d)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "smem.json"
    r = subprocess.run([sys.executable, "benchmarks/triton_smem.py", "int3", str(d), "4", f"{bn},{warps},{stages}",
                        "--json", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())[-1]
    assert row["block"] == [bn, warps, stages]
    assert row["fits_h200"], f"int3 at D {d} with {(bn, warps, stages)} asks {row['shared_bytes']:,} B"
