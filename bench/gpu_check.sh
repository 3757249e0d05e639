#!/usr/bin/env bash
# One-GPU check of configs/gpu_recipe.ini, meant to finish in a few minutes on one card:
# a few hundred training steps of the recipe (CAMUNet, separate decoders, ResNet34) with float16
# autocast, loss scaling and channels-last (no validation during training), one validation pass with
# valid.py on the last checkpoint, images per second
# and peak GPU memory; and a two-process torchrun run when the machine has two GPUs and train.py
# supports torchrun. Run it whenever a GPU is at hand and record what it prints in docs/training.md.
#
#   bash bench/gpu_check.sh [DATA] [WORK]        # DATA: a DSB2018-layout folder
#   EPOCHS=1 AMP=off PYTHON=.venv/bin/python bash bench/gpu_check.sh sample/stage1_train   # a dry run
#
# The encoder starts from random weights ([model] pretrained = False): ImageNet weights cannot be
# downloaded where this was first run, and the check is about speed and memory, not accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/dsb2018/stage1_train}
WORK=${2:-out/gpu_check}
PY=${PYTHON:-python3}
EPOCHS=${EPOCHS:-8}   # about 300 steps of 16 images on the 600 training images of stage1_train
AMP=${AMP:-float16}  # AMP=off for a dry run on a CPU, where float16 autocast is very slow

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import torch, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device', '|', torch.cuda.device_count(), 'GPU(s)')"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores"

rm -rf "$WORK"
mkdir -p "$WORK"
"$PY" split.py "$DATA" --out "$WORK/data" --force >/dev/null
"$PY" - "$WORK" "$EPOCHS" "$AMP" <<'EOF'
import configparser, sys
work, epochs, amp = sys.argv[1:4]
parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
parser.optionxform = str
parser.read("configs/gpu_recipe.ini")
overrides = {"model": {"pretrained": "False", "freeze_encoder_epochs": "2"},
             "train": {"n_epoch": epochs, "amp": amp, "n_cv_epoch": "0", "n_ckpt_epoch": epochs,
                       "checkpoint_dir": f"{work}/checkpoint", "log_dir": f"{work}/runs"},
             "dataset": {"root": f"{work}/data", "cache_dir": f"{work}/cache"}}
for section, values in overrides.items():
    if not parser.has_section(section):
        parser.add_section(section)
    for key, value in values.items():
        parser.set(section, key, value)
with open(f"{work}/check.ini", "w") as fh:
    parser.write(fh)
EOF

echo "== training: configs/gpu_recipe.ini for $EPOCHS epochs, amp = $AMP, random encoder weights"
start=$SECONDS
"$PY" train.py --config "$WORK/check.ini" --no-resume --quiet
echo "train.py wall time: $((SECONDS - start)) s (first epoch decodes every image into the cache)"

echo "== one validation pass: valid.py with flip TTA and the recipe's random-walker post-processing"
start=$SECONDS
"$PY" valid.py "$WORK/checkpoint/ckpt-$EPOCHS.pkl" --config "$WORK/check.ini" --dataset valid --no-figures \
    --scores "$WORK/scores.csv"
n=$(($(wc -l < "$WORK/scores.csv") - 1))
echo "valid.py wall time: $((SECONDS - start)) s for $n images (model loading included)"

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ] && [ -f distributed.py ]; then
    echo "== two processes under torchrun (DistributedDataParallel)"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 train.py --config "$WORK/check.ini" \
        --no-resume --overwrite --epoch 2 --quiet
else
    echo "== torchrun: skipped ($gpus GPU(s)$([ -f distributed.py ] || echo ', train.py without torchrun support'))"
fi
