"""The conformance contract: what every backend x device exposes to the suite, in NumPy terms.

A backend registers an adapter in conftest.BACKENDS (lazily: a missing framework skips with its
reason, never fakes). Every method takes and returns NumPy arrays; shapes as in kvspec.layout.
- quantize(x [..., T, D], bits, group, axis) -> (codes uint32, scales fp16, biases fp16)
- rotate(x [..., D], seed) -> fp32
- compress(x [B, H, T, D], spec, which, basis [H, D, r] | None, chunks) -> {array name: array},
  the layer cache's stored arrays after appending x in chunks of the given sizes
- attend(q [B, Hq, Tq, D], q_pos [Tq], stored {"k": arrays, "v": arrays}, spec, bases, tokens,
  window) -> [B, Hq, Tq, D]: attention over a given stored state
- decode(q [B, Hq, T, D], k, v [B, Hkv, T, D], spec, bases, chunks, window) -> [B, Hq, T, D]:
  append chunks through the layer cache, each chunk's queries attending as the protocol says
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import kvspec
from kvspec import reference as R
from kvspec.reference.quant import Quantized


@dataclass
class ReferenceBackend:
    """kvspec's NumPy reference: the oracle checked against its own golden vectors."""

    name: str = "reference"
    device: str = "cpu"
    dtype: str = "fp32"

    def quantize(self, x, bits, group, axis):
        q = R.quantize(x, bits, group, axis)
        return q.codes, q.scales, q.biases

    def rotate(self, x, seed):
        return R.rotate(x, seed)

    def compress(self, x, spec, which, basis, chunks):
        assert sum(chunks) == x.shape[-2]
        t = spec.tensors()[which]
        s = R.compress(x, t, spec.residual, spec.float_dtype, basis)
        out = {"tail": s.tail}
        if s.quant is not None:
            out.update(codes=s.quant.codes, scales=s.quant.scales, biases=s.quant.biases)
        if s.coeffs is not None:
            out["coeffs"] = s.coeffs
        return out

    def attend(self, q, q_pos, stored, spec, bases, tokens, window):
        parts = [stored_from_arrays(stored[w], spec, w, bases.get(w), tokens) for w in ("k", "v")]
        return R.attend(q, *parts, q_pos, window=window, space="compressed")

    def decode(self, q, k, v, spec, bases, chunks, window):
        return R.attend_as_decoded(q, k, v, spec, bases=bases, window=window)


def reference() -> ReferenceBackend:
    return ReferenceBackend()


def stored_from_arrays(arrays, spec: kvspec.KVSpec, which: str, basis, tokens: int) -> R.Stored:
    t = spec.tensors()[which]
    tail = np.asarray(arrays["tail"], np.float32)
    quant = None
    if "codes" in arrays:
        quant = Quantized(arrays["codes"], arrays["scales"], arrays["biases"])
    n = tokens - tail.shape[-2]
    return R.Stored(t, tokens, n, tail.shape[-1], tail, quant=quant, coeffs=arrays.get("coeffs"), basis=basis)
