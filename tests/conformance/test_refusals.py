"""Every backend refuses what kvspec refuses, naming where: NaN/Inf, values beyond fp16, and rows a
rotation could push beyond fp16."""

from __future__ import annotations

import numpy as np
import pytest

import kvspec
from kvspec.reference import NonFiniteError


@pytest.mark.parametrize(
    "text, poison, message",
    [
        ("int4", np.nan, "NaN/Inf"),
        ("int2-kchan", np.inf, "NaN/Inf"),
        ("int8", 7.0e4, "beyond fp16 range"),
        ("int4-rot", "row", "L2 norm"),
        ("rank8-random", np.nan, "NaN/Inf"),
    ],
)
def test_refused_with_position(backend, text, poison, message):
    spec = kvspec.parse(text)
    x = np.random.default_rng(0).standard_normal((1, 2, 70, 64)).astype(np.float32)
    if poison == "row":
        x[0, 1, 5, :] = 60_000.0  # every value fits fp16, but the rotated row would not
    else:
        x[0, 1, 5, 3] = poison
    basis = None
    if isinstance(spec.k, kvspec.LowRank):
        from kvspec.reference import make_basis

        basis = np.stack([make_basis("random", 64, seed=h)[:, :8] for h in range(2)]).astype(np.float32)
    with pytest.raises(NonFiniteError, match=message):
        backend.compress(x, spec, "k", basis, [70])
    x[0, 1, 5, :] = 1.0
    backend.compress(x, spec, "k", basis, [70])  # the same tensor without the bad value is stored
