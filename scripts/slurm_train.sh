#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node (srun), c10d rendezvous on the
# first node. Submit with e.g.:
#   sbatch --nodes=2 --gpus-per-node=8 --cpus-per-task=64 --ntasks-per-node=1 \
#          scripts/slurm_train.sh --data out/shards/ --recipe train/recipes/resnet50.yaml \
#          --output-dir runs/rn50 --resume auto
# `--resume auto` makes a requeued (preempted) job continue from its last checkpoint.
#SBATCH --job-name=imagenet-train
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# a fresh rendezvous store per restart attempt: with torchrun's shared store, restarted
# workers can read the failed attempt's keys and fail to connect (pytorch/pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
GPUS=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
srun --kill-on-bad-exit=1 .venv/bin/torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="${GPUS:-1}" \
  --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$HEAD:29500" \
  train/main.py "$@"
