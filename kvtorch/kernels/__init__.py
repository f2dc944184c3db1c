"""Triton kernels behind the kvtorch dispatchers.

Importing this package registers the compressed-attention kernel with kvtorch.attention (which
imports it on its first CUDA call). The registered entry serves CUDA tensors only: on CPU the
dispatcher keeps its torch reference even under TRITON_INTERPRET=1, which the kernels' own tests
use to run them in Triton's interpreter.
"""

from __future__ import annotations

from ..attention import register_kernel
from .attention import attention_kernel


def _cuda_attention(q, q_pos, k, v, **options):
    """attention_kernel for CUDA queries; None (refusal) elsewhere."""
    return attention_kernel(q, q_pos, k, v, **options) if q.is_cuda else None


register_kernel(_cuda_attention)
