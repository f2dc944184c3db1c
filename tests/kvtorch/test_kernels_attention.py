"""kvtorch.kernels.attention: split-K attention over compressed K/V against kvspec's oracle.

Decode and chunked prefill over every layout the kernels read (INT2/3/4/8, token and channel axes,
rotation, residual windows, rank and hybrid, fp16 and bf16, GQA ratios 1/3/4, several key splits),
compared with kvspec.reference.attend_as_decoded at kvspec.tolerances; the same kernels fed by
kvtorch.store's Parts; and the dispatcher's fallbacks. On CPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set here before triton is imported); GPU-size checks are marked
`gpu` and skipped without CUDA.
"""

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")

import kvspec  # noqa: E402
from kvspec import reference as R  # noqa: E402
from kvspec.layout import n_quantized  # noqa: E402
from kvspec.reference.lowrank import make_basis  # noqa: E402
from kvspec.spec import LowRank  # noqa: E402
from kvspec.tolerances import assert_close, spec_tolerance  # noqa: E402
from kvtorch import ops  # noqa: E402
from kvtorch.kernels import attention as ka  # noqa: E402
from kvtorch.kernels import prefill  # noqa: E402
from kvtorch.kernels.attention import attend, attention, attention_kernel, attention_reference, refusal  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Part:
    """What kvtorch.attention.Part carries, built straight from kvspec.reference.compress."""

    spec: object
    n: int
    arrays: dict
    basis: torch.Tensor | None
    floats: torch.Tensor
    float_start: int
    split: torch.Tensor


def make_part(x, t, spec, basis, t0, q_pos):
    """One tensor's cache after appending x [B, H, T1, D]: compressed [0, n(T1)), floats [n(T0), T1)."""
    s = R.compress(x, t, spec.residual, spec.float_dtype, basis)
    n0 = n_quantized(t, spec.residual, t0)
    floats = torch.from_numpy(R.round_to(x, spec.float_dtype)[..., n0:, :]).to(DEVICE, DTYPES[spec.float_dtype])
    arrays = {}
    if s.quant is not None:
        arrays = {"codes": ops.words_from_numpy(s.quant.codes, DEVICE), "scales": torch.from_numpy(s.quant.scales).to(DEVICE),
                  "biases": torch.from_numpy(s.quant.biases).to(DEVICE)}
    elif s.coeffs is not None:
        arrays = {"coeffs": torch.from_numpy(s.coeffs).to(DEVICE, DTYPES[spec.float_dtype])}
    split = torch.tensor([n_quantized(t, spec.residual, p + 1) for p in q_pos], device=DEVICE)
    b = None if basis is None else torch.from_numpy(basis).float().to(DEVICE)
    return Part(t, s.n, arrays, b, floats, n0, split)


def case(text, *, batch=2, kv_heads=2, rep=4, tokens=70, queries=1, dim=64, seed=0, outlier_channel=False, q_scale=1.0):
    """Random q/k/v with an outlier and a constant run, the parts after appending the last
    `queries` tokens as one chunk, and kvspec's decode oracle for those queries. outlier_channel:
    channel 3 of the last sequence's last KV head x40 in K and V at every token (as
    benchmarks/bench_mlx_kernels.py verifies), so its token-axis groups have scales ~40x the rest.
    q_scale multiplies the queries."""
    spec = kvspec.parse(text)
    rng = np.random.default_rng(seed)
    k, v = rng.standard_normal((2, batch, kv_heads, tokens, dim)).astype(np.float32)
    k[0, 0, 3, 5] = 40.0
    v[-1, -1, :33, 7] = 0.5
    if outlier_channel:
        k[-1, -1, :, 3] *= 40.0
        v[-1, -1, :, 3] *= 40.0
    q = rng.standard_normal((batch, kv_heads * rep, queries, dim)).astype(np.float32) * np.float32(q_scale)
    bases = {w: np.stack([make_basis("random", dim, seed=seed + h)[:, : t.rank] for h in range(kv_heads)])
             for w, t in spec.tensors().items() if isinstance(t, LowRank)}
    t0 = tokens - queries
    q_pos = list(range(t0, tokens))
    kp = make_part(k, spec.k, spec, bases.get("k"), t0, q_pos)
    vp = make_part(v, spec.v, spec, bases.get("v"), t0, q_pos)
    want = R.attend_as_decoded(q, k, v, spec, bases=bases)
    return spec, torch.from_numpy(q).to(DEVICE), torch.tensor(q_pos, device=DEVICE), kp, vp, want


