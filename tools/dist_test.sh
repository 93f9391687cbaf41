#!/usr/bin/env bash
# Evaluate CHECKPOINT on GPUS processes of this node (NNODES nodes in all).
# Usage: bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py options...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on every node;
# PYTHON picks the interpreter (default: the repository's .venv/bin/python that `make env`
# builds, else python3 on PATH).
set -euo pipefail

CONFIG=$1
CHECKPOINT=$2
GPUS=$3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}

TOOLS=$(dirname "$0")
VENV_PYTHON="$TOOLS/../.venv/bin/python"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$VENV_PYTHON" ]; then PYTHON=$VENV_PYTHON; else PYTHON=python3; fi
fi
PYTHONPATH="$TOOLS/..:${PYTHONPATH:-}" exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$TOOLS/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
