"""kvtorch's conformance adapter (see backends.py): NumPy in, torch CPU/CUDA ops and stores, NumPy out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'kvmlx[torch]')")

from kvtorch import ops  # noqa: E402
from kvtorch.attention import compressed_attention  # noqa: E402
from kvtorch.store import LayerStore, TensorStore  # noqa: E402


@dataclass
class TorchBackend:
    name: str
    device: str
    dtype: str = "fp32"

    def _t(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)

    def quantize(self, x, bits, group, axis):
        codes, scales, biases = ops.quantize(self._t(x), bits, group, axis)
        return ops.words_to_numpy(codes), scales.cpu().numpy(), biases.cpu().numpy()

    def rotate(self, x, seed):
        return ops.rotate(self._t(x), seed).cpu().numpy()

    def compress(self, x, spec, which, basis, chunks):
        store = TensorStore(spec.tensors()[which], spec.residual, spec.float_dtype, self._basis(basis))
        pos = 0
        for size in chunks:
            store.append(self._t(x[..., pos : pos + size, :]))
            pos += size
        # Like kvspec.reference.compress, a state with nothing compressed holds only its tail.
        keep = ("tail",) if store.n == 0 else ("tail", "codes", "scales", "biases", "coeffs")
        return {name: _to_numpy(name, a) for name, a in store.export().items() if name in keep}

    def attend(self, q, q_pos, stored, spec, bases, tokens, window):
        parts = []
        for which in ("k", "v"):
            store = TensorStore(spec.tensors()[which], spec.residual, spec.float_dtype, self._basis(bases.get(which)))
            arrays = {name: self._array(name, a) for name, a in stored[which].items()}
            store.restore(arrays, tokens)
            parts.append(store.state_part(len(q_pos)))
        q_pos = torch.as_tensor(np.asarray(q_pos), dtype=torch.int64, device=self.device)
        out = compressed_attention(self._t(q), q_pos, *parts, scale=q.shape[-1] ** -0.5, window=window)
        return out.cpu().numpy()

    def decode(self, q, k, v, spec, bases, chunks, window):
        layer = LayerStore(
            spec.k, spec.v, spec.residual, spec.float_dtype,
            {w: self._basis(bases.get(w)) for w in ("k", "v")}, window=window,
        )
        outs, pos = [], 0
        for size in chunks:
            sl = slice(pos, pos + size)
            chunk = layer.append(self._t(k[..., sl, :]), self._t(v[..., sl, :]))
            out = compressed_attention(self._t(q[..., sl, :]), chunk.q_pos, chunk.k, chunk.v, scale=q.shape[-1] ** -0.5, window=window)
            outs.append(out.cpu().numpy())
            pos += size
        return np.concatenate(outs, axis=-2)

    def _basis(self, basis):
        return None if basis is None else self._t(basis)

    def _array(self, name: str, a: np.ndarray) -> torch.Tensor:
        if name == "codes":
            return ops.words_from_numpy(a, self.device)
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)


def _to_numpy(name: str, a: torch.Tensor) -> np.ndarray:
    """Codes as uint32, scales/biases fp16, float-dtype arrays (tail, coefficients) as fp32 like the reference."""
    if name == "codes":
        return ops.words_to_numpy(a)
    if name in ("scales", "biases"):
        return a.cpu().numpy()
    return a.float().cpu().numpy()


def cpu() -> TorchBackend:
    return TorchBackend("torch-cpu", "cpu")


def cuda() -> TorchBackend:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return TorchBackend("torch-cuda", "cuda")