DECODE = [  # (spec, GQA ratio, key splits)
    ("int4", 4, 3),
    ("k8v2-krot-vg32-res5", 3, None),
    ("int3-g32-kchan-vrot-res4-bf16", 1, 2),
    ("k4v8-vchan-g32-res3", 4, None),
    ("krank16vrank32-random", 4, 2),
    ("krank32v2-kq4-krandom", 3, None),
]


@pytest.mark.parametrize("text,rep,splits", DECODE)
def test_decode_matches_the_oracle(text, rep, splits):
    spec, q, q_pos, kp, vp, want = case(text, rep=rep, tokens=71, seed=len(text))
    assert refusal(q, kp, vp) is None
    got = attend(q, q_pos, kp, vp, scale=q.shape[-1] ** -0.5, splits=splits)
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), text)


@pytest.mark.parametrize("text,dim,block", [("int4", 256, (64, 4, 3)), ("k8v2-res3", 128, (64, 2, 3)),
                                             ("k4v8-bf16", 64, (32, 1, 2)), ("int2-g32", 64, (32, 1, 2))])
def test_value_tiles_in_value_order_match_the_oracle(text, dim, block):
    """Blocks whose warps split the value columns into 64-column spans (D = 64 x warps) read 2- and
    8-bit value tiles (4-bit at D 256) in `value_order` and put the accumulator back at the end."""
    spec, q, q_pos, kp, vp, want = case(text, rep=4, tokens=133, dim=dim, seed=dim)
    got = attend(q, q_pos, kp, vp, scale=dim ** -0.5, block=block)
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), text)


@pytest.mark.parametrize("text,tokens,queries", [("int4-kchan-g32-res3", 75, 9), ("int2-res4-bf16", 12, 12)])
def test_chunked_prefill_matches_the_oracle(text, tokens, queries):
    """Each query of a chunk reads its own split between compressed and float forms."""
    spec, q, q_pos, kp, vp, want = case(text, rep=3, tokens=tokens, queries=queries, seed=tokens)
    got = attend(q, q_pos, kp, vp, scale=q.shape[-1] ** -0.5, splits=2)
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), text)


@pytest.mark.parametrize("text", ["int4-res3-bf16", "k8v2-res3"])
def test_queries_beyond_the_fp16_range_are_scaled_not_overflowed(text):
    """Quantized K and V take fp16 operands (bf16 caches too: kvtorch.kernels.attention.fp16_operands);
    a query with entries past 65504 is scaled by a power of two for the dots, not turned into inf."""
    spec, q, q_pos, kp, vp, want = case(text, rep=2, tokens=40, queries=2, seed=3, q_scale=3.0e5)
    got = attend(q, q_pos, kp, vp, scale=q.shape[-1] ** -0.5)
    assert torch.isfinite(got).all()
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), text)


PREFILL = ["int4", "int8-bf16", "k8v2-krot-vrot", "int3-g32-rot5", "krank16vrank32-random",
           "krank32v4-kq4-krandom-bf16",
           # float windows and channel-axis groups: the masked path (K and V splits differ in some)
           "int4-res4", "int4-kchan-g32", "int4-kchan-g32-res5-bf16", "k8v2-krot-vrot-res3",
           "krank16v4-krandom-res2", "int3-g32-vchan-res4-bf16"]


@pytest.mark.parametrize("text", PREFILL)
def test_long_prefill_chunks_rebuild_the_history_once(text, monkeypatch):
    """A chunk of at least kernels.prefill.MIN_QUERIES queries runs as one rebuild of K and V and SDPA
    (causal where every key is read compressed, else masked by the per-query splits), within the
    oracle's tolerance."""
    monkeypatch.setattr(prefill, "MIN_QUERIES", 16)
    monkeypatch.setattr(prefill, "QUERY_BLOCK", 16)  # masked path: 37 queries in 3 blocks
    served = []
    monkeypatch.setattr(prefill, "attend", lambda *a, _f=prefill.attend, **kw: served.append(1) or _f(*a, **kw))
    seed = int(np.random.SeedSequence().entropy % 2**31)
    spec, q, q_pos, kp, vp, want = case(text, rep=3, tokens=83, queries=37, seed=seed)
    got = attention_kernel(q, q_pos, kp, vp, scale=q.shape[-1] ** -0.5)
    assert served == [1], f"{text}: the prefill path did not serve"
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), f"{text} seed {seed}")


