"""What a cache needs to know about a transformers model: KV shape, sliding windows, fingerprint."""

from __future__ import annotations

from dataclasses import dataclass

from kvspec.budget import ModelShape
from kvspec.cachefile import config_fingerprint


@dataclass(frozen=True)
class ModelInfo:
    """model_type, KV shape, vocab size and per-layer sliding windows (None: full attention)."""

    model_type: str
    shape: ModelShape
    vocab_size: int
    windows: tuple[int | None, ...]

    @property
    def fingerprint(self) -> str:
        return config_fingerprint(self.model_type, self.shape, self.vocab_size, self.windows)


def text_config(config):
    """The decoder config of a (possibly multimodal) transformers config."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layer_windows(cfg) -> tuple[int | None, ...]:
    """Per-layer sliding windows, read as transformers' DynamicCache reads them (layer_types, else
    a global sliding_window); chunked attention is a different pattern and is refused."""
    layers = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * layers
    out: list[int | None] = []
    for i, kind in enumerate(types[:layers]):
        if kind == "sliding_attention":
            out.append(int(window))
        elif kind == "full_attention":
            out.append(None)
        else:
            raise ValueError(f"layer {i} has attention type {kind!r}; kvtorch supports full and sliding-window layers")
    return tuple(out)


def model_info(config) -> ModelInfo:
    """ModelInfo from a transformers config (or a model's .config)."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    windows = layer_windows(cfg)
    sliding = [w for w in windows if w is not None]
    if len(set(sliding)) > 1:
        raise ValueError(f"layers slide over different windows {sorted(set(sliding))}; kvspec shapes allow one")
    shape = ModelShape(
        layers=len(windows),
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        sliding_layers=len(sliding),
        sliding_window=sliding[0] if sliding else None,
    )
    return ModelInfo(cfg.model_type, shape, cfg.vocab_size, windows)
