"""kvmlx.kernels on CPU: template rendering in both dialects, the translation units MLX would build
(compiled with NVRTC where configured, tests/kvmlx/nvrtc.py), and the dispatcher's self-check and
fallback logic. The kernels' results are checked on the CPU by tests/kvmlx/test_kernels_emulated.py
(a warp emulator) and on a GPU by benchmarks/bench_mlx_kernels.py."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")

from kvmlx import ops  # noqa: E402
from kvmlx.attention import compressed_attention, reference_attention  # noqa: E402
from kvmlx.kernels import attention as kattn  # noqa: E402
from kvmlx.kernels import bodies, dialect, selfcheck, tensorcore  # noqa: E402
from kvmlx.kernels import quantize as kquant  # noqa: E402
from kvspec.grammar import parse  # noqa: E402

from . import nvrtc  # noqa: E402

SPECS = ["int2", "int3", "int4", "int8", "int4-kchan", "int4-rot", "k8v4", "rank32", "rank32-q4"]


def decode_launches(spec: str, d: int = 128, g: int = 4, dtype: str = "fp16", dialect: str | None = None):
    """The split (fast, general) and reduce launches of a probe decode step of `spec` (dialect
    "cuda": the fast split on matrix units where tensorcore takes the configuration)."""
    s = parse(spec)
    q, k, v, scale = kattn._probe((s.k, s.v, d, g, 2, dtype))
    assert kattn.refusal(q, k, v, None) is None
    fast, general, meta = kattn.split_launches(q, k, v, scale, dialect)
    outs = {n: mx.zeros(shape, dt) for n, (shape, dt) in fast.outputs.items()}
    return [fast, general, kattn.reduce_launch(outs, outs, meta)]


def _macro_arguments(source: str, macro: str) -> list[str]:
    """The argument text of every `macro(...)` call in `source` (balanced parentheses)."""
    out = []
    for m in re.finditer(rf"\b{macro}\(", source):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        out.append(source[m.end(): i - 1])
    return out


@pytest.mark.parametrize("body", ["QUANTIZE", "SPLIT", "REDUCE", "TC_SPLIT"])
def test_no_warp_collective_inside_a_comparing_macro(body):
    """KV_MAX/KV_MIN are macros that evaluate an argument twice, the second time only in the lanes
    whose compare went one way: a full-mask shuffle there deadlocks the warp (the H200 hang of
    2026-11-29 was `KV_MAX(mw, KV_SHFL_XOR(mw, o))`)."""
    source = getattr(tensorcore if body == "TC_SPLIT" else bodies, body)
    for macro in ("KV_MAX", "KV_MIN"):
        for args in _macro_arguments(source, macro):
            assert "KV_SHFL" not in args and "_sync" not in args, f"{body}: {macro}({args}) runs a warp collective"


def test_the_macro_check_catches_the_old_hang():
    bad = "for (int o = TPR; o < 32; o <<= 1) mw = KV_MAX(mw, KV_SHFL_XOR(mw, o));"
    assert any("KV_SHFL" in a for a in _macro_arguments(bad, "KV_MAX"))


@pytest.mark.parametrize("which", ["metal", "cuda"])
def test_bodies_render_without_placeholders(which):
    for body in (bodies.QUANTIZE, bodies.SPLIT, bodies.REDUCE):
        header, source = dialect.render(body, which)
        assert "{{" not in source and "kv_tid" in source
        assert ("threadIdx" in source) == (which == "cuda")
        assert ("thread_position_in_threadgroup" in source) == (which == "metal")
        assert "KV_SHFL_XOR" in header and "KV_DIV_RN" in header
        # MLX rebuilds and hashes the source on every call: comments and indentation are not sent.
        assert "//" not in source + header and not any(line.startswith(" ") for line in source.splitlines())
    # The template's K/V expansion ("@" -> K / V, "$" -> k / v) leaves no generic names behind.
    assert "@" not in bodies.SPLIT and "$" not in bodies.SPLIT


# What Metal's language lacks or spells otherwise: CUDA's double-underscore built-ins (__shfl_xor_sync,
# __syncthreads, __half...), double precision, the C++ standard library, lambdas, printf. The CPU
# emulator defines CUDA's names for both dialects, so only this check keeps them out of Metal units.
NOT_METAL = re.compile(r"\b__\w+|\bdouble\b|\bstd::|\[[&=]\]\s*\(|\bprintf\b")


@pytest.mark.parametrize("spec", SPECS)
def test_metal_units_use_only_metal_names(spec):
    launches = decode_launches(spec, dialect="metal") + [kquant.quantize_launch(mx.zeros((1, 2, 64, 64)), 4, 64, "token")]
    for launch in launches:
        unit = launch.translation_unit("metal")
        assert not NOT_METAL.findall(unit), f"{launch.name}: {sorted(set(NOT_METAL.findall(unit)))}"


def test_the_metal_name_check_catches_a_cuda_builtin():
    assert NOT_METAL.findall("float v = __shfl_xor_sync(0xffffffffu, x, 1); __syncthreads();")


def test_render_refuses_leftover_placeholders():
    with pytest.raises(ValueError, match="MISSING"):
        dialect.render("{{INDEX}} x = {{MISSING}};", "cuda")


@pytest.mark.parametrize("spec", SPECS)
def test_translation_units_match_mlx_signatures(spec):
    for launch in decode_launches(spec):
        cuda = launch.translation_unit("cuda")
        assert cuda.startswith('#include "mlx/backend/cuda/device/utils.cuh"')
        assert f"__global__ void custom_kernel_{launch.name}(" in cuda and "namespace mlx::core::cu" in cuda
        for name, _ in launch.template:
            assert re.search(rf"(constexpr (int|bool) {name} = |using {name} = )", cuda)
        metal = launch.translation_unit("metal")
        assert "[[kernel]] void custom_kernel_" in metal and "template <" in metal
        for name in launch.inputs:
            assert f" {name} [[buffer(" in metal
        # Strides are passed exactly for the inputs the body indexes with them.
        for name in launch.inputs:
            assert (f"Strides {name}_strides" in cuda) == (f"{name}_strides" in launch.body)


@pytest.mark.skipif(nvrtc.available() is not None, reason=str(nvrtc.available()))
@pytest.mark.parametrize("spec", SPECS)
def test_cuda_dialect_compiles_with_nvrtc(spec):
    launches = decode_launches(spec, 64, 7, "bf16") + decode_launches(spec, 128, 4, "fp16")
    x = mx.random.normal((1, 2, 64, 128))
    launches += [kquant.quantize_launch(x, b, 32, a) for b in (2, 3, 4, 8) for a in ("token", "channel")]
    for launch in launches:
        ok, log = nvrtc.compile_ptx(launch.translation_unit("cuda"))
        assert ok, f"{launch.name} {launch.template}: {log[:4000]}"


TC_CASES = [("int4", 128, 4, "bf16"), ("int4", 64, 7, "fp16"), ("int2", 128, 4, "bf16"), ("int8", 64, 3, "bf16"),
            ("k8v4", 128, 4, "fp16"), ("int4-kchan", 128, 4, "bf16"), ("int2-kchan", 64, 7, "bf16"),
            ("int4-g32", 128, 4, "bf16"), ("int4-g128", 256, 4, "bf16"), ("int4-rot", 64, 3, "fp16")]


@pytest.mark.parametrize("spec,d,g,dtype", TC_CASES)
def test_cuda_fast_splits_of_4_2_8_bit_caches_run_on_matrix_units(spec, d, g, dtype):
    fast, general, _ = decode_launches(spec, d, g, dtype, "cuda")[:3]
    assert fast.name == "kvmlx_split_tc" and general.name == "kvmlx_split"
    template = dict(fast.template)
    s = parse(spec)
    assert (template["KB"], template["VB"], template["KCH"]) == (s.k.bits, s.v.bits, int(s.k.axis == "channel"))
    # 8-bit codes need fp16 operands (1024 + c exact); otherwise the cache's own dtype.
    assert template["MT"] == (mx.float16 if 8 in (s.k.bits, s.v.bits) or dtype == "fp16" else mx.bfloat16)
    # Each warp walks whole tiles of 16 rows: the fast chunk is a multiple of 16 x warps x tiles.
    assert fast.inputs["params"].tolist()[5] % (16 * tensorcore.WARPS * tensorcore.tiles_for(d)) == 0


@pytest.mark.parametrize("spec,d,g,why", [("int3", 128, 4, "3-bit"), ("rank32", 128, 4, "low-rank"),
                                           ("int4", 128, 12, "query heads"), ("int4-vchan", 128, 4, "channel-axis values"),
                                           ("int2-g32", 128, 4, "K groups of 32"), ("int4-g32", 64, 4, None)])
def test_tensor_core_refusals_name_the_reason(spec, d, g, why):
    s = parse(spec)
    got = tensorcore.refusal(s.k, s.v, d, g, "bf16")
    assert got is None if why is None else why in got


@pytest.mark.parametrize("switch", ["off", None])
def test_tensor_cores_only_in_the_cuda_dialect_unless_switched_off(monkeypatch, switch):
    if switch is None:
        monkeypatch.delenv("KVMLX_TENSOR_CORES", raising=False)
    else:
        monkeypatch.setenv("KVMLX_TENSOR_CORES", switch)
    assert decode_launches("int4", 128, 4, "bf16", "metal")[0].name == "kvmlx_split"
    want = "kvmlx_split" if switch == "off" else "kvmlx_split_tc"
    assert decode_launches("int4", 128, 4, "bf16", "cuda")[0].name == want


@pytest.mark.skipif(nvrtc.available() is not None, reason=str(nvrtc.available()))
@pytest.mark.parametrize("spec,d,g,dtype", TC_CASES)
def test_tensor_core_split_compiles_with_nvrtc(spec, d, g, dtype):
    fast = decode_launches(spec, d, g, dtype, "cuda")[0]
    ok, log = nvrtc.compile_ptx(fast.translation_unit("cuda"))
    assert ok, f"{fast.template}: {log[:4000]}"


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("KVMLX_KERNELS", "off")
    assert selfcheck.current_dialect() is None
    assert "KVMLX_KERNELS=off" in selfcheck.refusal()


@pytest.mark.parametrize("switch", [None, "on"])
def test_cpu_says_why_no_kernel_runs(monkeypatch, switch):
    if switch is None:
        monkeypatch.delenv("KVMLX_KERNELS", raising=False)
    else:
        monkeypatch.setenv("KVMLX_KERNELS", switch)
    assert selfcheck.current_dialect() is None
    assert "cpu" in selfcheck.refusal().lower()


@pytest.mark.parametrize("switch, want", [(None, None), ("on", "metal")])
def test_metal_waits_for_the_switch(monkeypatch, switch, want):
    """Unset, a Mac runs the ops path (the Metal dialect is unverified); KVMLX_KERNELS=on tries it."""
    if switch is None:
        monkeypatch.delenv("KVMLX_KERNELS", raising=False)
    else:
        monkeypatch.setenv("KVMLX_KERNELS", switch)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert selfcheck.current_dialect() == want
    if want is None:
        assert "KVMLX_KERNELS=on" in selfcheck.refusal()


def test_cuda_runs_the_kernels_unless_switched_off(monkeypatch):
    monkeypatch.delenv("KVMLX_KERNELS", raising=False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx, "cuda", type("FakeCuda", (), {"is_available": staticmethod(lambda: True)}), raising=False)
    assert selfcheck.current_dialect() == "cuda"


def _fake(kernel):
    return selfcheck.SelfChecked(
        "fake", kernel, lambda key, x: ops.quantize(x, 4, 32, "token"),
        lambda key: (mx.array(np.random.default_rng(0).standard_normal((1, 1, 3, 64)).astype(np.float32)),),
        kquant._compare)


def _run_twice(checked, monkeypatch):
    monkeypatch.setattr(selfcheck, "current_dialect", lambda: "cuda")
    x = mx.array(np.random.default_rng(1).standard_normal((1, 2, 5, 64)).astype(np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [checked(("k",), x) for _ in range(2)]
    fallbacks = [w for w in caught if issubclass(w.category, selfcheck.KernelFallback)]
    return outs, fallbacks, ops.quantize(x, 4, 32, "token")


def test_failing_kernel_falls_back_with_one_warning(monkeypatch):
    def broken(dialect, key, x):
        raise RuntimeError("Failed to compile kernel: error: expected ';'")

    checked = _fake(broken)
    outs, fallbacks, want = _run_twice(checked, monkeypatch)
    assert len(fallbacks) == 1 and "fake" in str(fallbacks[0].message) and "compile" in str(fallbacks[0].message)
    for out in outs:
        assert all(selfcheck.bits_equal(g, w) is None for g, w in zip(out, want))
    assert list(checked.fallbacks().values())[0].startswith("failed to compile")


def test_disagreeing_kernel_falls_back_with_one_warning(monkeypatch):
    calls = []

    def wrong(dialect, key, x):
        calls.append(key)
        codes, scales, biases = ops.quantize(x, 4, 32, "token")
        return codes ^ 1, scales, biases

    outs, fallbacks, want = _run_twice(_fake(wrong), monkeypatch)
    assert len(fallbacks) == 1 and "codes" in str(fallbacks[0].message)
    assert len(calls) == 1  # only the probe ran the kernel
    for out in outs:
        assert all(selfcheck.bits_equal(g, w) is None for g, w in zip(out, want))


def test_agreeing_kernel_is_used_without_warning(monkeypatch):
    calls = []

    def right(dialect, key, x):
        calls.append(key)
        return ops.quantize(x, 4, 32, "token")

    outs, fallbacks, _ = _run_twice(_fake(right), monkeypatch)
    assert not fallbacks and len(calls) == 3  # the probe, then both calls


def test_decode_without_a_gpu_falls_back_once_and_stays_exact(monkeypatch):
    """The real decode kernels on a stream that cannot run them: one warning, then the reference."""
    monkeypatch.setattr(selfcheck, "current_dialect", lambda: "cuda")
    monkeypatch.setattr(kattn, "CHECKED", selfcheck.SelfChecked("decode_attention", kattn._kernel, kattn._reference,
                                                                kattn._probe, kattn._compare))
    s = parse("int4")
    q, k, v, scale = kattn._probe((s.k, s.v, 64, 3, 2, "fp16"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [compressed_attention(q, k, v, scale) for _ in range(2)]
    fallbacks = [w for w in caught if issubclass(w.category, selfcheck.KernelFallback)]
    assert len(fallbacks) == 1 and "decode_attention" in str(fallbacks[0].message)
    want = np.array(reference_attention(q, k, v, scale))
    for out in outs:
        assert np.array_equal(np.array(out), want)


@pytest.mark.parametrize("spec", ["int4", "int8", "int4-g32", "rank32-q4"])
def test_the_dequantizing_ops_path_of_mlx_cuda_matches_quantized_matmul(monkeypatch, spec):
    """MLX's CUDA build has no fp32-activation quantized_matmul, so there the ops path (the kernels'
    self-check reference) dequantizes first; on the CPU both forms run and must agree."""
    import kvmlx.attention as katt

    s = parse(spec)
    fused_here = (lambda: katt._hybrid_affine(s.k)) if spec.startswith("rank") else (lambda: katt._affine(s.k, 64))
    q, k, v, scale = kattn._probe((s.k, s.v, 64, 3, 2, "fp16"))
    assert fused_here()
    fused = np.array(reference_attention(q, k, v, scale).astype(mx.float32))
    monkeypatch.setattr(katt, "_fused_quantized_matmul", lambda: False)
    assert not fused_here()
    dequantized = np.array(reference_attention(q, k, v, scale).astype(mx.float32))
    np.testing.assert_allclose(dequantized, fused, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("spec,why", [("int4", "prefill"), ("fp16", "float")])
def test_decode_refusals_name_the_reason(spec, why):
    s = parse(spec)
    from kvmlx.store import TensorStore

    x = mx.array(np.random.default_rng(0).standard_normal((1, 2, 40, 64)).astype(np.float32))
    k = TensorStore(s.k, 0, "fp16").append(x)
    q = mx.zeros((1, 4, 40 if why == "prefill" else 1, 64), mx.float16)
    if why == "float":
        k = TensorStore(s.k, 0, "fp16").append(x[:, :, :1])
    assert why in kattn.refusal(q, k, k, None)