def test_prefill_path_leaves_short_chunks_and_float_tensors_to_others(monkeypatch):
    monkeypatch.setattr(prefill, "MIN_QUERIES", 16)
    _, q, q_pos, kp, vp, _ = case("k16v4", tokens=60, queries=20)
    assert not prefill.fits(q, q_pos, kp, vp)  # float keys: the torch reference
    _, q, q_pos, kp, vp, _ = case("int4-res4", tokens=60, queries=15)
    assert not prefill.fits(q, q_pos, kp, vp)  # under MIN_QUERIES
    _, q, q_pos, kp, vp, _ = case("int4-res4", tokens=60, queries=20)
    assert prefill.fits(q, q_pos, kp, vp) and not prefill.fits(q, q_pos - 1, kp, vp)  # not the last positions


def test_torch_reference_matches_the_oracle():
    spec, q, q_pos, kp, vp, want = case("krank16v3-kq4-krandom-vrot-res2", rep=3, tokens=30, queries=4)
    got = attention_reference(q, q_pos, kp, vp, scale=q.shape[-1] ** -0.5)
    assert_close(got.cpu(), want, spec_tolerance(spec, "fp32"), "reference")


def test_reads_kvtorch_store_parts():
    """The kernels take kvtorch.store's Parts as they are (views of growable buffers, int64 splits)."""
    from kvtorch.attention import attention_reference as store_reference
    from kvtorch.store import LayerStore

    spec = kvspec.parse("k4v8-kchan-g32-res4")
    rng = np.random.default_rng(1)
    k, v = (torch.from_numpy(rng.standard_normal((1, 2, 50, 64)).astype(np.float32)).to(DEVICE) for _ in range(2))
    q = torch.from_numpy(rng.standard_normal((1, 6, 50, 64)).astype(np.float32)).to(DEVICE)
    store = LayerStore(spec.k, spec.v, spec.residual, spec.float_dtype)
    for lo, hi in ((0, 40), (40, 41), (41, 50)):
        chunk = store.append(k[:, :, lo:hi], v[:, :, lo:hi])
        got = attention_kernel(q[:, :, lo:hi], chunk.q_pos, chunk.k, chunk.v, scale=0.125)
        want = store_reference(q[:, :, lo:hi], chunk.q_pos, chunk.k, chunk.v, scale=0.125)
        assert_close(got.cpu(), want.cpu().numpy(), spec_tolerance(spec, "fp16"), f"chunk {lo}..{hi}")


