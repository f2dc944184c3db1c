"""The read floor of decode attention: how fast any kernel could read a method's bytes under the
decode bench's timing, and how far each method and torch SDPA bf16 sit above it.

For each shape (Mistral-7B heads by default) and method, the bytes `bench_decode_attention` counts
for it are read once, 16 B a load, by a streaming kernel that does nothing else (`READ_SOURCE`: a
grid-stride or a per-block chunk, 256 or 1,024 threads, 1-8 blocks per multiprocessor, 4 or 8 loads in
flight per thread; the best of these per size), timed exactly as the methods are (medians of
CUDA-graph replays after warm-up, L2 cleared before each). "floor x" is SDPA bf16's time over the
floor of a method's bytes: the speedup a method reading only its bytes, at the best read rate and with
no other cost, would show in that run. L2 is cleared by zeroing 256 MB (the decode bench's way, which
leaves dirty lines whose write-back lands in the timed call) and, with `--clear read` too, by reading
them (clean lines).

    python benchmarks/read_floor.py
    python benchmarks/read_floor.py --shapes 8,32768 8,131072 --clear zero read

Writes benchmarks/results/read_floor_<gpu>.json (and into $OUT when set).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode_attention as bda  # noqa: E402

from kvtorch.kernels.cuda_decode import nvrtc_cubin  # noqa: E402

READ_SOURCE = r"""
// Reads words [lo, hi) of src once each, UNROLL loads in flight per thread, and stores only if their
// XOR hits one 32-bit value (so the loads stay; random data all but never hits it).
// (n and chunk are ints: torch's launcher passes Python ints as 32-bit.)
extern "C" __global__ void read_stream(const uint4* __restrict__ src, int n, int chunk, unsigned* sink) {
#if CHUNKED
    const long long lo = (long long)blockIdx.x * chunk + threadIdx.x, step = blockDim.x;
    const long long hi = (long long)(blockIdx.x + 1) * chunk < n ? (long long)(blockIdx.x + 1) * chunk : n;
#else
    const long long lo = (long long)blockIdx.x * blockDim.x + threadIdx.x, step = (long long)gridDim.x * blockDim.x;
    const long long hi = n;
#endif
    unsigned acc = 0;
    long long i = lo;
    for (; i + (UNROLL - 1) * step < hi; i += UNROLL * step) {
        uint4 w[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) w[u] = __ldg(src + i + u * step);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) acc ^= w[u].x ^ w[u].y ^ w[u].z ^ w[u].w;
    }
    for (; i < hi; i += step) {
        const uint4 w = __ldg(src + i);
        acc ^= w.x ^ w.y ^ w.z ^ w.w;
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;
}
"""
# (chunked, threads, blocks per multiprocessor, loads in flight per thread)
CONFIGS = [(chunked, threads, per_sm, unroll) for chunked in (False, True) for threads, per_sms in
           ((256, (1, 2, 4, 8)), (1024, (1, 2))) for per_sm in per_sms for unroll in (4, 8)]
METHODS = ("sdpa-bf16", "int4", "int8", "rank32")
MAX_REL_ERR = 2e-2  # relative L2 error vs the reference


def read_defines(chunked: bool, unroll: int) -> tuple[str, ...]:
    return f"-DCHUNKED={int(chunked)}", f"-DUNROLL={unroll}"


@functools.cache
def read_kernel(chunked: bool, unroll: int):
    from torch.cuda._utils import _cuda_load_module

    major, minor = torch.cuda.get_device_capability()
    cubin = nvrtc_cubin(READ_SOURCE, f"{major}{minor}", read_defines(chunked, unroll))
    return _cuda_load_module(cubin, ["read_stream"])["read_stream"]


def read_call(src: torch.Tensor, nbytes: int, config, sink: torch.Tensor):
    """A call reading the first `nbytes` of `src` (rounded down to 16 B) with `config`."""
    chunked, threads, per_sm, unroll = config
    blocks = per_sm * torch.cuda.get_device_properties().multi_processor_count
    words = nbytes // 16
    chunk = -(-words // blocks)
    kernel = read_kernel(chunked, unroll)
    return lambda: kernel(grid=(blocks, 1, 1), block=(threads, 1, 1), args=[src, words, chunk, sink])


def floor_ms(src, nbytes: int, clear, reps: int, sink) -> tuple[float, tuple]:
    """The best time over CONFIGS of reading `nbytes`, and the config that took it."""
    return min((bda.timed(read_call(src, nbytes, c, sink), None, reps, clear=clear), c) for c in CONFIGS)


def method_calls(b: int, t: int, heads):
    """{method: (call, bytes)} at one shape, each compressed method checked against the reference,
    with bytes counted as bench_decode_attention.run_shape counts them."""
    hq, hkv, d = heads
    q, qpos, gen, k, v = bda.decode_inputs(b, t, heads)
    calls = {"sdpa-bf16": (lambda: bda.F.scaled_dot_product_attention(q, k, v, scale=d**-0.5, enable_gqa=True),
                           2 * bda.nbytes(q) + bda.nbytes(k, v))}
    for method in METHODS[1:]:
        kp, vp = (bda.compressed_part(method, b, hkv, t, d, gen) for _ in range(2))
        call = functools.partial(bda.attend, q, qpos, kp, vp, scale=d**-0.5)
        ref = bda.attention_reference(q, qpos, kp, vp, scale=d**-0.5)
        err = ((call().float() - ref.float()).norm() / ref.float().norm()).item()
        if err > MAX_REL_ERR:
            raise SystemExit(f"{method} at b{b} x {t}: relative error {err:.2e} vs the reference")
        calls[method] = (call, bda.nbytes(q) + bda.part_bytes(kp) + bda.part_bytes(vp) + b * hq * d * 4)
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", default="32,8,128", help="QUERY_HEADS,KV_HEADS,HEAD_DIM (default Mistral-7B)")
    ap.add_argument("--shapes", nargs="+", default=["8,32768", "8,131072", "1,32768", "32,32768"],
                    help="BATCH,CONTEXT")
    ap.add_argument("--clear", nargs="+", default=["zero", "read"], choices=["zero", "read"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("read_floor needs a CUDA GPU")
    heads = tuple(int(x) for x in args.heads.split(","))
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    clears = {"zero": flush.zero_, "read": read_call(flush, flush.numel(), (False, 256, 8, 8), sink)}
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: heads {heads}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = []
    for shape in args.shapes:
        b, t = (int(x) for x in shape.split(","))
        calls = method_calls(b, t, heads)
        src = torch.randint(-2**31, 2**31 - 1, (max(n for _, n in calls.values()) // 4 + 4,), dtype=torch.int32,
                            device="cuda")
        for clear in args.clear:
            sdpa = bda.timed(calls["sdpa-bf16"][0], None, args.reps, clear=clears[clear])
            for method, (call, nbytes) in calls.items():
                ms = sdpa if method == "sdpa-bf16" else bda.timed(call, None, args.reps, clear=clears[clear])
                floor, config = floor_ms(src, nbytes, clears[clear], args.reps, sink)
                rows.append(dict(batch=b, context=t, clear=clear, method=method, bytes=nbytes, ms=ms, sdpa_ms=sdpa,
                                 floor_ms=floor, floor_config=list(config), floor_tbps=nbytes / floor / 1e9))
                print(f"b{b:<3d} x {t:<7d} clear {clear:4s} {method:9s} {nbytes / 1e6:8.1f} MB  {ms:.4f} ms "
                      f"(x{sdpa / ms:.2f} SDPA)  floor {floor:.4f} ms at {nbytes / floor / 1e9:.2f} TB/s "
                      f"(x{sdpa / floor:.2f} SDPA; method at {100 * floor / ms:.0f}% of it)  {config}", flush=True)
        del calls, src
        torch.cuda.empty_cache()
    record = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv),
                  heads=list(heads), configs=[list(c) for c in CONFIGS], rows=rows)
    bda.write_results("read_floor", record, args.out)


if __name__ == "__main__":
    main()
