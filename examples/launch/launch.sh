#!/usr/bin/env bash
# Launch a cropi command under torchrun on one or several GPU nodes (run it on every node with that
# node's NODE_RANK; the rendezvous is MASTER_ADDR:MASTER_PORT on node 0).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#   DATA_DIR=/data MODEL_DIR=/models/Qwen2.5-7B-Instruct \
#     examples/launch/launch.sh examples/configs/qwen2.5-7b-instruct_2node.yaml [extra cropi arguments]
#
#   DRY_RUN=1 ... examples/launch/launch.sh CONFIG [key.path=value ...]
#       `cropi run --dry-run` for the world size this launch would have (NNODES × NPROC_PER_NODE):
#       config, layout, paths and the per-GPU memory estimate (vLLM's share included); no GPU, no
#       torchrun. Overrides (`key.path=value`) apply to it as to the launch.
#
# Environment (default):
#   NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), NPROC_PER_NODE (8)
#   CROPI_COMMAND (run; or train, score, rollout; or serve-scoring: the scoring job of a run with
#             curriculum.background_scorer external, launched on nodes of its own with the run's config
#             and PREFLIGHT=0, since the preflight checks a training launch)   PYTHON (python)   DRY_RUN (0)
#   PREFLIGHT (1: run the dry run before torchrun, for every CROPI_COMMAND and with the launch's
#             overrides, so a bad config fails before the GPUs are taken; 0: skip it)
#   GPU_MEMORY_GIB (80: the memory budget of the dry run)
# The config's own references (DATA_DIR, MODEL_DIR, OUTPUT_DIR) are read from the environment too.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: [NNODES=N NODE_RANK=R MASTER_ADDR=A ...] $0 CONFIG.yaml [cropi arguments]" >&2
    exit 64
fi
config=$1
shift

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
CROPI_COMMAND=${CROPI_COMMAND:-run}
PYTHON=${PYTHON:-python}
GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-80}
world_size=$((NNODES * NPROC_PER_NODE))

# The dry run sees what the launch will run: for `run` every extra argument (overrides, --new-run),
# for the other commands the overrides (key.path=value) among them (their own flags are not run's).
preflight_extra=()
for arg in "$@"; do
    if [[ $CROPI_COMMAND == run || ($arg != -* && $arg == *=*) ]]; then
        preflight_extra+=("$arg")
    fi
done
dry_run_args=(
    run --dry-run "$config"
    --world-size "$world_size"
    --gpus-per-node "$NPROC_PER_NODE"
    --gpu-memory-gib "$GPU_MEMORY_GIB"
    ${preflight_extra[@]+"${preflight_extra[@]}"}
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
    exec "$PYTHON" -m megatron_cropi.cli "${dry_run_args[@]}"
fi
if [[ ${PREFLIGHT:-1} == 1 ]]; then
    echo "[launch] preflight: cropi ${dry_run_args[*]}" >&2
    "$PYTHON" -m megatron_cropi.cli "${dry_run_args[@]}" > /dev/null
fi

torchrun_args=(
    --nnodes "$NNODES"
    --node-rank "$NODE_RANK"
    --nproc-per-node "$NPROC_PER_NODE"
    --master-addr "$MASTER_ADDR"
    --master-port "$MASTER_PORT"
)
cropi_args=("$CROPI_COMMAND" "$config" "$@")

# Megatron's TP communication/compute overlap needs one CUDA connection per device.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# One OpenMP thread per rank unless told otherwise (the CPU side of 8 ranks shares the node).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "[launch] node $NODE_RANK/$NNODES, $NPROC_PER_NODE ranks per node (world $world_size): cropi ${cropi_args[*]}" >&2
exec "$PYTHON" -m torch.distributed.run "${torchrun_args[@]}" -m megatron_cropi.cli "${cropi_args[@]}"
