"""kvtorch.kernels.cuda_decode: the CUDA C++ decode kernel for 4- and 8-bit K and V, against kvspec's oracle
(head dims 64, 128 and 256, on the GPU and on the emulator).

On the GPU (marked `gpu`): decode through `attend` with the kernel taking the lean launch (checked by
counting its launches) at Mistral-sized heads, against kvspec.reference.attend_as_decoded at
kvspec.tolerances, over GQA ratios 1-8, odd lengths, residual windows, fp16 and bf16, outlier channels,
constant groups, queries past fp16's range and explicit splits (more splits than keys included). On CPU:
the same kernel source built with g++ over the warp emulator (tests/kvtorch/simt_decode.py) runs
`attend` end to end at small shapes against the same oracle; and which attentions it refuses, and why.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: kvtorch.kernels imports it")

import kvspec  # noqa: E402
from kvspec import reference as R  # noqa: E402
from kvspec.tolerances import assert_close, spec_tolerance  # noqa: E402
from kvtorch.kernels import cuda_decode  # noqa: E402
from kvtorch.kernels.attention import attend  # noqa: E402

from . import simt_decode  # noqa: E402
from .test_kernels_attention import DEVICE, case, make_part  # noqa: E402


@pytest.fixture
def launches(monkeypatch):
    """The number of CUDA-kernel launches `attend` makes (a check that the path under test ran)."""
    count = [0]
    real = cuda_decode.launch

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cuda_decode, "launch", counted)
    return count


@pytest.fixture
def emulated(monkeypatch):
    """CPU tensors go to the emulated kernels (the GPU checks of `device_refusal` waived, the layout
    checks stay); returns a function of the code width (and head dim) giving its kernel, whose
    `launches` count its calls."""
    why = simt_decode.available()
    if why:
        pytest.skip(why)
    monkeypatch.setattr(cuda_decode, "device_refusal", lambda q: None)
    monkeypatch.setattr(cuda_decode, "_kernel_for", lambda device, bits, d: simt_decode.kernel(bits, d))
    return lambda bits, d=128: simt_decode.kernel(bits, d)  # the same cache key as the launches


EMULATED = [  # (spec, batch, GQA ratio, tokens, splits, case options)
    ("int4", 1, 4, 150, None, {}),
    ("int4-bf16", 2, 3, 77, 3, {}),
    ("int4-res5", 1, 8, 200, 2, {}),
    ("int4", 1, 1, 40, 1, {}),
    ("int4", 1, 4, 100, 8, {}),  # more splits than 32-key steps: blocks with no keys
    ("int4-bf16", 1, 4, 90, None, {"outlier_channel": True}),
    ("int4", 1, 4, 40, None, {"q_scale": 3.0e5, "seed": 0}),  # past fp16's range once scaled
    ("int8", 1, 4, 150, None, {}),
    ("int8-bf16", 2, 3, 77, 3, {}),
    ("int8-res5", 1, 8, 200, 2, {}),
    ("int8", 1, 1, 100, 8, {}),
    ("int8-bf16", 1, 4, 90, None, {"outlier_channel": True}),
    ("int8", 1, 4, 40, None, {"q_scale": 3.0e5, "seed": 0}),
]
# (spec, batch, GQA ratio, tokens, splits, case options): SmolLM2's 3 and Qwen2.5's 7 per KV head; stored
# lengths even (one scale a row: an odd head stride leaves pairs of rows unaligned for 4-byte copies)
HEAD_DIM_64 = [
    ("int4", 1, 3, 150, None, {}),
    ("int8-bf16", 2, 7, 76, 3, {}),
    ("int4-res5", 1, 7, 201, 2, {}),
    ("int8", 1, 3, 100, 8, {}),  # blocks with no keys
    ("int4-bf16", 1, 3, 90, None, {"outlier_channel": True}),
    ("int8", 1, 7, 40, None, {"q_scale": 3.0e5, "seed": 0}),
]
# Gemma-3's 4 query heads per KV head, and 2 and 8: each lane's K words span one whole group, two V groups
# a row
HEAD_DIM_256 = [
    ("int4", 1, 4, 150, None, {}),
    ("int8-bf16", 2, 2, 77, 3, {}),
    ("int4-res5", 1, 8, 130, 2, {}),
    ("int8", 1, 4, 100, 8, {}),  # blocks with no keys
    ("int4-bf16", 1, 4, 90, None, {"outlier_channel": True}),
    ("int8", 1, 4, 40, None, {"q_scale": 3.0e5, "seed": 0}),
]


def emulated_attend(emulated, spec, q, q_pos, kp, vp, splits=None):
    """`attend` at q's head dim, checked to have launched the emulated kernel of spec's width once."""
    d = q.shape[-1]
    kernel = emulated(spec.k.bits, d)
    before = kernel.launches
    got = attend(q, q_pos, kp, vp, scale=d ** -0.5, splits=splits)
    assert kernel.launches == before + 1
    return got


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests below run the kernel itself")
@pytest.mark.parametrize("d,text,batch,rep,tokens,splits,options",
                         [(128, *c) for c in EMULATED] + [(64, *c) for c in HEAD_DIM_64] +
                         [(256, *c) for c in HEAD_DIM_256])
def test_emulated_kernel_matches_the_oracle(d, text, batch, rep, tokens, splits, options, emulated):
    options = {"seed": tokens, **options}
    spec, q, q_pos, kp, vp, want = case(text, batch=batch, kv_heads=2, rep=rep, tokens=tokens, dim=d, **options)
    assert cuda_decode.refusal(q, kp, vp) is None
    got = emulated_attend(emulated, spec, q, q_pos, kp, vp, splits)
    assert torch.isfinite(got).all()
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), f"D {d} {text} {options}")


@pytest.mark.parametrize("text,why", [
    ("int2", "not a 4-bit or 8-bit token-axis quantizer"),
    ("int4-kchan", "not a 4-bit or 8-bit token-axis quantizer"),
    ("int8-g32", "group 32, not 64"),
    ("int4-krot", "rotated"),
    ("krank32v4-random", "not a 4-bit or 8-bit token-axis quantizer"),
])
def test_specs_it_refuses(text, why):
    spec = kvspec.parse(text)
    reasons = [cuda_decode._spec_refusal(t) for t in (spec.k, spec.v)]
    assert any(r is not None and why in r for r in reasons), reasons
    assert cuda_decode._spec_refusal(kvspec.parse("int4").k) is None
    assert cuda_decode._spec_refusal(kvspec.parse("int8").v) is None


def test_mixed_widths_are_refused(monkeypatch):
    """K at 8 bits and V at 4 (each alone a width it takes): one build serves one width, so Triton runs."""
    monkeypatch.setattr(cuda_decode, "device_refusal", lambda q: None)
    spec, q, q_pos, kp, vp, _ = case("k8v4", kv_heads=2, rep=4, tokens=40, dim=128)
    assert cuda_decode.refusal(q, kp, vp) == "K of 8 bits and V of 4: the kernel takes one width for both"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")
def test_cpu_tensors_are_refused():
    spec, q, q_pos, kp, vp, _ = case("int4", kv_heads=2, rep=4, tokens=40, dim=128)
    assert cuda_decode.refusal(q, kp, vp) == "not a CUDA tensor"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("queries,dim,rep,why", [
    (2, 128, 4, "2 queries of head dim 128"),
    (1, 192, 4, "1 queries of head dim 192"),
    (1, 128, 16, "16 query heads per KV head"),
])
def test_shapes_it_refuses(queries, dim, rep, why):
    spec, q, q_pos, kp, vp, _ = case("int4", kv_heads=2, rep=rep, tokens=70, queries=queries, dim=dim)
    assert why in cuda_decode.refusal(q, kp, vp)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_unaligned_code_rows_are_refused():
    spec, q, q_pos, kp, vp, _ = case("int4", kv_heads=2, rep=4, tokens=40, dim=128)
    wide = torch.zeros(*kp.arrays["codes"].shape[:-1], 20, dtype=torch.int32, device=DEVICE)
    wide[..., :16] = kp.arrays["codes"]
    kp.arrays["codes"] = wide[..., :16]  # rows 20 words apart
    assert "code rows" in cuda_decode.refusal(q, kp, vp)


DECODE = [  # (spec, GQA ratio, tokens, splits)
    ("int8", 4, 2051, None),
    ("int8-bf16", 3, 4099, None),
    ("int8-res5", 8, 333, 2),
    ("int8", 1, 300, 32),
    ("int4", 4, 2051, None),
    ("int4-bf16", 4, 4099, None),
    ("int4", 1, 1000, 3),
    ("int4-bf16", 2, 77, None),
    ("int4", 8, 513, 1),
    ("int4-res64", 4, 1500, None),
    ("int4-res5-bf16", 3, 333, 2),
    ("int4", 4, 300, 32),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text,rep,tokens,splits", DECODE)
def test_decode_matches_the_oracle(text, rep, tokens, splits, launches):
    spec, q, q_pos, kp, vp, want = case(text, batch=2, kv_heads=8, rep=rep, tokens=tokens, dim=128,
                                        seed=tokens)
    assert cuda_decode.refusal(q, kp, vp) is None
    got = attend(q, q_pos, kp, vp, scale=128 ** -0.5, splits=splits)
    assert launches[0] == 1
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), text)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text", ["int4", "int4-bf16", "int8", "int8-bf16"])
def test_outlier_channels_and_large_queries(text, launches):
    """An x40 outlier channel (groups with ~40x the scales); queries x3e5, past fp16's range once
    scaled (up to 1.8e5): the kernel scales them down by a power of two, as the Triton kernel does. The
    softmax is then one-hot, so the seed is one whose top two scores differ, in every head, well beyond
    fp16 rounding, and the oracle's choice is stable: over 40 keys by 0.24% or more at 4 bits (seed 0)
    and 1.7% at 8 (seed 30; seed 0 has a head at 0.002%, where the kernel and the oracle may pick
    different keys)."""
    seed = {4: 0, 8: 30}[kvspec.parse(text).k.bits]
    for kwargs in (dict(outlier_channel=True, tokens=1037), dict(q_scale=3.0e5, tokens=40, seed=seed)):
        spec, q, q_pos, kp, vp, want = case(text, batch=2, kv_heads=8, rep=4, dim=128, **kwargs)
        got = attend(q, q_pos, kp, vp, scale=128 ** -0.5)
        assert torch.isfinite(got).all()
        assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), f"{text} {kwargs}")
    assert launches[0] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks builds the GPU tests do not run")
@pytest.mark.parametrize("bits,tiles,stages,blocks", [(4, 1, 3, 3), (4, 4, 2, 2), (8, 1, 3, 3)])
def test_emulated_variants_match_the_oracle(bits, tiles, stages, blocks, emulated, monkeypatch):
    """Other builds of the kernel (benchmarks/sweep_cuda_decode.py times them): 1 tile a step over a
    3-stage ring, 4 tiles over 2 stages; each rounds as the default does, so the same tolerance holds."""
    build = cuda_decode.Build(tiles, stages, blocks)
    kernel = simt_decode.EmulatedKernel(cuda_decode.build_defines(bits, 128, build))
    monkeypatch.setattr(cuda_decode, "_kernel_for", lambda device, bits, d: kernel)
    monkeypatch.setitem(cuda_decode.BUILDS, (bits, 128), build)  # the splits' grain, keys_per_step
    spec, q, q_pos, kp, vp, want = case(f"int{bits}-res3", batch=1, kv_heads=2, rep=4, tokens=333, dim=128, seed=5)
    got = attend(q, q_pos, kp, vp, scale=128 ** -0.5, splits=2)
    assert kernel.launches == 1
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), f"variant {tiles, stages, blocks}")


def constant_group_case(text, b, hkv, rep, tokens, d=128):
    """Parts whose groups of 64 values are all equal (scale 0): every key of one head (K), every
    second key of another (V); q, q_pos and the oracle's output."""
    spec = kvspec.parse(text)
    rng = np.random.default_rng(7)
    k, v = rng.standard_normal((2, b, hkv, tokens, d)).astype(np.float32)
    k[0, 1, :, :64] = 0.25
    v[-1, 0, ::2, d - 64:] = -1.5
    q = rng.standard_normal((b, hkv * rep, 1, d)).astype(np.float32)
    q_pos = [tokens - 1]
    kp, vp = (make_part(x, t, spec, None, tokens - 1, q_pos) for x, t in ((k, spec.k), (v, spec.v)))
    want = R.attend_as_decoded(q, k, v, spec)
    return spec, torch.from_numpy(q).to(DEVICE), torch.tensor(q_pos, device=DEVICE), kp, vp, want


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the kernel itself")
@pytest.mark.parametrize("text,d,rep", [("int4", 128, 4), ("int8", 128, 4), ("int4", 64, 3), ("int8", 64, 3),
                                        ("int4", 256, 4), ("int8", 256, 4)])
