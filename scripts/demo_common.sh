# Sourced by scripts/demo.sh and scripts/demo_s3.sh: the steps both demos take. Expects
# $PREP (the prep command) and the repository root as the working directory.

sample_tree() {  # DEMO: the synthetic, learnable ILSVRC2017 tree (10 classes) of both demos
  "$PREP" sample "$1/ILSVRC2017" --layout ilsvrc2017 --classes 10 --train-per-class 60 \
    --val-per-class 10 --test-images 20 --size 96
}

evaluate() {  # RUN_DIR DATA_ARGS...: RUN_DIR/best.pt evaluated -> RUN_DIR/result.pkl
  local run=$1
  shift
  .venv/bin/torchrun --standalone --nproc_per_node=2 train/main.py "$@" --evaluate \
    --checkpoint "$run/best.pt" --device cpu --out "$run/result.pkl" \
    > "$run/evaluate.out" 2> "$run/evaluate.err" \
    || { grep -v "^W[0-9]" "$run/evaluate.err" | grep -m 3 "error"; exit 1; }
  # (torchrun's banner and trace left out, the error shown)
  tail -1 "$run/evaluate.out"
}
