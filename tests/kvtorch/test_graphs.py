"""Static caches and CUDA-graph decoding (kvtorch.graphs) against the growing cache and the reference.

On CPU the static store runs its kernels in Triton's interpreter: each decode step writes at a row
the device holds and attention plans over the whole storage, so the stored arrays must equal the
growing store's bit for bit, and attention must match the reference while the storage past the
current token holds poison. The graph itself needs CUDA (tests marked `gpu`): replays must give the
eager static steps' logits exactly, and the growing cache's within tolerance.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")

import kvspec  # noqa: E402
from kvspec.reference.quant import NonFiniteError  # noqa: E402
from kvspec.tolerances import assert_close, spec_tolerance  # noqa: E402
from kvtorch.attention import attention_reference  # noqa: E402
from kvtorch.kernels.attention import attention_kernel  # noqa: E402
from kvtorch.store import LayerStore  # noqa: E402

from .helpers import bases_for  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, HKV, REP, D, PROMPT, STEPS = 2, 2, 3, 64, 37, 6


def layer(text: str, seed: int) -> LayerStore:
    spec = kvspec.parse(text)
    bases = {w: torch.from_numpy(b).to(DEVICE) for w, b in bases_for(spec, D, HKV, seed).items()}
    return LayerStore(spec.k, spec.v, spec.residual, spec.float_dtype, bases, kernels=True)


def poison(store: LayerStore) -> None:
    """Fill every array's storage past the live tokens, and the ring rows no float token holds, with
    values that would wreck any read of them."""
    for tensor in (store.k, store.v):
        for buf in tensor.arrays.values():
            spare = buf.storage()[..., len(buf) :, :]
            if spare.dtype == torch.int32:
                spare.fill_(-1)
            else:
                spare.fill_(float("nan"))
        if tensor.ring is not None:
            rows = tensor.ring.shape[-2]
            live = {p % rows for p in range(tensor.start, tensor.tokens)}
            tensor.ring[:, :, [r for r in range(rows) if r not in live]] = float("nan")


# Without float rows (every token compressed as it arrives), then with a ring of them: residual
# windows (int4-res8 from a prompt inside the window: nothing compressed yet), channel-axis groups
# filling and flushed within the steps (a group of 32 leaves at 68, 69 and 67 tokens).
STATIC = [("int4", PROMPT, STEPS), ("int8-bf16", PROMPT, STEPS), ("int2-g32", PROMPT, STEPS),
          ("int4-rot5", PROMPT, STEPS), ("rank16-random", PROMPT, STEPS), ("rank16-random-q4-bf16", PROMPT, STEPS),
          ("int4-res8", 5, 7), ("k4v2-g32-kchan-res5", 66, 5), ("k8v2-g32-vchan-res3", 64, 6),
          ("int3-g32-kchan-vrot-res4-bf16", 66, 4), ("rank16-random-res4", 3, 8)]


@pytest.mark.parametrize("text,prompt,steps", STATIC)
def test_static_store_matches_the_growing_store(text, prompt, steps):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = torch.Generator().manual_seed(seed)
    spec = kvspec.parse(text)
    total = prompt + steps
    k, v = (torch.randn(B, HKV, total, D, generator=rng).to(DEVICE) for _ in range(2))
    q = torch.randn(B, HKV * REP, total, D, generator=rng).to(DEVICE)
    growing, static = layer(text, 1), layer(text, 1)
    for store in (growing, static):
        store.append(k[:, :, :prompt], v[:, :, :prompt])
    static.make_static(total)
    poison(static)
    for t in range(prompt, total):
        want_chunk = growing.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        chunk = static.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        assert chunk.k.extent == total and int(chunk.q_pos) == t
        assert int(chunk.k.split) == growing.k.n and int(chunk.v.split) == growing.v.n
        qt, tol, what = q[:, :, t : t + 1], spec_tolerance(spec, spec.float_dtype), f"{text} seed {seed} step {t}"
        got = attention_kernel(qt, chunk.q_pos, chunk.k, chunk.v, scale=D**-0.5)
        for want in (attention_kernel(qt, want_chunk.q_pos, want_chunk.k, want_chunk.v, scale=D**-0.5),
                     attention_reference(qt, want_chunk.q_pos, want_chunk.k, want_chunk.v, scale=D**-0.5)):
            assert_close(got.cpu(), want.cpu().numpy(), tol, what)
    assert static.tokens == growing.tokens == total and static.k.n == growing.k.n
    for a, b in ((static.k, growing.k), (static.v, growing.v)):
        ea, eb = a.export(), b.export()
        for name in [*a.arrays, "tail"]:
            assert torch.equal(ea[name], eb[name]), f"{text} seed {seed}: {name} differ"


@pytest.mark.parametrize("text", ["k16v4", "k4v16"])
def test_static_refuses_float_tensors(text):
    store = layer(text, 0)
    store.append(torch.randn(1, HKV, 5, D, device=DEVICE), torch.randn(1, HKV, 5, D, device=DEVICE))
    with pytest.raises(ValueError, match="layer (keys|values): cannot make a static cache: float tensors"):
        store.make_static(64)


def test_static_store_refuses_what_it_cannot_hold():
    store = layer("int4", 0)
    with pytest.raises(ValueError, match="prefill"):
        store.make_static(64)
    x = torch.randn(1, HKV, 5, D, device=DEVICE)
    store.append(x, x)
    with pytest.raises(ValueError, match="capacity 5 holds no more than the 5 tokens"):
        store.make_static(5)
    store.make_static(6)
    with pytest.raises(ValueError, match="one token per step"):
        store.append(x[:, :, :2], x[:, :, :2])
    store.append(x[:, :, :1], x[:, :, :1])
    with pytest.raises(ValueError, match="7 tokens exceed the static capacity 6"):
        store.advance(1)


def test_static_store_flags_non_finite_tokens_when_checked():
    store = layer("int4", 0)
    x = torch.randn(1, HKV, 5, D, device=DEVICE)
    store.append(x, x)
    store.make_static(10)
    store.append(x[:, :, :1], x[:, :, :1])
    store.check_pending()
    bad = x[:, :, :1].clone()
    bad[0, 1, 0, 3] = float("inf")
    store.append(x[:, :, :1], bad)
    store.append(x[:, :, :1], x[:, :, :1])
    with pytest.raises(NonFiniteError, match="layer values"):
        store.check_pending()


def test_graph_decoder_needs_a_gpu_and_a_fixed_shape_cache():
    from transformers import DynamicCache

    from kvtorch.graphs import GraphDecoder

    from .tiny import tiny_model

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA GPU"):
        GraphDecoder(model, DynamicCache(config=model.config), 64)


def _decode(model, cache, ids, steps, graph: bool, static: bool):
    """Prefill ids [1, T], then `steps` greedy steps; the logits of every step [steps, V]."""
    from kvtorch.graphs import GraphDecoder
    from kvtorch.integration import cache_argument

    arg = cache_argument(model)
    with torch.no_grad():
        token = model(ids, use_cache=True, **{arg: cache}).logits[:, -1:].argmax(-1)
        decoder = GraphDecoder(model, cache, ids.shape[1] + steps) if graph else None
        if static and not graph:
            cache.make_static(ids.shape[1] + steps)
        out = []
        for _ in range(steps):
            logits = decoder.step(token) if graph else model(token, use_cache=True, **{arg: cache}).logits[:, -1]
            out.append(logits.clone())
            token = logits.argmax(-1, keepdim=True)
    return torch.cat(out)


@pytest.mark.parametrize("text", ["int4-res8", "int4-kchan-g32-res4"])
def test_static_decoding_through_a_model_matches_the_growing_cache(text, monkeypatch):
    """The static cache inside a transformers model (the steps a graph records, run eagerly), with a
    ring: a prompt inside the window for int4-res8; for int4-kchan-g32-res4 a prompt with nothing
    compressed (33 tokens) whose first key group leaves the ring at 36 tokens."""
    import kvtorch.attention as attention
    from kvtorch import make_cache

    from .tiny import tiny_model

    monkeypatch.setattr(attention, "_KERNELS", [attention_kernel])  # on CPU too (interpreter)
    model = tiny_model("mistral", seed=2, dtype=torch.float32).to(DEVICE)
    prompt, steps = (5, 6) if text == "int4-res8" else (33, 5)
    ids = (torch.arange(5, 5 + prompt) % 256)[None].to(DEVICE)
    static = _decode(model, make_cache(model, text), ids, steps, graph=False, static=True)
    growing = _decode(model, make_cache(model, text), ids, steps, graph=False, static=False)
    spec = kvspec.parse(text)
    assert_close(static.cpu(), growing.cpu().numpy(), spec_tolerance(spec, spec.float_dtype, model=True), text)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text", ["int4", "int8-bf16", "rank16-random", "int4-rot3", "int4-res8",
                                  "int4-kchan-g32-res16-bf16"])
def test_gpu_graph_replays_equal_eager_static_steps(text):
    """int4-kchan-g32-res16: channel-axis key groups leave the ring at 80, 112 and 144 tokens."""
    from kvtorch import make_cache

    from .tiny import tiny_model

    model = tiny_model("mistral", seed=2, dtype=torch.float32).cuda()
    ids = (torch.arange(5, 5 + 77) % 256)[None].cuda()
    steps = 70  # past kvtorch.store.CHECK_EVERY: the graph's flags are read once
    graph = _decode(model, make_cache(model, text), ids, steps, graph=True, static=True)
    eager = _decode(model, make_cache(model, text), ids, steps, graph=False, static=True)
    growing = _decode(model, make_cache(model, text), ids, steps, graph=False, static=False)
    assert torch.equal(graph, eager), f"{text}: replays differ from the same steps run eagerly"
    spec = kvspec.parse(text)
    assert_close(eager.cpu(), growing.cpu().numpy(), spec_tolerance(spec, spec.float_dtype, model=True), text)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_decodes_a_transformers_static_cache():
    from transformers import StaticCache

    from .tiny import tiny_model

    model = tiny_model("mistral", seed=2, dtype=torch.float32).cuda()
    ids = (torch.arange(5, 5 + 40) % 256)[None].cuda()
    graph = _decode(model, StaticCache(config=model.config, max_cache_len=60), ids, 12, graph=True, static=False)
    eager = _decode(model, StaticCache(config=model.config, max_cache_len=60), ids, 12, graph=False, static=False)
    torch.testing.assert_close(graph, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graph_decoders_in_turn_keep_memory_flat():
    """A decoder per reply (as kvtorch.runner makes them): once the first has settled its one-time
    allocations, later decoders leave nothing allocated behind (a side stream per decoder kept 32 MiB
    of cuBLAS workspace each on the H200)."""
    import gc

    from kvtorch import make_cache

    from .tiny import tiny_model

    model = tiny_model("mistral", seed=2, dtype=torch.float32).cuda()
    ids = (torch.arange(5, 5 + 40) % 256)[None].cuda()
    after = []
    for _ in range(3):
        _decode(model, make_cache(model, "int4"), ids, 4, graph=True, static=True)
        gc.collect()
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert after[1] == after[2], f"{(after[2] - after[1]) / 2**20:.1f} MiB more allocated after the third decoder"


def test_static_parts_never_fall_back_to_the_reference():
    """The reference reads host counts that a CUDA graph would freeze: a refused static call raises."""
    import kvtorch.attention as attention

    store = layer("int4", 0)
    x = torch.randn(1, HKV, 5, D, device=DEVICE)
    store.append(x, x)
    store.make_static(8)
    chunk = store.append(x[:, :, :1], x[:, :, :1])
    q = torch.randn(1, HKV * REP, 1, D, device=DEVICE)
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool, device=DEVICE)
    with pytest.raises(RuntimeError, match="static cache .* read by the attention kernels only"):
        attention.compressed_attention(q, chunk.q_pos, chunk.k, chunk.v, scale=0.125, mask=mask)


@pytest.mark.parametrize("text", ["int4", "rank16-random-q4-bf16", "k4v2-g32-kchan-res5"])
def test_a_static_store_grows_again_like_one_that_never_stopped(text):
    """Static decode steps, then make_growing and a multi-token chunk (the next turn): the arrays equal a
    store that grew all along, and appends past the old capacity work."""
    rng = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    k, v = (torch.randn(B, HKV, 60, D, generator=rng).to(DEVICE) for _ in range(2))
    growing, static = layer(text, 1), layer(text, 1)
    for store in (growing, static):
        store.append(k[:, :, :20], v[:, :, :20])
    static.make_static(24)
    for t in range(20, 24):
        growing.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        static.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
    static.make_growing()
    for store in (growing, static):
        store.append(k[:, :, 24:60], v[:, :, 24:60])
    assert static.tokens == 60 and static.position is None
    for a, b in ((static.k, growing.k), (static.v, growing.v)):
        ea, eb = a.export(), b.export()
        assert all(torch.equal(ea[name], eb[name]) for name in [*a.arrays, "tail"]), text


def test_a_refused_make_static_changes_nothing():
    """Keys could be static, values (float) cannot: the layer refuses and both stay growing."""
    store = layer("k4v16", 0)
    x = torch.randn(1, HKV, 40, D, device=DEVICE)
    store.append(x, x)
    with pytest.raises(ValueError, match="layer values: cannot make a static cache: float tensors"):
        store.make_static(64)
    assert store.position is None and store.k.capacity is None and store.v.capacity is None
    store.append(x[:, :, :3], x[:, :, :3])  # multi-token chunks still append
    assert store.tokens == 43
