"""Registry of backends x devices for the conformance suite. Each entry is a factory that returns
an adapter (see backends.py) or raises pytest.skip with the reason it is unavailable here."""

from __future__ import annotations

import pytest

from .backends import ReferenceBackend


def _reference():
    return ReferenceBackend()


BACKENDS = {
    "reference-cpu": _reference,
}


@pytest.fixture(params=sorted(BACKENDS), scope="session")
def backend(request):
    return BACKENDS[request.param]()
