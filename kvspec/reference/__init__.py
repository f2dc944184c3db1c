"""NumPy reference implementation of every kvspec method: the oracle the backends are tested against."""

from .attention import attend, attend_as_decoded, visible
from .floats import round_bf16, round_to
from .lowrank import make_basis, pca_basis, project, reconstruct
from .quant import NonFiniteError, Quantized, check_finite, dequantize, error_bound, pack, quantize, unpack
from .rotation import fwht, hadamard_signs, rotate, unrotate
from .store import Stored, compress, compressed_values, decompress

__all__ = [
    "NonFiniteError", "Quantized", "Stored", "attend", "attend_as_decoded", "check_finite", "compress",
    "compressed_values", "decompress", "dequantize", "error_bound", "fwht", "hadamard_signs", "make_basis",
    "pack", "pca_basis", "project", "quantize", "reconstruct", "rotate", "round_bf16", "round_to", "unpack",
    "unrotate", "visible",
]
