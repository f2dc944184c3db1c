"""One kernel launch described as data: run it through MLX, or print the translation unit MLX builds.

`Launch.run(dialect)` calls mx.fast.metal_kernel / cuda_kernel (one compiled object per body and
dialect). `Launch.translation_unit(dialect)` reproduces the source MLX generates around the body
(kvmlx/kernels/dialect.py cites the MLX files): tests compile the CUDA one with NVRTC where it is
installed, and the GPU benchmark writes it out when a kernel fails to compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import mlx.core as mx

from . import dialect as dialects

CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
              mx.uint32: "uint32_t", mx.int32: "int32_t"}
METAL_TYPES = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
               mx.uint32: "uint32_t", mx.int32: "int32_t"}
CUDA_PRELUDE = '#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
METAL_SMALL = 8  # MLX passes inputs of fewer elements in the `constant` address space


@dataclass
class Launch:
    """name/body: the kernel; inputs: name -> array (order = signature order); outputs: name ->
    (shape, dtype); template: (name, int | bool | Dtype) pairs; grid/threadgroup in threads."""

    name: str
    body: str
    inputs: dict[str, mx.array]
    outputs: dict[str, tuple[tuple[int, ...], mx.Dtype]]
    template: list[tuple[str, object]]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]

    def run(self, dialect: str) -> dict[str, mx.array]:
        kernel = _kernel(self.name, self.body, tuple(self.inputs), tuple(self.outputs), dialect)
        outs = kernel(inputs=list(self.inputs.values()), template=self.template, grid=self.grid,
                      threadgroup=self.threadgroup, output_shapes=[s for s, _ in self.outputs.values()],
                      output_dtypes=[d for _, d in self.outputs.values()])
        return dict(zip(self.outputs, outs))

    def translation_unit(self, dialect: str) -> str:
        """The source MLX compiles for this launch (see mlx/backend/{common/metal,cuda/custom}_kernel.cpp)."""
        header, source = dialects.render(self.body, dialect)
        return _cuda_unit(self, header, source) if dialect == "cuda" else _metal_unit(self, header, source)


@cache
def _kernel(name: str, body: str, inputs: tuple[str, ...], outputs: tuple[str, ...], dialect: str):
    return dialects.build(name, body, list(inputs), list(outputs), dialect)


def _uses(source: str, name: str, what: str) -> bool:
    return f"{name}_{what}" in source


def _cuda_unit(launch: Launch, header: str, source: str) -> str:
    lines = [CUDA_PRELUDE + header, "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n",
             f"__global__ void custom_kernel_{launch.name}("]
    params = []
    for name, arr in launch.inputs.items():
        params.append(f"    const {CUDA_TYPES[arr.dtype]}* {name}")
        if arr.ndim:
            params += [f"    const __grid_constant__ {kind} {name}_{what}"
                       for kind, what in (("Shape", "shape"), ("Strides", "strides"), ("int", "ndim"))
                       if _uses(source, name, what)]
    params += [f"    {CUDA_TYPES[dtype]}* {name}" for name, (_, dtype) in launch.outputs.items()]
    lines.append(",\n".join(params) + ") {")
    for name, value in launch.template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {name} = {value};")
        else:
            lines.append(f"  using {name} = {CUDA_TYPES[value]};")
    lines += ["", source, "}\n\n} // namespace mlx::core::cu\n"]
    return "\n".join(lines)


def _metal_unit(launch: Launch, header: str, source: str) -> str:
    kinds = {bool: "bool", int: "int"}
    tparams = ", ".join(f"{kinds.get(type(v), 'typename')} {n}" for n, v in launch.template)
    params, index = [], 0
    for name, arr in launch.inputs.items():
        space = "constant" if arr.size < METAL_SMALL else "device"
        params.append(f"  const {space} {METAL_TYPES[arr.dtype]}{'*' if arr.ndim else '&'} {name} [[buffer({index})]]")
        index += 1
        for kind, what in (("int*", "shape"), ("int64_t*", "strides"), ("int&", "ndim")):
            if arr.ndim and _uses(source, name, what):
                params.append(f"  const constant {kind} {name}_{what} [[buffer({index})]]")
                index += 1
    for name, (_, dtype) in launch.outputs.items():
        params.append(f"  device {METAL_TYPES[dtype]}* {name} [[buffer({index})]]")
        index += 1
    for attr, kind in (("thread_position_in_threadgroup", "uint3"), ("threadgroup_position_in_grid", "uint3")):
        if attr in source:
            params.append(f"  {kind} {attr} [[{attr}]]")
    template = f"template <{tparams}>\n" if tparams else ""
    return f"{header}{template}[[kernel]] void custom_kernel_{launch.name}(\n" + ",\n".join(params) + ") {\n" + source + "\n}\n"
