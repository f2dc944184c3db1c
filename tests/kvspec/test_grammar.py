"""The spec grammar: round trip, canonical form, and errors that name the fix."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvspec
from kvspec.spec import BASES, GROUP_SIZES, QUANT_BITS, Float, KVSpec, LowRank, Quant, SpecError

quants = st.builds(
    Quant,
    bits=st.sampled_from(QUANT_BITS),
    group=st.sampled_from(GROUP_SIZES),
    axis=st.sampled_from(["token", "channel"]),
    rotation=st.none() | st.integers(0, 99),
)


@st.composite
def lowranks(draw):
    rank = draw(st.sampled_from([8, 16, 24, 32, 64, 96]))
    coeff = None
    if draw(st.booleans()):
        groups = [g for g in GROUP_SIZES if rank % g == 0] + [rank]
        coeff = Quant(bits=draw(st.sampled_from(QUANT_BITS)), group=draw(st.sampled_from(groups)))
    return LowRank(rank=rank, basis=draw(st.sampled_from(BASES)), coeff=coeff)


tensors = st.just(Float()) | quants | lowranks()
specs = st.builds(KVSpec, k=tensors, v=tensors, residual=st.sampled_from([0, 1, 32, 128]),
                  float_dtype=st.sampled_from(["fp16", "bf16"]))


@given(specs)
def test_format_parse_round_trip(spec):
    text = kvspec.format(spec)
    assert kvspec.parse(text) == spec
    assert kvspec.format(kvspec.parse(text)) == text


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("int4-g64", "int4"),
        ("INT4", "int4"),
        ("k8v4", "k8v4"),
        ("kint8vint4-g64", "k8v4"),
        ("int4-tok", "int4"),
        ("int4-kchan-res128", "int4-kchan-res128"),
        ("rank32-pca", "rank32"),
        ("rank64-q4-g64", "rank64-q4"),
        ("k16v4", "k16v4"),
        ("int4-rot0", "int4-rot"),
    ],
)
def test_canonical_forms(text, canonical):
    assert kvspec.format(kvspec.parse(text)) == canonical


def test_parsed_fields():
    s = kvspec.parse("k8v2-vg32-kchan-res64-bf16")
    assert s.k == Quant(bits=8, group=64, axis="channel")
    assert s.v == Quant(bits=2, group=32, axis="token")
    assert (s.residual, s.float_dtype) == (64, "bf16")
    h = kvspec.parse("krank48vrank16-q4")
    assert h.k == LowRank(48, coeff=Quant(4, group=48)) and h.v == LowRank(16, coeff=Quant(4, group=16))
    assert kvspec.parse("k8vrank32-q4-g32").k == Quant(8, group=32)


@pytest.mark.parametrize(
    "text, fix",
    [
        ("int5", "use 2, 3, 4, 8"),
        ("int4-g48", "use g32, g64, g128"),
        ("rank32-g64", "rank32-q4-g32"),
        ("int4-pca", "rank32-random"),
        ("", "empty"),
        ("int4-xyz", "unknown option 'xyz'"),
        ("int4-g32-g64", "given twice"),
        ("fp16-bf16", "write just"),
        ("int4-kq4", "rank32-q4"),
        ("k8", "like k8v4"),
        ("int4-res", "like res128"),
        ("rank24-q4-g32", "leave g out"),
        ("q4", "unknown method"),
        ("rank0", "rank must be positive"),
        ("int4-q9", "use q2, q3, q4, q8"),
    ],
)
def test_errors_name_problem_and_valid_forms(text, fix):
    with pytest.raises(SpecError) as e:
        kvspec.parse(text)
    assert fix in str(e.value)
    assert "valid forms: fp16" in str(e.value)


@given(st.text(max_size=12))
def test_arbitrary_text_parses_or_raises_spec_error(text):
    try:
        spec = kvspec.parse(text)
    except SpecError:
        return
    assert kvspec.parse(kvspec.format(spec)) == spec


def test_head_dim_checks():
    with pytest.raises(SpecError, match="does not divide head dim 64; use one of g32, g64"):
        kvspec.parse("int4-g128").check_head_dim(64)
    with pytest.raises(SpecError, match="power-of-two head dim"):
        kvspec.parse("int4-g32-rot").check_head_dim(96)
    with pytest.raises(SpecError, match="exceeds head dim"):
        kvspec.parse("rank128").check_head_dim(64)
    kvspec.parse("int4-g128-chan").check_head_dim(96)  # channel groups run along tokens
