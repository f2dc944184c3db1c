"""Every Triton launch of a few decode scenarios compiles for the H200 (sm_90) as the device would
specialize it (tests/kvtorch/sm90.py; no GPU needed): paths that run only on a GPU, such as the 4-bit
PTX dequantization, are type-checked by LLVM here instead of aborting a process on the device."""

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

from . import sm90  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("scenario", sorted(sm90.SCENARIOS))
def test_every_launch_compiles_for_sm90(tmp_path, scenario):
    launches = tmp_path / "launches.pt"
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = dict(cwd=ROOT, capture_output=True, text=True, timeout=900)
    r = subprocess.run([sys.executable, "-m", "tests.kvtorch.sm90", "capture", scenario, str(launches)],
                       env=dict(base, TRITON_INTERPRET="1"), **run)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "tests.kvtorch.sm90", "compile", str(launches)], env=base, **run)
    # An LLVM abort ends the process with SIGABRT (-6) and its message on stderr.
    assert r.returncode == 0, f"rc {r.returncode}: {r.stderr[-3000:]}"
    assert {"_split_kernel:", "_reduce_kernel:"} <= set(r.stdout.split()), r.stdout
