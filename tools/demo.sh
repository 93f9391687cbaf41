#!/usr/bin/env bash
# `make demo`: make the synthetic COCO dataset (once), train each demo config from
# scratch with tools/train.py, evaluate it with tools/test.py, print COCO bbox metrics.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA=data/synthetic_coco
WORK=work_dirs/demo
# The configs to train and compare: the dense baseline and the same detector with SBP
# (keep ratio 0.5); the summary below prints one row per config.
CONFIGS=(configs/synthetic/faster-rcnn_r18_fpn_synthetic.py
         configs/synthetic/faster-rcnn_r18_fpn_sbp_synthetic.py)

if [ ! -f "$DATA/annotations/instances_val2017.json" ]; then
    "$PYTHON" tools/make_synthetic_coco.py "$DATA" --num-train 1000 --num-val 200 --seed 0
fi

summary=()
for config in "${CONFIGS[@]}"; do
    name=$(basename "$config" .py)
    start=$SECONDS
    "$PYTHON" tools/train.py "$config" --work-dir "$WORK/$name"
    train_s=$((SECONDS - start))
    "$PYTHON" tools/test.py "$config" "$(cat "$WORK/$name/last_checkpoint")" \
        --work-dir "$WORK/$name/test"
    metrics=$(ls -t "$WORK/$name"/test/*/*.json | head -n 1)
    summary+=("$("$PYTHON" - "$metrics" "$name" "$train_s" <<'PY'
import json, sys
metrics, name, train_s = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
print(f"{name:40s} {train_s // 60:3d} min {train_s % 60:02d} s  "
      + '  '.join(f"{key}={metrics[f'coco/bbox_{key}']:.3f}" for key in ('mAP', 'mAP_50', 'mAP_75')))
PY
)")
done

echo
echo "Demo results (bbox on $DATA/val2017, training wall time on this machine):"
printf '  %s\n' "${summary[@]}"

echo
echo "Activation memory saved for backward, dense vs SBP (demo model, batch 4 x 256x256):"
"$PYTHON" tools/analysis_tools/benchmark_sbp.py configs/synthetic/faster-rcnn_r18_fpn_sbp_synthetic.py \
    --size 256 256 --batch-size 4 --steps 0 --variants dense sbp@0.5 sbp@0.25 \
    --out-dir "$WORK/memory" 2>/dev/null | grep '^|'
