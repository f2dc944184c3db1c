"""One layer's K (or V) as kvspec lays it out: a compressed part and a float tail, grown in place.

A `TensorStore` holds tokens [0, n) compressed (n = kvspec.layout.n_quantized) and tokens
[start, T) in the spec's float dtype, with start = n, or start = max(0, T - W) on a sliding-window
layer (those are Float, so n = 0). Appending a chunk rounds it to the float dtype, moves the tokens
that leave the float window into compressed form (never re-quantizing older ones) and returns a
`Fetched`: what the attention protocol of docs/BACKENDS.md reads for that chunk's queries.

Arrays are [B, Hkv, rows, C] with rows along axis -2 (tokens, or token groups for channel-axis
scales); `Buffer` preallocates rows and grows by a quarter of its live rows, at least STEP and at
most MAX_SPARE rows at a time (kvtorch.buffer's policy).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kvspec.layout import n_quantized
from kvspec.spec import Float, LowRank, Quant, TensorSpec

from . import ops
from .kernels import quantize as kernels

# Spare rows after a grow: GROWTH - 1 of the live rows, at least STEP (mlx-lm's KVCache allocates 256
# rows at a time) and at most MAX_SPARE, capacity rounded up to STEP. Doubling, as before, left up to
# 100% of a long cache's storage unused; with the cap a grow past 4k rows copies the live rows once
# per 1,024 appended (at Mistral-7B int4, 32k tokens: 1.1 GiB per batch row, once per 1,024 steps).
GROWTH = 1.25
STEP = 256
MAX_SPARE = 1024


class Buffer:
    """Rows appended along axis -2 of [B, H, rows, C] storage; live rows are data[..., lo:hi, :]."""

    def __init__(self, initial: mx.array | None = None) -> None:
        self.data = initial
        self.lo = 0
        self.hi = 0 if initial is None else initial.shape[-2]

    def __len__(self) -> int:
        return self.hi - self.lo

    def append(self, x: mx.array) -> None:
        rows = x.shape[-2]
        if self.data is None or self.hi + rows > self.data.shape[-2]:
            live = len(self)
            need = live + rows
            spare = min(max(int((GROWTH - 1) * need), STEP), MAX_SPARE)
            capacity = -(-(need + spare) // STEP) * STEP
            grown = mx.zeros((*x.shape[:-2], capacity, x.shape[-1]), x.dtype)
            if live:
                grown[..., :live, :] = self.view()
            self.data, self.lo, self.hi = grown, 0, live
        self.data[..., self.hi : self.hi + rows, :] = x
        self.hi += rows

    def view(self) -> mx.array:
        return self.data[..., self.lo : self.hi, :]

    def drop_front(self, rows: int) -> None:
        self.lo += rows

    def drop_back(self, rows: int) -> None:
        self.hi -= rows


@dataclass(frozen=True)
class Fetched:
    """What one chunk's queries read of one tensor (see docs/BACKENDS.md, attention protocol).

    spec: the tensor spec. compressed: arrays of tokens [0, n) (codes/scales/biases or coeffs, shapes
    of kvspec.layout). basis: [Hkv, D, r] fp32 for low rank. float_start, floats: float tokens
    [float_start, tokens), [B, Hkv, tokens - float_start, D] in the float dtype. Queries sit at
    positions [q_start, tokens); split [Tq]: query i reads key s compressed iff s < split[i]
    (n_quantized(p + 1) when the chunk was just appended, so that prefill equals decoding).
    """

    spec: TensorSpec
    head_dim: int
    n: int
    compressed: dict[str, mx.array]
    basis: mx.array | None
    float_start: int
    floats: mx.array
    q_start: int
    tokens: int
    split: np.ndarray


class TensorStore:
    """One layer's K or V cache (see module docstring). `where` names it in errors."""

    def __init__(
        self,
        spec: TensorSpec,
        residual: int,
        float_dtype: str,
        basis: mx.array | None = None,
        window: int | None = None,
        where: str = "",
    ) -> None:
        if window is not None and not isinstance(spec, Float):
            raise ValueError("a sliding-window layer keeps its tokens uncompressed (kvspec.cachefile.layer_tensor_spec)")
        if isinstance(spec, LowRank) and (basis is None or basis.shape[-1] != spec.rank):
            raise ValueError(f"{where}: rank {spec.rank} needs a basis [Hkv, D, {spec.rank}]")
        self.spec, self.residual, self.float_dtype = spec, residual, float_dtype
        self.basis = None if basis is None else basis.astype(mx.float32)
        self.window, self.where = window, where
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.n = 0
        self.start = 0
        self.tail = Buffer()
        self.parts: dict[str, Buffer] = {}

    def n_at(self, tokens: int) -> int:
        """Compressed tokens when `tokens` are held (0 on sliding-window layers, which are Float)."""
        return n_quantized(self.spec, self.residual, tokens)

    def append(self, x: mx.array) -> Fetched:
        """Append x [B, Hkv, S, D] at positions [T, T + S); returns what those S queries read."""
        t0, t1 = self.tokens, self.tokens + x.shape[-2]
        if not isinstance(self.spec, Float):
            ops.check_finite(x, self.where, isinstance(self.spec, Quant) and self.spec.rotation is not None)
        self.tail.append(ops.round_to(x, self.float_dtype))
        held = self.tail.view()  # tokens [start, t1)
        n0, n1 = self.n, self.n_at(t1)
        # Float forms the chunk's queries read: from n(T0 + 1), the first query's split.
        float_start = max(self.n_at(t0 + 1), self.start)
        floats = held[..., float_start - self.start :, :]
        if n1 > n0:
            self._compress(held[..., : n1 - n0, :])
            self.tail.drop_front(n1 - n0)
            self.start = n1
        self.tokens, self.n = t1, n1
        split = np.array([self.n_at(p + 1) for p in range(t0, t1)])
        return Fetched(self.spec, x.shape[-1], n1, self.compressed(), self.basis, float_start, floats, t0, t1, split)

    def keep_last(self, tokens: int) -> None:
        """Drop float tokens older than the last `tokens` (sliding-window layers, after attention)."""
        drop = max(self.tokens - self.start - tokens, 0)
        self.tail.drop_front(drop)
        self.start += drop

    def _compress(self, rows: mx.array) -> None:
        """Compress float rows [B, H, m, D] (tokens [n0, n1)) and append them to the stored parts."""
        t, x = self.spec, rows.astype(mx.float32)
        if isinstance(t, Quant):
            if t.rotation is not None:
                x = ops.rotate(x, t.rotation)
            arrays = dict(zip(("codes", "scales", "biases"), kernels.quantize(x, t.bits, t.group, t.axis)))
        elif t.coeff is None:
            arrays = {"coeffs": ops.round_to(ops.project(x, self.basis, stored=True), self.float_dtype)}
        else:
            c = ops.project(x, self.basis, stored=True)
            arrays = dict(zip(("codes", "scales", "biases"), kernels.quantize(c, t.coeff.bits, t.coeff.group, "token")))
        for name, arr in arrays.items():
            self.parts.setdefault(name, Buffer()).append(arr)

    def compressed(self) -> dict[str, mx.array]:
        return {name: buf.view() for name, buf in self.parts.items()}

    def arrays(self) -> dict[str, mx.array]:
        """Stored arrays, named and shaped as kvspec.cachefile writes them (tail in the float dtype)."""
        out = self.compressed()
        if self.tail.data is not None:
            out["tail"] = self.tail.view()
        if self.basis is not None:
            out["basis"] = self.basis
        return out

    def load(self, arrays: dict[str, mx.array], tokens: int) -> None:
        """Restore from `arrays` (as `arrays()` gives) holding `tokens` tokens."""
        self.reset()
        tail = arrays["tail"]
        self.tokens, self.n, self.start = tokens, self.n_at(tokens), tokens - tail.shape[-2]
        first_float = self.n if self.window is None else max(0, tokens - self.window)
        if self.start != first_float:
            raise ValueError(f"{self.where}: {tail.shape[-2]} float tokens of {tokens}, the spec keeps {tokens - first_float}")
        self.tail = Buffer(tail.astype(ops.float_dtype(self.float_dtype)))
        self.parts = {k: Buffer(v) for k, v in arrays.items() if k not in ("tail", "basis")}

    def trimmable(self) -> bool:
        """Whether any number of recent tokens can be dropped exactly (see `can_trim`)."""
        if self.window is not None:
            return self.start == 0
        channel = isinstance(self.spec, Quant) and self.spec.axis == "channel"
        return self.n == 0 or (self.residual == 0 and not channel)

    def can_trim(self, tokens: int) -> bool:
        """Whether dropping the last `tokens` tokens leaves exactly the cache of the shorter history:
        its compressed part is a prefix of ours and its float tokens are still held in float."""
        t1 = self.tokens - tokens
        n1 = self.n_at(t1)
        first_float = n1 if self.window is None else max(0, t1 - self.window)
        return 0 <= t1 and n1 <= self.n and (first_float >= self.start or first_float == t1)

    def trim(self, tokens: int) -> None:
        """Drop the last `tokens` tokens (check `can_trim` first)."""
        t1 = self.tokens - tokens
        n1 = self.n_at(t1)
        if t1 <= self.start:
            self.tail.drop_back(len(self.tail))
            self.start = t1
        else:
            self.tail.drop_back(self.tokens - t1)
        for name, buf in self.parts.items():
            # Channel-axis scales/biases hold one row per group of tokens.
            grouped = name != "codes" and isinstance(self.spec, Quant) and self.spec.axis == "channel"
            buf.drop_back((self.n - n1) // (self.spec.group if grouped else 1))
        self.tokens, self.n = t1, n1

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tokens (live rows, not preallocated ones; the basis is per model)."""
        return sum(a.nbytes for name, a in self.arrays().items() if name != "basis")
