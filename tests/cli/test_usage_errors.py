"""Usage errors that an alias's known shape decides are raised before the model loads (a load of the
bundled SmolLM2 takes ~35 s on a CPU), through the real typer app; the model need not be installed."""

import pytest
from typer.testing import CliRunner

from kvmlx_cli import experiment
from kvmlx_cli.app import app
from kvspec.models import ALIASES

from .helpers import flat

runner = CliRunner()



@pytest.fixture
def no_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the usage error")

    monkeypatch.setattr(experiment, "load_runner", refuse)


@pytest.mark.parametrize(
    "command, fix",
    [
        (["ppl", "--kv", "int4-g128"], "use one of g32, g64"),
        (["ppl", "--kv", "int8", "--kv", "int4-g128"], "use one of g32, g64"),
        (["ppl", "--context", "100000"], "--context 100000 exceeds the model's 8192 positions"),
        (["ppl", "--model", "qwen2.5-0.5b", "--context", "40000"], "exceeds the model's 32768 positions"),
        (["sweep", "--kv", "int4-g128"], "use one of g32, g64"),
        (["chat", "--kv", "int4-g128", "--prompt", "hi"], "use one of g32, g64"),
    ],
)
def test_alias_shape_errors_come_before_the_load(no_load, command, fix):
    r = runner.invoke(app, [*command, "--backend", "torch"])
    assert r.exit_code == 2, r.output
    assert fix in flat(r.output) and "Traceback" not in r.output


def test_valid_input_goes_on_to_the_load(no_load):
    """The early checks pass what the alias allows: the load is reached (and refused here)."""
    with pytest.raises(AssertionError, match="model was loaded"):
        runner.invoke(app, ["ppl", "--backend", "torch", "--kv", "int4-g64", "--context", "8192"], catch_exceptions=False)


def test_every_bundled_alias_names_its_context_length():
    assert all(a.max_positions for a in ALIASES.values())
