#!/usr/bin/env bash
# poll.sh SECONDS [LOG...]: wait (keeping the machine held: it is given back 30 s after a call
# returns, with everything running and staged on it), then print the tail of each log and the GPU's
# load, and copy ~/results/*.{json,md,png} into $OUT (at most 8 files come back per call).
sleep "$1"; shift
for f in "$@"; do echo "== $f"; tail -c 600 "$f" | tr '\r' '\n' | tail -n 4; done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
mkdir -p "$OUT" && cp ~/results/*.json ~/results/*.md ~/results/*.png "$OUT"/ 2>/dev/null; ls "$OUT"