def test_wired_into_a_kvtorch_cache(monkeypatch):
    """Registered with kvtorch's dispatcher (the wiring the cache needs), the kernels serve a model's
    decode steps and give the logits of the reference path."""
    from transformers import MistralConfig, MistralForCausalLM

    import kvtorch
    import kvtorch.attention

    config = MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=100, sliding_window=None)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval().to(DEVICE)
    ids = torch.randint(0, 100, (1, 40), device=DEVICE)
    spec = kvspec.parse("int4-g32-res4")

    def logits():
        cache, out = kvtorch.make_cache(model, spec), []
        with torch.no_grad():
            for lo in (0, 16, 32):
                out.append(model(ids[:, lo : lo + 16], past_key_values=cache, use_cache=True).logits)
            for _ in range(3):
                out.append(model(out[-1][:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits)
        return torch.cat(out, 1)

    served = []

    def kernel(*args, **kwargs):
        out = attention_kernel(*args, **kwargs)
        served.append(out is not None)
        return out

    monkeypatch.setattr(kvtorch.attention, "_KERNELS", [])
    want = logits()
    kvtorch.attention.register_kernel(kernel)
    got = logits()
    assert sum(served) >= 6, "the decode steps of both layers did not run the kernels"
    assert_close(got.cpu(), want.cpu().numpy(), spec_tolerance(spec, "fp16", model=True), "logits")


def test_dispatcher_falls_back_where_kernels_refuse():
    spec, q, q_pos, kp, vp, want = case("int4-chan-g32", rep=2, tokens=20, dim=48)
    assert "power of two" in refusal(q, kp, vp)
    assert_close(attention(q, q_pos, kp, vp, scale=48 ** -0.5).cpu(), want, spec_tolerance(spec, "fp32"), "fallback")
    spec, q, q_pos, kp, vp, _ = case("int4", rep=2, tokens=20)
    assert attention_kernel(q, q_pos, kp, vp, scale=0.125, window=8) is None
    with pytest.raises(ValueError, match="window"):
        attention(q, q_pos, kp, vp, scale=0.125, window=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text,ptx", [("int4", False), ("int4", True), ("int4-bf16", True), ("int8", False),
                                      ("int8", True), ("int8-bf16", True), ("k8v4", True),
                                      ("int2-res64-bf16", False), ("rank32-random", False),
                                      ("k3v4-kg32-kchan-krot-res128", True)])
def test_gpu_size_decode(text, ptx):
    """Mistral-7B-sized heads (8 KV heads, GQA 4, D 128) over 2k tokens; ptx: 4-/8-bit PTX dequantization
    (fp16 operands: fp16 caches, and bf16 caches of quantized K and V, see fp16_operands)."""
    spec, q, q_pos, kp, vp, want = case(text, batch=2, kv_heads=8, rep=4, tokens=2051, dim=128)
    assert refusal(q, kp, vp) is None
    got = attend(q, q_pos, kp, vp, scale=128 ** -0.5, ptx=ptx)
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), text)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text", ["int4-bf16", "int4", "int8-bf16", "int4-kchan-bf16"])
def test_gpu_size_decode_with_an_outlier_channel(text):
    """The same at an x40 outlier channel: on the H200 the Triton kernel once disagreed beyond tolerance
    with the MLX kernel (itself within kvspec tolerance) in 13 of 40 such cases of
    benchmarks/bench_mlx_kernels.py, most of them 4-bit bf16, whose PTX dequantization then rounded the
    fp16 scales and biases to bf16; it now takes them in fp16, as stored."""
    spec, q, q_pos, kp, vp, want = case(text, batch=2, kv_heads=8, rep=4, tokens=1037, dim=128,
                                        outlier_channel=True)
    got = attend(q, q_pos, kp, vp, scale=128 ** -0.5)
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), text)


def test_channel_axis_tiles_wider_than_128_are_refused():
    from kvtorch.kernels.support import tensor_refusal

    spec = kvspec.parse("int4-kchan")
    assert "shared memory" in tensor_refusal(spec.k, 256)
    assert tensor_refusal(spec.k, 128) is None
    assert tensor_refusal(spec.v, 256) is None  # token-axis values at D 256 ran on the H200


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text", ["int4-bf16", "int8", "krank32v4-kq4-krandom-bf16"])
def test_gpu_size_long_prefill_chunk(text):
    """Mistral-7B-sized heads, a 1,100-query chunk after 1,000 tokens: kernels.prefill's rebuild and
    SDPA (FlashAttention on the GPU) within the oracle's tolerance."""
    spec, q, q_pos, kp, vp, want = case(text, batch=1, kv_heads=8, rep=4, tokens=2100, queries=1100, dim=128)
    assert prefill.fits(q, q_pos, kp, vp)
    got = attention_kernel(q, q_pos, kp, vp, scale=128 ** -0.5)
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), text)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text", ["int4-kchan-res128-bf16", "k8v4-krot-res64"])
def test_gpu_size_long_prefill_chunk_with_float_windows(text):
    """The masked path at head dim 128 and GQA 4 (two KV heads keep the per-query oracle quick): a
    1,030-query chunk after 170 tokens, keys split per channel group and a 128-token window."""
    spec, q, q_pos, kp, vp, want = case(text, batch=1, kv_heads=2, rep=4, tokens=1200, queries=1030, dim=128)
    assert prefill.fits(q, q_pos, kp, vp)
    got = attention_kernel(q, q_pos, kp, vp, scale=128 ** -0.5)
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), text)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compiled variants")
def test_decoding_compiles_each_launch_once():
    """Positions, splits and float starts move with every decode step; none of them may select a new
    compiled variant of the split kernel (Triton specializes integers on divisibility by 16)."""
    from transformers import MistralConfig, MistralForCausalLM

    import kvtorch
    import kvtorch.kernels  # noqa: F401 - registers the kernels with kvtorch's dispatcher
    from kvtorch.kernels import _attention_triton as kat

    config = MistralConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=100, sliding_window=None)
    model = MistralForCausalLM(config).eval().cuda().half()
    cache = kvtorch.make_cache(model, "int4-res8")
    tok = torch.randint(0, 100, (1, 1000), device="cuda")

    def variants():
        return sum(len(c[0]) for c in kat._split_kernel.device_caches.values())

    with torch.no_grad():
        for _ in range(3):  # the prefill and the first steps compile what decoding needs
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        before = variants()
        for _ in range(40):  # crosses multiples of 16 in every moving argument
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    assert variants() == before


