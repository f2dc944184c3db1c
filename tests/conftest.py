"""One kvmlx cache (kvspec.paths.cache_root: converted models, bases, corpora, joined GGUF parts) for
the whole test run, in a temporary directory; one intra-op thread per xdist worker.

Several modules load SmolLM2 from its GGUF file (~35 s each on 2 cores): sharing the cache makes
every load after the first take about a second, and nothing is written to the user's ~/.cache.
Set up in the controlling process before xdist starts its workers, which inherit the environment
(sweep worker processes too); removed when the run ends. A KVMLX_CACHE_DIR set by the user is kept.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CREATED = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    # xdist's workers (one per core, at most 4) share the cores: one intra-op thread each. torch's
    # default, a thread per core in every worker, oversubscribed them: on 2 cores the whole suite took
    # 16:38 against 13:58 locally, and CI's pytest 19:01 against 12:08 (2026-12-01).
    if getattr(config.option, "numprocesses", None) not in (None, 0):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "KVMLX_CACHE_DIR" in os.environ:
        return
    config.stash[_CREATED] = os.environ["KVMLX_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvmlx-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    created = config.stash.get(_CREATED, None)
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        del os.environ["KVMLX_CACHE_DIR"]
