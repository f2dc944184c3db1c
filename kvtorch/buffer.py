"""A preallocated token buffer: appends are amortized O(1), and tokens can leave from the front.

Caches serve inference: what is stored is detached from autograd.

Holds the live tokens [start, end) of a tensor along axis -2 ([B, H, tokens, X] for tails, codes,
coefficients, and [B, H, groups, D] for channel-axis scales). Storage grows geometrically (GROWTH) up to
MAX_SPARE tokens of reserve; a grow also moves the live tokens to the front, so a buffer whose front
keeps leaving (a residual window, a sliding window) reuses memory instead of creeping forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# Capacity after a grow: GROWTH times the tokens live then, at least SPARE and at most MAX_SPARE tokens
# more. SPARE keeps short windows (residual tails) from moving every few steps. Up to 4k tokens appends
# are amortized O(1); beyond, a grow every 1,024 tokens copies the cache (Mistral-7B int4 at batch 8 x
# 32k: 9 GiB, ~4.5 ms on an H200, ~4 us per 16 ms decode step) instead of keeping 25% unused (2.2 GiB
# there, which put kvtorch's int4 peak above transformers' quanto int4 cache despite 10% fewer bytes).
GROWTH = 1.25
SPARE = 64
MAX_SPARE = 1024


class TokenBuffer:
    """Growable [..., tokens, X] storage. `view()` is the live range; views stay valid until the next append."""

    def __init__(self) -> None:
        self._data: torch.Tensor | None = None
        self._start = 0
        self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def capacity(self) -> int:
        return 0 if self._data is None else self._data.shape[-2]

    def view(self) -> torch.Tensor | None:
        """The live tokens [..., len, X], or None before the first append."""
        if self._data is None:
            return None
        return self._data[..., self._start : self._end, :]

    def append(self, x: torch.Tensor) -> None:
        """Append x [..., m, X] (same leading shape, dtype and device as earlier appends)."""
        self.reserve(x.shape, x.dtype, x.device)[...] = x.detach()

    def reserve(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Make room for shape[-2] more tokens ([..., m, X], as earlier appends), count them as live,
        and return their storage (uninitialized) for a kernel to write in place."""
        m = shape[-2]
        if self._data is None or self._end + m > self.capacity:
            self._grow(shape, dtype, device, m)
        self._end += m
        return self._data[..., self._end - m : self._end, :]

    def _grow(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, extra: int,
              exact: bool = False) -> None:
        live = len(self)
        need = live + extra
        # Zero tokens asked of an empty buffer: a zero-capacity array that only records the layout.
        cap = need if exact or not need else need + min(max(math.ceil((GROWTH - 1) * need), SPARE), MAX_SPARE)
        # An even capacity: at head dim 64 a head's fp16 scale rows then start 4-byte aligned, which the
        # CUDA decode kernel's 4-byte copies need (it refuses odd head strides).
        cap += cap % 2
        # A normal tensor even under inference mode, so a cache filled there can grow outside it.
        with torch.inference_mode(False):
            new = torch.empty((*shape[:-2], cap, shape[-1]), dtype=dtype, device=device)
        if live:
            new[..., :live, :] = self.view()
        # A fresh tensor rather than an in-place shift: views handed out before stay intact.
        self._data, self._start, self._end = new, 0, live

    def ensure_capacity(self, tokens: int) -> None:
        """Storage for `tokens` live tokens in all (a static cache: no grow, so no move, until then)."""
        if self._data is None:
            raise ValueError("an empty buffer has no layout to preallocate; append first")
        if self._start + tokens > self.capacity:
            self._grow(self._data.shape, self._data.dtype, self._data.device, tokens - len(self), exact=True)

    def storage(self) -> torch.Tensor:
        """The whole storage [..., capacity, X]: live tokens at [start, end), then the reserve."""
        return self._data

    def advance(self, m: int) -> None:
        """Count m more tokens as live that a kernel already wrote past the end (device-side offsets)."""
        if self._end + m > self.capacity:
            raise ValueError(f"{m} more tokens exceed the capacity {self.capacity} ({len(self)} live)")
        self._end += m

    def drop_front(self, m: int) -> None:
        """Forget the first m live tokens (no copy)."""
        if not 0 <= m <= len(self):
            raise ValueError(f"cannot drop {m} of {len(self)} tokens")
        self._start += m

    def replace(self, x: torch.Tensor | None) -> None:
        """Make x [..., len, X] the live tokens (used to restore a saved state)."""
        self._data, self._start, self._end = None, 0, 0
        if x is not None:
            self.append(x)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-axis operation (select, repeat, reorder) to the live tokens."""
        if self._data is not None:
            self.replace(fn(self.view()))