@pytest.mark.parametrize("text,d,programs,keys,block", [
    ("int4", 128, 8 * 8, 4096, (64, 2, 3)),  # batch 8 x 8 KV heads: many programs, 2-warp blocks
    ("int4", 128, 8 * 8, 32768, (64, 2, 3)),  # ... over long contexts too (key tiles in MMA order)
    ("int4", 128, 1 * 8, 4096, (128, 4, 3)),  # batch 1 over short contexts: 4-warp blocks and more splits,
    ("int4", 128, 1 * 8, 32768, (64, 2, 3)),  # over long ones 2-warp blocks and up to 64 splits
    ("int4", 64, 1 * 2, 32768, (64, 2, 3)),  # (Qwen2.5 heads too)
    ("int4", 128, 8 * 2, 32768, (64, 2, 3)),  # Qwen2.5 heads at batch 8: 16 programs are many for 4-bit
    ("int8", 128, 8 * 8, 32768, (64, 2, 3)),
    ("int8", 128, 1 * 8, 4096, (128, 4, 3)),  # batch 1: few programs, 4-warp blocks and more splits
    ("int8", 128, 1 * 8, 131072, (64, 2, 3)),  # ... but 2-warp blocks over long contexts
    ("int2", 64, 8 * 3, 32768, (128, 4, 3)),  # 2-bit K and V: 4 warps, 128 keys at D 64 ...
    ("int2", 128, 2 * 8, 32768, (64, 4, 3)),  # ... 64 at D 128 with few programs,
    ("int2", 128, 1 * 8, 4096, (64, 4, 3)),
    ("int2", 128, 4 * 8, 32768, (16, 1, 3)),  # 1 warp over 16 keys with 32+ programs
    ("int2", 128, 8 * 8, 4096, (16, 1, 3)),
    ("int4", 256, 8, 4096, (128, 8, 3)),  # head dim 256 keeps the 8-warp block over short contexts ...
    ("int4", 256, 1, 32768, (128, 8, 3)),  # ... and with few programs,
    ("int4", 256, 8, 32768, (64, 4, 3)),  # but not with 8+ programs over long ones
    ("int8", 256, 8, 4096, (64, 4, 3)),
    ("int3", 128, 64, 4096, (64, 4, 2)),  # 3-bit tiles: the block that fits an H200's shared memory
    ("int4-kchan", 128, 64, 32768, (64, 4, 3)),  # channel-axis keys: unchanged
    ("rank32-random", 128, 64, 32768, (128, 4, 3)),
    ("krank32v4-kq4-krandom", 128, 64, 32768, (64, 4, 3)),  # a hybrid: the general default
])
def test_default_block_follows_the_launch_policy(text, d, programs, keys, block):
    spec = kvspec.parse(text)
    assert ka.default_block(spec.k, spec.v, d, programs, keys) == block


def test_2_bit_query_chunks_keep_4_warp_blocks():
    """1-warp blocks were measured for decoding only: a chunk of queries (prefill) keeps (64, 4, 3)."""
    spec = kvspec.parse("int2")
    assert ka.default_block(spec.k, spec.v, 128, 8 * 32, 4096, queries=1) == (16, 1, 3)
    assert ka.default_block(spec.k, spec.v, 128, 8 * 32, 4096, queries=256) == (64, 4, 3)


