"""`kvmlx plot`: several sweep JSONs in one figure, and the errors a wrong file gets."""

import json

import pytest
from typer.testing import CliRunner

from kvmlx_cli.app import app

from .helpers import flat

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'kvmlx[plot]')")
runner = CliRunner()



def sweep(tmp_path, model: str) -> str:
    """A sweep report as `kvmlx sweep` writes it, with one row per family at two budgets."""
    rows = [{"spec": "fp16", "family": "baseline", "bits_per_element_limit": 16.0, "delta_ppl": 0.0}]
    for family, penalty in (("int (token)", 1.0), ("int (K per channel)", 0.1), ("rank", 50.0), ("hybrid (q8)", 9.0)):
        rows += [{"spec": f"{family}@{b}", "family": family, "bits_per_element_limit": b, "delta_ppl": penalty * 4.5 / b}
                 for b in (2.5, 4.5)]
    path = tmp_path / f"sweep-{model}.json"
    path.write_text(json.dumps({"model": model, "data": "bbc", "results": rows}))
    return str(path)


def test_plot_draws_every_model_into_one_png(tmp_path):
    out = tmp_path / "grid.png"
    r = runner.invoke(app, ["plot", sweep(tmp_path, "a"), sweep(tmp_path, "b"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_names_the_file_that_is_not_a_sweep(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text(json.dumps({"rows": []}))
    r = runner.invoke(app, ["plot", str(bad), "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "notes.json: no 'model' and 'results'" in flat(r.output)
    r = runner.invoke(app, ["plot", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "missing.json: not a readable sweep JSON" in flat(r.output)
    assert not (tmp_path / "x.png").exists()
