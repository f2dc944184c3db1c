"""`kvmlx spec describe` and `kvmlx spec list` through the real typer app."""

import json

from typer.testing import CliRunner

from kvmlx_cli.app import app

from .helpers import flat

runner = CliRunner()



def test_describe_issue_example():
    r = runner.invoke(app, ["spec", "describe", "int4-g64", "--model-shape", "32,8,128", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)
    assert row["bits_per_element"] == {"k": 4.5, "v": 4.5, "total": 4.5}
    assert row["bytes_per_token"] == 36864 and row["fp16_bytes_per_token"] == 131072


def test_describe_table_and_alias():
    r = runner.invoke(app, ["spec", "describe", "k8v4-kchan-res128", "--model", "smollm2-135m"])
    assert r.exit_code == 0, r.output
    assert "int8, group 64 along tokens" in r.stdout and "last 128 tokens" in r.stdout


def test_bad_inputs_exit_2_with_the_fix():
    for args, fix in (
        (["int5"], "use 2, 3, 4, 8"),
        (["int4-g128", "--model", "smollm2-135m"], "use one of g32, g64"),
        (["int4", "--model-shape", "32,8"], "LAYERS,KV_HEADS,HEAD_DIM"),
        (["int4", "--model", "nope"], "known: smollm2-135m"),
    ):
        r = runner.invoke(app, ["spec", "describe", *args])
        assert r.exit_code == 2 and fix in flat(r.output) and "Traceback" not in r.output, r.output


def test_list_shows_grammar():
    r = runner.invoke(app, ["spec", "list"])
    assert r.exit_code == 0 and "rank32-q4" in r.stdout and "-res128" in r.stdout
