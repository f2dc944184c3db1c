"""kvspec: the shared KV-cache compression spec and its NumPy reference (imports neither torch nor mlx)."""

from .grammar import EXAMPLES, format, parse
from .spec import Float, KVSpec, LowRank, Quant, SpecError, TensorSpec

__all__ = ["EXAMPLES", "Float", "KVSpec", "LowRank", "Quant", "SpecError", "TensorSpec", "format", "parse"]
