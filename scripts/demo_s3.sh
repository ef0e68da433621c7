#!/usr/bin/env bash
# The pipeline against object storage: a local S3 server (SeaweedFS, started here and
# stopped at the end), prep shard --out s3://, prep verify s3://, torchrun training from
# s3:// through a bounded shard cache, evaluation with --out. Uses the sample `make demo`
# prepares (made here when missing).
# Usage: scripts/demo_s3.sh [DEMO_DIR]   (default ./demo)
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${1:-demo}
PREP=${PREP:-.venv/bin/prep}
. scripts/demo_common.sh
if [ ! -d "$DEMO/data/imagenet" ]; then
  [ -d "$DEMO/ILSVRC2017" ] || sample_tree "$DEMO"
  "$PREP" imagenet --src "$DEMO/ILSVRC2017" --link "$DEMO/data" -q
fi
STORE="$DEMO/s3"
rm -rf "$STORE" "$DEMO/runs/s3_demo" "$DEMO/cache"
mkdir -p "$STORE"
echo "== a local S3 server (SeaweedFS), bucket 'imagenet'"
.venv/bin/python scripts/s3_server.py "$STORE/server" --bucket imagenet \
  --env-file "$STORE/env" > "$STORE/server.out" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do [ -s "$STORE/env" ] && break; sleep 0.5; done
[ -s "$STORE/env" ] || { cat "$STORE/server.out"; exit 1; }
set -a; . "$STORE/env"; set +a   # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... as for any store
cat "$STORE/env"
echo "== prep shard --out s3://imagenet/shards (rerun: nothing to do)"
"$PREP" shard --data "$DEMO/data/imagenet" --out s3://imagenet/shards -q
"$PREP" shard --data "$DEMO/data/imagenet" --out s3://imagenet/shards -q | head -1
echo "== prep verify --deep s3://imagenet/shards"
"$PREP" verify s3://imagenet/shards --deep -q
echo "== torchrun from s3:// (the cache bounded at 4 MB; the shards take 5.2 MB)"
.venv/bin/torchrun --standalone --nproc_per_node=2 train/main.py --data s3://imagenet/shards \
  --cache-dir "$DEMO/cache" --cache-size 4MB --recipe train/recipes/cpu_demo.yaml \
  --set shard_window=2 --output-dir "$DEMO/runs/s3_demo" --device cpu --save-every 10
du -sh "$DEMO/cache"
echo "== evaluate from s3:// -> result.pkl"
evaluate "$DEMO/runs/s3_demo" --data s3://imagenet/shards --cache-dir "$DEMO/cache" \
  --cache-size 4MB
