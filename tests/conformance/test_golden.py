"""Every backend reproduces the golden vectors: codes, scales and biases bit-exactly; floats within
the tolerance table; the decode protocol against the reference oracle."""

from __future__ import annotations

import numpy as np
import pytest

import kvspec
from kvspec import reference as R
from kvspec.tolerances import assert_close, spec_tolerance, tolerance
from tests.golden import generate as G

GOLD = G.load()
QUANT_CASES = sorted({k.split("/")[1] for k in GOLD if k.startswith("quant/")})


def test_golden_file_is_what_the_generator_writes():
    fresh = G.generate()
    assert sorted(fresh) == sorted(GOLD)
    for name, arr in fresh.items():
        assert arr.dtype == GOLD[name].dtype and np.array_equal(arr, GOLD[name]), name


def parse_case(name):
    label, b, g, axis, *rot = name.split("-")
    return label, int(b[1:]), int(g[1:]), axis, int(rot[0][3:]) if rot else None


@pytest.mark.parametrize("case", QUANT_CASES)
def test_quantize_bit_exact(backend, case):
    label, bits, group, axis, rot = parse_case(case)
    x = GOLD["x.quant" if label == "normal" else "x.extreme"]
    if axis == "channel":
        x = x[..., :128, :]
    if rot is not None:
        rotated = backend.rotate(x, rot)
        assert_bit_exact(rotated, R.rotate(x, rot), "rotation")
        x = rotated
    codes, scales, biases = backend.quantize(x, bits, group, axis)
    for what, got in (("codes", codes), ("scales", scales), ("biases", biases)):
        assert_bit_exact(got, GOLD[f"quant/{case}/{what}"], what)


def assert_bit_exact(got, want, what):
    got = np.asarray(got)
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
    unsigned = {2: np.uint16, 4: np.uint32}[want.dtype.itemsize]
    differ = np.argwhere(got.view(unsigned) != want.view(unsigned))
    assert differ.size == 0, f"{what}: {len(differ)} elements differ, first at {differ[:3].tolist()}"


def bases_of(text):
    return {w: GOLD[f"basis/{w}/{text}"] for w in ("k", "v") if f"basis/{w}/{text}" in GOLD}


CHUNKINGS = {"prefill": [G.T], "decode": [1] * G.T, "mixed": [30, 1, 1, 20, 8, 7]}


@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
@pytest.mark.parametrize("text", G.SPECS)
def test_cache_contents(backend, text, chunking):
    """The layer cache holds the golden arrays whatever the chunking (groups align to token 0)."""
    spec = kvspec.parse(text)
    bases = bases_of(text)
    for which in ("k", "v"):
        got = backend.compress(GOLD[f"kv.{which}"], spec, which, bases.get(which), CHUNKINGS[chunking])
        prefix = f"store/{text}/{which}/"
        want = {k[len(prefix):]: v for k, v in GOLD.items() if k.startswith(prefix)}
        assert sorted(got) == sorted(want), which
        t = spec.tensors()[which]
        for name, arr in want.items():
            what = f"{text} {which}.{name}"
            if name == "tail" or isinstance(t, kvspec.Quant):
                assert_bit_exact(got[name], arr, what)
            elif name == "coeffs":
                # Projections summed in another order can round to a neighbouring fp16 value.
                assert_close(got[name], arr, tolerance("rank", 16, backend.dtype), what)
            elif name != "codes":
                # Hybrid codes follow those coefficients, so they are checked through attention.
                assert_close(got[name], arr, tolerance("hybrid", t.coeff.bits, backend.dtype), what)


@pytest.mark.parametrize("text", G.SPECS)
def test_attention_over_golden_state(backend, text):
    spec = kvspec.parse(text)
    stored = {w: {k.split("/")[-1]: v for k, v in GOLD.items() if k.startswith(f"store/{text}/{w}/")} for w in ("k", "v")}
    out = backend.attend(GOLD["q"], np.arange(G.T - 5, G.T), stored, spec, bases_of(text), G.T, None)
    # Same stored data on both sides: only the arithmetic order differs, whatever the method.
    assert_close(out, GOLD[f"attn/{text}"], tolerance("int", 16, backend.dtype), text)


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("text", ["int4", "int2-g32-kchan-res8", "k4v2-kchan-rot3-res16", "rank16", "rank32-q4", "fp16"])
def test_decode_protocol_matches_oracle(backend, text, window):
    """Chunked appends with each chunk's queries attending equal token-by-token decoding."""
    spec = kvspec.parse(text)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((G.B, G.HQ, G.T, G.D)).astype(np.float32)
    k, v = GOLD["kv.k"], GOLD["kv.v"]
    bases = bases_of(text)
    want = R.attend_as_decoded(q, k, v, spec, bases=bases, window=window)
    got = backend.decode(q, k, v, spec, bases, CHUNKINGS["mixed"], window)
    assert_close(got, want, spec_tolerance(spec, backend.dtype), text)
