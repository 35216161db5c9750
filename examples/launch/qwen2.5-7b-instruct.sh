#!/usr/bin/env bash
# CROPI on Qwen2.5-7B-Instruct: launch.sh with examples/configs/qwen2.5-7b-instruct_${NNODES}node.yaml
# (NNODES = 1, 2 or 4; CONFIG=... picks another file). Every other variable: see launch.sh.
#
#   DATA_DIR=/data MODEL_DIR=/models/Qwen2.5-7B-Instruct examples/launch/qwen2.5-7b-instruct.sh
#   DRY_RUN=1 NNODES=2 DATA_DIR=... MODEL_DIR=... examples/launch/qwen2.5-7b-instruct.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export NNODES=${NNODES:-1}
config=${CONFIG:-$here/../configs/qwen2.5-7b-instruct_${NNODES}node.yaml}
if [[ ! -f $config ]]; then
    echo "no example config for NNODES=$NNODES: $config (examples exist for 1, 2 or 4 nodes)" >&2
    exit 64
fi
exec bash "$here/launch.sh" "$config" "$@"
