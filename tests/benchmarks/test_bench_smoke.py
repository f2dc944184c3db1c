"""The GPU benchmarks' CPU-checkable parts, so a refactor cannot silently break them between device
sessions (bench_decode_attention's own `Part` lacked head_dim and end for a while, so its reference
check could not run: only the device would have said so)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")

import kvspec  # noqa: E402
from kvspec.tolerances import assert_close, spec_tolerance  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_decode_attention as bda  # noqa: E402


@pytest.mark.parametrize("method", ["int8", "int4", "int2", "rank32"])
def test_bench_decode_attention_inputs_run_through_kernels_and_reference(method, monkeypatch):
    """compressed_part builds what attend and the reference both take, and they agree."""
    if torch.cuda.is_available():
        pytest.skip("the CPU check of the benchmark's inputs (on a GPU the benchmark itself checks them)")
    monkeypatch.setattr(bda, "DEVICE", "cpu")
    gen = torch.Generator().manual_seed(3)
    b, hkv, t, d, g = 1, 2, 150, 128, 4
    k, v = (bda.compressed_part(method, b, hkv, t, d, gen) for _ in range(2))
    q = torch.randn(b, hkv * g, 1, d, generator=gen).bfloat16()
    qpos = torch.tensor([t - 1])
    ref = bda.attention_reference(q, qpos, k, v, scale=d**-0.5)
    out = bda.attend(q, qpos, k, v, scale=d**-0.5)
    spec = kvspec.parse("rank32-random-bf16" if method == "rank32" else f"{method}-bf16")
    assert_close(out.float(), ref.float().numpy(), spec_tolerance(spec, "bf16"), method)


def _e2e_smoke(out: Path, *caches: str) -> dict:
    """Run bench_decode_e2e.py --smoke (CPU, 2-layer model, interpreter) for `caches`; its JSON."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "benchmarks/bench_decode_e2e.py", "--smoke", "--out", str(out),
                        "--caches", *caches], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "decode_e2e_cpu-smoke.json").read_text())


def test_bench_decode_e2e_smoke_writes_rows(tmp_path):
    """The e2e script end to end on CPU: a row per cache and context."""
    rows = _e2e_smoke(tmp_path, "int4-bf16", "bf16-sdpa")["rows"]
    assert sorted((x["cache"], x["context"]) for x in rows) == [
        ("bf16-sdpa", 40), ("bf16-sdpa", 70), ("int4-bf16", 40), ("int4-bf16", 70)]
    for x in rows:
        assert x["step_ms"] > 0 and x["tokens_per_s"] > 0
    assert all(0 < x["append_share_pct"] < 100 for x in rows if x["cache"] == "int4-bf16")


def test_bench_decode_e2e_smoke_runs_transformers_quantized_cache(tmp_path):
    """transformers' QuantizedCache (quanto backend) as the e2e bench builds it, on CPU."""
    pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (pip install optimum-quanto)")
    data = _e2e_smoke(tmp_path, "quanto-int4")
    assert data["skipped"] == [] and [x["cache"] for x in data["rows"]] == ["quanto-int4", "quanto-int4"]
    assert all("append_share_pct" not in x for x in data["rows"])  # only kvtorch appends are timed


def test_profile_report_reads_ncu_source_page(tmp_path):
    """profile_decode_attention's report: stall shares, opcodes without predicates or modifiers, the
    hottest instruction first; a CSV that is not ncu's source page is refused by name."""
    import profile_decode_attention as pda

    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_wait",
            "stall_short_sb", "stall_wait (Not Issued)"]
    rows = [["0x10", "  IMAD.MOV.U32 R1, RZ, RZ, R2", "30", "1,000", "10", "20", "5"],
            ["0x20", "@P1 HFMA2 R3, R4, R5, R6", "10", "3,000", "10", "0", "0"]]
    path = tmp_path / "k.sass.csv"
    path.write_text("\n".join(",".join(f'"{c}"' for c in r) for r in [["Kernel Name", "_split_kernel"], head, *rows]))
    text = pda.report(path)
    assert "40 warp samples, 4,000 warp instructions" in text
    table = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("  ")}
    assert table["wait"] == ["50.0"] and table["short_sb"] == ["50.0"]  # "Not Issued" columns not counted
    assert table["IMAD"] == ["25.0", "75.0"] and table["HFMA2"] == ["75.0", "25.0"]
    hot = text.split("most-sampled instructions")[1].splitlines()[1]
    assert hot.split()[:2] == ["75.0", "IMAD.MOV.U32"]
    bad = tmp_path / "other.csv"
    bad.write_text('"a","b"\n"1","2"\n')
    with pytest.raises(ValueError, match="source page"):
        pda.report(bad)


def test_sweep_cuda_decode_parses_variants():
    """TILES,STAGES,BLOCKS_PER_SM; blocks whose rings pass a multiprocessor's 227 KB are refused by name."""
    import sweep_cuda_decode as scd

    from kvtorch.kernels.cuda_decode import Build

    assert scd.parse_variant("2,2,3", 4, 128) == Build(2, 2, 3)
    assert scd.parse_variant("2,2,2", 8, 128) == Build(2, 2, 2)
    assert scd.parse_variant("2,2,4", 8, 64) == Build(2, 2, 4)
    with pytest.raises(SystemExit, match="227 KB"):
        scd.parse_variant("8,4,1", 4, 128)
    with pytest.raises(SystemExit, match="227 KB"):
        scd.parse_variant("2,2,3", 8, 128)  # 3 x 77,824 B


def test_read_floor_kernel_reads_with_wide_loads_and_stores_once(tmp_path):
    """read_floor's streaming kernel, each layout and loads-in-flight it builds, compiles for sm_90 (no GPU:
    NVRTC from the test extra); every load is a 128-bit LDG (UNROLL in the loop, one in the tail) and the
    sink's is the one store, so no load is dropped and the floor does no other memory traffic. Its
    configurations fit a multiprocessor's 2,048 threads."""
    import read_floor as rf

    from kvtorch.kernels.cuda_decode import nvrtc_cubin
    from tests.kvtorch.helpers import cuobjdump_tool, nvrtc_library

    assert all(threads * per_sm <= 2048 for _, threads, per_sm, _ in rf.CONFIGS)
    for chunked, unroll in sorted({(c[0], c[3]) for c in rf.CONFIGS}):
        path = tmp_path / f"read_{int(chunked)}_{unroll}.cubin"
        path.write_bytes(nvrtc_cubin(rf.READ_SOURCE, "90", rf.read_defines(chunked, unroll), lib=nvrtc_library()))
        sass = subprocess.run([str(cuobjdump_tool()), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
        loads = re.findall(r"\bLDG\.E\.(\S+)", sass)
        assert len(loads) == unroll + 1 and all(x.startswith("128") for x in loads), (chunked, unroll, loads)
        assert len(re.findall(r"\bSTG\b", sass)) == 1, sass


def test_write_results_names_the_gpu_and_writes_out_and_the_device_output(tmp_path, monkeypatch):
    """The GPU benches' JSON: `<prefix>_<gpu>.json` in --out and in $OUT (the lent GPU's output folder)."""
    monkeypatch.setenv("OUT", str(tmp_path / "device"))
    record = {"gpu": "NVIDIA H200", "rows": [{"ms": 0.1}]}
    bda.write_results("read_floor", record, tmp_path / "results")
    for folder in ("results", "device"):
        assert json.loads((tmp_path / folder / "read_floor_nvidia_h200.json").read_text()) == record
