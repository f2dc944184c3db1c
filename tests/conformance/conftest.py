"""Registry of backends x devices for the conformance suite.

Each entry names a factory "module:function" under tests/conformance that returns an adapter (see
backends.py) or calls pytest.skip with the reason it is unavailable here (framework not installed,
no such device). Factories are imported lazily so one backend never imports another.
"""

from __future__ import annotations

import importlib

import pytest

BACKENDS = {
    "reference-cpu": ("backends", "reference"),
    "torch-cpu": ("adapter_torch", "cpu"),
    "torch-cuda": ("adapter_torch", "cuda"),
    "mlx-cpu": ("adapter_mlx", "cpu"),
    "mlx-gpu": ("adapter_mlx", "gpu"),
}


@pytest.fixture(params=sorted(BACKENDS), scope="session")
def backend(request):
    module, factory = BACKENDS[request.param]
    try:
        mod = importlib.import_module(f"tests.conformance.{module}")
    except ModuleNotFoundError as e:
        pytest.skip(f"{request.param}: adapter module not available ({e})")
    return getattr(mod, factory)()
