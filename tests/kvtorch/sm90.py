"""Compile the Triton launches a CPU scenario makes as the H200 would compile them (sm_90), no GPU needed.

Some kernel paths exist only on a GPU (4-bit PTX dequantization; MM_F32 off), and a type mismatch
there aborts LLVM inside the process instead of raising: the H200 aborted a test decoding inside a
residual window, where nothing is compressed yet and the 4-bit PTX path was compiled for an int32
stand-in of the fp16 scales. This runs in two processes:

    python -m tests.kvtorch.sm90 capture SCENARIO OUT   (TRITON_INTERPRET=1: run it, record every launch)
    python -m tests.kvtorch.sm90 compile OUT            (no interpreter: triton.compile each for sm_90)

The compile step specializes arguments with Triton's own binder (integers equal to 1, multiples of
16, 16-byte aligned pointers), as a launch on the device does, and sets the constexprs the device
takes where the interpreter differs (PTX on for fp16 dots, MM_F32 off).
"""

from __future__ import annotations

import sys

import torch

# kernel module attribute -> module, for every Triton kernel kvtorch launches
KERNELS = {
    "_split_kernel": "kvtorch.kernels._attention_triton",
    "_reduce_kernel": "kvtorch.kernels._attention_triton",
    "_quantize_kernel": "kvtorch.kernels._quantize_triton",
}
B, HKV, REP, D = 2, 2, 3, 64


def _decode(text: str, prompt: int, steps: int, static: bool, chunk: int = 1) -> None:
    """Prefill `prompt` tokens, then `steps` appends of `chunk` tokens (static: one-token steps of a
    static store), each attended by the kernels."""
    import kvspec
    from kvtorch.kernels.attention import attention_kernel
    from kvtorch.store import LayerStore

    from .helpers import bases_for

    spec = kvspec.parse(text)
    bases = {w: torch.from_numpy(b) for w, b in bases_for(spec, D, HKV, 0).items()}
    layer = LayerStore(spec.k, spec.v, spec.residual, spec.float_dtype, bases, kernels=True)
    total = prompt + steps * chunk
    x = torch.randn(B, HKV, total, D)
    layer.append(x[:, :, :prompt], x[:, :, :prompt])
    if static:
        layer.make_static(total)
    for t in range(prompt, total, chunk):
        part = layer.append(x[:, :, t : t + chunk], x[:, :, t : t + chunk])
        attention_kernel(torch.randn(B, HKV * REP, chunk, D), part.q_pos, part.k, part.v, scale=D**-0.5)


SCENARIOS = {
    # decoding inside the residual window (nothing compressed yet), 4-bit PTX path
    "window-int4": lambda: _decode("int4-res8", 5, 2, static=False),
    # the same from a static store's ring, then past the window (rows leave the ring)
    "ring-int4": lambda: _decode("int4-res8", 5, 5, static=True),
    # channel-axis keys wait in the ring and leave as a group; bf16 values on fp16 dots
    "ring-kchan-bf16": lambda: _decode("int4-kchan-g32-res4-bf16", 34, 3, static=True),
    # chunked prefill, the first chunk inside the window, rotated 2-bit keys
    "chunks-int2-rot": lambda: _decode("int2-g32-krot-res4", 3, 2, static=False, chunk=7),
}


def capture(scenario: str, out: str) -> None:
    import importlib

    from kvtorch.kernels.offline import plain

    seen = []

    class Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((self.name, args, plain(kwargs)))
                return self.fn[grid](*args, **kwargs)
            return launch

    for name, module in KERNELS.items():
        mod = importlib.import_module(module)
        setattr(mod, name, Recorder(name, getattr(mod, name)))
    torch.manual_seed(0)
    SCENARIOS[scenario]()
    torch.save(seen, out)


def compile_all(path: str) -> list[str]:
    """triton.compile every distinct launch recorded in `path` for sm_90; one line per kernel."""
    import importlib

    import triton.language as tl

    from kvtorch.kernels.offline import compile_launch, restored, specialize

    done, lines = set(), []
    for name, args, kwargs in torch.load(path, weights_only=False):
        fn = getattr(importlib.import_module(KERNELS[name]), name)
        kw = restored(kwargs)
        if "MM_F32" in kw:  # what attend passes off the interpreter (its default ptx=True)
            kw["MM_F32"], kw["PTX"] = False, kw["DOT"] == tl.float16
        source, options = specialize(fn, args, kw)
        key = (name, repr(sorted(source.signature.items())), repr(sorted(source.constants.items())),
               repr(sorted(source.attrs.items())))
        if key in done:
            continue
        done.add(key)
        kernel = compile_launch(source, options)
        lines.append(f"{name}: {kernel.metadata.shared} B shared")
    return lines


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        capture(sys.argv[2], sys.argv[3])
    else:
        print("\n".join(compile_all(sys.argv[2])))
