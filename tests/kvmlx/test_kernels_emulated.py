"""The kernels run on the CPU (tests/kvmlx/simt.py emulates the warp, mma.sync included) against
kvspec: quantize bit-exact with the MLX ops path (kvspec's numerics), decode attention within
kvspec's tolerances of the MLX ops reference, both split bodies (tensor cores and FMA). The CUDA
dialect throughout; the Metal dialect's units too (over tests/kvmlx/metal_shim.h), which no Metal
compiler or Apple GPU has run. Inputs: fresh seeds, odd lengths, a constant stretch, an outlier
channel, several splits and tiles per warp. What this cannot show: timing, the real tensor cores'
accumulation order, and whether Metal's compiler accepts the Metal units."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed")

from kvmlx import ops  # noqa: E402
from kvmlx.kernels import attention as kattn  # noqa: E402
from kvmlx.kernels import quantize as kquant  # noqa: E402
from kvmlx.kernels import selfcheck, tensorcore  # noqa: E402
from kvmlx.kernels.launch import Launch  # noqa: E402
from kvmlx.store import TensorStore  # noqa: E402
from kvspec.grammar import parse  # noqa: E402
from kvspec.spec import LowRank, Quant  # noqa: E402

from . import simt  # noqa: E402

pytestmark = pytest.mark.skipif(simt.available() is not None, reason=str(simt.available()))


@pytest.fixture
def emulated(monkeypatch):
    """Launch.run executes the dialect's translation unit on the CPU emulator."""
    monkeypatch.setattr(Launch, "run", lambda self, dialect: simt.run(self, dialect))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("dialect", ["cuda", "metal"])
def test_quantize_kernel_is_bit_exact(emulated, bits, axis, dialect):
    rng = np.random.default_rng(bits * 10 + len(axis))
    x = rng.standard_normal((2, 2, 64, 96)).astype(np.float32)
    x[0, 0, 5:40] = 0.625  # constant groups on both axes
    x[1, 1, :, 7] *= 40.0  # an outlier channel
    for xm in (mx.array(x), mx.array(x).astype(mx.bfloat16)):
        got = kquant.quantize_launch(xm, bits, 32, axis).run(dialect)
        want = ops.quantize(xm.astype(mx.float32), bits, 32, axis)
        for name, w in zip(("codes", "scales", "biases"), want):
            assert selfcheck.bits_equal(got[name], w) is None, f"{name}: {selfcheck.bits_equal(got[name], w)}"


def decode_inputs(spec: str, d: int, g: int, dtype: str, seed: int, hkv: int = 2, batch: int = 2):
    """One decode step after 5 groups + 13 tokens (several tiles and splits, a partial last one),
    with a constant stretch, an x30 outlier channel and a residual tail where the spec keeps one."""
    s = parse(f"{spec}-{dtype}")
    rng = np.random.default_rng(seed)
    group = max([t.group for t in (s.k, s.v) if isinstance(t, Quant)] + [16])
    tokens = 5 * group + 13
    fetched = []
    for t in (s.k, s.v):
        x = rng.standard_normal((batch, hkv, tokens, d)).astype(np.float32)
        x[0, 0, 3:40] = 0.5
        x[-1, :, :, 5] *= 30.0
        basis = None
        if isinstance(t, LowRank):
            basis = mx.array(np.linalg.qr(rng.standard_normal((hkv, d, t.rank)))[0].astype(np.float32))
        store = TensorStore(t, s.residual, s.float_dtype, basis)
        store.append(mx.array(x[:, :, :-1]))
        fetched.append(store.append(mx.array(x[:, :, -1:])))
    q = mx.array(rng.standard_normal((batch, hkv * g, 1, d)).astype(np.float32)).astype(ops.float_dtype(s.float_dtype))
    key = (s.k, s.v, d, g, hkv, s.float_dtype)
    return key, q, fetched[0], fetched[1], 1.0 / math.sqrt(d)


DECODE = [  # spec, head dim, G, float dtype
    ("int4", 128, 4, "bf16"), ("int4", 64, 3, "fp16"), ("int4", 256, 4, "bf16"), ("int2", 128, 4, "bf16"),
    ("int8", 64, 7, "bf16"), ("int8", 128, 4, "fp16"), ("k8v4", 64, 7, "bf16"), ("k4v2", 128, 8, "bf16"),
    ("int4-kchan-res16", 128, 4, "bf16"), ("int2-kchan", 64, 7, "fp16"), ("int4-rot", 64, 3, "fp16"),
    ("int4-g32", 128, 4, "bf16"), ("int4-g128", 128, 1, "bf16"), ("int3", 128, 4, "bf16"),
    ("rank32", 128, 4, "bf16"), ("rank32-q4", 64, 7, "fp16"), ("int4-res8", 64, 12, "bf16"),
]


@pytest.mark.parametrize("spec,d,g,dtype", DECODE)
@pytest.mark.parametrize("cores", ["on", "off"])
def test_decode_kernels_match_the_reference(emulated, monkeypatch, spec, d, g, dtype, cores):
    """Both split bodies (KVMLX_TENSOR_CORES on / off), the general split and the reduce, against
    the MLX ops path (kvspec's reference numerics) at kvspec's tolerance."""
    monkeypatch.setenv("KVMLX_TENSOR_CORES", cores)
    seed = int(np.random.default_rng().integers(2**31))  # fresh each run; a failure names it
    key, q, k, v, scale = decode_inputs(spec, d, g, dtype, seed)
    assert kattn.refusal(q, k, v, None) is None
    got = kattn.run_decode("cuda", q, k, v, scale)
    want = kattn._reference(key, q, k, v, scale)
    assert got.dtype == q.dtype and got.shape == q.shape
    why = kattn._compare(key, got, want)
    assert why is None, f"seed {seed}: {why}"


