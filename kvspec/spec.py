"""The compression spec as data: what each of K and V is turned into, and the shared float window.

A `KVSpec` holds one `TensorSpec` for keys and one for values. A tensor spec is one of
- `Float`: kept in the spec's float dtype (the fp16 / bf16 baseline);
- `Quant`: asymmetric affine integer codes per group (see kvspec.reference.quant for the numerics);
- `LowRank`: coefficients on an orthonormal basis of rank r; with `coeff` set, the coefficients are
  themselves quantized (the paper's hybrids).
`residual` keeps the most recent R tokens of both K and V in the float dtype.

Strings are parsed and written by kvspec.grammar; bits are counted by kvspec.budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

QUANT_BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP = 64
AXES = ("token", "channel")
BASES = ("pca", "random", "identity", "hadamard")
FLOAT_DTYPES = ("fp16", "bf16")
DEFAULT_ROTATION_SEED = 0


class SpecError(ValueError):
    """A spec that cannot be built or does not fit a model; the message names the fix."""


@dataclass(frozen=True)
class Float:
    """Uncompressed: stored in the KVSpec's float dtype."""

    kind: Literal["float"] = field(default="float", init=False)


@dataclass(frozen=True)
class Quant:
    """Affine `bits`-bit codes, one fp16 scale and bias per `group` elements.

    axis "token": groups of `group` consecutive head-dim elements of one token (MLX, llama.cpp).
    axis "channel": groups of `group` consecutive tokens of one head-dim channel (KIVI); the
    tokens of an incomplete group stay in float until the group is complete.
    rotation: seed of the randomized Hadamard transform applied along the head dim before
    quantizing (None: no rotation).
    """

    bits: int
    group: int = DEFAULT_GROUP
    axis: Literal["token", "channel"] = "token"
    rotation: int | None = None
    kind: Literal["int"] = field(default="int", init=False)

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise SpecError(f"bits must be one of {', '.join(map(str, QUANT_BITS))}, got {self.bits}")
        if self.group < 1:
            raise SpecError(f"group size must be positive, got {self.group}")
        if self.axis not in AXES:
            raise SpecError(f"axis must be 'token' or 'channel', got {self.axis!r}")


@dataclass(frozen=True)
class LowRank:
    """Coefficients c = x @ P on an orthonormal basis P (head_dim x rank) per layer and KV head.

    basis: how P is made ("pca" from calibration activations; the others need no data).
    coeff: None keeps coefficients in float; a token-axis Quant makes the hybrid.
    """

    rank: int
    basis: Literal["pca", "random", "identity", "hadamard"] = "pca"
    coeff: Quant | None = None
    kind: Literal["rank"] = field(default="rank", init=False)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise SpecError(f"rank must be positive, got {self.rank}")
        if self.basis not in BASES:
            raise SpecError(f"basis must be one of {', '.join(BASES)}, got {self.basis!r}")
        if self.coeff is not None:
            if self.coeff.axis != "token" or self.coeff.rotation is not None:
                raise SpecError("hybrid coefficients are quantized per token, without rotation")
            if self.rank % self.coeff.group:
                raise SpecError(
                    f"hybrid group size {self.coeff.group} does not divide rank {self.rank}; "
                    "leave g out for one group per token's coefficients, or pick a rank it divides"
                )


TensorSpec = Float | Quant | LowRank


@dataclass(frozen=True)
class KVSpec:
    """How one model's K and V caches are stored.

    k, v: per-tensor specs. residual: the most recent `residual` tokens stay in `float_dtype`.
    float_dtype: dtype of everything kept in float (baseline, window, incomplete channel groups,
    low-rank coefficients).
    """

    k: TensorSpec
    v: TensorSpec
    residual: int = 0
    float_dtype: Literal["fp16", "bf16"] = "fp16"

    def __post_init__(self) -> None:
        if self.residual < 0:
            raise SpecError(f"residual window must be >= 0 tokens, got {self.residual}")
        if self.float_dtype not in FLOAT_DTYPES:
            raise SpecError(f"float dtype must be fp16 or bf16, got {self.float_dtype!r}")

    @property
    def is_baseline(self) -> bool:
        return isinstance(self.k, Float) and isinstance(self.v, Float)

    @property
    def method(self) -> str:
        """Family name used by the tolerance table and sweeps: float, int, rank, hybrid or mixed."""
        kinds = {method_of(self.k), method_of(self.v)}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def tensors(self) -> dict[str, TensorSpec]:
        return {"k": self.k, "v": self.v}

    def check_head_dim(self, head_dim: int) -> None:
        """Raise SpecError if this spec cannot be applied to heads of `head_dim` channels."""
        for name, t in self.tensors().items():
            check_tensor_fits(name, t, head_dim)


def method_of(t: TensorSpec) -> str:
    if isinstance(t, LowRank):
        return "hybrid" if t.coeff is not None else "rank"
    return t.kind


def check_tensor_fits(name: str, t: TensorSpec, head_dim: int) -> None:
    if isinstance(t, Quant):
        if t.axis == "token" and head_dim % t.group:
            fits = [f"g{g}" for g in GROUP_SIZES if head_dim % g == 0]
            fix = f"use one of {', '.join(fits)}" if fits else "use the channel axis (-chan)"
            raise SpecError(f"{name.upper()}: group size {t.group} does not divide head dim {head_dim}; {fix}")
        if t.rotation is not None and head_dim & (head_dim - 1):
            raise SpecError(
                f"{name.upper()}: rotation needs a power-of-two head dim, got {head_dim}; drop 'rot'"
            )
    if isinstance(t, LowRank):
        if t.rank > head_dim:
            raise SpecError(f"{name.upper()}: rank {t.rank} exceeds head dim {head_dim}")
        if t.basis == "hadamard" and head_dim & (head_dim - 1):
            raise SpecError(
                f"{name.upper()}: a Hadamard basis needs a power-of-two head dim, got {head_dim}"
            )
