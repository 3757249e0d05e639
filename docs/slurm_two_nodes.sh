#!/bin/bash
# Train on two nodes with several GPUs each: srun starts one torchrun per node, and the torchruns
# meet at a rendezvous on the job's first node (c10d backend), one process per GPU.
# NOT RUN ON A CLUSTER HERE: written against Slurm's and torchrun's documented options; adjust the
# partition, account, GPU count, time, environment, network interface and paths to your cluster.
#
#   sbatch docs/slurm_two_nodes.sh                     # from the repository root
#
# The repository, the data, [train] checkpoint_dir and [dataset] cache_dir must be on a file
# system that both nodes see (process 0 writes the checkpoints; the others read the decode cache).
# [train] n_batch is the batch of one step over all 8 GPUs (docs/training.md).
#SBATCH --job-name=nuclei-2nodes
#SBATCH --nodes=2
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
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=29500
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-32} / GPUS / 2 > 0 ? ${SLURM_CPUS_PER_TASK:-32} / GPUS / 2 : 1 ))
# export NCCL_SOCKET_IFNAME=ib0   # where NCCL picks the wrong network interface

# one task per node; $HEAD and $PORT are expanded here, so every node gets the same endpoint
srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 \
    torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS" \
             --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" \
    train.py --config configs/gpu_recipe.ini --budget 1380 --quiet
