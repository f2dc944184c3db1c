"""Choosing and loading a backend lazily, so the CLI never imports the framework it does not use."""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys

import typer

BACKENDS = ("auto", "mlx", "torch")
_EXTRA = {"torch": "pip install torch 'kvmlx[torch]'", "mlx": "pip install 'kvmlx[mlx]'"}


def resolve(name: str) -> str:
    """auto -> mlx on Apple Silicon when MLX is installed, torch elsewhere."""
    if name not in BACKENDS:
        raise typer.BadParameter(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    if apple and importlib.util.find_spec("mlx") is not None:
        return "mlx"
    return "torch"


def runner(backend: str, model: str, **options):
    """A loaded Runner (docs/BACKENDS.md) of the chosen backend for `model`."""
    name = resolve(backend)
    module = {"torch": "kvtorch.runner", "mlx": "kvmlx.runner"}[name]
    framework = {"torch": "torch", "mlx": "mlx"}[name]
    if importlib.util.find_spec(framework) is None:
        raise typer.BadParameter(f"the {name} backend needs {framework}; install it with: {_EXTRA[name]}")
    return importlib.import_module(module).Runner(model, **options)
