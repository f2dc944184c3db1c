"""`load_model`: kvspec aliases, Hugging Face hub ids, local mlx-lm directories and GGUF files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from kvspec.models import ModelNotAvailable, check_hub_reachable, resolve_alias


def load_model(name_or_path: str, dtype: mx.Dtype | None = None) -> tuple[Any, Any]:
    """(mlx-lm model, TokenizerWrapper) for an alias (kvspec.models), a .gguf file, a local mlx-lm
    or Hugging Face directory, or a hub id. dtype applies to GGUF weights (kvmlx.gguf.default_dtype());
    mlx-lm checkpoints keep the dtype they were saved in."""
    alias = resolve_alias(name_or_path)
    if alias is not None:
        if not alias.gguf_parts:
            return _mlx_lm_load(alias.hub_id)
        try:
            path = alias.gguf_path()
        except ModelNotAvailable as missing:
            if alias.hub_id is None:
                raise
            try:
                return _mlx_lm_load(alias.hub_id)
            except Exception as e:  # offline or not on the hub: the install hint is the useful answer
                raise ModelNotAvailable(f"{missing}; loading {alias.hub_id} from the hub failed too ({e})") from None
        return _gguf(path, dtype)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf (or give an mlx-lm / Hugging Face directory)")
        return _gguf(path, dtype)
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"{path} holds neither config.json nor exactly one .gguf file")
        return _gguf(ggufs[0], dtype)
    return _mlx_lm_load(str(path) if path.is_dir() else name_or_path)


def _gguf(path: Path, dtype: mx.Dtype | None) -> tuple[Any, Any]:
    from .gguf import load_gguf

    return load_gguf(path, dtype)


def _mlx_lm_load(path_or_repo: str) -> tuple[Any, Any]:
    from mlx_lm import load

    if not Path(path_or_repo).exists():
        check_hub_reachable(path_or_repo)
    model, tokenizer = load(path_or_repo)
    return model, tokenizer
