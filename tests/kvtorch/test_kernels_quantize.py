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

    from .helpers import bases_for

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
        assert store.n == ref.n and len(launches) > before, f"{text} {which}: the kernel did not run"
        assert_stored_like_reference(store.export(), ref, t, f"{text} {which}")


def assert_stored_like_reference(got, ref, t, what):
    """A store's exported arrays vs kvspec.reference.compress's: the float tail and quantized codes
    bit for bit, low-rank coefficients within the rank tolerance, hybrid codes (dequantized) within
    the hybrid tolerance."""
    from .helpers import reference_arrays

    want = reference_arrays(ref)
    assert np.array_equal(got["tail"].float().cpu().numpy(), want["tail"]), f"{what}: tail"
    if "coeffs" in want:
        assert_close(got["coeffs"].float().cpu(), want["coeffs"], tolerance("rank", 16, "fp16"), what)
    elif isinstance(t, LowRank):
        q = t.coeff
        deq = ops.dequantize(got["codes"], got["scales"], got["biases"], q.bits, q.group, "token", t.rank)
        assert_close(deq.cpu(), R.compressed_values(ref), tolerance("hybrid", q.bits, "fp16"), what)
    else:
        assert_bit_exact(got, ref, what)


PAIRS = [  # one spec for K and V: token axis, a decode step's 1 row, channel axis with rotation, low rank
    (Quant(bits=4, group=64), 5), (Quant(bits=2, group=32), 1), (Quant(bits=3, group=32, axis="channel", rotation=5), 32),
    (LowRank(rank=32, basis="random"), 7), (LowRank(rank=32, basis="random", coeff=Quant(bits=4, group=32)), 3),
]


def count_launches(monkeypatch) -> list:
    from kvtorch.kernels import _quantize_triton

    launches, original = [], _quantize_triton.quantize_rows_triton
    monkeypatch.setattr(_quantize_triton, "quantize_rows_triton", lambda *a, **k: launches.append(1) or original(*a, **k))
    return launches


@pytest.mark.parametrize("t,rows", PAIRS, ids=str)
def test_pair_is_one_launch_with_each_tensors_arrays(t, rows, monkeypatch):
    """quantize_pair writes K's and V's arrays (their own bases, rows and device-held row) in one
    launch, bit for bit as a launch each; mismatched layouts fall back to a launch each."""
    from kvtorch.kernels.quantize import quantize_pair, stored_arrays

    xs = tuple(history((1, 2, rows, 64), seed=s).to(DEVICE) for s in (rows, rows + 100))
    bs = (tuple(torch.from_numpy(bases(2, 64, 32) if s == 0 else np.flip(bases(2, 64, 32), 0).copy()).float()
                .to(DEVICE) for s in (0, 1)) if isinstance(t, LowRank) else (None, None))
    want = [quantize_rows(x, t, "bf16", b) for x, b in zip(xs, bs)]
    launches = count_launches(monkeypatch)
    outs = tuple(stored_arrays(x, t, "bf16") for x in xs)
    quantize_pair(xs, t, "bf16", bs, outs)
    assert len(launches) == 1
    for got, ref, which in zip(outs, want, "KV"):
        assert all(torch.equal(got[n], ref[n]) for n in ref), f"{t} {which} differs from its own launch"
    # A device-held row of whole storage (rows 32.. of 96; nothing at all for a negative row).
    for row0 in (32, -1):
        big = tuple(stored_arrays(history((1, 2, 96, 64), 0).to(DEVICE), t, "bf16") for _ in xs)
        for arrays in big:
            for a in arrays.values():
                a.zero_()
        sep = tuple({n: a.clone() for n, a in arrays.items()} for arrays in big)
        pos = torch.tensor([row0], device=DEVICE)
        quantize_pair(xs, t, "bf16", bs, big, row0=pos)
        for x, b, arrays in zip(xs, bs, sep):
            quantize_rows(x, t, "bf16", b, out=arrays, row0=pos)
        assert all(torch.equal(g[n], s[n]) for g, s in zip(big, sep) for n in g), f"{t} row0 {row0}"
    launches.clear()
    # K and V as transformers hands them over in a decode step: one token, whose axis has another
    # stride in each (a transposed projection, a RoPE output); one launch still.
    if rows == 1:
        launches.clear()
        outs = tuple(stored_arrays(x, t, "bf16") for x in xs)
        b, h, _, d = xs[1].shape
        v = xs[1].clone().as_strided(xs[1].shape, (h * d, d, h * d, 1))  # [B, T, H, D] storage as [B, H, T, D]
        assert v.stride() != xs[1].stride() and torch.equal(v, xs[1])
        quantize_pair((xs[0], v), t, "bf16", bs, outs)
        assert len(launches) == 1
        assert all(torch.equal(got[n], ref[n]) for got, ref in zip(outs, want) for n in ref)
        launches.clear()
    # V as rows of a longer tensor (other strides), K with D not the unit-stride axis: same values.
    wider = torch.cat([xs[1], xs[1]], dim=2)[:, :, :rows]
    outs = tuple(stored_arrays(x, t, "bf16") for x in xs)
    quantize_pair((xs[0].transpose(-1, -2).contiguous().transpose(-1, -2), wider), t, "bf16", bs, outs)
    assert len(launches) == 2
    assert all(torch.equal(got[n], ref[n]) for got, ref in zip(outs, want) for n in ref)


@pytest.mark.parametrize("text", ["int4-res3", "k4v2-g32-res2", "int3-g32-chan-rot5", "rank16-random-q4"])
def test_layer_quantizes_k_and_v_in_one_launch(text, monkeypatch):
    """A LayerStore whose K and V share a spec flushes both through one launch (mixed specs: one
    each), and stores what kvspec.reference.compress stores for each, with K's and V's own bases."""
    import kvspec
    from kvtorch.store import LayerStore

    spec = kvspec.parse(text)
    sizes = [33, 1, 30, 1, 1]
    k, v = (history((1, 2, sum(sizes), 64), seed=s) for s in (1, 2))
    own = {w: np.flip(bases(2, 64, 16), 0).copy() if w == "v" else bases(2, 64, 16)
           for w, t in spec.tensors().items() if isinstance(t, LowRank)}  # K's and V's differ
    layer = LayerStore(spec.k, spec.v, spec.residual, spec.float_dtype,
                       {w: torch.from_numpy(b).to(DEVICE) for w, b in own.items()}, kernels=True)
    launches, flushes, pos = count_launches(monkeypatch), [0, 0], 0
    for size in sizes:
        n0 = layer.k.n, layer.v.n
        layer.append(k[:, :, pos : pos + size].to(DEVICE), v[:, :, pos : pos + size].to(DEVICE))
        flushes = [f + (store.n > n) for f, store, n in zip(flushes, (layer.k, layer.v), n0)]
        pos += size
    assert min(flushes) > 1
    assert len(launches) == (flushes[0] if spec.k == spec.v else sum(flushes)), f"{text}: {flushes} flushes"
    for which, x, store in (("k", k, layer.k), ("v", v, layer.v)):
        t = spec.tensors()[which]
        ref = R.compress(x.numpy(), t, spec.residual, spec.float_dtype, own.get(which))
        assert_stored_like_reference(store.export(), ref, t, f"{text} {which}")
