#!/usr/bin/env bash
# One command on a CUDA machine, the whole frontier of docs/memory.md ("Every memory saver side
# by side"): dense; the exact savers (mmdet's with_cp, mmengine's efficient_conv_bn_eval and
# activation_checkpointing, torch's selective activation checkpointing: tokens ecbe, act_ckpt,
# sac); the SBP settings we ship (0.75 + recompute: the COCO configs; 0.5; 0.5 + cp: the lowmem
# config's backbone); and SBP 0.75 + recompute composed with each exact saver on its dense
# stage. In fp32 and in AMP (fp16 autocast), for Faster R-CNN and RetinaNet R50-FPN at
# 2 x 800x1344, random init, each variant in its own process: bytes saved for backward,
# torch.cuda.max_memory_allocated, the median step time of 10 steps after 3 warm-up steps,
# aten operators per step, ratios to dense of the same precision, and the mAP change of the
# accuracy study where one exists.
# Usage: bash tools/benchmark_gpu.sh [OUT_DIR]         (default outputs/benchmark_gpu)
#        DRY_RUN=1 bash tools/benchmark_gpu.sh [OUT_DIR]  the same on the CPU at toy size, 1 step
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-outputs/benchmark_gpu}
VARIANTS=(dense sbp@0.5 sbp@0.75+recompute with_cp sbp@0.5+cp amp sbp@0.5+amp sbp@0.75+recompute+amp
          with_cp+amp sbp@0.5+cp+amp
          ecbe act_ckpt sac sbp@0.75+recompute+ecbe sbp@0.75+recompute+act_ckpt
          sbp@0.75+recompute+sac ecbe+amp act_ckpt+amp sac+amp sbp@0.75+recompute+sac+amp)
ACCURACY=docs/results/accuracy_finetune_w16_synthetic/accuracy.json
CONFIGS=(configs/faster_rcnn_r50_sbp.py configs/retinanet_r50_sbp.py)

if [ "${DRY_RUN:-0}" = 1 ]; then
    ARGS=(--device cpu --size 64 96 --batch-size 1 --steps 1 --warmup 0 --no-plot)
else
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else
        "benchmark_gpu.sh: no CUDA device here; DRY_RUN=1 runs it on the CPU at toy size")'
    ARGS=(--device cuda --size 800 1344 --batch-size 2 --steps 10 --warmup 3)
fi

for config in "${CONFIGS[@]}"; do
    name=$(basename "$config" .py)
    echo "== $name: ${ARGS[*]}"
    "$PYTHON" tools/analysis_tools/benchmark_sbp.py "$config" "${ARGS[@]}" \
        --variants "${VARIANTS[@]}" --accuracy "$ACCURACY" --out-dir "$OUT/$name"
done
