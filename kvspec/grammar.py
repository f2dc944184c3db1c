"""The one spec-string grammar shared by the CLI, the Python API and cache-file metadata.

    spec   := head ( "-" option )*
    head   := "fp16" | "bf16"                  uncompressed baseline
            | "int" B                          K and V quantized to B bits (B in 2, 3, 4, 8)
            | "rank" R                         K and V projected to rank R
            | "k" part "v" part                K and V apart; part := B | 16 | "int" B | "rank" R
    option := [ "k" | "v" ] field              a k/v prefix applies the field to one tensor only
    field  := "g" N                            group size 32, 64 (default) or 128
            | "tok" | "chan"                   group along the head dim (default) or along tokens (KIVI)
            | "rot" [ SEED ]                   randomized Hadamard rotation of the head dim (seed 0)
            | "q" B                            quantize rank coefficients to B bits (hybrid)
            | "pca" | "random" | "identity" | "hadamard"   low-rank basis (default pca)
            | "res" R                          keep the last R tokens in float (no prefix)
            | "fp16" | "bf16"                  dtype of everything kept in float (no prefix)

A field without a prefix applies to every tensor it fits. `format` writes the canonical string
(defaults left out), and `parse(format(s)) == s` for every spec.
"""

from __future__ import annotations

import re
from dataclasses import replace

from .spec import (
    DEFAULT_GROUP,
    DEFAULT_ROTATION_SEED,
    GROUP_SIZES,
    QUANT_BITS,
    Float,
    KVSpec,
    LowRank,
    Quant,
    SpecError,
    TensorSpec,
)

EXAMPLES = (
    "fp16",
    "int8",
    "int4",
    "int4-g32",
    "k8v4",
    "int4-kchan-res128",
    "int2-g32-kchan-res128",
    "int4-rot",
    "rank32",
    "krank48vrank16",
    "rank32-q4",
    "rank32-random",
)
_VALID = "valid forms: " + ", ".join(EXAMPLES) + " (see `kvmlx spec list`)"

_HINTS = {
    "g": "a group size applies to int tensors and hybrid coefficients (e.g. int4-g32, rank32-q4-g32)",
    "axis": "tok/chan apply to int tensors (e.g. int4-kchan)",
    "rot": "rot applies to int tensors (e.g. int4-rot)",
    "q": "q<bits> applies to rank tensors (e.g. rank32-q4)",
    "basis": "a basis applies to rank tensors (e.g. rank32-random)",
}

_PART = re.compile(r"^(?:int(\d+)|rank(\d+)|(\d+))$")
_FIELD = re.compile(r"^(k|v)?(g\d+|tok|chan|rot\d*|q\d+|pca|random|identity|hadamard)$")
_GLOBAL = re.compile(r"^(res\d+|fp16|bf16)$")


def _error(text: str, problem: str) -> SpecError:
    return SpecError(f"bad KV spec {text!r}: {problem}; {_VALID}")


def _parse_part(text: str, part: str) -> TensorSpec:
    m = _PART.match(part)
    if not m:
        raise _error(text, f"{part!r} is not a tensor method (use a bit width like 4, int4, or rank32)")
    int_bits, rank, bare = m.groups()
    if rank is not None:
        if int(rank) < 1:
            raise _error(text, f"rank must be positive, got {rank}")
        return LowRank(rank=int(rank))
    bits = int(int_bits if int_bits is not None else bare)
    if bits == 16 and bare is not None:
        return Float()
    if bits not in QUANT_BITS:
        raise _error(text, f"{bits} bits is not supported (use {', '.join(map(str, QUANT_BITS))}, or 16 for float)")
    return Quant(bits=bits)