@pytest.mark.parametrize("text,block,d,keys,per_sm", [
    ("int4", (128, 4, 3), 128, 32768, 8),  # 4-bit in 4-warp blocks: twice the programs
    ("int4", (64, 2, 3), 128, 32768, 6),  # 2-warp blocks at D 128 (value order) over long contexts: 6
    ("int4", (64, 2, 3), 128, 4096, 4),  # ... not over short ones,
    ("int4", (64, 2, 3), 64, 32768, 4),  # ... nor at D 64 (values in stream order)
    ("int8", (128, 4, 3), 128, 32768, 4), ("rank32-random", (128, 4, 3), 128, 32768, 4),
    ("int2", (16, 1, 3), 128, 32768, 32),  # 1-warp blocks: as many splits as MAX_SPLITS allows
])
def test_programs_per_sm_follows_the_launch_policy(text, block, d, keys, per_sm):
    spec = kvspec.parse(text)
    assert ka.programs_per_sm(spec.k, spec.v, block, d, keys) == per_sm
    n, _ = ka._splits(0, keys, block[0], 64, None, 132, per_sm)
    # batch 8 x 8 KV heads: per_sm x 132 / 64 splits, within MAX_SPLITS and MIN_SPLIT_KEYS keys each
    assert n == min(per_sm * 132 // 64, ka.MAX_SPLITS, keys // ka.MIN_SPLIT_KEYS)


@pytest.mark.parametrize("text,block,keys,cap", [
    ("int4", (64, 2, 3), 32768, 64),  # 4- and 8-bit words in 2-warp blocks over long contexts: 64
    ("int8", (64, 2, 3), 131072, 64),
    ("k8v4", (64, 2, 3), 32768, 64),
    ("int4", (64, 2, 3), 4096, 32),  # short contexts,
    ("int4", (128, 4, 3), 32768, 32),  # other blocks,
    ("int2", (64, 4, 3), 32768, 32),  # other widths: 32
    ("rank32-random", (128, 4, 3), 32768, 32),
])
def test_max_splits_doubles_only_for_long_4_and_8_bit_in_2_warp_blocks(text, block, keys, cap):
    spec = kvspec.parse(text)
    assert ka.max_splits(spec.k, spec.v, block, keys) == cap
    n, _ = ka._splits(0, keys, block[0], 8, None, 132, 4, cap)
    assert n == min(cap, 4 * 132 // 8, keys // ka.MIN_SPLIT_KEYS)  # batch 1 x 8 KV heads: 64, 32 or 16 splits


@pytest.mark.parametrize("bits,d,batch,kv_heads,keys,splits", [
    (4, 256, 8, 1, 32768, 16),  # Gemma-3's heads: 2 blocks per SM would leave 1,024 keys a split: aim for 1
    (4, 256, 32, 1, 4096, 4),  # ... 512 keys: 4 splits, not 8
    (4, 256, 8, 1, 131072, 32),  # 4,096 keys a split at 2 blocks per SM: kept
    (4, 256, 32, 1, 32768, 8),
    (4, 256, 1, 1, 32768, 32),  # MAX_SPLITS either way
    (8, 256, 8, 1, 32768, 16),  # the 8-bit D 256 build runs 1 block per SM anyway
    (4, 128, 8, 8, 32768, 6),  # Mistral's heads: 3 blocks per SM, no short-split rule
    (8, 128, 8, 8, 32768, 4),
])
def test_cuda_splits_aim_for_one_block_per_sm_where_splits_would_be_short(bits, d, batch, kv_heads, keys, splits):
    n, chunk = ka.cuda_splits(bits, d, keys, batch * kv_heads, None, 132)
    assert n == splits and n * chunk >= keys and (n - 1) * chunk < keys
    assert ka.cuda_splits(bits, d, keys, batch * kv_heads, 5, 132)[0] == 5  # an explicit count stands


@pytest.mark.parametrize("keys,programs,splits", [
    (32768, 64, 8),  # 4 programs per SM of 132: 8 splits of 4096 keys
    (32768, 8, 32),  # 66 wanted, MAX_SPLITS allowed
    (4096, 8, 16),  # 32 allowed, but splits keep >= MIN_SPLIT_KEYS keys
    (100, 8, 1),
])
def test_splits_fill_the_gpu_within_their_bounds(keys, programs, splits):
    n, chunk = ka._splits(0, keys, 64, programs, None, 132)
    assert n == splits
    assert n * chunk >= keys and (n - 1) * chunk < keys
    assert n == 1 or chunk >= ka.MIN_SPLIT_KEYS
