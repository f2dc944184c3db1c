"""kvtorch: kvspec caches for transformers models on PyTorch (Triton kernels on CUDA)."""
