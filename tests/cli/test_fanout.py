"""Fan-out of sweep specs over worker processes: retry once, never drop, same numbers as one process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kvmlx_cli import fanout
from kvmlx_cli.app import app
from kvspec.models import ALIASES, ModelNotAvailable


def job(specs, devices=("cpu", "cpu")):
    return fanout.Job("torch", "m", "bbc", 32, 16, None, 8, 0, 0, tuple(specs), tuple(devices), None, "")


def fake_spawn(behaviour):
    """A stand-in for the spawned workers: behaviour(attempt, spec) -> "ok", "error" or "die"."""
    calls = []

    def spawn(j):
        calls.append(j)
        attempt = len(calls)
        out = Path(j.out_dir) / "worker0.jsonl"
        for text in j.specs:
            what = behaviour(attempt, text)
            if what == "die":
                return "ProcessExitedException: process 1 terminated with signal SIGKILL"
            rec = {"spec": text, "row": {"spec": text, "ppl": 1.0}, "nll": [0.0, 0.0]} if what == "ok" else {"spec": text, "error": "RuntimeError: boom"}
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        return None

    return spawn, calls


def test_failed_specs_are_retried_once(monkeypatch):
    spawn, calls = fake_spawn(lambda attempt, s: "error" if (s == "int4" and attempt == 1) else "ok")
    monkeypatch.setattr(fanout, "_spawn", spawn)
    logs = []
    results, failures = fanout.run(job(["fp16", "int4", "int8"]), logs.append)
    assert [r["spec"] for r, _ in results] == ["fp16", "int4", "int8"] and failures == []
    assert len(calls) == 2 and calls[1].specs == ("int4",) and calls[1].devices == ("cpu",)
    assert any("int4 failed: RuntimeError: boom" in m for m in logs) and any("retrying 1 spec" in m for m in logs)


def test_a_dead_worker_loses_nothing_silently(monkeypatch):
    spawn, calls = fake_spawn(lambda attempt, s: "die" if s == "int2" else "ok")
    monkeypatch.setattr(fanout, "_spawn", spawn)
    logs = []
    results, failures = fanout.run(job(["fp16", "int8", "int2", "int4"]), logs.append)
    assert [r["spec"] for r, _ in results] == ["fp16", "int8"]
    assert {f["spec"] for f in failures} == {"int2", "int4"}
    assert all("worker died" in f["error"] for f in failures)
    assert len(calls) == 2 and any("a worker failed" in m for m in logs)


@pytest.mark.slow
def test_two_cpu_workers_match_one_process(tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("the torch backend is not installed")
    try:
        ALIASES["smollm2-135m"].gguf_path()
    except ModelNotAvailable as e:
        pytest.skip(str(e))
    common = ["sweep", "--backend", "torch", "--device", "cpu", "--budgets", "8.5", "--max-tokens", "40",
              "--context", "20", "--chunk", "8", "--kv", "rank8-random", "--calib-tokens", "64"]
    runner = CliRunner()
    # Output prefixes with a dot of their own (like "sweep-qwen2.5-0.5b-bbc") keep it.
    one = runner.invoke(app, [*common, "--out", str(tmp_path / "one-0.5b")])
    assert one.exit_code == 0, one.output
    two = runner.invoke(app, [*common, "--workers", "2", "--out", str(tmp_path / "two-0.5b")])
    assert two.exit_code == 0, two.output
    a = json.loads((tmp_path / "one-0.5b.json").read_text())
    b = json.loads((tmp_path / "two-0.5b.json").read_text())
    assert b["workers"] == ["cpu", "cpu"] and b["failures"] == []
    assert [r["spec"] for r in a["results"]] == [r["spec"] for r in b["results"]]
    np.testing.assert_allclose([r["ppl"] for r in b["results"]], [r["ppl"] for r in a["results"]], rtol=1e-9)
    assert (tmp_path / "two-0.5b.png").stat().st_size > 0 and "| 8.5 |" in (tmp_path / "two-0.5b.md").read_text()
    assert b["device"] == "cpu" and b["hardware"]


@pytest.mark.parametrize("args,option", [(["ppl", "--backend", "mlx", "--device-map", "auto"], "--device-map"),
                                         (["sweep", "--backend", "mlx", "--gpus", "2"], "--gpus")])
def test_multi_gpu_options_name_the_torch_backend(args, option):
    """Sharding and GPU fan-out exist for the torch backend only: asking them of MLX is refused before
    any model loads, naming the option and the way out."""
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 2
    assert option in result.output and "--backend torch" in result.output
