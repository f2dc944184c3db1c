"""kvmlx.kernels on CPU: template rendering in both dialects, the translation units MLX would build
(compiled with NVRTC where configured, tests/kvmlx/nvrtc.py), and the dispatcher's self-check and
fallback logic. The kernels themselves run only on a GPU (benchmarks/bench_mlx_kernels.py)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")

from kvmlx import ops  # noqa: E402
from kvmlx.attention import compressed_attention, reference_attention  # noqa: E402
from kvmlx.kernels import attention as kattn  # noqa: E402
from kvmlx.kernels import bodies, dialect, selfcheck  # noqa: E402
from kvmlx.kernels import quantize as kquant  # noqa: E402
from kvspec.grammar import parse  # noqa: E402

from . import nvrtc  # noqa: E402

SPECS = ["int2", "int3", "int4", "int8", "int4-kchan", "int4-rot", "k8v4", "rank32", "rank32-q4"]


def decode_launches(spec: str, d: int = 128, g: int = 4, dtype: str = "fp16"):
    """The split (fast, general) and reduce launches of a probe decode step of `spec`."""
    s = parse(spec)
    q, k, v, scale = kattn._probe((s.k, s.v, d, g, 2, dtype))
    assert kattn.refusal(q, k, v, None) is None
    fast, general, meta = kattn.split_launches(q, k, v, scale)
    outs = {n: mx.zeros(shape, dt) for n, (shape, dt) in fast.outputs.items()}
    return [fast, general, kattn.reduce_launch(outs, outs, meta)]


@pytest.mark.parametrize("which", ["metal", "cuda"])
def test_bodies_render_without_placeholders(which):
    for body in (bodies.QUANTIZE, bodies.SPLIT, bodies.REDUCE):
        header, source = dialect.render(body, which)
        assert "{{" not in source and "kv_tid" in source
        assert ("threadIdx" in source) == (which == "cuda")
        assert ("thread_position_in_threadgroup" in source) == (which == "metal")
        assert "KV_SHFL_XOR" in header and "KV_DIV_RN" in header
    # The template's K/V expansion leaves no generic names behind.
    assert not re.search(r"\bX(c|s|b|B|W|GR|CH|FOLD)\b", bodies.SPLIT)


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


def test_kernels_are_opt_in(monkeypatch):
    monkeypatch.delenv("KVMLX_KERNELS", raising=False)
    assert selfcheck.current_dialect() is None
    assert "KVMLX_KERNELS=on" in selfcheck.refusal()


def test_cpu_says_why_no_kernel_runs(monkeypatch):
    monkeypatch.setenv("KVMLX_KERNELS", "on")
    assert selfcheck.current_dialect() is None
    assert "cpu" in selfcheck.refusal().lower()


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
