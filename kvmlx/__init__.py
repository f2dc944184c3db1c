"""kvmlx: kvspec caches for mlx-lm models on MLX (Metal and CUDA kernels)."""
