"""A transformers `Cache` whose layers are kvspec layer stores: `make_cache(model, spec, bases)`.

Works with `model.generate(..., past_key_values=cache)` and plain forwards (transformers >= 5.0, < 6;
see kvtorch.integration). Each layer's `update` stores the chunk (compressing what the spec says) and
returns the chunk's own K/V; the "kvmlx" attention function then reads the compressed layer.
Sliding-window layers (kvspec.cachefile.layer_tensor_spec) stay in the float dtype, trimmed to their
window. The mask sizes a layer reports are the columns its attention reads, so transformers'
padding masks line up with them.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvspec import parse
from kvspec.cachefile import layer_tensor_spec
from kvspec.reference.lowrank import make_basis
from kvspec.spec import KVSpec, LowRank, SpecError

from . import integration
from .model_info import ModelInfo, model_info
from .store import LayerStore

Bases = dict[str, list]  # {"k": [L][Hkv, D, r], "v": ...} as NumPy arrays or tensors


class KVLayer(CacheLayerMixin):
    """One decoder layer's cache: a LayerStore created on the first update (device and batch known then)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, spec: KVSpec, layer_idx: int, window: int | None, bases: dict[str, torch.Tensor | None]):
        super().__init__()
        self.spec, self.layer_idx, self.window, self.bases = spec, layer_idx, window, bases
        self.is_sliding = window is not None
        self.sliding_window = window
        self.store: LayerStore | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.store = self.new_store(key_states.device)
        self.is_initialized = True

    def new_store(self, device: torch.device) -> LayerStore:
        with torch.inference_mode(False):  # usable in and out of inference mode, like the stored tokens
            bases = {w: None if b is None else b.to(device) for w, b in self.bases.items()}
        return LayerStore(
            layer_tensor_spec(self.spec, self.window, "k"), layer_tensor_spec(self.spec, self.window, "v"),
            self.spec.residual, self.spec.float_dtype, bases, window=self.window, where=f"layer {self.layer_idx}",
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store key/value [B, Hkv, m, D]; returns them unchanged for the "kvmlx" attention to recognise."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        chunk = self.store.append(key_states, value_states)
        integration.bind(self.layer_idx, key_states, value_states, chunk, self.window)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.store.tokens if self.store is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): the attention of the next chunk reads positions [offset, T + query_length)."""
        if self.store is None:
            return query_length, 0
        first = self.store.first_column()
        return self.store.tokens - first + query_length, first

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reset(self) -> None:
        self.store = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a kvmlx cache cannot drop tokens (compressed groups are final)")

    def _map_batch(self, fn) -> None:
        if self.store is not None:
            self.store.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda x: x[indices, ...])

    def offload(self) -> None:
        raise NotImplementedError("kvmlx caches do not offload")

    def prefetch(self) -> None:
        raise NotImplementedError("kvmlx caches do not offload")


class KVCache(Cache):
    """kvspec-compressed KV cache for one transformers model. spec: the KVSpec; info: the model facts
    (shape, windows, fingerprint) a saved file records; bases: per-layer low-rank bases used."""

    def __init__(self, spec: KVSpec, info: ModelInfo, bases: dict[str, list[torch.Tensor | None]]):
        self.spec, self.info, self.bases = spec, info, bases
        # Batch-1 token ids the cache holds, kept by the Runner and cache files (None: unknown).
        self.token_ids: list[int] | None = None
        layers = [
            KVLayer(spec, i, w, {x: bases[x][i] if x in bases else None for x in ("k", "v")})
            for i, w in enumerate(info.windows)
        ]
        super().__init__(layers=layers)

    def reset(self) -> None:
        super().reset()
        self.token_ids = None

    def stores(self) -> list[LayerStore | None]:
        return [layer.store for layer in self.layers]

    def check_pending(self) -> None:
        """Read any lazily accumulated non-finite flags now (raises NonFiniteError naming the layer)."""
        for store in self.stores():
            if store is not None:
                store.check_pending()

    def make_static(self, capacity: int) -> None:
        """Preallocate every layer for `capacity` tokens in all and append at device-held positions
        from now on (one token per step), so a decode step can be captured as a CUDA graph
        (kvtorch.graphs.GraphDecoder). Needs a prefilled cache whose every layer compresses K and V
        (no float tensors or sliding-window layers); tokens a residual window or a channel-axis group
        keeps in float wait in a ring of rows (kvtorch.store.TensorStore.make_static)."""
        stores = self.stores()
        if any(s is None for s in stores):
            raise ValueError("prefill the cache before making it static (its layers have no storage yet)")
        # Every layer is checked before any changes: a refusal leaves the whole cache growing.
        why = next(filter(None, (s.static_refusal(capacity) for s in stores)), None)
        if why:
            raise ValueError(why)
        for store in stores:
            store.make_static(capacity)

    def make_growing(self) -> None:
        """Undo `make_static`: the cache takes chunks of any length again (a new prompt, another turn)."""
        for store in self.stores():
            if store is not None and store.position is not None:
                store.make_growing()

    def advance(self, m: int) -> None:
        """Host counters after m decode steps replayed by a CUDA graph (the device positions moved themselves)."""
        for store in self.stores():
            store.advance(m)

    def nbytes(self) -> int:
        """Bytes of stored tokens over all layers (bases excluded), as kvspec.budget.kv_bytes counts them."""
        return sum(s.k.nbytes() + s.v.nbytes() for s in self.stores() if s is not None)


def resolve_bases(spec: KVSpec, info: ModelInfo, bases: Bases | None) -> dict[str, list[torch.Tensor | None]]:
    """Per-layer fp32 bases [Hkv, D, r] for the spec's low-rank tensors (None on sliding layers).

    Given bases may have more than r columns (a full calibrated basis): the first r are used.
    Without bases, random / identity / hadamard bases are made with kvspec's make_basis (seed = KV
    head index, the same on every layer); PCA bases must come from calibration.
    """
    shape, out = info.shape, {}
    for which, t in spec.tensors().items():
        if not isinstance(t, LowRank):
            continue
        given = (bases or {}).get(which)
        if given is None and t.basis == "pca":
            raise SpecError(
                f"{which.upper()}: rank{t.rank} with a PCA basis needs calibrated bases; run `kvmlx calibrate` "
                "for this model and pass them (bases={'k': [L][Hkv, D, r], 'v': ...})"
            )
        if given is None:
            heads = [make_basis(t.basis, shape.head_dim, seed=h)[:, : t.rank] for h in range(shape.kv_heads)]
            given = [np.stack(heads)] * shape.layers
        if len(given) != shape.layers:
            raise SpecError(f"{which.upper()}: {len(given)} layer bases given, the model has {shape.layers} layers")
        layers = []
        for i, (b, window) in enumerate(zip(given, info.windows)):
            b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).float()
            want = (shape.kv_heads, shape.head_dim)
            if tuple(b.shape[:2]) != want or b.ndim != 3 or b.shape[2] < t.rank:
                raise SpecError(f"{which.upper()} basis of layer {i} has shape {tuple(b.shape)}, need [{want[0]}, {want[1]}, >={t.rank}]")
            layers.append(None if window is not None else b[:, :, : t.rank].contiguous())
        out[which] = layers
    return out


def make_cache(model, spec: KVSpec | str, bases: Bases | None = None) -> KVCache:
    """A kvspec cache for a loaded transformers model; switches the model's attention to "kvmlx".

    spec: a KVSpec or spec string. bases: {"k": [L][Hkv, D, r], "v": ...} for low-rank tensors
    (required for PCA bases; made from the basis kind otherwise).
    """
    spec = parse(spec) if isinstance(spec, str) else spec
    info = model_info(model.config)
    spec.check_head_dim(info.shape.head_dim)
    cache = KVCache(spec, info, resolve_bases(spec, info, bases))
    integration.install(model)
    return cache
