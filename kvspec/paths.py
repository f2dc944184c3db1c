"""Where kvmlx keeps what it derives once and reuses: joined GGUF parts, converted models
(kvtorch.loading), low-rank bases (cli.bases) and extracted corpora (cli.corpora)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$KVMLX_CACHE_DIR, else $XDG_CACHE_HOME/kvmlx, else ~/.cache/kvmlx. Read at each call, so a
    process (the test suite, tests/conftest.py) can redirect every cache at once."""
    if os.environ.get("KVMLX_CACHE_DIR"):
        return Path(os.environ["KVMLX_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "kvmlx"
