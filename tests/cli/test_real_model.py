"""`kvmlx ppl` and `kvmlx chat` end to end on the bundled SmolLM2, through both backends.

Each backend's model loads once for the module (commands here run in one process through typer's
CliRunner): a load takes ~35 s on a CPU, and what a command does with the runner is under test, not
the load itself (tests/kvtorch/test_runner.py, tests/kvmlx/test_gguf.py cover loading).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from kvmlx_cli import backend as backends
from kvmlx_cli.app import app
from kvspec.models import ALIASES, ModelNotAvailable

from .helpers import flat

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def load_once():
    """kvmlx_cli.backend.runner memoized by its arguments for this module's commands."""
    loaded, load = {}, backends.runner

    def memo(backend, model, **options):
        key = (backends.resolve(backend), model, tuple(sorted(options.items())))
        if key not in loaded:
            loaded[key] = load(backend, model, **options)
        return loaded[key]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(backends, "runner", memo)
        yield


def needs(backend: str) -> None:
    if importlib.util.find_spec({"torch": "torch", "mlx": "mlx"}[backend]) is None:
        pytest.skip(f"the {backend} backend is not installed")
    try:
        ALIASES["smollm2-135m"].gguf_path()
    except ModelNotAvailable as e:
        pytest.skip(str(e))



# MLX's CPU matmuls run at ~2.5 GFLOP/s (the wheel's reference BLAS; numpy here: ~110), so its run
# is shorter and skips the final-word test (runner.greedy is checked in tests/conformance).
@pytest.mark.parametrize("backend, tokens, lastword", [("torch", 80, 2), ("mlx", 40, 0)])
def test_ppl_json_rows(backend, tokens, lastword):
    needs(backend)
    r = runner.invoke(app, ["ppl", "--backend", backend, "--max-tokens", str(tokens), "--context", "40", "--chunk", "16",
                            "--kv", "int8,int4", "--kv", "rank16-random", "--lastword", str(lastword), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    rows = report["results"]
    assert [x["spec"] for x in rows] == ["fp16", "int8", "int4", "rank16-random"]
    assert report["backend"] == backend and "decoding" in report["protocol"]
    assert report["command"].startswith("kvmlx ppl") and report["hardware"]
    for x in rows:
        assert x["tokens"] == tokens - 1 and 1 < x["ppl"] < 1e6  # rank16 on a random basis ruins the model
        assert x["ppl_ci"][0] < x["ppl"] < x["ppl_ci"][1]
        if lastword:
            assert x["lastword_n"] == lastword and 0 <= x["lastword_accuracy"] <= 1
        else:
            assert "lastword_n" not in x
    assert rows[0]["delta_ppl"] == 0 and rows[0]["bits_per_element"] == 16
    assert rows[1]["bits_per_element"] == 8.5 and abs(rows[1]["delta_ppl_pct"]) < 5
    assert rows[3]["kv_bytes"] < rows[1]["kv_bytes"] < rows[0]["kv_bytes"]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_chat_one_shot_answers(backend):
    needs(backend)
    r = runner.invoke(app, ["chat", "--backend", backend, "--kv", "int4", "--max-tokens", "24",
                            "--prompt", "What is the capital of France? Answer in one sentence."])
    assert r.exit_code == 0, r.output
    assert "Paris" in r.stdout


@pytest.mark.parametrize(
    "args, fix",
    [
        (["--model", "no-such-model"], "--model"),
        (["--data", "nowhere"], "use one of bbc"),
        (["--stride", "50", "--context", "20"], "exceeds --context"),
    ],
)
def test_bad_input_is_a_usage_error(args, fix):
    needs("torch")
    r = runner.invoke(app, ["ppl", "--backend", "torch", "--max-tokens", "32", *args])
    assert r.exit_code == 2, r.output
    assert fix in flat(r.output) and "Traceback" not in r.output


def test_too_little_text(tmp_path):
    needs("torch")
    (tmp_path / "t.txt").write_text("Too short.")
    r = runner.invoke(app, ["ppl", "--backend", "torch", "--data", str(tmp_path / "t.txt")])
    assert r.exit_code == 2 and "need at least 16" in flat(r.output)


@pytest.mark.parametrize("backends", [("torch", "mlx")])
def test_chat_saves_a_cache_the_other_backend_resumes(tmp_path, backends):
    for b in backends:
        needs(b)
    path = tmp_path / "chat.safetensors"
    question = "What is the capital of France? Answer in one sentence."
    first = runner.invoke(app, ["chat", "--backend", backends[0], "--kv", "int4-kchan-res16", "--max-tokens", "12",
                                "--prompt", question, "--save-cache", str(path)])
    assert first.exit_code == 0 and path.stat().st_size > 0, first.output
    again = runner.invoke(app, ["chat", "--backend", backends[1], "--kv", "int4-kchan-res16", "--max-tokens", "12",
                                "--prompt", question, "--load-cache", str(path)])
    assert again.exit_code == 0 and "Paris" in again.stdout, again.output
    wrong = runner.invoke(app, ["chat", "--backend", backends[1], "--kv", "int8", "--prompt", "hi", "--load-cache", str(path)])
    assert wrong.exit_code == 2 and "pass --kv int4-kchan-res16" in flat(wrong.output)
