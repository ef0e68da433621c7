#!/usr/bin/env python
"""Object storage, side by side in one run, against a local S3 server (SeaweedFS):

1. The train loader (train/resumable.py; decode + RandomResizedCrop + flip in the workers)
   over one epoch: the shards on local disk (the baseline), from the store through an empty
   cache (cold), and from the store through a cache that holds them (warm). The cases
   alternate; medians are reported.
2. Writing to the store: `prep shard --out s3://...` against `prep shard` to a local
   directory followed by `s5cmd cp` of that directory (the copy tool for the job).

    .venv/bin/python scripts/bench_store.py [--root /tmp/store-bench] [--trials 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from s3_server import SeaweedFS  # noqa: E402

from prep.workers import worker_context  # noqa: E402
from shards.cache import open_cache  # noqa: E402
from shards.store import Store  # noqa: E402
from train.data import collate_with_ring  # noqa: E402
from train.decode import TrainDecoder  # noqa: E402
from train.resumable import ResumableLoader, read_rows  # noqa: E402

BATCH, WINDOW, CROP = 32, 4, 160
BIN = Path(sys.executable).parent


def build(root: Path, per_class: int, size: int) -> Path:
    data = root / "data/imagenet"
    if not (data / "meta").exists():
        subprocess.run([BIN / "prep", "sample", "--classes", "10", "--train-per-class",
                        str(per_class), "--val-per-class", "2", "--size", str(size),
                        str(root / "src")], check=True)
        subprocess.run([BIN / "prep", "imagenet", "-q", "--src", str(root / "src"), "--link",
                        str(root / "data")], check=True)
    return data


def shard(data: Path, out: str, shards: int) -> float:
    t = time.perf_counter()
    subprocess.run([BIN / "prep", "shard", "-q", "--data", str(data), "--out", out,
                    "--splits", "train", "--num-shards", str(shards)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def epoch(rows, workers: int, cache=None, window: int = 0, ring: bool = True) -> float:
    """Images per second over one epoch of a fresh loader, as the trainer builds it on a
    machine without a GPU (batches handed over in reused shared buffers), or with --no-ring
    as on a GPU machine (a fresh shared tensor per batch, which its pin thread copies)."""
    collate, batch_ring = collate_with_ring(workers, BATCH, CROP, not ring, "cpu")
    loader = ResumableLoader(rows, TrainDecoder(CROP, 0.35, True, seed=0), batch_size=BATCH,
                             workers=workers, collate=collate, ring=batch_ring, cache=cache,
                             window=window)
    t = time.perf_counter()
    n = sum(len(b[-1]) for b in loader)
    rate = n / (time.perf_counter() - t)
    loader.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/store-bench")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--no-ring", action="store_true",
                    help="hand batches over as the trainer does on a GPU machine (no reused "
                         "shared buffers; pinning itself is left out: no GPU here)")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    data = build(root, args.per_class, args.size)
    server = SeaweedFS(root / "seaweedfs")
    shutil.rmtree(server.root, ignore_errors=True)
    server.start()
    try:
        os.environ.update(server.env)
        server.make_bucket("bench")
        s5cmd = shutil.which("s5cmd") or str(BIN / "s5cmd")
        write = {"direct": [], "local+s5cmd": []}
        for trial in range(args.trials):
            local = root / f"local-{trial}"
            shutil.rmtree(local, ignore_errors=True)
            write["direct"].append(shard(data, f"s3://bench/direct-{trial}", args.shards))
            t = time.perf_counter()
            shard(data, str(local), args.shards)
            subprocess.run([s5cmd, "--endpoint-url", server.endpoint, "cp", f"{local}/*",
                            f"s3://bench/copied-{trial}/"], check=True,
                           stdout=subprocess.DEVNULL)
            write["local+s5cmd"].append(time.perf_counter() - t)
        local = root / "local-0"
        url = "s3://bench/direct-0"
        rows_local, rows_store = read_rows(local, "train"), read_rows(url, "train")
        total = sum(p.stat().st_size for p in local.glob("train-*.tar"))
        rates = {"local disk": [], "store, cold cache": [], "store, warm cache": [],
                 "store, bounded cache": []}
        def run(rows, cache=None) -> float:
            return epoch(rows, args.workers, cache, WINDOW, ring=not args.no_ring)

        # the loader workers' forkserver, started as the trainer starts it for s3:// data
        # (boto3 loaded once in the server), then a first epoch that is not counted
        worker_context(["train.data", "shards.s3_preload"])
        run(rows_local)
        for trial in range(args.trials):
            rates["local disk"].append(run(rows_local))
            cold = root / f"cache-cold-{trial}"
            shutil.rmtree(cold, ignore_errors=True)
            rates["store, cold cache"].append(
                run(rows_store, open_cache(Store(url), cold, None)))
            warm = open_cache(Store(url), root / "cache-warm", None)
            if trial == 0:
                run(rows_store, warm)  # fills it
            rates["store, warm cache"].append(run(rows_store, warm))
            small = open_cache(Store(url), root / f"cache-small-{trial}", None)
            small.limit = (2 * WINDOW + 2) * small.largest()  # the least the trainer takes
            rates["store, bounded cache"].append(run(rows_store, small))
    finally:
        server.kill()
    n = len(rows_local.keys)
    print(f"\n{n} train images ({args.size} px, {total / 1e6:.0f} MB in {args.shards} shards), "
          f"{args.workers} loader workers, batch {BATCH}, shard_window {WINDOW}, "
          f"{args.trials} trials (medians)")
    print(f"{'loader epoch':<22} {'img/s':>8} {'vs local':>9}   paired per trial: median "
          "(min-max)   each trial's img/s")
    base = statistics.median(rates["local disk"])
    for name, values in rates.items():
        m = statistics.median(values)
        # each case against the local-disk epoch of its own trial (they alternate): drift
        # of the machine between trials cancels out
        paired = [v / d for v, d in zip(values, rates["local disk"])]
        print(f"{name:<22} {m:8.0f} {m / base:8.2f}x   {statistics.median(paired):.2f}x "
              f"({min(paired):.2f}-{max(paired):.2f})   {' '.join(f'{v:.0f}' for v in values)}")
    print(f"(bounded cache: {2 * WINDOW + 2} shards' worth, the least the trainer takes: "
          "every epoch downloads again)")
    print(f"\n{'write to the store':<22} {'s':>8} {'vs direct':>9}")
    base = statistics.median(write["direct"])
    for name, values in write.items():
        m = statistics.median(values)
        print(f"{name:<22} {m:8.2f} {m / base:8.2f}x")


if __name__ == "__main__":
    main()
