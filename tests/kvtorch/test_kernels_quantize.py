"""kvtorch.kernels.quantize: the quantize-and-append kernel against kvspec.reference.

Codes, scales and biases bit-exact (all bits, both axes, rotation, odd lengths, constant groups,
outliers, bf16 input); low-rank coefficients within kvspec's rank tolerance, hybrid codes within its
hybrid tolerance (they come from projections computed in another order). On CPU the kernel runs in
Triton's interpreter (TRITON_INTERPRET=1, set here before triton is imported); GPU-size checks are
marked `gpu` and skipped without CUDA.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")

from kvspec import reference as R  # noqa: E402
from kvspec.reference.lowrank import make_basis  # noqa: E402
from kvspec.spec import LowRank, Quant  # noqa: E402
from kvspec.tolerances import assert_close, tolerance  # noqa: E402
from kvtorch import ops  # noqa: E402
from kvtorch.kernels.quantize import quantize_rows, quantize_rows_reference, refusal  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def history(shape, seed, dtype=torch.float32):
    """Random K/V rows with an outlier and a constant group (exact in fp16), in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    rows = shape[2]
    x[0, 0, min(1, rows - 1), 3] = 900.0
    x[-1, -1, min(2, rows - 1), :32] = 1.25
    return x.to(dtype)


def assert_bit_exact(out, stored, what):
    q = stored.quant
    assert np.array_equal(ops.words_to_numpy(out["codes"]), q.codes), f"{what}: codes differ"
    assert np.array_equal(out["scales"].cpu().numpy(), q.scales), f"{what}: scales differ"
    assert np.array_equal(out["biases"].cpu().numpy(), q.biases), f"{what}: biases differ"


CASES = [  # (bits, group, axis, rotation, rows, float dtype, input dtype)
    (2, 32, "token", None, 21, "fp16", torch.float32),
    (3, 64, "token", 7, 21, "fp16", torch.float32),
    (4, 64, "token", None, 5, "fp16", torch.bfloat16),
    (8, 32, "token", 1, 21, "bf16", torch.float16),
    (3, 32, "channel", None, 64, "fp16", torch.float32),
    (4, 32, "channel", 2, 32, "bf16", torch.float32),
    (8, 64, "channel", None, 64, "fp16", torch.float32),
    # fewer rows than a 16-row program: a decode step's token (1), and 2- and 4-row programs
    (4, 64, "token", None, 1, "bf16", torch.bfloat16),
    (2, 32, "token", 3, 1, "fp16", torch.float32),
    (8, 64, "token", None, 2, "fp16", torch.float32),
    (3, 32, "token", 5, 3, "bf16", torch.float32),
]


@pytest.mark.parametrize("bits,group,axis,rotation,rows,fdt,xdt", CASES)
def test_quantize_is_bit_exact(bits, group, axis, rotation, rows, fdt, xdt):
    t = Quant(bits=bits, group=group, axis=axis, rotation=rotation)
    x = history((2, 3, rows, 64), seed=bits * 10 + rows, dtype=xdt).to(DEVICE)
    assert refusal(x, t) is None
    out = quantize_rows(x, t, fdt)
    assert_bit_exact(out, R.compress(x.float().cpu().numpy(), t, 0, fdt), f"int{bits} {axis}")


def test_writes_into_views_of_preallocated_storage():
    """The append: rows [n, n + M) of larger buffers are written, the rest left alone."""
    t = Quant(bits=4, group=32)
    x = history((1, 2, 7, 64), seed=3).to(DEVICE)
    full = quantize_rows_reference(torch.zeros(1, 2, 20, 64, device=DEVICE), t, "fp16")
    store = {name: torch.full_like(a, 77) for name, a in full.items()}
    quantize_rows(x, t, "fp16", out={name: a[:, :, 5:12] for name, a in store.items()})
    assert_bit_exact({name: a[:, :, 5:12] for name, a in store.items()}, R.compress(x.cpu().numpy(), t, 0, "fp16"), "view")
    for a in store.values():
        assert (a[:, :, :5] == 77).all() and (a[:, :, 12:] == 77).all()


def bases(heads, dim, rank):
    return np.stack([make_basis("random", dim, seed=h)[:, :rank] for h in range(heads)])