METAL_DECODE = [  # a spread of DECODE: bit widths, both axes, rotation, rank, D 64/128/256, G 1-12
    ("int4", 128, 4, "bf16"), ("int4", 256, 4, "bf16"), ("int8", 64, 7, "bf16"), ("k4v2", 128, 8, "bf16"),
    ("int2-kchan", 64, 7, "fp16"), ("int4-rot", 64, 3, "fp16"), ("int3", 128, 4, "bf16"),
    ("rank32-q4", 64, 7, "fp16"), ("int4-res8", 64, 12, "bf16"), ("int4-g128", 128, 1, "bf16"),
]


@pytest.mark.parametrize("spec,d,g,dtype", METAL_DECODE)
def test_metal_dialect_decode_matches_the_reference(emulated, spec, d, g, dtype):
    """The Metal units (FMA split body, general split, reduce: Metal has no tensor-core body) compute
    what the CUDA ones do: within kvspec's tolerance of the MLX ops reference."""
    seed = int(np.random.default_rng().integers(2**31))
    key, q, k, v, scale = decode_inputs(spec, d, g, dtype, seed)
    assert kattn.split_launches(q, k, v, scale, "metal")[0].name == "kvmlx_split"
    why = kattn._compare(key, kattn.run_decode("metal", q, k, v, scale), kattn._reference(key, q, k, v, scale))
    assert why is None, f"seed {seed}: {why}"


def test_metal_threadgroup_memory_is_declared_at_kernel_scope():
    """Metal accepts threadgroup variables only in a kernel's outermost scope (CUDA takes __shared__
    anywhere), which the emulator cannot tell: every KV_SHARED of a body sits at brace depth 0."""
    from kvmlx.kernels import bodies

    found = 0
    for name, body in vars(bodies).items():
        if not (isinstance(body, str) and "{{INDEX}}" in body):
            continue
        depth = 0
        for line in body.splitlines():
            code = line.split("//")[0]
            if "KV_SHARED" in code:
                assert depth == 0, f"bodies.{name}: {code.strip()} is inside a block"
                found += 1
            depth += code.count("{") - code.count("}")
    assert found >= 3


@pytest.mark.parametrize("spec,d,g,dtype", [("int4", 128, 4, "bf16"), ("int4-kchan-res16", 64, 7, "fp16"),
                                           ("k8v4", 128, 3, "bf16")])
@pytest.mark.parametrize("prefetch", [False, True])
def test_two_tile_tensor_core_body_matches_the_reference(emulated, monkeypatch, spec, d, g, dtype, prefetch):
    """The launch shapes other than the default (1 tile per step, prefetched; DECODE above runs it):
    2 tiles per step, with and without tensorcore.PREFETCH."""
    monkeypatch.setattr(tensorcore, "PREFETCH", prefetch)
    monkeypatch.setattr(tensorcore, "TILES", 2)
    seed = int(np.random.default_rng().integers(2**31))
    key, q, k, v, scale = decode_inputs(spec, d, g, dtype, seed)
    fast = kattn.split_launches(q, k, v, scale, "cuda")[0]
    assert fast.name == "kvmlx_split_tc" and dict(fast.template)["PF"] == int(prefetch) and dict(fast.template)["UT"] == 2
    why = kattn._compare(key, kattn.run_decode("cuda", q, k, v, scale), kattn._reference(key, q, k, v, scale))
    assert why is None, f"seed {seed}: {why}"


def test_the_tensor_core_body_is_what_ran(monkeypatch):
    """The cases above exercise TC_SPLIT where it applies (not only the FMA body)."""
    monkeypatch.delenv("KVMLX_TENSOR_CORES", raising=False)
    taken = []
    for spec, d, g, dtype in DECODE:
        key, q, k, v, scale = decode_inputs(spec, d, g, dtype, seed=0)
        if kattn.split_launches(q, k, v, scale, "cuda")[0].name == "kvmlx_split_tc":
            taken.append(spec)
    assert {"int4", "int2", "int8", "k8v4", "int4-kchan-res16", "int4-rot"} <= set(taken)
    assert "int3" not in taken and "rank32" not in taken and "int4-res8" not in taken  # G 12 > 8


_HANG = """
import sys
sys.path.insert(0, {root!r})
from kvmlx.kernels.launch import Launch
import mlx.core as mx
from tests.kvmlx import simt
simt.TIMEOUT_S = 2.0
body = "{{{{INDEX}}}} float v = (float)(kv_tid % 3); v = KV_MAX(v, KV_SHFL_XOR(v, 1)); out[kv_tid] = v;"
launch = Launch("hang", body, {{"x": mx.zeros((8,), mx.float32)}}, {{"out": ((32,), mx.float32)}}, [], (32, 1, 1), (32, 1, 1))
simt.run(launch)
"""


def test_a_divergent_shuffle_is_reported():
    """The 2026-11-29 H200 hang (a shuffle inside KV_MAX, evaluated a second time only in the lanes
    whose compare failed) ends the emulated run with a message instead of passing or stalling."""
    root = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", _HANG.format(root=root)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 4 and "divergent warp collective" in r.stderr, (r.returncode, r.stderr[-2000:])
