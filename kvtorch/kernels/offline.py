"""Compile a recorded Triton launch as a GPU would, on a machine without one (sm_90 by default).

A launch is recorded where it runs (CPU, under TRITON_INTERPRET=1) as (arguments, keyword
constexprs); `plain` makes the constexprs picklable. In a process without the interpreter,
`specialize` binds them with Triton's own binder, which specializes arguments as a launch on the
device does (integers equal to 1 or divisible by 16, 16-byte aligned pointers), and `compile_launch`
compiles that. Used by tests/kvtorch/sm90.py (every decode launch compiles for the H200) and
benchmarks/triton_smem.py (registers, shared memory and SASS of the split kernel).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

SM90 = GPUTarget("cuda", 90, 32)
_DTYPES = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}


def plain(kw: dict) -> dict:
    """Keyword constexprs with Triton dtypes as ("dtype", name), which torch.save keeps."""
    return {k: ("dtype", v.name) if isinstance(v, tl.dtype) else v for k, v in kw.items()}


def restored(kw: dict) -> dict:
    """The inverse of `plain`."""
    return {k: _DTYPES[v[1]] if isinstance(v, tuple) and v[:1] == ("dtype",) else v for k, v in kw.items()}


def specialize(fn, args: tuple, kw: dict, target: GPUTarget = SM90) -> tuple[ASTSource, object]:
    """(source, options) of the launch fn[grid](*args, **kw) as the device would compile it."""
    backend = make_backend(target)
    bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    return ASTSource(fn, signature, constexprs, attrs), options


def compile_launch(source: ASTSource, options, target: GPUTarget = SM90):
    """triton.compile of a `specialize`d launch for `target` (no GPU needed)."""
    return triton.compile(source, target=target, options=options.__dict__)
