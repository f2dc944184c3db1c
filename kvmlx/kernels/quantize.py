"""The quantize kernel (kvmlx/kernels/bodies.py QUANTIZE) as a launch: x [B, H, M, D] -> kvspec arrays.

`quantize_launch(x, bits, group, axis)` describes the launch; `quantize(x, bits, group, axis)` is
the dispatcher that TensorStore uses: the kernel on a GPU stream once it has checked itself against
kvmlx.ops.quantize (codes, scales and biases bit-exact), kvmlx.ops.quantize otherwise.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from kvspec.layout import words_per_row

from .. import ops
from . import bodies
from .launch import Launch
from .selfcheck import SelfChecked, bits_equal

THREADS = 256


def quantize_launch(x: mx.array, bits: int, group: int, axis: str) -> Launch:
    """Launch quantizing x [B, H, M, D] (fp16, bf16 or fp32; unit last stride) like kvmlx.ops.quantize."""
    b, h, m, d = x.shape
    w = words_per_row(d, bits)
    total = b * h * m * w
    chan = axis == "channel"
    sshape = (b, h, m // group, d) if chan else (b, h, m, d // group)
    return Launch(
        name="kvmlx_quantize", body=bodies.QUANTIZE,
        inputs={"params": mx.array([h, m, total, 0], mx.int32), "x": x},
        outputs={"codes": ((b, h, m, w), mx.uint32), "scales": (sshape, mx.float16), "biases": (sshape, mx.float16)},
        template=[("T", x.dtype), ("D", d), ("BITS", bits), ("GROUP", group), ("CHAN", int(chan)), ("W", w)],
        grid=(-(-total // THREADS) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
    )


def refusal(x: mx.array, bits: int, group: int, axis: str) -> str | None:
    """Why the kernel does not take this input (None: it does)."""
    if x.ndim != 4 or x.size == 0:
        return f"input of shape {x.shape} is not a non-empty [B, H, M, D]"
    if x.dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return f"input dtype {x.dtype}"
    if axis == "channel" and x.shape[2] % group:
        return f"{x.shape[2]} rows are not whole channel groups of {group}"
    if axis == "token" and x.shape[3] % group:
        return f"group {group} does not divide {x.shape[3]}"
    return None


def _probe(key: tuple) -> tuple[mx.array, ...]:
    """A small input of the same configuration with constant groups, ties and an outlier."""
    bits, group, axis, d, dtype = key
    rows = 2 * group if axis == "channel" else 7
    rng = np.random.default_rng(bits * 131 + group)
    x = rng.standard_normal((1, 2, rows, d)).astype(np.float32)
    x[0, 0, :2] = -0.75
    x[0, 1, :, 1] *= 300.0
    x[0, 1, 3, : d // 2] = np.round(x[0, 1, 3, : d // 2] * 4) / 4
    return (mx.array(x).astype(dtype),)


def _kernel(dialect: str, key: tuple, x: mx.array):
    bits, group, axis, _, _ = key
    out = quantize_launch(x, bits, group, axis).run(dialect)
    return out["codes"], out["scales"], out["biases"]


def _reference(key: tuple, x: mx.array):
    bits, group, axis, _, _ = key
    return ops.quantize(x, bits, group, axis)


def _compare(key, got, want) -> str | None:
    for name, g, w in zip(("codes", "scales", "biases"), got, want):
        why = bits_equal(g, w)
        if why:
            return f"{name}: {why}"
    return None


CHECKED = SelfChecked("quantize", _kernel, _reference, _probe, _compare)


def quantize(x: mx.array, bits: int, group: int, axis: str) -> tuple[mx.array, mx.array, mx.array]:
    """kvmlx.ops.quantize's contract (x [..., M, D] -> codes, scales, biases), by the kernel where it runs."""
    if x.ndim != 4 or refusal(x, bits, group, axis):
        return ops.quantize(x, bits, group, axis)
    return CHECKED((bits, group, axis, x.shape[-1], x.dtype), x)
