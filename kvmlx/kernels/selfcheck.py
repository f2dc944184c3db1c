"""Which dialect runs here, and kernels that check themselves once before they are trusted.

`current_dialect()` is "metal" or "cuda" when MLX's default stream is a GPU of that kind and the
kernels are switched on there, else None; `refusal()` says why no kernel runs. KVMLX_KERNELS picks:
"off" (never), "on" (both dialects), unset (the CUDA dialect only). The CUDA dialect, with its
tensor-core decode body (kvmlx.kernels.tensorcore), was verified on an H200 (MLX 0.32.4, 40 cases:
10 specs x 4 shapes, quantized codes bit-exact, every output within kvspec tolerance, zero
fallbacks; 2026-11-29, benchmarks/results/mlx_kernels_nvidia_h200-verify.json). The Metal dialect has
never been compiled by a Metal compiler or run on an Apple GPU (its units run in CI on a CPU emulation
of Metal's names, tests/kvmlx/metal_shim.h), and a self-check cannot catch a kernel that never
returns, so Metal waits for KVMLX_KERNELS=on.

`SelfChecked` wraps one kernel: the first call for a configuration (key) runs the kernel and the
MLX ops path on a small probe input of that configuration; if the kernel fails to compile or run,
or disagrees, one warning (KernelFallback) names the kernel, the configuration and the reason, and
that configuration keeps using the ops path. A Mac user never gets silent garbage.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable

import mlx.core as mx
import numpy as np

log = logging.getLogger("kvmlx.kernels")


class KernelFallback(UserWarning):
    """A kernel failed its first-use check; the MLX ops path runs instead."""


def _switch() -> str:
    """KVMLX_KERNELS as "on", "off" or "auto" (unset or anything else)."""
    value = os.environ.get("KVMLX_KERNELS", "auto").lower()
    if value in ("1", "on", "true", "yes"):
        return "on"
    return "off" if value in ("0", "off", "false", "no") else "auto"


def refusal() -> str | None:
    """Why no kernel runs on MLX's default stream (None: one can)."""
    switch = _switch()
    if switch == "off":
        return "KVMLX_KERNELS=off: the MLX ops path runs"
    if mx.default_device() != mx.gpu:
        return f"MLX's default device is {mx.default_device()}: the kernels run on GPU streams"
    if mx.metal.is_available():
        if switch == "on":
            return None
        return ("the Metal kernels have not been run on Apple hardware yet: set KVMLX_KERNELS=on to try them "
                "(each checks itself on first use)")
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return None
    return "this MLX build has neither Metal nor CUDA"


_said: set[str] = set()


def current_dialect() -> str | None:
    """"metal" or "cuda" for MLX's default GPU stream; None (the reason logged once) elsewhere."""
    why = refusal()
    if why is not None:
        if why not in _said:
            _said.add(why)
            log.info("kvmlx kernels off, the MLX ops path runs: %s", why)
        return None
    return "metal" if mx.metal.is_available() else "cuda"


def bits_equal(got: mx.array, want: mx.array) -> str | None:
    """None if the arrays have the same shape, dtype and bits; else where they differ."""
    g, w = np.array(got), np.array(want)
    if g.shape != w.shape or g.dtype != w.dtype:
        return f"{g.dtype}{g.shape} vs {w.dtype}{w.shape}"
    view = {2: np.uint16, 4: np.uint32}.get(g.dtype.itemsize)
    differ = np.argwhere(g.view(view) != w.view(view)) if view else np.argwhere(g != w)
    return f"{len(differ)} elements differ, first at {differ[0].tolist()}" if len(differ) else None


class SelfChecked:
    """kernel(dialect, key, *args) behind a first-use check per (dialect, key) (see module docstring).

    reference(key, *args): the MLX ops path; probe(key) -> args: a small input of configuration
    key; compare(key, got, want) -> None if they agree, else the reason.
    """

    def __init__(self, name: str, kernel: Callable, reference: Callable, probe: Callable, compare: Callable) -> None:
        self.name, self.kernel, self.reference, self.probe, self.compare = name, kernel, reference, probe, compare
        self.verdicts: dict[tuple, str | None] = {}  # (dialect, key) -> None (trusted) or the reason

    def __call__(self, key: tuple, *args):
        dialect = current_dialect()
        if dialect is None:
            return self.reference(key, *args)
        if (dialect, key) not in self.verdicts:
            self.verdicts[(dialect, key)] = self._check(dialect, key)
        if self.verdicts[(dialect, key)] is not None:
            return self.reference(key, *args)
        return self.kernel(dialect, key, *args)

    def fallbacks(self) -> dict[tuple, str]:
        """(dialect, key) -> reason, for every configuration that fell back."""
        return {k: v for k, v in self.verdicts.items() if v is not None}

    def _check(self, dialect: str, key: tuple) -> str | None:
        try:
            args = self.probe(key)
            got = self.kernel(dialect, key, *args)
            mx.eval(got)
            why = self.compare(key, got, self.reference(key, *args))
        except Exception as e:  # a compile error surfaces here, on the first evaluation
            why = f"failed to compile or run: {type(e).__name__}: {e}"
        if why is not None:
            warnings.warn(f"kvmlx kernel {self.name} {key} ({dialect}) falls back to the MLX ops path: {why}",
                          KernelFallback, stacklevel=3)
        return why
