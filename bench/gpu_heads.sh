#!/usr/bin/env bash
# Do the contour and marker heads earn their place with more training than 20 CPU-minutes give?
# Trains the CPU recipe (configs/cpu_recipe_v5.ini) as UNet (one head), CAUNet (+ contour) and
# CAMUNet (+ contour + marker) side by side on one GPU, BUDGET minutes each, then tunes the
# thresholds on the tune split (policy kept: watershed) and scores the validation split with
# bench/accuracy.py; one row per model in RESULTS.<model>.
#
#   bash bench/gpu_heads.sh DATA [RESULTS]        # DATA: a DSB2018-layout folder
#   BUDGET=0.3 WORKERS=0 PYTHON=.venv/bin/python bash bench/gpu_heads.sh sample/stage1_train  # a dry run
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/dsb2018/stage1_train}
RESULTS=${2:-out/bench/rows_gpu_heads.csv}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-2.5}
WORKERS=${WORKERS:-4}   # loader workers per run; three runs share the machine's cores
WORK=out/gpu_heads
mkdir -p "$WORK"
# the budget, not the epoch count, ends each run; validation only at its end
cat > "$WORK/gpu.ini" <<EOF
[train]
n_epoch = 1000
n_worker = $WORKERS
n_cv_epoch = 1000
n_ckpt_epoch = 1000
EOF
for model in unet caunet camunet; do
    extra=()
    [ "$model" = unet ] || extra=(--config "configs/ablation/$model.ini")
    "$PY" bench/accuracy.py --config configs/cpu_recipe_v5.ini "${extra[@]}" --config "$WORK/gpu.ini" \
        --budget "$BUDGET" --data "$DATA" --work "$WORK" --name "v5_${model}_gpu" --valid-args=--keep-policy \
        --results "$RESULTS.$model" > "$WORK/$model.log" 2>&1 &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
for model in unet caunet camunet; do
    echo "== $model"
    grep -E "^(Precision|Training finished|Throughput|Wall-clock)|^name " "$WORK/$model.log" || tail -5 "$WORK/$model.log"
done
exit $status
