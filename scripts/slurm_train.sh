#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node (srun), c10d rendezvous on the
# first node; preemption-proof. Submit with e.g.:
#   sbatch --nodes=2 --gpus-per-node=8 --cpus-per-task=64 --ntasks-per-node=1 \
#          scripts/slurm_train.sh --data out/shards/ --recipe train/recipes/resnet50.yaml \
#          --output-dir runs/rn50 --resume auto --save-every 30m
# 120 s before the time limit (or on preemption, SIGTERM) every rank finishes its step,
# writes one step checkpoint and exits 75 (docs/training.md); this script then requeues
# the job, and `--resume auto` continues at the next step.
#SBATCH --job-name=imagenet-train
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=USR1@120
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# a fresh rendezvous store per restart attempt: with torchrun's shared store, restarted
# workers can read the failed attempt's keys and fail to connect (pytorch/pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# torchrun forwards these to the ranks (SIGUSR1 is not among its defaults: it would end it)
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
OUT=runs/default  # the trainer's --output-dir, where it writes preempted.json when stopped
args=("$@")
for i in "${!args[@]}"; do
  case "${args[$i]}" in
    --output-dir) OUT="${args[$((i + 1))]}" ;;
    --output-dir=*) OUT="${args[$i]#--output-dir=}" ;;
  esac
done
GPUS=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
srun --kill-on-bad-exit=1 .venv/bin/torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="${GPUS:-1}" \
  --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$HEAD:29500" \
  train/main.py "$@"
status=$?
if [ -f "$OUT/preempted.json" ]; then
  echo "preempted: $(cat "$OUT/preempted.json"); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
