"""The MLX backend (kvmlx) as a conformance adapter: NumPy in, NumPy out (see backends.py).

cpu() runs on MLX's CPU device; gpu() on Metal or MLX's CUDA build, and skips where neither exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")

from kvmlx import ops  # noqa: E402
from kvmlx.attention import compressed_attention  # noqa: E402
from kvmlx.cache import LayerCache  # noqa: E402
from kvmlx.store import Fetched, TensorStore  # noqa: E402


@dataclass
class MLXBackend:
    device: str
    name: str = "mlx"
    dtype: str = "fp32"

    def _stream(self):
        return mx.stream(mx.cpu if self.device == "cpu" else mx.gpu)

    def quantize(self, x, bits, group, axis):
        with self._stream():
            return tuple(np.array(a) for a in ops.quantize(mx.array(x), bits, group, axis))

    def rotate(self, x, seed):
        with self._stream():
            return np.array(ops.rotate(mx.array(x), seed))

    def compress(self, x, spec, which, basis, chunks):
        t = spec.tensors()[which]
        with self._stream():
            store = TensorStore(t, spec.residual, spec.float_dtype, None if basis is None else mx.array(basis))
            start = 0
            for size in chunks:
                store.append(mx.array(x[..., start : start + size, :]))
                start += size
            arrays = store.arrays()
            arrays.pop("basis", None)
            # The oracle holds float tokens and low-rank coefficients as fp32 arrays.
            return {k: np.array(a.astype(mx.float32) if k in ("tail", "coeffs") else a) for k, a in arrays.items()}

    def attend(self, q, q_pos, stored, spec, bases, tokens, window):
        with self._stream():
            views = [self._view(stored[w], spec.tensors()[w], bases.get(w), tokens, q_pos) for w in ("k", "v")]
            return np.array(compressed_attention(mx.array(q), *views, 1 / np.sqrt(q.shape[-1]), window))

    @staticmethod
    def _view(arrays, t, basis, tokens, q_pos) -> Fetched:
        tail = mx.array(arrays["tail"])
        n = tokens - tail.shape[-2]
        compressed = {k: mx.array(v) for k, v in arrays.items() if k != "tail"}
        basis = None if basis is None else mx.array(basis)
        # A given state: every query reads tokens [0, n) compressed, whatever its position.
        split = np.full(len(q_pos), n)
        return Fetched(t, tail.shape[-1], n, compressed, basis, n, tail, int(q_pos[0]), tokens, split)

    def decode(self, q, k, v, spec, bases, chunks, window):
        with self._stream():
            cache = LayerCache(spec, {w: mx.array(b) for w, b in bases.items()})
            outs, start = [], 0
            for size in chunks:
                part = slice(start, start + size)
                fk, fv = cache.update_and_fetch(mx.array(k[..., part, :]), mx.array(v[..., part, :]))
                outs.append(compressed_attention(mx.array(q[..., part, :]), fk, fv, 1 / np.sqrt(q.shape[-1]), window))
                start += size
            return np.array(mx.concatenate(outs, axis=-2))


def cpu() -> MLXBackend:
    return MLXBackend("cpu")


def gpu() -> MLXBackend:
    if not (mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())):
        pytest.skip("mlx-gpu: neither Metal nor MLX's CUDA backend is available here")
    return MLXBackend("gpu")