@pytest.mark.parametrize("coeff", [None, Quant(bits=4, group=32), Quant(bits=3, group=32)])
def test_low_rank_and_hybrid_within_tolerance(coeff):
    t = LowRank(rank=32, basis="random", coeff=coeff)
    x = history((2, 3, 19, 64), seed=5)
    p = bases(3, 64, 32)
    out = quantize_rows(x.to(DEVICE), t, "fp16", torch.from_numpy(p).float().to(DEVICE))
    ref = R.compress(x.numpy(), t, 0, "fp16", p)
    if coeff is None:
        assert_close(out["coeffs"].float().cpu(), ref.coeffs, tolerance("rank", 16, "fp16"), "coefficients")
        return
    got = ops.dequantize(out["codes"], out["scales"], out["biases"], coeff.bits, coeff.group, "token", 32)
    want = R.dequantize(ref.quant, coeff.bits, coeff.group, "token", 32)
    assert_close(got.cpu(), want, tolerance("hybrid", coeff.bits, "fp16"), "hybrid coefficients")


def test_reference_matches_kvspec():
    t = Quant(bits=3, group=32, axis="channel", rotation=4)
    x = history((1, 2, 64, 64), seed=9)
    assert_bit_exact(quantize_rows_reference(x, t, "bf16"), R.compress(x.numpy(), t, 0, "bf16"), "reference")


def test_unsupported_shapes_fall_back_to_the_reference():
    t = Quant(bits=4, group=16)  # head dim 48 is no power of two: the kernel refuses
    x = history((1, 2, 6, 48), seed=2).to(DEVICE)
    assert "power of two" in refusal(x, t)
    assert_bit_exact(quantize_rows(x, t, "fp16"), R.compress(x.cpu().numpy(), t, 0, "fp16"), "fallback")
    chan = Quant(bits=4, group=32, axis="channel")
    assert "whole groups" in refusal(history((1, 1, 20, 64), 1).to(DEVICE), chan)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,axis,rotation", [(4, "token", None), (8, "token", 3), (2, "channel", None), (3, "token", None)])
def test_gpu_size_bit_exact(bits, axis, rotation):
    t = Quant(bits=bits, group=64, axis=axis, rotation=rotation)
    x = history((2, 8, 2048, 128), seed=bits, dtype=torch.bfloat16)
    out = quantize_rows(x.cuda(), t, "bf16")
    assert_bit_exact(out, R.compress(x.float().numpy(), t, 0, "bf16"), f"gpu int{bits} {axis}")


@pytest.mark.parametrize("text,sizes", [
    ("int4-res3", [5, 1, 1, 9, 1]),
    ("k2v8-kchan-g32-krot5-res4", [40, 1, 30, 1, 1]),
    ("int3-g32-vchan-res0-bf16", [33, 1, 31, 1]),
    ("krank16vint4-q4-random-res2", [7, 1, 3]),
])
def test_store_appends_through_the_kernel(text, sizes, monkeypatch):
    """kvtorch.store with kernels=True quantizes each residual-window flush with the kernel, in place
    in its buffers, and stores kvspec.reference.compress's arrays for the whole history."""
    import kvspec
    from kvtorch.kernels import _quantize_triton
    from kvtorch.store import TensorStore

    from .helpers import bases_for, reference_arrays

    launches = []
    original = _quantize_triton.quantize_rows_triton
    monkeypatch.setattr(_quantize_triton, "quantize_rows_triton", lambda *a, **k: launches.append(1) or original(*a, **k))
    spec = kvspec.parse(text)
    x = history((1, 2, sum(sizes), 64), seed=len(text))
    bases = bases_for(spec, 64, 2)
    for which, t in spec.tensors().items():
        basis = torch.from_numpy(bases[which]).to(DEVICE) if which in bases else None
        store = TensorStore(t, spec.residual, spec.float_dtype, basis, kernels=True)
        before, pos = len(launches), 0
        for size in sizes:
            store.append(x[:, :, pos : pos + size].to(DEVICE))
            pos += size
        ref = R.compress(x.numpy(), t, spec.residual, spec.float_dtype, bases.get(which))
        got = store.export()
        assert store.n == ref.n and len(launches) > before, f"{text} {which}: the kernel did not run"
        want = reference_arrays(ref)
        assert np.array_equal(got["tail"].float().cpu().numpy(), want["tail"]), f"{text} {which}: tail"
        if "coeffs" in want:
            assert_close(got["coeffs"].float().cpu(), want["coeffs"], tolerance("rank", 16, "fp16"), f"{text} {which}")
        elif isinstance(t, LowRank):
            q = t.coeff
            deq = ops.dequantize(got["codes"], got["scales"], got["biases"], q.bits, q.group, "token", t.rank)
            assert_close(deq.cpu(), R.compressed_values(ref), tolerance("hybrid", q.bits, "fp16"), f"{text} {which}")
        else:
            assert_bit_exact(got, ref, f"{text} {which}")
