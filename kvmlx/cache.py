"""Layer caches that follow mlx-lm's cache protocol and hold K and V as a kvspec spec says.

A model calls `cache.update_and_fetch(keys, values)` with post-RoPE [B, Hkv, S, D] arrays and hands
the result to `scaled_dot_product_attention(..., cache=cache)`; kvmlx.integration routes that call
to `LayerCache.attend`, which reads the compressed data (kvmlx.attention). Besides that the cache
offers what mlx-lm's KVCache offers: offset, state (a tree of arrays and scalars) with its setter and
`from_state`, is_trimmable / trim, make_mask, size, empty, nbytes; so mlx_lm.generate,
stream_generate and save/load/trim_prompt_cache work with it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from kvspec.budget import ModelShape
from kvspec.cachefile import layer_tensor_spec
from kvspec.grammar import format as format_spec
from kvspec.grammar import parse
from kvspec.spec import KVSpec, LowRank

from .attention import compressed_attention
from .store import Fetched, TensorStore


class LayerCache:
    """One layer's K/V cache for `spec` (a KVSpec or spec string).

    bases: {"k"|"v": [Hkv, D, r]} for the spec's low-rank tensors. window: the layer's sliding window
    (its tokens then stay uncompressed and only the last `window` are kept). layer: index, for errors.
    """

    def __init__(
        self,
        spec: KVSpec | str,
        bases: dict[str, Any] | None = None,
        window: int | None = None,
        layer: int | None = None,
    ) -> None:
        self._configure(parse(spec) if isinstance(spec, str) else spec, bases or {}, window, layer)

    def _configure(self, spec: KVSpec, bases: dict[str, Any], window: int | None, layer: int | None) -> None:
        self.spec, self.window, self.layer = spec, window, layer
        stores = {}
        for which in ("k", "v"):
            t = layer_tensor_spec(spec, window, which)
            basis = bases.get(which) if isinstance(t, LowRank) else None
            where = f"layer {layer} {which.upper()}" if layer is not None else which.upper()
            stores[which] = TensorStore(
                t, spec.residual, spec.float_dtype, None if basis is None else mx.array(basis), window, where
            )
        self.k, self.v = stores["k"], stores["v"]
        self.offset = 0

    # --- what the model calls ---------------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Fetched, Fetched]:
        """Append keys/values [B, Hkv, S, D]; returns the views the S new queries attend over."""
        fk, fv = self.k.append(keys), self.v.append(values)
        self.offset += keys.shape[-2]
        if self.window is not None:
            # The views above hold what this chunk's queries need; later queries need only the window.
            self.k.keep_last(self.window)
            self.v.keep_last(self.window)
        return fk, fv

    def attend(self, queries: mx.array, keys: Fetched, values: Fetched, scale: float) -> mx.array:
        """Attention of queries [B, Hq, S, D] over what `update_and_fetch` returned -> [B, Hq, S, D]."""
        return compressed_attention(queries, keys, values, scale, self.window)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None) -> None:  # noqa: N803
        """No mask array: kvmlx attention derives causality and the window from token positions."""
        return None

    # --- mlx-lm's cache protocol ------------------------------------------------------------------

    @property
    def state(self) -> dict[str, Any]:
        """{"k": arrays, "v": arrays, "meta": {spec, window, layer, offset}}; arrays as kvspec.cachefile
        names them (codes, scales, biases, coeffs, tail, basis)."""
        meta = {"spec": format_spec(self.spec), "window": self.window, "layer": self.layer, "offset": self.offset}
        return {"k": self.k.arrays(), "v": self.v.arrays(), "meta": meta}

    @state.setter
    def state(self, state: dict[str, Any]) -> None:
        meta = state["meta"]
        arrays = {w: dict(state.get(w) or {}) for w in ("k", "v")}
        bases = {w: a["basis"] for w, a in arrays.items() if "basis" in a}
        self._configure(parse(meta["spec"]), bases, meta["window"], meta["layer"])
        self.offset = int(meta["offset"])
        if self.offset:
            self.k.load(arrays["k"], self.offset)
            self.v.load(arrays["v"], self.offset)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LayerCache:
        obj = cls.__new__(cls)
        obj.state = state
        return obj

    def is_trimmable(self) -> bool:
        """True when dropping recent tokens is exact (see TensorStore.can_trim): float caches, and
        token-axis or low-rank caches without a residual window, before a sliding window drops tokens."""
        return self.k.trimmable() and self.v.trimmable()

    def trim(self, n: int) -> int:
        """Drop the last n tokens; returns how many were dropped (0 where that is not exact)."""
        n = min(self.offset, n)
        if not (self.k.can_trim(n) and self.v.can_trim(n)):
            return 0
        self.k.trim(n)
        self.v.trim(n)
        self.offset -= n
        return n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def nbytes(self) -> int:
        """Bytes of the stored K and V (exactly kvspec.budget.kv_bytes for this layer)."""
        return self.k.nbytes + self.v.nbytes

    def reset(self) -> None:
        """Forget every token (same spec, bases and window)."""
        self.k.reset()
        self.v.reset()
        self.offset = 0


class ModelCache(list):
    """The list of a model's LayerCaches (what mlx-lm takes as `prompt_cache`), with what a cache file
    needs to know about the model: the spec, the config fingerprint, the KV shape, and the token ids
    fed so far when the feeder tracked them (kvmlx.runner does; None when unknown)."""

    def __init__(self, layers: list[LayerCache], spec: KVSpec, fingerprint: str, shape: ModelShape) -> None:
        super().__init__(layers)
        self.spec, self.fingerprint, self.shape = spec, fingerprint, shape
        self.token_ids: list[int] | None = []

    @property
    def offset(self) -> int:
        return self[0].offset if self else 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self)

    def reset(self) -> None:
        for c in self:
            c.reset()
        self.token_ids = []
