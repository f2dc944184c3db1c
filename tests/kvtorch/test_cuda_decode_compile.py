"""decode_quant.cu compiles, without a GPU, as kvtorch.kernels.cuda_decode builds it on one: NVRTC from
the nvidia-cuda-nvrtc wheel (the test extra) for sm_80 and sm_90, then the cubin's resource use read by
Triton's bundled cuobjdump. A source error, a register budget blown past __launch_bounds__ (spills) or a
static shared-memory array that outgrows the 48 KB without opt-in shows here, not first on a GPU."""

import os
import re
import subprocess

import pytest
import torch

# As in every kvtorch test module: on a CPU, triton must be imported with the interpreter on, or a
# later module's interpreted kernels fail in this worker (kvtorch.kernels imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvtorch.kernels import cuda_decode  # noqa: E402

from .helpers import cuobjdump_tool, nvrtc_library  # noqa: E402


@pytest.mark.parametrize("bits,d", sorted(cuda_decode.BUILDS))
@pytest.mark.parametrize("arch", ["80", "90"])
def test_compiles_within_its_register_budget(tmp_path, arch, bits, d):
    """Every build of BUILDS; its static_assert also checks the tile against cuda_decode.tile_bytes."""
    cubin = cuda_decode.nvrtc_cubin(cuda_decode.SOURCE.read_text(), arch, cuda_decode.build_defines(bits, d),
                                    lib=nvrtc_library())
    path = tmp_path / "decode_quant.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([str(cuobjdump_tool()), "-res-usage", str(path)], capture_output=True, text=True,
                         check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    assert "decode_quant_split" in out, out
    # __launch_bounds__(128, blocks per SM): 65,536 registers over that many blocks of 128 threads (at most 255)
    assert 0 < int(usage["REG"]) <= min(255, 65536 // (128 * cuda_decode.BUILDS[bits, d].blocks_per_sm)), out
    assert int(usage["STACK"]) == 0 and int(usage["LOCAL"]) == 0, f"spills: {out}"
    assert int(usage["SHARED"]) < 48 * 1024, out  # the ring is dynamic shared memory; the rest static


def test_the_source_names_what_the_launcher_passes():
    """The launcher's mirror of the kernel's layout (one tile of the ring: K and V code rows of 16 keys,
    padded, then 4 x 16 x d / 64 fp16 of scales and biases) and the defines it sets."""
    src = cuda_decode.SOURCE.read_text()
    tiles = {(4, 128): 16 * (64 + 80) + 256, (8, 128): 16 * (144 + 144) + 256, (4, 64): 16 * (32 + 48) + 128,
             (8, 64): 16 * (64 + 80) + 128}
    assert {key: cuda_decode.tile_bytes(*key) for key in tiles} == tiles
    for name in ("#define WARPS 4", "#ifndef BITS", "#ifndef HEAD_DIM", "#ifndef TILES", "#ifndef STAGES",
                 "#ifndef MIN_BLOCKS", "static_assert(TILE_BYTES == EXPECT_TILE_BYTES", "extern \"C\" __global__"):
        assert name in src, name