def _parse_head(text: str, head: str) -> tuple[TensorSpec, TensorSpec, str | None]:
    if head in ("fp16", "bf16"):
        return Float(), Float(), head
    if head.startswith("k") and "v" in head:
        k_part, v_part = head[1:].split("v", 1)
        return _parse_part(text, k_part), _parse_part(text, v_part), None
    if head.startswith(("int", "rank")):
        t = _parse_part(text, head)
        return t, t, None
    if re.fullmatch(r"[kv]\d+", head):
        raise _error(text, f"{head!r} names one tensor; give both, like k8v4")
    raise _error(text, f"unknown method {head!r}")


def _applies(field: str, t: TensorSpec, hybrid: bool) -> bool:
    if field in ("g",):
        return isinstance(t, Quant) or hybrid
    if field in ("axis", "rot"):
        return isinstance(t, Quant)
    if field in ("q", "basis"):
        return isinstance(t, LowRank)
    return False


def parse(text: str) -> KVSpec:
    """Parse a spec string; raise SpecError naming the problem and showing valid forms."""
    if not isinstance(text, str) or not text.strip():
        raise _error(str(text), "the spec is empty")
    head, *options = text.strip().lower().split("-")
    k, v, float_dtype = _parse_head(text, head)
    glob: dict[str, object] = {}
    # Per tensor: field name -> (value, given with a k/v prefix).
    fields: dict[str, dict[str, tuple[object, bool]]] = {"k": {}, "v": {}}
    for opt in options:
        if _GLOBAL.match(opt):
            key = "res" if opt.startswith("res") else "dtype"
            if key in glob:
                raise _error(text, f"{key!r} is given twice")
            if key == "dtype" and float_dtype is not None:
                raise _error(text, f"{opt!r} repeats the baseline dtype; write just {head!r} or {opt!r}")
            glob[key] = int(opt[3:]) if key == "res" else opt
            continue
        m = _FIELD.match(opt)
        if not m:
            hint = " (give a token count, like res128)" if opt == "res" else ""
            raise _error(text, f"unknown option {opt!r}{hint}")
        prefix, body = m.group(1) or "", m.group(2)
        name, value = _field_value(text, body)
        for who in [prefix] if prefix else ["k", "v"]:
            if name in fields[who]:
                raise _error(text, f"option {name!r} is given twice for {who.upper()}")
            fields[who][name] = (value, bool(prefix))
    k = _apply(text, "k", k, fields["k"])
    v = _apply(text, "v", v, fields["v"])
    _check_unprefixed_used(text, options, k, v)
    residual = int(glob.get("res", 0))  # type: ignore[call-overload]
    return KVSpec(k=k, v=v, residual=residual, float_dtype=float_dtype or glob.get("dtype", "fp16"))  # type: ignore[arg-type]


def _field_value(text: str, body: str) -> tuple[str, object]:
    if body.startswith("g"):
        g = int(body[1:])
        if g not in GROUP_SIZES:
            raise _error(text, f"group size {g} is not supported (use {', '.join(f'g{s}' for s in GROUP_SIZES)})")
        return "g", g
    if body in ("tok", "chan"):
        return "axis", "token" if body == "tok" else "channel"
    if body.startswith("rot"):
        return "rot", int(body[3:]) if body[3:] else DEFAULT_ROTATION_SEED
    if body.startswith("q"):
        b = int(body[1:])
        if b not in QUANT_BITS:
            raise _error(text, f"coefficient bits q{b} not supported (use {', '.join(f'q{x}' for x in QUANT_BITS)})")
        return "q", b
    return "basis", body