def test_emulated_constant_groups(text, d, rep, emulated):
    spec, q, q_pos, kp, vp, want = constant_group_case(text, 1, 2, rep, 70, d=d)
    got = emulated_attend(emulated, spec, q, q_pos, kp, vp)
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), f"constant groups, D {d}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text", ["int4", "int8"])
def test_constant_groups(text, launches):
    spec, q, q_pos, kp, vp, want = constant_group_case(text, 2, 8, 4, 901)
    got = attend(q, q_pos, kp, vp, scale=128 ** -0.5)
    assert launches[0] == 1
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), "constant groups")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text", ["int4-bf16", "int8-bf16"])
def test_the_triton_path_agrees(text, launches):
    """cuda=False takes the Triton lean launch on the same inputs: the two agree to the oracle's
    tolerance (each rounds its dequantized values to fp16 once)."""
    spec, q, q_pos, kp, vp, want = case(text, batch=3, kv_heads=8, rep=4, tokens=3001, dim=128)
    ours = attend(q, q_pos, kp, vp, scale=128 ** -0.5)
    theirs = attend(q, q_pos, kp, vp, scale=128 ** -0.5, cuda=False)
    assert launches[0] == 1
    assert_close(ours.cpu(), theirs.cpu().numpy(), spec_tolerance(spec, spec.float_dtype), "cuda vs triton")




