#!/usr/bin/env bash
# start.sh NAME KVMLX_ARGS...: run `kvmlx KVMLX_ARGS...` from ~/snap detached (it outlives the call),
# logging to ~/results/NAME.log; write outputs under ~/results so poll.sh brings them back. E.g.
#   bash tools/device/start.sh gemma-bbc sweep --model gemma3-270m --data bbc --max-tokens 51200 \
#     --budgets 4.5 --device cuda --workers 4 --out ~/results/sweep-gemma3-270m-bbc-h200
# Several sweeps share the GPU best under MPS (`nvidia-cuda-mps-control -d` before the first), but a
# fault in one MPS client takes down the others.
set -euo pipefail
name=$1; shift
mkdir -p ~/results
cd ~/snap
PYTHONPATH=~/site:~/snap setsid nohup python3 -c "from kvmlx_cli.app import main; main()" "$@" \
  >~/results/"$name".log 2>&1 </dev/null &
echo "started $name (pid $!), log ~/results/$name.log"