def _apply(text: str, who: str, t: TensorSpec, given: dict[str, tuple[object, bool]]) -> TensorSpec:
    """Apply parsed fields to one tensor; prefixed fields must fit it, unprefixed ones may skip it."""
    hybrid = isinstance(t, LowRank) and "q" in given
    f: dict[str, object] = {}
    for name, (value, prefixed) in given.items():
        if _applies(name, t, hybrid):
            f[name] = value
        elif prefixed:
            raise _error(text, f"a {who}-prefixed option does not apply to {who.upper()} ({_describe(t)}): {_HINTS[name]}")
    try:
        if isinstance(t, Quant):
            return Quant(
                bits=t.bits,
                group=int(f.get("g", DEFAULT_GROUP)),  # type: ignore[arg-type]
                axis=f.get("axis", "token"),  # type: ignore[arg-type]
                rotation=f.get("rot"),  # type: ignore[arg-type]
            )
        if isinstance(t, LowRank):
            coeff = None
            if hybrid:
                coeff = Quant(bits=int(f["q"]), group=int(f.get("g", t.rank)))  # type: ignore[arg-type]
            return replace(t, basis=f.get("basis", "pca"), coeff=coeff)  # type: ignore[arg-type]
    except SpecError as e:
        raise _error(text, str(e)) from None
    return t


def _check_unprefixed_used(text: str, options: list[str], k: TensorSpec, v: TensorSpec) -> None:
    for opt in options:
        m = _FIELD.match(opt)
        if m and not m.group(1):
            name = _field_value(text, m.group(2))[0]
            hybrid = [isinstance(t, LowRank) and t.coeff is not None for t in (k, v)]
            if not any(_applies(name, t, h) for t, h in zip((k, v), hybrid)):
                raise _error(text, f"option {opt!r} does not apply to {_describe(k)} / {_describe(v)}: {_HINTS[name]}")


def _describe(t: TensorSpec) -> str:
    if isinstance(t, Quant):
        return f"int{t.bits}"
    if isinstance(t, LowRank):
        return f"rank{t.rank}"
    return "float"


def _fields_of(t: TensorSpec) -> dict[str, str]:
    """Option strings for one tensor's non-default fields, keyed by field name."""
    out: dict[str, str] = {}
    q = t if isinstance(t, Quant) else (t.coeff if isinstance(t, LowRank) else None)
    if isinstance(t, LowRank):
        if t.coeff is not None:
            out["q"] = f"q{t.coeff.bits}"
        if t.basis != "pca":
            out["basis"] = t.basis
    if q is not None:
        default_group = t.rank if isinstance(t, LowRank) else DEFAULT_GROUP
        if q.group != default_group:
            out["g"] = f"g{q.group}"
        if q.axis != "token":
            out["axis"] = "chan"
        if q.rotation is not None:
            out["rot"] = "rot" if q.rotation == DEFAULT_ROTATION_SEED else f"rot{q.rotation}"
    return out


def _head_part(t: TensorSpec) -> str:
    if isinstance(t, Quant):
        return str(t.bits)
    if isinstance(t, LowRank):
        return f"rank{t.rank}"
    return "16"


def format(spec: KVSpec) -> str:  # noqa: A001 - the grammar's name for it
    """The canonical string of a spec (defaults left out)."""
    k, v = spec.k, spec.v
    if isinstance(k, Float) and isinstance(v, Float):
        head = spec.float_dtype
    elif _describe(k) == _describe(v):
        head = _describe(k)
    else:
        head = f"k{_head_part(k)}v{_head_part(v)}"
    parts = [head]
    kf, vf = _fields_of(k), _fields_of(v)
    for name in ("g", "axis", "rot", "q", "basis"):
        ka, va = kf.get(name), vf.get(name)
        k_fits = _applies(name, k, isinstance(k, LowRank) and k.coeff is not None)
        v_fits = _applies(name, v, isinstance(v, LowRank) and v.coeff is not None)
        # Unprefixed when both tensors that take the field agree (a missing value means the default).
        if k_fits and v_fits and ka == va and ka is not None:
            parts.append(ka)
        elif (k_fits != v_fits) and (ka or va):
            parts.append(ka or va)  # type: ignore[arg-type]
        else:
            parts += [f"k{ka}"] if ka else []
            parts += [f"v{va}"] if va else []
    if spec.residual:
        parts.append(f"res{spec.residual}")
    if spec.float_dtype != "fp16" and not spec.is_baseline:
        parts.append(spec.float_dtype)
    return "-".join(parts)