def test_head_dim_64_odd_head_strides_are_refused(monkeypatch):
    """One fp16 scale a row at D 64: rows are copied two at a time (4 bytes), so a head stride of odd
    length would misalign them: Triton takes such storage."""
    monkeypatch.setattr(cuda_decode, "device_refusal", lambda q: None)
    spec, q, q_pos, kp, vp, _ = case("int4", kv_heads=2, rep=3, tokens=77, dim=64)
    assert cuda_decode.refusal(q, kp, vp) == ("K: scale or bias heads do not start 4-byte aligned (an odd head "
                                              "stride or offset)")
    spec, q, q_pos, kp, vp, _ = case("int4", kv_heads=2, rep=3, tokens=78, dim=64)
    assert cuda_decode.refusal(q, kp, vp) is None


def with_nan_reserve(part, reserve: int):
    """`part` with its arrays moved into storage `reserve` rows longer, as a static cache's: codes past
    the live rows random, scales and biases there NaN. The kernel must not let them reach the output
    (rows past the range are copied as zeros, and weigh 0; at D 64, where scale rows are copied in
    pairs, an odd live count with an even stride puts a NaN beside the last row)."""
    for name, x in list(part.arrays.items()):
        big = torch.empty(*x.shape[:-2], x.shape[-2] + reserve, x.shape[-1], dtype=x.dtype, device=x.device)
        if x.dtype == torch.float16:
            big.fill_(float("nan"))
        else:
            big.random_(-2**31, 2**31 - 1)
        big[..., : x.shape[-2], :] = x
        part.arrays[name] = big[..., : x.shape[-2], :]
    return part


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the kernel itself")
@pytest.mark.parametrize("text,d,tokens", [("int4", 128, 77), ("int8", 64, 61), ("int4-res3", 64, 102),
                                           ("int8", 256, 61)])
