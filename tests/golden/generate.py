"""Write the golden vectors: inputs and kvspec-reference outputs every backend must reproduce.

    python -m tests.golden.generate          # rewrites tests/golden/vectors.npz (deterministic)

Contents (one compressed .npz, no pickle):
- quant/<case>/{codes,scales,biases}: `quantize` of the input `x.quant` (or `x.extreme`) for every
  bits x group x axis x rotation; rotated cases quantize `rotate(x)`.
- store/<spec>/<k|v>/<array>: what a cache holds after all T tokens of `kv.k`/`kv.v` (odd T = 67).
- attn/<spec>: reference attention [B, Hq, 5, D] of `q` (last 5 positions) over that cache.
- basis/<k|v>/<spec>: the [Hkv, D, r] bases used by low-rank specs (PCA ones from seeded activations).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import kvspec
from kvspec import reference as R
from kvspec.spec import LowRank

PATH = Path(__file__).with_name("vectors.npz")
B, HKV, HQ, T, D = 1, 2, 4, 67, 128
QUANT_BITS = (2, 3, 4, 8)
QUANT_GROUPS = (32, 64, 128)
ROTATION_SEED = 3
SPECS = (
    "fp16", "bf16", "int8", "int4", "int3-g32", "int2-g128", "int4-rot", "int2-g32-kchan-res8",
    "int3-g32-chan-res4", "k8v4-vg32", "k4v2-kchan-rot3-res16", "int4-res16-bf16", "rank16",
    "rank32-random", "rank24-identity", "rank16-hadamard", "rank32-q4", "rank32-q2-g32", "k8vrank16",
    "krank48vrank16-q8",
)


def extreme_input(rng: np.random.Generator) -> np.ndarray:
    """[1, 1, 128, D]: constant groups, fp16-range extremes, tiny values, an outlier channel, ties."""
    x = rng.standard_normal((1, 1, 128, D)).astype(np.float32)
    x[0, 0, :32, :] = 1.25  # constant tokens (token axis) and constant channel groups
    x[0, 0, 32:40, :] *= 60000.0 / np.abs(x[0, 0, 32:40, :]).max()  # near the fp16 limit
    x[0, 0, 40:48, :] *= 1e-5  # tiny ranges: scales near fp16 subnormals
    x[0, 0, 48:, 7] *= 300.0  # an outlier channel
    x[0, 0, 64:96, :64] = np.round(x[0, 0, 64:96, :64] * 2) / 2  # many exact half steps
    x[0, 0, 96:, 64:] = 0.0
    return x


def calibration(rng: np.random.Generator) -> np.ndarray:
    """[HKV, N, D] activations with a decaying spectrum, for PCA bases."""
    scale = np.geomspace(4.0, 0.05, D)
    return rng.standard_normal((HKV, 512, D)) * scale


def bases_for(spec: kvspec.KVSpec, calib: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for which, t in spec.tensors().items():
        if isinstance(t, LowRank):
            heads = [R.make_basis(t.basis, D, acts=calib[h], seed=h)[:, : t.rank] for h in range(HKV)]
            out[which] = np.stack(heads).astype(np.float32)
    return out


def quant_cases(x: np.ndarray, extreme: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for bits in QUANT_BITS:
        for group in QUANT_GROUPS:
            for axis in ("token", "channel"):
                for rot in (None, ROTATION_SEED):
                    for label, inp in (("normal", x), ("extreme", extreme)):
                        if label == "extreme" and rot is not None:
                            continue  # rotation spreads the extremes; the normal input covers it
                        src = inp[..., :128, :] if axis == "channel" else inp
                        if rot is not None:
                            src = R.rotate(src, rot)
                        q = R.quantize(src, bits, group, axis)
                        name = case_name(label, bits, group, axis, rot)
                        out[f"quant/{name}/codes"] = q.codes
                        out[f"quant/{name}/scales"] = q.scales
                        out[f"quant/{name}/biases"] = q.biases
    return out


def case_name(label: str, bits: int, group: int, axis: str, rot: int | None) -> str:
    return f"{label}-b{bits}-g{group}-{axis}" + ("" if rot is None else f"-rot{rot}")


def store_arrays(s: R.Stored) -> dict[str, np.ndarray]:
    out = {"tail": s.tail}
    if s.quant is not None:
        out.update(codes=s.quant.codes, scales=s.quant.scales, biases=s.quant.biases)
    if s.coeffs is not None:
        out["coeffs"] = s.coeffs
    return out


def generate() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261129)
    arrays: dict[str, np.ndarray] = {
        "x.quant": rng.standard_normal((1, 1, 131, D)).astype(np.float32),
        "x.extreme": extreme_input(rng),
        "kv.k": (rng.standard_normal((B, HKV, T, D)) * np.linspace(0.5, 2.0, D)).astype(np.float32),
        "kv.v": rng.standard_normal((B, HKV, T, D)).astype(np.float32),
        "q": rng.standard_normal((B, HQ, 5, D)).astype(np.float32),
    }
    calib = calibration(rng).astype(np.float32)
    arrays.update(quant_cases(arrays["x.quant"], arrays["x.extreme"]))
    pos = np.arange(T - 5, T)
    for text in SPECS:
        spec = kvspec.parse(text)
        bases = bases_for(spec, calib.astype(np.float64))
        stored = {}
        for which in ("k", "v"):
            t = spec.tensors()[which]
            s = R.compress(arrays[f"kv.{which}"], t, spec.residual, spec.float_dtype, bases.get(which))
            stored[which] = s
            for name, a in store_arrays(s).items():
                arrays[f"store/{text}/{which}/{name}"] = a
            if which in bases:
                arrays[f"basis/{which}/{text}"] = bases[which]
        arrays[f"attn/{text}"] = R.attend(arrays["q"], stored["k"], stored["v"], pos).astype(np.float32)
    return arrays


def load() -> dict[str, np.ndarray]:
    with np.load(PATH, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


if __name__ == "__main__":
    np.savez_compressed(PATH, **generate())
    print(f"wrote {PATH} ({PATH.stat().st_size / 1e6:.2f} MB)")
