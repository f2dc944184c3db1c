"""Cache files: round trip, validation, refusal of damaged or mismatched files, safetensors interop."""

import dataclasses

import numpy as np
import pytest

import kvspec
from kvspec import cachefile as CF
from kvspec import reference as R
from kvspec.budget import ModelShape
from kvspec.reference.lowrank import make_basis

SHAPE = ModelShape(layers=2, kv_heads=2, head_dim=32)


def stored_layers(spec, tokens, windows, seed=0):
    """Reference-compressed arrays for every layer, as a backend would save them."""
    rng = np.random.default_rng(seed)
    layers = []
    for window in windows:
        held = tokens if window is None else min(tokens, window)
        layer = {}
        for which in ("k", "v"):
            t = CF.layer_tensor_spec(spec, window, which)
            x = rng.standard_normal((1, 2, held, 32)).astype(np.float32)
            basis = None
            if isinstance(t, kvspec.LowRank):
                basis = np.stack([make_basis("random", 32, seed=h)[:, : t.rank] for h in range(2)]).astype(np.float32)
            s = R.compress(x, t, spec.residual, spec.float_dtype, basis)
            arrays = {"tail": _float(s.tail, spec.float_dtype)}
            if s.quant is not None:
                arrays.update(codes=s.quant.codes, scales=s.quant.scales, biases=s.quant.biases)
            if s.coeffs is not None:
                arrays["coeffs"] = _float(s.coeffs, spec.float_dtype)
            if basis is not None:
                arrays["basis"] = basis
            layer[which] = arrays
        layers.append(layer)
    return layers


def _float(x, dtype):
    if dtype == "fp16":
        return x.astype(np.float16)
    return R.round_bf16(x).view(np.uint32).astype(np.uint64).__rshift__(16).astype(np.uint16)


def header(spec_text, tokens=37, windows=(None, None)):
    fp = CF.config_fingerprint("llama", SHAPE, 100, windows)
    return CF.CacheHeader(spec=spec_text, model="tiny", config_fingerprint=fp, tokens=tokens, batch=1,
                          kv_heads=2, head_dim=32, windows=windows, producer="test")


@pytest.mark.parametrize("text", ["fp16", "int4-g32", "int3-g32-kchan-res5", "rank8-q4", "k8vrank8-g32-bf16", "int2-g32-rot-res4"])
def test_round_trip(tmp_path, text):
    spec = kvspec.parse(text)
    h = header(kvspec.format(spec))
    layers = stored_layers(spec, 37, h.windows)
    ids = np.arange(37, dtype=np.int32)[None]
    CF.save(tmp_path / "c.safetensors", h, layers, token_ids=ids)
    h2, layers2, ids2 = CF.load(tmp_path / "c.safetensors", expect_fingerprint=h.config_fingerprint, expect_spec=text)
    assert h2 == h and np.array_equal(ids2, ids)
    for a, b in zip(layers, layers2):
        for which in ("k", "v"):
            assert a[which].keys() == b[which].keys()
            for name in a[which]:
                assert np.array_equal(a[which][name], b[which][name])


def test_sliding_layers_are_float_and_bounded():
    h = header("int4-g32", tokens=50, windows=(None, 16))
    exp = CF.expected_arrays(h)
    assert exp["layers.1.k.tail"] == ((1, 2, 16, 32), "F16")
    assert "layers.1.k.codes" not in exp and exp["layers.0.k.codes"][0] == (1, 2, 50, 4)


def test_readable_by_the_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors package not installed")
    spec = kvspec.parse("int4-g32")
    CF.save(tmp_path / "c.safetensors", header("int4-g32"), stored_layers(spec, 37, (None, None)))
    loaded = safetensors_numpy.load_file(str(tmp_path / "c.safetensors"))
    assert loaded["layers.0.k.codes"].dtype == np.uint32 and loaded["layers.0.k.codes"].shape == (1, 2, 37, 4)


def save_default(tmp_path, text="int4-g32"):
    spec = kvspec.parse(text)
    path = tmp_path / "c.safetensors"
    CF.save(path, header(text), stored_layers(spec, 37, (None, None)))
    return path


def test_refuses_damaged_data(tmp_path):
    path = save_default(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CF.CacheFileError, match="checksum mismatch"):
        CF.load(path)


def test_refuses_truncated_file(tmp_path):
    path = save_default(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CF.CacheFileError, match="inconsistent offsets|truncated"):
        CF.load(path)


def test_refuses_garbage_and_missing(tmp_path):
    (tmp_path / "g").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CF.CacheFileError, match="not valid JSON"):
        CF.load(tmp_path / "g")
    with pytest.raises(CF.CacheFileError, match="no such cache file"):
        CF.load(tmp_path / "missing")


def test_refuses_other_model_and_spec(tmp_path):
    path = save_default(tmp_path)
    other = CF.config_fingerprint("qwen2", SHAPE, 100, (None, None))
    with pytest.raises(CF.CacheFileError, match="made for model 'tiny'"):
        CF.load(path, expect_fingerprint=other)
    with pytest.raises(CF.CacheFileError, match="pass --kv int4-g32"):
        CF.load(path, expect_spec="int8")


def test_save_refuses_wrong_shapes():
    spec = kvspec.parse("int4-g32")
    layers = stored_layers(spec, 37, (None, None))
    layers[1]["v"]["scales"] = layers[1]["v"]["scales"][..., :5, :]
    with pytest.raises(CF.CacheFileError, match="layers.1.v.scales"):
        CF.save("/nonexistent/never-written", header("int4-g32"), layers)


def test_refuses_newer_format_version(tmp_path):
    spec = kvspec.parse("fp16")
    h = dataclasses.replace(header("fp16"), format_version=99)
    CF.save(tmp_path / "c", h, stored_layers(spec, 37, (None, None)))
    with pytest.raises(CF.CacheFileError, match="format version 99"):
        CF.load(tmp_path / "c")
