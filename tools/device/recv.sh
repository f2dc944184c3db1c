#!/usr/bin/env bash
# recv.sh PART_DIR: keep one carried part on the device (~/stage) until install.sh joins them.
# Parts survive only while the machine stays warm (30 s after a call returns): send them back to back.
set -euo pipefail
mkdir -p ~/stage && cp "$1"/* ~/stage/ && ls ~/stage