def test_emulated_nan_past_the_live_rows(text, d, tokens, emulated):
    spec, q, q_pos, kp, vp, want = case(text, batch=1, kv_heads=2, rep=3, tokens=tokens, dim=d, seed=3)
    live = kp.arrays["codes"].shape[-2]
    assert live % 2 == 1  # an odd live count (the even-stride storage then has a NaN beside its last row)
    kp, vp = with_nan_reserve(kp, 17), with_nan_reserve(vp, 17)
    assert cuda_decode.refusal(q, kp, vp) is None
    got = emulated_attend(emulated, spec, q, q_pos, kp, vp, splits=3)
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), f"NaN reserve {text} D {d}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("text", ["int4", "int8-bf16"])
def test_nan_past_the_live_rows(text, launches):
    spec, q, q_pos, kp, vp, want = case(text, batch=2, kv_heads=8, rep=4, tokens=1001, dim=128, seed=3)
    kp, vp = with_nan_reserve(kp, 40), with_nan_reserve(vp, 40)
    got = attend(q, q_pos, kp, vp, scale=128 ** -0.5, splits=5)
    assert launches[0] == 1
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), f"NaN reserve {text}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d,text,kv_heads,rep,tokens,splits", [
    (64, "int4", 3, 3, 2050, None),  # SmolLM2-135M's heads
    (64, "int8-bf16", 2, 7, 4098, None),  # Qwen2.5-0.5B's
    (64, "int4-res5", 3, 3, 1501, 2),
    (64, "int8", 2, 7, 300, 32),
    (256, "int4", 1, 4, 3001, None),  # Gemma-3-270m's
    (256, "int8-bf16", 1, 4, 2050, None),
    (256, "int4-res5", 2, 2, 1501, 2),
    (256, "int8", 2, 8, 300, 32),
])
def test_other_head_dims(d, text, kv_heads, rep, tokens, splits, launches):
    """The D 64 and D 256 builds on the GPU (SmolLM2's, Qwen2.5's and Gemma-3's heads)."""
    spec, q, q_pos, kp, vp, want = case(text, batch=2, kv_heads=kv_heads, rep=rep, tokens=tokens, dim=d,
                                        seed=tokens)
    assert cuda_decode.refusal(q, kp, vp) is None
    got = attend(q, q_pos, kp, vp, scale=d ** -0.5, splits=splits)
    assert launches[0] == 1
    assert_close(got.cpu(), want, spec_tolerance(spec, spec.float_dtype), f"D {d} {text}")
