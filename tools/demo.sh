#!/usr/bin/env bash
# `make demo`: make the synthetic COCO dataset (once), train each demo config from
# scratch with tools/train.py, evaluate it with tools/test.py, measure the activation
# memory each saves for backward, and print one summary table. The console shows progress
# and results; every tool's full output is in a log file under work_dirs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA=data/synthetic_coco
WORK=work_dirs/demo
# The configs to train and compare, each with the benchmark_sbp.py variant that measures
# its memory: the dense baseline and the same detector with SBP (keep ratio 0.5).
CONFIGS=(configs/synthetic/faster-rcnn_r18_fpn_synthetic.py
         configs/synthetic/faster-rcnn_r18_fpn_sbp_synthetic.py)
VARIANTS=(dense sbp@0.5)
# the committed multi-seed study of these two settings and their names there (the SBP config's
# default neck is the study's :neck=lateral): the summary quotes its seed spread
STUDY=(docs/results/accuracy_neck_convs_synthetic/accuracy.json dense sbp@0.5:neck=lateral)

# run LOG CMD...: CMD's output goes to LOG; training progress lines are shown shortened.
# On failure, the end of LOG is shown.
run() {
    local log=$1
    shift
    mkdir -p "$(dirname "$log")"
    : > "$log"
    if ! "$@" > "$log" 2>&1; then
        echo "failed: $*"
        echo "--- last lines of $log:"
        tail -n 25 "$log"
        exit 1
    fi &
    local pid=$!
    tail -n +1 -F --pid="$pid" "$log" 2>/dev/null | sed -n -u -E \
        's/.*(Iter\(train\) *\[ *[0-9]+\/[0-9]+\]).*(eta: [^ ]+).*  loss: ([0-9.]+).*/  \1  \2  loss: \3/p' || true
    wait "$pid"
}

mkdir -p "$WORK"
if [ ! -f "$DATA/annotations/instances_val2017.json" ]; then
    echo "making the synthetic dataset in $DATA (log: $WORK/make_synthetic_coco.log)"
    run "$WORK/make_synthetic_coco.log" "$PYTHON" tools/make_synthetic_coco.py "$DATA" \
        --num-train 1000 --num-val 200 --seed 0
fi

runs=()
for i in "${!CONFIGS[@]}"; do
    config=${CONFIGS[$i]}
    name=$(basename "$config" .py)
    echo "training $name (log: $WORK/$name/train.log)"
    start=$SECONDS
    run "$WORK/$name/train.log" "$PYTHON" tools/train.py "$config" --work-dir "$WORK/$name"
    train_s=$((SECONDS - start))
    echo "evaluating $name (log: $WORK/$name/test.log)"
    run "$WORK/$name/test.log" "$PYTHON" tools/test.py "$config" \
        "$(cat "$WORK/$name/last_checkpoint")" --work-dir "$WORK/$name/test"
    metrics=$(ls -t "$WORK/$name"/test/*/*.json | head -n 1)
    runs+=(--run "$name" "${VARIANTS[$i]}" "$train_s" "$metrics")
done

echo "measuring the activation memory saved for backward (log: $WORK/memory/benchmark.log)"
run "$WORK/memory/benchmark.log" "$PYTHON" tools/analysis_tools/benchmark_sbp.py \
    configs/synthetic/faster-rcnn_r18_fpn_sbp_synthetic.py --size 256 256 --batch-size 4 \
    --steps 0 --variants "${VARIANTS[@]}" --no-plot --out-dir "$WORK/memory"

echo
echo "Demo results: COCO bbox metrics on $DATA/val2017, training wall time on this machine,"
echo "bytes saved for backward in one training forward (batch 4 x 256x256):"
"$PYTHON" tools/demo_summary.py --memory "$WORK/memory/results.json" "${runs[@]}" \
    --study "${STUDY[@]}"
echo "(whole demo: $((SECONDS / 60)) min $((SECONDS % 60)) s; logs and checkpoints in $WORK/)"
