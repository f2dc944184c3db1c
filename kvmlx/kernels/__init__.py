"""MLX custom kernels behind the kvmlx dispatchers: one body per op (bodies.py) emitted in the Metal and
CUDA dialects (dialect.py), launched through mx.fast (launch.py), self-checked on first use (selfcheck.py):
quantize (store appends) and decode attention (attention.py; rank space for low-rank tensors), whose
fast splits run on matrix units in the CUDA dialect (tensorcore.py)."""
