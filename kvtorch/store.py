"""Per-layer K/V storage with kvspec semantics: compressed tokens [0, n) plus a float tail [n, T).

`TensorStore` holds one tensor (K or V) of one layer; `LayerStore` pairs K and V, appends chunks, and
hands attention the `Part`s the protocol of docs/BACKENDS.md asks for. Incoming tokens are rounded
to the float dtype first; tokens leave the tail for the compressed part as soon as
kvspec.layout.n_quantized says so, and are never re-quantized. Channel groups align to token 0, so
any chunking stores exactly what kvspec.reference.compress stores for the whole history.
Float tensors with a sliding window (Gemma-3 local layers) keep only their last `window` tokens.

Compression (the residual-window flush) runs the Triton quantize kernel where it can
(kvtorch.kernels.quantize: on CUDA by default, or wherever `kernels=True` asks, e.g. CPU under
TRITON_INTERPRET=1), writing codes, scales and biases straight into the preallocated storage of the
compressed buffers; elsewhere it quantizes with kvtorch.ops. Both store kvspec's bits exactly
(low-rank coefficients: see kernels.quantize).

Non-finite input (or beyond fp16 range) in a compressed tensor raises kvspec's NonFiniteError naming
the layer. On CPU every chunk is checked; on an accelerator single-token appends fold their largest
magnitude into a device-side running maximum (two kernels per append) that is read every
CHECK_EVERY tokens (and by `check_pending`), so decoding does not wait on the device each step;
multi-token chunks are checked at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvspec.layout import compressed_shapes, n_quantized
from kvspec.reference.quant import NonFiniteError
from kvspec.spec import Float, LowRank, Quant, TensorSpec

from . import ops
from .attention import Part
from .buffer import TokenBuffer

CHECK_EVERY = 64


def split_positions(t: TensorSpec, residual: int, q_pos: torch.Tensor) -> torch.Tensor:
    """n_quantized(t, residual, p + 1) for each query position p: int64 [Tq]."""
    if isinstance(t, Float):
        return torch.zeros_like(q_pos)
    older = (q_pos + 1 - residual).clamp_min(0)
    if isinstance(t, Quant) and t.axis == "channel":
        return older // t.group * t.group
    return older


# Positions 0, 1, 2, ... per device, shared by every layer: a chunk's positions and (past the
# residual window) its token-axis splits are views of it, where computing them launched four
# kernels per layer and step. Grown by doubling; views handed out keep older tables alive.
_POSITIONS: dict[torch.device, torch.Tensor] = {}


def position_range(lo: int, hi: int, device: torch.device) -> torch.Tensor:
    """torch.arange(lo, hi) (int64 on `device`, 0 <= lo <= hi) as a view of a shared table: do not write to it."""
    table = _POSITIONS.get(device)
    if table is None or table.shape[0] < hi:
        # A normal tensor even under inference mode, like the stores' buffers.
        with torch.inference_mode(False):
            table = torch.arange(max(hi, 2 * (0 if table is None else table.shape[0]), 4096), device=device)
        _POSITIONS[device] = table
    return table[lo:hi]


def chunk_splits(t: TensorSpec, residual: int, t0: int, t1: int, q_pos: torch.Tensor) -> torch.Tensor:
    """`split_positions` of the queries at positions [t0, t1) (q_pos), as a table view where it is one:
    token-axis and low-rank tensors once every query is past the residual window (n_quantized(p + 1)
    = p + 1 - residual)."""
    first = t0 + 1 - residual
    if first >= 0 and not isinstance(t, Float) and not (isinstance(t, Quant) and t.axis == "channel"):
        return position_range(first, t1 + 1 - residual, q_pos.device)
    return split_positions(t, residual, q_pos)


def array_names(t: TensorSpec) -> tuple[str, ...]:
    """Names of the compressed arrays of a tensor spec (kvspec.layout)."""
    if isinstance(t, Float):
        return ()
    if isinstance(t, LowRank) and t.coeff is None:
        return ("coeffs",)
    return ("codes", "scales", "biases")


def static_refusal(t: TensorSpec) -> str | None:
    """Why a tensor of spec t cannot be stored statically (compressed at device-held rows, recent
    tokens in a fixed ring of float rows), or None."""
    if isinstance(t, Float):
        return "float tensors (fp16/bf16 K or V, sliding-window layers) have no compressed storage"
    return None


def flush_rows(t: TensorSpec) -> int:
    """Tokens that leave the float tail at once when one token is appended: a channel-axis group, else 1."""
    return t.group if isinstance(t, Quant) and t.axis == "channel" else 1


class TensorStore:
    """One layer's K or V. tokens: T appended so far; n: compressed; the tail holds [start, T)."""

    def __init__(
        self,
        spec: TensorSpec,
        residual: int,
        float_dtype: str,
        basis: torch.Tensor | None = None,
        where: str = "",
        keep: int | None = None,
        lazy_check: bool | None = None,
        kernels: bool | None = None,
    ) -> None:
        """basis: [H, D, r] fp32, required for LowRank. keep: a float tensor's sliding window.
        lazy_check: accumulate the finite check on device for 1-token appends (default: off CPU).
        kernels: compress with the Triton quantize kernel where it can run (default: on CUDA only,
        as kvtorch.attention's kernels; True also on CPU under TRITON_INTERPRET=1)."""
        if isinstance(spec, LowRank) and (basis is None or basis.shape[-1] != spec.rank):
            raise ValueError(f"{where}: rank {spec.rank} needs a basis [Hkv, D, {spec.rank}]")
        if keep is not None and not isinstance(spec, Float):
            raise ValueError(f"{where}: only float tensors are trimmed to a sliding window")
        self.spec, self.residual, self.float_dtype = spec, residual, float_dtype
        self.basis = basis if isinstance(spec, LowRank) else None
        self.where, self.keep, self.lazy_check, self.kernels = where, keep, lazy_check, kernels
        self.tokens = self.n = self.start = 0
        self.tail = TokenBuffer()
        self.arrays = {name: TokenBuffer() for name in array_names(spec)}
        self._peak: torch.Tensor | None = None  # running ops.finite_peak of lazily checked tokens
        self._unchecked_from = 0
        self.capacity: int | None = None  # set by make_static
        self.ring: torch.Tensor | None = None  # static with float rows: position s at ring row s % rows

    def append(self, x: torch.Tensor, checked: bool = False, pending: list | None = None) -> tuple[torch.Tensor, int]:
        """Append x [B, H, m, D]; returns the float tokens [start_before, T) (float dtype) and that start:
        the tail before the append plus the chunk, which the protocol's queries read in float.
        checked: `check(x)` already ran. pending: where the quantize kernel would run, its (rows,
        out arrays, basis, row0 None) go here instead, reserved and counted, for the caller to launch
        (`LayerStore` quantizes K and V in one launch)."""
        if not checked:
            self.check(x)
        chunk = ops.round_to(x, self.float_dtype).detach()
        m, held, float_start = x.shape[-2], len(self.tail), self.start
        self.tokens += m
        n1 = n_quantized(self.spec, self.residual, self.tokens)
        # Tokens leaving the front of (tail + chunk): to the compressed part, or out of a float window.
        drop = max(n1 - self.n, 0 if self.keep is None else held + m - self.keep)
        stay = held + m - drop
        if m <= stay:
            # The whole chunk stays in float (decoding with a residual window): append in place.
            self.tail.append(chunk)
            floats = self.tail.view()
        else:
            # Most of a prefill chunk leaves at once: its floats live only for this call, so the tail's
            # storage never grows to a chunk's length (it would stay that large for the cache's life).
            floats = chunk if held == 0 else torch.cat([self.tail.view(), chunk], dim=-2)
        if n1 > self.n:
            self._compress(floats[..., : n1 - self.n, :], pending)
        if m <= stay:
            self.tail.drop_front(drop)
        else:
            self.tail.drop_front(held)
            self.tail.append(floats[..., held + m - stay :, :])  # with stay 0: records the layout only
        self.n, self.start = n1, self.start + drop
        return floats, float_start

    def _compress(self, x: torch.Tensor, pending: list | None = None) -> None:
        """Compress tokens [n, n1) (float dtype [B, H, m, D]) onto the compressed arrays."""
        if self._kernel_compress(x, pending):
            return
        t = self.spec
        if isinstance(t, Quant):
            head = x.float() if t.rotation is None else ops.rotate(x, t.rotation)
            out = dict(zip(("codes", "scales", "biases"), ops.quantize(head, t.bits, t.group, t.axis)))
        else:
            # float64 projection as the reference (a float32 sum could move a coefficient by an fp16
            # ulp); MPS has no float64, and there the conformance tolerance covers that ulp.
            dt = torch.float32 if x.device.type == "mps" else torch.float64
            c = (x.to(dt) @ self.basis.to(dt)).float()
            if t.coeff is None:
                out = {"coeffs": ops.round_to(c, self.float_dtype)}
            else:
                out = dict(zip(("codes", "scales", "biases"), ops.quantize(c, t.coeff.bits, t.coeff.group, "token")))
        for name, arr in out.items():
            self.arrays[name].append(arr)

    def _kernel_compress(self, x: torch.Tensor, pending: list | None = None) -> bool:
        """Quantize-and-append with the Triton kernel, in place in the buffers (or, given `pending`,
        rows reserved there and the launch left to the caller); False where it cannot."""
        if not (x.is_cuda if self.kernels is None else self.kernels):
            return False
        from .kernels import quantize as kq

        if kq.refusal(x, self.spec, self.basis) is not None:
            return False
        b, h, m, d = x.shape
        out = {name: self.arrays[name].reserve(shape, _dtype(name, self.float_dtype), x.device)
               for name, shape in compressed_shapes(self.spec, b, h, m, d).items()}
        if pending is not None:
            pending.append((x, out, self.basis, None))
        else:
            kq.quantize_rows(x, self.spec, self.float_dtype, self.basis, out=out)
        return True

    def static_refusal(self, capacity: int) -> str | None:
        """Why `make_static(capacity)` cannot be done (naming this tensor), or None."""
        why = static_refusal(self.spec)
        if why is None and self.tokens == 0:
            why = "nothing stored yet: prefill before making the cache static"
        if why is None and capacity <= self.tokens:
            why = f"capacity {capacity} holds no more than the {self.tokens} tokens stored"
        if why is None:
            from .kernels import quantize as kq

            why = kq.refusal(self.arrays_like(), self.spec, self.basis)
        return None if why is None else f"{self.where}: cannot make a static cache: {why}"

    def make_static(self, capacity: int, ring_rows: int = 0) -> None:
        """Preallocate the arrays for `capacity` tokens; from now on tokens arrive one at a time through
        `append_static`, written at a row the device holds, so no shape or pointer changes from step
        to step and a decode step can be captured as a CUDA graph (kvtorch.graphs).
        ring_rows: where tokens wait in float (a residual window, channel-axis groups filling), they
        live in a ring of that many rows (LayerStore gives K and V the same), at least
        residual + flush_rows."""
        why = self.static_refusal(capacity)
        if why:
            raise ValueError(why)
        if ring_rows and ring_rows < self.residual + flush_rows(self.spec):
            raise ValueError(f"{self.where}: a ring of {ring_rows} rows cannot hold the float tail")
        like = self.arrays_like()
        b, h, _, d = like.shape
        shapes = compressed_shapes(self.spec, b, h, 0, d)
        for name, buf in self.arrays.items():
            if buf.view() is None:  # nothing compressed yet (a prompt within the residual window)
                buf.reserve(shapes[name], _dtype(name, self.float_dtype), like.device)
            buf.ensure_capacity(-(-capacity // self._rows_per_entry(name)))
        if ring_rows:
            self.ring = torch.zeros(b, h, ring_rows, d, dtype=like.dtype, device=like.device)
            self.ring[:, :, torch.arange(self.start, self.tokens, device=like.device) % ring_rows] = self.tail.view()
        self.capacity = capacity
        if self._peak is None:
            # fp64 holds every peak exactly (MPS has no fp64: there fp32, exact for fp16/bf16/fp32 input)
            dtype = torch.float32 if like.device.type == "mps" else torch.float64
            self._peak = torch.zeros((), dtype=dtype, device=like.device)
            self._unchecked_from = self.tokens
        else:
            self._peak = self._peak.clone()  # a tensor of its own, updated in place from now on

    def _rows_per_entry(self, name: str) -> int:
        """Tokens per row of array `name`: a group for channel-axis scales and biases, else 1."""
        return 1 if name == "codes" else flush_rows(self.spec)

    def make_growing(self) -> None:
        """Back from `make_static`: any appends again (storage kept, grown when needed); pending
        non-finite flags are read first."""
        self.check_pending()
        if self.ring is not None:
            self.tail.replace(self.floats())
        self.capacity, self._peak, self.ring = None, None, None

    def arrays_like(self) -> torch.Tensor:
        """A zero-token float tensor [B, H, 0, D] on the store's device (shapes for the kernels' refusals)."""
        return self.tail.view()[..., :0, :]

    def floats(self) -> torch.Tensor:
        """The float tokens [B, H, T - start, D] at positions [start, T), from the ring while static."""
        if self.ring is None:
            return self.tail.view()
        rows = torch.arange(self.start, self.tokens, device=self.ring.device) % self.ring.shape[-2]
        return self.ring[:, :, rows]

    def append_static(self, x: torch.Tensor, pos: torch.Tensor, pending: list | None = None) -> torch.Tensor:
        """Append one token x [B, H, 1, D] at position `pos` (int64 [1] on the device) of a static store;
        returns it in the float dtype. Without a ring it is compressed at row pos at once; with one it
        waits there, and the rows that leave the float tail (flush_rows of them, when the protocol's
        n_quantized grows) are compressed from the ring at rows the device computes. Host counters
        advance except while a CUDA graph is being captured (the graph's owner calls `advance`).
        pending: as `append`'s, with the launch's device-held row0."""
        chunk = ops.round_to(x, self.float_dtype).detach()
        torch.maximum(self._peak, ops.finite_peak(x, self.rotated), out=self._peak)  # in place: a graph replays it
        from .kernels import quantize as kq

        out = {name: buf.storage() for name, buf in self.arrays.items()}
        if self.ring is None:
            leaving, row0 = chunk, pos
        else:
            rows = self.ring.shape[-2]
            self.ring.index_copy_(2, pos % rows, chunk)
            m = flush_rows(self.spec)
            n_new = split_positions(self.spec, self.residual, pos)
            first = n_new - m
            leaving = self.ring.index_select(2, (first + torch.arange(m, device=pos.device)) % rows)
            # A negative row tells the kernel that nothing leaves at this step.
            row0 = torch.where(n_new > split_positions(self.spec, self.residual, pos - 1), first, -1)
        if pending is not None:
            pending.append((leaving, out, self.basis, row0))
        else:
            kq.quantize_rows(leaving, self.spec, self.float_dtype, self.basis, out=out, row0=row0)
        if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.advance(1)
        return chunk

    def advance(self, m: int) -> None:
        """Count m more tokens appended by kernels of a static store (device-held rows)."""
        if self.tokens + m > self.capacity:
            raise ValueError(f"{self.where}: {self.tokens + m} tokens exceed the static capacity {self.capacity}")
        n1 = n_quantized(self.spec, self.residual, self.tokens + m)
        for name, buf in self.arrays.items():
            per = self._rows_per_entry(name)
            buf.advance(n1 // per - self.n // per)
        self.tokens += m
        self.n = self.start = n1

    def static_part(self, chunk: torch.Tensor, float_start: int, split: torch.Tensor) -> Part:
        """The Part of a static store for its one new token: storage planned to `capacity` rows; floats
        are the ring (position s at row s % rows) or, without one, the token itself (never read)."""
        arrays = {name: buf.view() for name, buf in self.arrays.items()}
        if self.ring is None:
            return Part(self.spec, chunk.shape[-1], self.n, arrays, self.basis, chunk, float_start, split, self.capacity)
        return Part(self.spec, chunk.shape[-1], self.n, arrays, self.basis, self.ring, 0, split, self.capacity,
                    ring=self.ring.shape[-2])

    @property
    def rotated(self) -> bool:
        return isinstance(self.spec, Quant) and self.spec.rotation is not None

    def check(self, x: torch.Tensor) -> None:
        """Refuse non-finite input to a compressed tensor (see the module docstring for when)."""
        if isinstance(self.spec, Float):
            return  # stored as given, like kvspec.reference.compress
        lazy = x.device.type != "cpu" if self.lazy_check is None else self.lazy_check
        if not lazy or x.shape[-2] > 1:
            self.check_pending()
            ops.check_finite(x, f"{self.where} (tokens {self.tokens}..{self.tokens + x.shape[-2] - 1})", self.rotated)
            return
        peak = ops.finite_peak(x, self.rotated)
        if self._peak is None:
            self._peak, self._unchecked_from = peak, self.tokens
        else:
            self._peak = torch.maximum(self._peak, peak)
        if self.tokens + 1 - self._unchecked_from >= CHECK_EVERY:
            self.check_pending(upto=self.tokens + 1)

    def check_pending(self, upto: int | None = None) -> None:
        """Read the device-side peak of lazily checked tokens (those before `upto`, default all
        appended); raise NonFiniteError if any was bad."""
        if self._peak is not None and not bool(self._peak <= ops.FP16_MAX):
            last = (self.tokens if upto is None else upto) - 1
            raise NonFiniteError(
                f"cannot quantize NaN/Inf or a value beyond the fp16 range in {self.where}, "
                f"in one of tokens {self._unchecked_from}..{last}"
            )
        if self.capacity is None:
            self._peak = None
        elif self._peak is not None:
            self._peak.zero_()  # a static store's peak stays the same tensor (a CUDA graph writes it)
            self._unchecked_from = self.tokens

    def part(self, floats: torch.Tensor, float_start: int, split: torch.Tensor) -> Part:
        """A `Part` of the current compressed arrays with the given float tokens and per-query split."""
        arrays = {name: buf.view() for name, buf in self.arrays.items() if self.n}
        return Part(self.spec, floats.shape[-1], self.n, arrays, self.basis, floats, float_start, split)

    def first_column(self) -> int:
        """The first stored position: 0, unless this float tensor is trimmed to a window."""
        return 0 if self.keep is None else self.start

    def state_part(self, q_len: int) -> Part:
        """The stored state as it stands (compressed [0, n), tail [n, T)), for q_len queries."""
        floats = self.floats()
        split = torch.full((q_len,), self.n, dtype=torch.int64, device=floats.device)
        return self.part(floats, self.start, split)

    def export(self) -> dict[str, torch.Tensor]:
        """The stored arrays: kvspec.layout names and shapes plus "tail" (and "basis" for LowRank)."""
        out = {name: buf.view() for name, buf in self.arrays.items()}
        if self.n == 0:
            out = {name: _empty(self.spec, name, self.tail.view(), self.float_dtype) for name in self.arrays}
        out["tail"] = self.floats()
        if self.basis is not None:
            out["basis"] = self.basis
        return out

    def restore(self, arrays: dict[str, torch.Tensor], tokens: int) -> None:
        """Load a saved state of `tokens` tokens (arrays as `export` gives them)."""
        tail = arrays["tail"]
        n = n_quantized(self.spec, self.residual, tokens)
        held = tokens - n if self.keep is None else min(tokens, self.keep)
        if tail.shape[-2] != held:
            raise ValueError(f"{self.where}: {tail.shape[-2]} float tokens of {tokens}; the spec keeps {held}")
        self.tokens, self.n, self.start = tokens, n, tokens - held
        self.tail.replace(ops.round_to(tail, self.float_dtype))
        for name, buf in self.arrays.items():
            buf.replace(arrays[name] if self.n else None)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-axis operation to every stored array."""
        self.tail.map_batch(fn)
        for buf in self.arrays.values():
            buf.map_batch(fn)

    def nbytes(self) -> int:
        """Bytes of the stored tokens (live arrays, not spare capacity; bases excluded)."""
        return sum(a.numel() * a.element_size() for name, a in self.export().items() if name != "basis")


def _dtype(name: str, float_dtype: str) -> torch.dtype:
    """The torch dtype of a kvspec.layout array: codes int32 (uint32 bits), coeffs the float dtype, else fp16."""
    return {"codes": torch.int32, "coeffs": ops.float_dtype(float_dtype)}.get(name, torch.float16)


def _empty(t: TensorSpec, name: str, like: torch.Tensor, float_dtype: str) -> torch.Tensor:
    """A zero-token array of the right dtype and trailing shape (what kvspec.layout gives for n = 0)."""
    b, h, _, d = like.shape
    return torch.zeros(compressed_shapes(t, b, h, 0, d)[name], dtype=_dtype(name, float_dtype), device=like.device)


@dataclass(frozen=True)
class Chunk:
    """What attention needs after appending a chunk: query positions and the K and V parts."""

    q_pos: torch.Tensor
    k: Part
    v: Part


class LayerStore:
    """K and V of one layer. window: the layer's sliding window (visibility; float tensors are trimmed)."""

    def __init__(
        self,
        k: TensorSpec,
        v: TensorSpec,
        residual: int,
        float_dtype: str,
        bases: dict[str, torch.Tensor | None] | None = None,
        window: int | None = None,
        where: str = "layer",
        lazy_check: bool | None = None,
        kernels: bool | None = None,
    ) -> None:
        """kernels: as TensorStore's (compress with the Triton quantize kernel; default on CUDA)."""
        bases = bases or {}
        self.window, self.residual = window, residual
        self.k, self.v = (
            TensorStore(
                t, residual, float_dtype, bases.get(which), f"{where} {name}",
                keep=window if isinstance(t, Float) else None, lazy_check=lazy_check, kernels=kernels,
            )
            for which, name, t in (("k", "keys", k), ("v", "values", v))
        )
        self.position: torch.Tensor | None = None  # a static store's next position, on the device

    @property
    def tokens(self) -> int:
        return self.k.tokens

    def static_refusal(self, capacity: int) -> str | None:
        """Why `make_static(capacity)` cannot be done for K or V, or None."""
        return self.k.static_refusal(capacity) or self.v.static_refusal(capacity)

    def make_static(self, capacity: int) -> None:
        """Preallocate K and V for `capacity` tokens and append from then on at a device-held
        position (TensorStore.make_static); one token per append. Tokens that wait in float (a
        residual window, channel-axis groups) live in one ring size for K and V, so attention reads
        both with one index. A refusal changes neither."""
        why = self.static_refusal(capacity)
        if why:
            raise ValueError(why)
        waits = self.residual > 0 or flush_rows(self.k.spec) > 1 or flush_rows(self.v.spec) > 1
        ring_rows = self.residual + max(flush_rows(self.k.spec), flush_rows(self.v.spec)) if waits else 0
        self.k.make_static(capacity, ring_rows)
        self.v.make_static(capacity, ring_rows)
        self.position = torch.tensor([self.tokens], dtype=torch.int64, device=self.k.arrays_like().device)

    def make_growing(self) -> None:
        """Back from `make_static`: chunks of any length again, positions from the host."""
        self.k.make_growing()
        self.v.make_growing()
        self.position = None

    def advance(self, m: int) -> None:
        """Host counters of a static layer after m replayed steps (the device position moved itself)."""
        self.k.advance(m)
        self.v.advance(m)

    def _append_static(self, k: torch.Tensor, v: torch.Tensor) -> Chunk:
        if k.shape[-2] != 1:
            raise ValueError(f"a static cache appends one token per step (decoding); got {k.shape[-2]}")
        t0 = self.tokens
        q_pos = self.position.clone()
        self.position.add_(1)
        pending = [] if self.k.spec == self.v.spec else None
        fk, fv = self.k.append_static(k, q_pos, pending), self.v.append_static(v, q_pos, pending)
        if pending:
            self._quantize(pending)
        if self.k.ring is None:  # every token compressed as it arrives: both splits are q_pos + 1
            return Chunk(q_pos, self.k.static_part(fk, t0, self.position), self.v.static_part(fv, t0, self.position))
        k_split = split_positions(self.k.spec, self.residual, q_pos)
        v_split = k_split if self.v.spec == self.k.spec else split_positions(self.v.spec, self.residual, q_pos)
        return Chunk(q_pos, self.k.static_part(fk, t0, k_split), self.v.static_part(fv, t0, v_split))

    def _quantize(self, pending: list) -> None:
        """Launch the quantize kernels K and V left pending (same spec): one launch for both, or the
        one that took the kernel path (a basis on another device sends the other to the reference).
        A static layer's row0 is the same for K and V (one spec, one position)."""
        from .kernels import quantize as kq

        xs, outs, bases, row0s = zip(*pending)
        if len(pending) == 2:
            kq.quantize_pair(xs, self.k.spec, self.k.float_dtype, bases, outs, row0s[0])
        else:
            kq.quantize_rows(xs[0], self.k.spec, self.k.float_dtype, bases[0], out=outs[0], row0=row0s[0])

    def first_column(self) -> int:
        """The first position the next chunk's attention reads: 0, or where a trimmed window begins."""
        return min(self.k.first_column(), self.v.first_column())

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Chunk:
        """Append k, v [B, Hkv, m, D] at positions [T0, T0 + m); the chunk's queries attend as decoding would."""
        if self.position is not None:
            return self._append_static(k, v)
        t0 = self.tokens
        self.k.check(k)  # both before either is stored, so a refusal leaves the layer as it was
        self.v.check(v)
        # One spec: K's and V's quantize kernels (same rows, same layout) run as one launch.
        pending = [] if self.k.spec == self.v.spec else None
        fk, fk0 = self.k.append(k, checked=True, pending=pending)
        fv, fv0 = self.v.append(v, checked=True, pending=pending)
        if pending:
            self._quantize(pending)
        q_pos = position_range(t0, self.tokens, k.device)
        k_split = chunk_splits(self.k.spec, self.residual, t0, self.tokens, q_pos)
        # Same spec, same splits: one set of ops fewer per layer and step.
        v_split = k_split if self.v.spec == self.k.spec else chunk_splits(self.v.spec, self.residual, t0,
                                                                          self.tokens, q_pos)
        return Chunk(q_pos, self.k.part(fk, fk0, k_split), self.v.part(fv, fv0, v_split))

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.k.map_batch(fn)
        self.v.map_batch(fn)

    def check_pending(self) -> None:
        self.k.check_pending()
        self.v.check_pending()
