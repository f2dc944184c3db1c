"""MLX custom kernels (one body, Metal and CUDA dialects) behind the kvmlx dispatchers."""
