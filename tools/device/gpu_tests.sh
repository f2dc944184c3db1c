#!/usr/bin/env bash
# gpu_tests.sh: on the lent GPU, every kvtorch test that needs CUDA (the ones CI skips), one file at a
# time with -s (a C++ abort prints there, not in pytest's capture), in one process (-o addopts= drops
# pyproject's pytest-xdist options: the lent machine has no xdist), and a one-line tally per file.
# About 6 minutes on an H200. Run from the repo root: `bash tools/device/gpu_tests.sh` (no carry needed;
# with a bundle installed, PYTHONPATH=~/site:. also runs the GGUF tests).
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-.}
nvidia-smi --query-gpu=name --format=csv,noheader
status=0
for target in "tests/kvtorch/test_cuda_decode.py" "tests/kvtorch/test_kernels_attention.py -k gpu" "tests/kvtorch/test_dequant_ptx.py" "tests/kvtorch/test_kernels_quantize.py" \
              "tests/kvtorch/test_graphs.py -k gpu" "tests/kvtorch/test_runner.py" "tests/kvtorch/test_device_map.py"; do
  echo "== $target"
  # shellcheck disable=SC2086 - the -k argument travels inside the target string
  timeout 300 python3 -m pytest -o addopts= -q -x -s -p no:cacheprovider -rs $target 2>&1 | grep -v -i warn | tail -4 || status=1
done
exit $status
