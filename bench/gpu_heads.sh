#!/usr/bin/env bash
# Do the contour and marker heads earn their place with more training than 20 CPU-minutes give?
# Trains a CPU recipe (RECIPE, default configs/cpu_recipe_v5.ini) as UNet (one head), CAUNet
# (+ contour) and CAMUNet (+ contour + marker) side by side on one GPU, BUDGET minutes each, then
# tunes the thresholds on the tune split (policy kept: watershed) and scores the validation split
# with bench/accuracy.py; one row per model in RESULTS.<model>. HOLD_OUT=FAMILY validates on that
# image family instead, trained and tuned on the others (bench/accuracy.py --hold-out-family).
#
#   bash bench/gpu_heads.sh DATA [RESULTS]        # DATA: a DSB2018-layout folder
#   BUDGET=0.3 WORKERS=0 PYTHON=.venv/bin/python bash bench/gpu_heads.sh sample/stage1_train  # a dry run
#   MODELS="unet camunet camunet_hw" BUDGET=4 WORKERS=5 bash bench/gpu_heads.sh DATA   # longer, balanced heads
#   RECIPE=configs/cpu_recipe_v8.ini MODELS=unet HOLD_OUT=colour_tinted BUDGET=4 bash bench/gpu_heads.sh DATA
# MODELS picks from unet, caunet, camunet and camunet_hw (CAMUNet with configs/ablation/head_weights.ini);
# each row is named <v>_<model>_gpu, or <v>_<model>_gpu<BUDGET> when BUDGET is not the default, where
# <v> is the recipe's name after cpu_recipe_ (v5 by default), and TAG (default empty) after it.
# CONFIGS: more settings files stacked on each run (e.g. configs/ablation/seed2.ini). TUNE_WORKERS=N
# passes --tune-workers N to valid.py (default: every CPU, for each run).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/dsb2018/stage1_train}
RESULTS=${2:-out/bench/rows_gpu_heads.csv}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-2.5}
MODELS=${MODELS:-unet caunet camunet}
RECIPE=${RECIPE:-configs/cpu_recipe_v5.ini}
[ -f "$RECIPE" ] || { echo "gpu_heads.sh: RECIPE: no file $RECIPE" >&2; exit 2; }
VERSION=$(basename "$RECIPE" .ini); VERSION=${VERSION#cpu_recipe_}
SUFFIX=gpu; [ "$BUDGET" = 2.5 ] || SUFFIX=gpu$BUDGET
WORKERS=${WORKERS:-4}   # loader workers per run; three runs share the machine's cores
VALID_ARGS=--keep-policy; [ -z "${TUNE_WORKERS:-}" ] || VALID_ARGS="$VALID_ARGS --tune-workers $TUNE_WORKERS"
HOLD=(); [ -z "${HOLD_OUT:-}" ] || HOLD=(--hold-out-family "$HOLD_OUT")
STACK=(); for file in ${CONFIGS:-}; do
    [ -f "$file" ] || { echo "gpu_heads.sh: CONFIGS: no file $file" >&2; exit 2; }
    STACK+=(--config "$file")
done
WORK=out/gpu_heads${HOLD_OUT:+_$HOLD_OUT}
mkdir -p "$WORK"
# the budget, not the epoch count, ends each run; validation only at its end
cat > "$WORK/gpu.ini" <<EOF
[train]
n_epoch = 1000
n_worker = $WORKERS
n_cv_epoch = 1000
n_ckpt_epoch = 1000
EOF
for model in $MODELS; do
    case $model in
        unet) extra=() ;;
        caunet|camunet) extra=(--config "configs/ablation/$model.ini") ;;
        camunet_hw) extra=(--config configs/ablation/camunet.ini --config configs/ablation/head_weights.ini) ;;
        *) echo "gpu_heads.sh: MODELS: unknown model '$model' (unet, caunet, camunet, camunet_hw)" >&2; exit 2 ;;
    esac
    "$PY" bench/accuracy.py --config "$RECIPE" "${extra[@]}" "${STACK[@]}" --config "$WORK/gpu.ini" "${HOLD[@]}" \
        --budget "$BUDGET" --data "$DATA" --work "$WORK" --name "${VERSION}_${model}_$SUFFIX${TAG:-}" \
        --valid-args="$VALID_ARGS" --results "$RESULTS.$model" > "$WORK/$model.log" 2>&1 &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
for model in $MODELS; do
    echo "== $model"
    grep -E "^(Precision|Training finished|Throughput|Wall-clock)|^name " "$WORK/$model.log" || tail -5 "$WORK/$model.log"
done
exit $status
