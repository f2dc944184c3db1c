"""Hadamard rotation and low-rank bases."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvspec.reference import lowrank as L
from kvspec.reference import rotation as R


@pytest.mark.parametrize("dim", [2, 8, 64, 128, 256])
def test_fwht_is_sylvester_hadamard(dim):
    h = R.hadamard_matrix(dim)
    assert np.allclose(h @ h.T, np.eye(dim), atol=1e-12)
    x = np.random.default_rng(dim).standard_normal((3, dim)).astype(np.float32)
    assert np.allclose(R.fwht(x), x.astype(np.float64) @ h * np.sqrt(dim), atol=1e-4)


@given(st.integers(0, 1000), st.sampled_from([64, 128, 256]))
@settings(deadline=None)
def test_rotation_is_orthonormal_and_undone(seed, dim):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, dim)).astype(np.float32)
    y = R.rotate(x, seed)
    assert np.allclose(R.unrotate(y, seed), x, atol=1e-5)
    assert np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    q = rng.standard_normal((dim,)).astype(np.float32)
    assert np.allclose(R.rotate(q, seed) @ y.T, q @ x.T, atol=1e-3)
    assert np.allclose(R.rotate_f64(x, seed), y, atol=1e-5)


def test_rotation_refuses_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        R.rotate(np.zeros((2, 96), np.float32), 0)


@pytest.mark.parametrize("kind", ["pca", "random", "identity", "hadamard"])
def test_bases_are_orthonormal_and_deterministic(kind):
    acts = np.random.default_rng(0).standard_normal((500, 32)) * np.linspace(3, 0.1, 32)
    b1 = L.make_basis(kind, 32, acts=acts, seed=5)
    b2 = L.make_basis(kind, 32, acts=acts, seed=5)
    assert np.allclose(b1.T @ b1, np.eye(32), atol=1e-10)
    assert np.array_equal(b1, b2)


def test_pca_orders_by_energy_and_keeps_the_most():
    rng = np.random.default_rng(3)
    acts = rng.standard_normal((2000, 16)) * np.array([5.0, 0.1] * 8)
    basis, energy = L.pca_basis(acts)
    assert (np.diff(energy) <= 1e-12).all()
    p = basis[:, :8]
    kept = np.linalg.norm(acts @ p) ** 2 / np.linalg.norm(acts) ** 2
    assert kept > 0.99
    rand = L.make_basis("random", 16, seed=0)[:, :8]
    assert kept > np.linalg.norm(acts @ rand) ** 2 / np.linalg.norm(acts) ** 2


def test_project_reconstruct_identity_at_full_rank():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 5, 16))
    basis = np.stack([L.make_basis("random", 16, seed=s) for s in (1, 2)])
    assert np.allclose(L.reconstruct(L.project(x, basis), basis), x, atol=1e-12)
    with pytest.raises(ValueError, match="calibration"):
        L.make_basis("pca", 16)
