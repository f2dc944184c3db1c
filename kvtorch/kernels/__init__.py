"""Triton kernels behind the kvtorch dispatchers."""
