"""Randomized Hadamard rotation of the head dim, defined op by op so every backend gets the same bits.

rotate(x)   = fwht(x * signs) * c        unrotate(y) = fwht(y) * c * signs        c = fp32(1/sqrt(D))
fwht is the unnormalized Walsh-Hadamard transform in Sylvester order, computed in fp32 by stages
h = 1, 2, 4, ..., D/2: for each pair (j, j + h) inside blocks of 2h, (a, b) -> (a + b, a - b).
Every stage is elementwise IEEE addition/subtraction, so the result is bit-identical across NumPy,
torch, CUDA and Metal (no reassociation; multiplying by +-1 is exact, so fused multiply-adds agree).
The rotation is orthonormal (H H^T = D I), so q.k = rotate(q).rotate(k) and attention outputs
computed on rotated values are undone by `unrotate`.
signs: +-1 of length D from numpy's PCG64 seeded with `seed` (the spec's rotation seed).
"""

from __future__ import annotations

import numpy as np


def hadamard_signs(dim: int, seed: int) -> np.ndarray:
    """The +-1 vector [D] (fp32) of the randomized Hadamard transform for `seed`."""
    rng = np.random.default_rng(seed)
    return np.where(rng.integers(0, 2, size=dim) == 1, 1.0, -1.0).astype(np.float32)


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalized Walsh-Hadamard transform along the last axis (fp32, Sylvester order)."""
    x = np.array(x, dtype=np.float32)
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two length, got {d}")
    h = 1
    while h < d:
        y = x.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = np.stack([a + b, a - b], axis=-2).reshape(x.shape)
        h *= 2
    return x


def norm_factor(dim: int) -> np.float32:
    return np.float32(1.0 / np.sqrt(dim))


def rotate(x: np.ndarray, seed: int) -> np.ndarray:
    """Rotate the last axis of x [..., D]; fp32 in, fp32 out."""
    x = np.asarray(x, dtype=np.float32)
    d = x.shape[-1]
    return fwht(x * hadamard_signs(d, seed)) * norm_factor(d)


def unrotate(y: np.ndarray, seed: int) -> np.ndarray:
    """Inverse of `rotate` (exact up to fp32 rounding)."""
    y = np.asarray(y, dtype=np.float32)
    d = y.shape[-1]
    return fwht(y) * norm_factor(d) * hadamard_signs(d, seed)


def hadamard_matrix(dim: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix H/sqrt(D) in float64 (rows are fwht of unit vectors)."""
    return fwht(np.eye(dim, dtype=np.float32)).astype(np.float64) / np.sqrt(dim)


def rotate_f64(x: np.ndarray, seed: int) -> np.ndarray:
    """`rotate` in float64 by matrix product, for reference attention (not for codes)."""
    d = x.shape[-1]
    return (np.asarray(x, np.float64) * hadamard_signs(d, seed)) @ hadamard_matrix(d)


def unrotate_f64(y: np.ndarray, seed: int) -> np.ndarray:
    """`unrotate` in float64 by matrix product, for reference attention and reconstruction."""
    d = y.shape[-1]
    return (np.asarray(y, np.float64) @ hadamard_matrix(d)) * hadamard_signs(d, seed)
