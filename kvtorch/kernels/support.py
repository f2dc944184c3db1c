"""Where the Triton kernels can run, and the reasons they refuse (vLLM style: a refusal names why).

The kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the tests). Each
dispatcher asks `triton_refusal(device)` and its own shape checks; a non-None answer sends the call
to the module's plain-torch reference.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from kvspec.reference.rotation import hadamard_signs
from kvspec.spec import LowRank, Quant, TensorSpec

from .. import ops


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_refusal(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on `device` (None: they can)."""
    if not _have_triton():
        return "triton is not installed"
    if device.type == "cuda":
        return None if not interpreting() else "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
    if device.type == "cpu" and interpreting():
        return None
    return f"no Triton kernels on {device.type} (CUDA, or CPU under TRITON_INTERPRET=1)"


def on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make x's GPU the current one for a launch (Triton launches on the current device); no-op off CUDA."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded(n: int) -> int:
    """A tile width for n columns: a power of two, at least 16 (tl.dot's smallest operand side)."""
    return max(16, next_pow2(n))


def quantizer(t: TensorSpec) -> Quant | None:
    """The Quant that stores a tensor's codes: the spec itself, a hybrid's coefficient quantizer, or
    None (float coefficients, float tensors)."""
    return t if isinstance(t, Quant) else (t.coeff if isinstance(t, LowRank) else None)


def compressed_rows(part, lo: int, hi: int) -> torch.Tensor:
    """Compressed rows [lo, hi) of a Part as attention reads them, fp32 [B, Hkv, hi - lo, D or r]
    (still rotated; channel-axis bounds on group boundaries)."""
    t, a = part.spec, part.arrays
    q = quantizer(t)
    if q is None:
        return a["coeffs"][:, :, lo:hi].float()
    g = q.group if q.axis == "channel" else 1
    width = t.rank if isinstance(t, LowRank) else part.floats.shape[-1]
    return ops.dequantize(a["codes"][:, :, lo:hi], a["scales"][:, :, lo // g : hi // g],
                          a["biases"][:, :, lo // g : hi // g], q.bits, q.group, q.axis, width)


@functools.lru_cache(maxsize=256)  # asked for K and V of every layer at every step; specs are frozen
def tensor_refusal(t: TensorSpec, head_dim: int) -> str | None:
    """Why the kernels cannot read or write tensors of spec t at this head dim (None: they can).

    Assumptions: head dim a power of two in [16, 256]; quantization groups a power of two of at
    least 16 that divides the tile width (token axis) or of at most 128 tokens (channel axis);
    3-bit rows a multiple of 32 codes.
    """
    if not (is_pow2(head_dim) and 16 <= head_dim <= 256):
        return f"head dim {head_dim} is not a power of two in [16, 256]"
    q = quantizer(t)
    width = t.rank if isinstance(t, LowRank) else head_dim
    if isinstance(t, LowRank) and t.rank > head_dim:
        return f"rank {t.rank} exceeds head dim {head_dim}"
    if q is None:
        return None if isinstance(t, LowRank) else "float tensors have no compressed part"
    if not (is_pow2(q.group) and q.group >= 16):
        return f"group {q.group} is not a power of two >= 16"
    if q.axis == "token" and (width % q.group or padded(width) % q.group):
        return f"group {q.group} does not tile a row of {width}"
    if q.axis == "channel" and q.group > 128:
        return f"channel group {q.group} is longer than 128 tokens"
    if q.axis == "channel" and width > 128:
        # Gemma-3 (D 256) on the H200: 348,160 B of shared memory asked for, 232,448 B there, and one
        # illegal address; the reference path runs until these tiles are fixed and measured.
        return f"channel-axis tiles at width {width} exceed the GPU's shared memory (measured at D 256)"
    if q.bits == 3 and padded(width) % 32:
        return "3-bit rows need a multiple of 32 codes"
    return None


@functools.lru_cache(maxsize=32)
def rotation_signs(dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """kvspec's Hadamard signs [D] (fp32) on `device`, made once per (dim, seed, device)."""
    return torch.from_numpy(hadamard_signs(dim, seed)).to(device)


def patch_interpreter() -> None:
    """Under TRITON_INTERPRET=1 with NumPy >= 2.4, let Triton's interpreter use tensor loop bounds.

    Triton 3.6's interpreter turns a loop bound into an int with int() of a one-element array,
    which NumPy 2.4 refuses (triton-lang/triton#9171, fixed upstream by #9172 after 3.6); this
    applies the same fix. Compiled kernels are unaffected.
    """
    if not interpreting() or importlib.util.find_spec("triton") is None:
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "kvtorch_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.kvtorch_fixed = True
    interpreter._patch_lang_tensor = patched
