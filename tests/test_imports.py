"""Layering: kvspec imports neither framework; each backend imports only its own."""

import subprocess
import sys

import pytest

CASES = {
    "kvspec": ("torch", "mlx", "transformers", "mlx_lm"),
    "kvspec.reference": ("torch", "mlx"),
    "kvmlx_cli.app": ("torch", "mlx", "transformers", "mlx_lm"),
    "kvtorch": ("mlx", "mlx_lm"),
    "kvtorch.runner": ("mlx", "mlx_lm"),
    "kvmlx": ("torch",),
    "kvmlx.runner": ("torch",),
}


@pytest.mark.parametrize("module", sorted(CASES))
def test_import_does_not_pull_other_frameworks(module):
    forbidden = CASES[module]
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        f"print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if r.returncode and "No module named" in r.stderr:
        pytest.skip(f"{module} needs a framework that is not installed: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing {module} imported {r.stdout.strip()}"
