#!/usr/bin/env bash
# install.sh: on the device, join the parts in ~/stage, check them, install the wheels into ~/site,
# put corpora and bases into ~/.cache/kvmlx, and copy this tree to ~/snap (the CLI package under its
# installed name, kvmlx_cli). Run commands as: cd ~/snap && PYTHONPATH=~/site:~/snap python3 ...
set -euo pipefail
repo=$PWD
cd ~/stage
cat bundle.tar.part* >~/bundle.tar
(cd ~ && md5sum -c ~/stage/md5)
rm -rf ~/bundle && mkdir -p ~/bundle && tar -xf ~/bundle.tar -C ~/bundle && rm -f ~/stage/bundle.tar.part*
python3 -m pip install -q --no-index --no-deps --upgrade --target ~/site ~/bundle/wheels/*.whl
mkdir -p ~/.cache/kvmlx && cp -r ~/bundle/data/* ~/.cache/kvmlx/ 2>/dev/null || true
rm -rf ~/snap && mkdir -p ~/snap
cd "$repo" && cp -r kvspec kvtorch kvmlx benchmarks pyproject.toml ~/snap/ && cp -r cli ~/snap/kvmlx_cli
cd ~/snap && PYTHONPATH=~/site:~/snap python3 -c "
import importlib.metadata as m
for p in ('transformers', 'gguf', 'mlx', 'mlx-cuda-13', 'mlx-lm'):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, 'not installed')"
