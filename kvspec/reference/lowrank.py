"""Orthonormal bases for low-rank K/V and the projections in and out of rank space (float64).

A basis is a [D, D] matrix whose first r columns are the rank-r basis P (orthonormal columns).
- pca: eigenvectors of the uncentered second moment X^T X of calibration activations, by decreasing
  eigenvalue (the cache stores c = x P with no mean, so the uncentered moment is what rank r keeps);
- random: Q of the QR decomposition of a seeded Gaussian matrix;
- identity: the coordinate axes (rank r keeps the first r head-dim channels);
- hadamard: the columns of the orthonormal Sylvester Hadamard matrix.
Each column's sign is fixed (its largest-magnitude entry positive) so bases are deterministic.
"""

from __future__ import annotations

import numpy as np

from .rotation import hadamard_matrix


def _fix_signs(basis: np.ndarray) -> np.ndarray:
    idx = np.argmax(np.abs(basis), axis=0)
    signs = np.sign(basis[idx, np.arange(basis.shape[1])])
    return basis * np.where(signs == 0, 1.0, signs)


def pca_basis(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """acts [N, D] -> (basis [D, D] by decreasing energy, energies [D] = eigenvalues / N)."""
    x = np.asarray(acts, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"PCA needs activations of shape [N, D] with N >= 1, got {x.shape}")
    moment = x.T @ x / x.shape[0]
    vals, vecs = np.linalg.eigh(moment)
    order = np.argsort(vals)[::-1]
    return _fix_signs(vecs[:, order]), np.clip(vals[order], 0, None)


def random_basis(dim: int, seed: int = 0) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return _fix_signs(q * np.sign(np.diag(r)))


def identity_basis(dim: int) -> np.ndarray:
    return np.eye(dim)


def make_basis(kind: str, dim: int, acts: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """A [D, D] basis of the named kind; "pca" needs activations [N, D]."""
    if kind == "pca":
        if acts is None:
            raise ValueError("a PCA basis needs calibration activations (run `kvmlx calibrate`)")
        return pca_basis(acts)[0]
    if kind == "random":
        return random_basis(dim, seed)
    if kind == "identity":
        return identity_basis(dim)
    if kind == "hadamard":
        return _fix_signs(hadamard_matrix(dim))
    raise ValueError(f"unknown basis {kind!r}")


def project(x: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """x [B, H, T, D], basis [H, D, r] -> coefficients [B, H, T, r] (float64)."""
    return np.einsum("bhtd,hdr->bhtr", np.asarray(x, np.float64), np.asarray(basis, np.float64))


def reconstruct(c: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """coefficients [B, H, T, r], basis [H, D, r] -> [B, H, T, D] (float64)."""
    return np.einsum("bhtr,hdr->bhtd", np.asarray(c, np.float64), np.asarray(basis, np.float64))
