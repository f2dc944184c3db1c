"""Layer stores against kvspec.reference.compress: any chunking stores the whole-history arrays;
sliding windows trim; growth is geometric; saved states restore; bad input is refused by layer."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'kvmlx[torch]')")

import kvspec  # noqa: E402
from kvspec import reference as R  # noqa: E402
from kvspec.layout import compressed_shapes, n_quantized  # noqa: E402
from kvspec.reference.quant import NonFiniteError  # noqa: E402
from kvspec.tolerances import assert_close, tolerance  # noqa: E402
from kvtorch import ops  # noqa: E402
from kvtorch.buffer import GROWTH, MAX_SPARE, SPARE, TokenBuffer  # noqa: E402
from kvtorch.store import (  # noqa: E402
    CHECK_EVERY,
    LayerStore,
    TensorStore,
    chunk_splits,
    position_range,
    split_positions,
)

from .helpers import SPECS, bases_for, chunking, reference_arrays  # noqa: E402

B, H, D = 2, 3, 128


def as_numpy(name: str, a: torch.Tensor) -> np.ndarray:
    if name == "codes":
        return ops.words_to_numpy(a)
    return a.cpu().numpy() if name in ("scales", "biases") else a.float().cpu().numpy()


def fill(store: TensorStore, x: np.ndarray, sizes: list[int]) -> None:
    pos = 0
    for size in sizes:
        store.append(torch.from_numpy(x[..., pos : pos + size, :]))
        pos += size


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("tokens", [1, 37, 130])
def test_any_chunking_stores_the_reference_arrays(text, tokens):
    spec = kvspec.parse(text)
    rng = np.random.default_rng(tokens)
    x = (rng.standard_normal((B, H, tokens, D)) * np.linspace(0.2, 30, D)).astype(np.float32)
    x[0, 0, : tokens // 2, :5] = 1.5  # constant stretches
    bases = bases_for(spec, D, H)
    for which, t in spec.tensors().items():
        ref = R.compress(x, t, spec.residual, spec.float_dtype, bases.get(which))
        want = reference_arrays(ref)
        for sizes in ([tokens], [1] * tokens, chunking(rng, tokens)):
            basis = torch.from_numpy(bases[which]) if which in bases else None
            store = TensorStore(t, spec.residual, spec.float_dtype, basis)
            fill(store, x, sizes)
            assert store.n == ref.n and store.tokens == tokens
            got = {k: as_numpy(k, a) for k, a in store.export().items() if k != "basis"}
            assert sorted(got) == sorted(set(want) | set(compressed_shapes(t, B, H, 0, D)))
            for name, arr in got.items():
                what = f"{text} {which}.{name} chunks {sizes[:6]}"
                if name not in want:  # nothing compressed yet: a zero-token array of the layout shape
                    assert arr.shape == compressed_shapes(t, B, H, 0, D)[name], what
                elif name == "coeffs":
                    assert_close(arr, want[name], tolerance("rank", 16, "fp32"), what)
                elif isinstance(t, kvspec.LowRank) and name != "tail":
                    continue  # hybrid codes follow the coefficients: compared after dequantization below
                else:
                    assert arr.dtype == want[name].dtype and np.array_equal(arr, want[name]), what
            if isinstance(t, kvspec.LowRank) and t.coeff is not None and ref.n:
                q = t.coeff
                deq = ops.dequantize(*(store.export()[k] for k in ("codes", "scales", "biases")), q.bits, q.group, "token", t.rank)
                assert_close(deq.numpy(), R.compressed_values(ref), tolerance("hybrid", q.bits, "fp32"), text)


def test_split_positions_is_n_quantized_per_query():
    pos = torch.arange(0, 300)
    for text in ("int4", "int2-kchan-g32-res8", "fp16", "rank16-random-res5"):
        spec = kvspec.parse(text)
        for t in spec.tensors().values():
            want = [n_quantized(t, spec.residual, p + 1) for p in range(300)]
            assert split_positions(t, spec.residual, pos).tolist() == want


def test_chunk_splits_equal_split_positions_for_every_chunk():
    # Chunks starting inside and past the residual window, single tokens and longer chunks.
    for text in ("int4", "int2-kchan-g32-res8", "fp16", "rank16-random-res5", "int4-res130"):
        spec = kvspec.parse(text)
        for t in spec.tensors().values():
            for t0, m in ((0, 1), (3, 1), (4, 7), (129, 1), (130, 1), (131, 5), (5000, 1), (9000, 300)):
                q_pos = position_range(t0, t0 + m, torch.device("cpu"))
                assert q_pos.tolist() == list(range(t0, t0 + m))
                want = [n_quantized(t, spec.residual, p + 1) for p in range(t0, t0 + m)]
                assert chunk_splits(t, spec.residual, t0, t0 + m, q_pos).tolist() == want, (text, t0, m)


def test_position_views_stay_valid_when_the_table_grows():
    early = position_range(10, 12, torch.device("cpu"))
    late = position_range(100_000, 100_003, torch.device("cpu"))  # beyond any earlier table: it grows
    assert early.tolist() == [10, 11] and late.tolist() == [100_000, 100_001, 100_002]


def test_sliding_float_layer_keeps_its_window():
    spec = kvspec.parse("fp16")
    layer = LayerStore(spec.k, spec.v, 0, "fp16", window=8)
    x = torch.randn(1, 2, 30, D)
    chunk = layer.append(x[:, :, :5], x[:, :, :5])
    assert chunk.k.float_start == 0 and chunk.k.floats.shape[-2] == 5
    layer.append(x[:, :, 5:20], x[:, :, 5:20])
    assert len(layer.k.tail) == 8 and layer.k.start == 12 and layer.first_column() == 12
    chunk = layer.append(x[:, :, 20:23], x[:, :, 20:23])
    # The chunk's queries read the 8 tokens held before it plus itself: positions [12, 23).
    assert chunk.k.float_start == 12 and torch.equal(chunk.k.floats, x[:, :, 12:23].half())
    assert torch.equal(layer.v.tail.view(), x[:, :, 15:23].half())


def test_growth_is_geometric_then_capped_and_views_survive_it():
    buf = TokenBuffer()
    grows, cap, n = 0, 0, 12000
    for i in range(n):
        buf.append(torch.full((1, 1, 1, 4), float(i)))
        if i % 7 == 0:
            buf.drop_front(1)  # a window leaving from the front
        if buf.capacity != cap:  # a grow: live tokens moved to the front, then at most MAX_SPARE spare
            grows += 1  # (+1 for the window's drop, +1 rounding to an even capacity, which D 64 kernels need)
            assert buf.capacity - len(buf) <= MAX_SPARE + 2 and buf.capacity % 2 == 0, (i, buf.capacity, len(buf))
        cap = buf.capacity
    # One grow per factor GROWTH of length until the reserve reaches MAX_SPARE, then one per
    # MAX_SPARE tokens (plus moves of the window's front), not one per append.
    geometric = math.log(MAX_SPARE / (GROWTH - 1) / SPARE, GROWTH)
    assert grows <= geometric + n / MAX_SPARE + 8
    assert buf.view()[0, 0, :, 0].tolist() == [i for i in range(n) if i >= (n - len(buf))]
    view = buf.view()
    before = view.clone()
    for _ in range(cap):
        buf.append(torch.zeros(1, 1, 1, 4))
    assert torch.equal(view, before)  # a grow never overwrites what an earlier view shows


@pytest.mark.parametrize("text", ["int4", "int8-res5", "int4-kchan-res3", "rank16-random"])
def test_storage_holds_the_live_tokens_not_the_largest_chunk(text):
    """A prefill chunk's floats do not stay allocated in the tail (they would for the cache's life),
    and the compressed arrays hold at most GROWTH times their tokens (or SPARE more)."""
    spec = kvspec.parse(text)
    bases = {w: torch.from_numpy(b) for w, b in bases_for(spec, D, H).items()}
    layer = LayerStore(spec.k, spec.v, spec.residual, spec.float_dtype, bases)
    chunk = layer.append(*(torch.randn(1, H, 1000, D),) * 2)
    assert chunk.k.floats.shape[-2] == 1000  # the chunk's queries still read every chunk token in float
    for _ in range(40):
        layer.append(*(torch.randn(1, H, 1, D),) * 2)
    for store in (layer.k, layer.v):
        float_tokens = 1040 - n_quantized(store.spec, spec.residual, 1040)
        # The most a tail holds between flushes: the window and one token, or a whole channel group.
        most = spec.residual + (store.spec.group if getattr(store.spec, "axis", "") == "channel" else 1)
        assert len(store.tail) == float_tokens and store.tail.capacity <= max(GROWTH * most, most + SPARE)
        for name, buf in store.arrays.items():
            assert len(buf) * GROWTH + 1 >= buf.capacity or buf.capacity <= len(buf) + SPARE, (text, name)


@pytest.mark.parametrize("text", ["int4-kchan-res7", "rank16-q4-random", "fp16"])
def test_export_restore_continues_identically(text):
    spec = kvspec.parse(text)
    bases = {w: torch.from_numpy(b) for w, b in bases_for(spec, D, H).items()}
    x = torch.randn(B, H, 90, D)
    whole = LayerStore(spec.k, spec.v, spec.residual, spec.float_dtype, bases)
    whole.append(x[:, :, :50], x[:, :, :50])
    resumed = LayerStore(spec.k, spec.v, spec.residual, spec.float_dtype, bases)
    resumed.k.restore(whole.k.export(), 50)
    resumed.v.restore(whole.v.export(), 50)
    for store in (whole, resumed):
        store.append(x[:, :, 50:], x[:, :, 50:])
    for a, b in ((whole.k, resumed.k), (whole.v, resumed.v)):
        ea, eb = a.export(), b.export()
        assert sorted(ea) == sorted(eb) and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_restore_refuses_a_state_the_spec_cannot_hold():
    spec = kvspec.parse("int4-res4")
    store = TensorStore(spec.k, 4, "fp16", where="layer 2 keys")
    with pytest.raises(ValueError, match="layer 2 keys: 6 float tokens of 10; the spec keeps 4"):
        store.restore({"tail": torch.zeros(1, 1, 6, D), "codes": torch.zeros(1, 1, 4, 8, dtype=torch.int32)}, 10)


def test_map_batch_selects_like_a_store_of_that_row():
    spec = kvspec.parse("int4-kchan-res3")
    x = torch.randn(3, H, 70, D)
    full = LayerStore(spec.k, spec.v, spec.residual, "fp16")
    full.append(x, x)
    full.map_batch(lambda a: a[1:2])
    one = LayerStore(spec.k, spec.v, spec.residual, "fp16")
    one.append(x[1:2], x[1:2])
    ea, eb = full.k.export(), one.k.export()
    assert all(torch.equal(ea[k], eb[k]) for k in eb)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e5])
def test_non_finite_input_is_refused_with_the_layer_named(bad):
    spec = kvspec.parse("k16v4")
    layer = LayerStore(spec.k, spec.v, 0, "fp16", where="layer 3")
    x = torch.randn(1, 2, 6, D)
    x[0, 1, 4, 9] = bad
    layer.append(x, torch.zeros_like(x))  # float keys are stored as given, like the reference
    with pytest.raises(NonFiniteError, match=r"layer 3 values \(tokens 6\.\.11\) at index \(0, 1, 4, 9\)"):
        layer.append(torch.zeros_like(x), x)
    assert layer.k.tokens == layer.v.tokens == 6  # refused before either tensor stored the chunk


def test_lazy_check_reads_the_device_flag_every_few_tokens():
    store = TensorStore(kvspec.parse("int8").k, 0, "fp16", where="layer 0 keys", lazy_check=True)
    x = torch.randn(1, 1, CHECK_EVERY, D)
    x[0, 0, 5, 0] = float("nan")
    for i in range(CHECK_EVERY - 1):
        store.append(x[:, :, i : i + 1])  # single tokens: flagged on device, not read yet
    with pytest.raises(NonFiniteError, match=f"layer 0 keys, in one of tokens 0..{CHECK_EVERY - 1}"):
        store.append(x[:, :, -1:])
    store = TensorStore(kvspec.parse("int8").k, 0, "fp16", lazy_check=True)
    store.append(x[:, :, 5:6])
    with pytest.raises(NonFiniteError):
        store.check_pending()
