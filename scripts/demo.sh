#!/usr/bin/env bash
# The whole pipeline on a synthetic sample: prep sample -> prep imagenet -> prep shard ->
# prep verify -> torchrun (2 processes, CPU, gloo) -> val accuracy far above chance (10%).
# Usage: scripts/demo.sh [DEMO_DIR]   (default ./demo; rerun-safe).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${1:-demo}
PREP=${PREP:-.venv/bin/prep}
. scripts/demo_common.sh
if [ ! -d "$DEMO/ILSVRC2017" ]; then
  echo "== prep sample: a synthetic, learnable ILSVRC2017 tree (10 classes)"
  sample_tree "$DEMO"
fi
echo "== prep imagenet: detect, validate, rebuild val class folders, write meta/"
"$PREP" imagenet --src "$DEMO/ILSVRC2017" --link "$DEMO/data"
ls -l "$DEMO/data" "$DEMO/data/imagenet"
head -3 "$DEMO/data/imagenet/meta/val.txt"
echo "== prep shard: reproducible WebDataset shards + manifest (rerun: nothing to do)"
"$PREP" shard --data "$DEMO/data/imagenet" --out "$DEMO/shards" -q
echo "== prep verify --deep"
"$PREP" verify "$DEMO/shards" --deep -q
echo "== torchrun: 2 processes, ResNet-18, train/recipes/cpu_demo.yaml"
.venv/bin/torchrun --standalone --nproc_per_node=2 train/main.py --data "$DEMO/shards" \
  --recipe train/recipes/cpu_demo.yaml --output-dir "$DEMO/runs/cpu_demo" --device cpu \
  --resume auto
echo "== result: $DEMO/runs/cpu_demo (metrics.csv, curves.png, checkpoint.pt, best.pt)"
column -s, -t < "$DEMO/runs/cpu_demo/metrics.csv" | cut -c1-100
echo "== evaluate -> result.pkl -> prep export-preds (Kaggle submission format)"
evaluate "$DEMO/runs/cpu_demo" --data "$DEMO/shards"
"$PREP" export-preds "$DEMO/runs/cpu_demo/result.pkl" "$DEMO/runs/cpu_demo/submission.csv" \
  --format kaggle --classes "$DEMO/data/imagenet/meta/classes.csv" --summary
head -3 "$DEMO/runs/cpu_demo/submission.csv"
