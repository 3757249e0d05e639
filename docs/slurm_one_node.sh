#!/bin/bash
# Train on one node with several GPUs: one torchrun, one process per GPU (DistributedDataParallel).
# NOT RUN ON A CLUSTER HERE: written against Slurm's and torchrun's documented options; adjust the
# partition, account, GPU count, time, environment and paths to your cluster.
#
#   sbatch docs/slurm_one_node.sh                      # from the repository root
#
# [train] n_batch is the batch of one step over all GPUs (docs/training.md): raise it with the
# number of GPUs. Resubmitting the script continues an interrupted run from its last checkpoint.
#SBATCH --job-name=nuclei-1node
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=myproject

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source .venv/bin/activate        # or: module load ...; conda activate ...

GPUS=${SLURM_GPUS_ON_NODE:-4}
# loader workers and CPU threads per process: this job's cores shared by the GPUs' processes
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-32} / GPUS / 2 > 0 ? ${SLURM_CPUS_PER_TASK:-32} / GPUS / 2 : 1 ))

# a 23-hour budget inside the 24-hour limit: the run anneals and writes its checkpoint in time
srun torchrun --standalone --nproc_per_node="$GPUS" \
    train.py --config configs/gpu_recipe.ini --budget 1380 --quiet
