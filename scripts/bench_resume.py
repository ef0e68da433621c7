#!/usr/bin/env python
"""Time to the first batch after resuming the train loader at 10% and at 90% of an epoch.

The resumable loader (train/resumable.py) seeks through index.parquet to its position; the
baseline, measured in the same run, is what a loader without a position must do: read
and drop the batches already consumed (here: iterate the same loader from the epoch's
start). Each trial is a fresh loader with fresh workers (as after a restart); the cases
alternate and the medians are reported.

    .venv/bin/python scripts/bench_resume.py [--root /tmp/resume-bench] [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.data import collate  # noqa: E402
from train.decode import TrainDecoder  # noqa: E402
from train.resumable import STATE_VERSION, ResumableLoader, read_rows  # noqa: E402

BATCH = 32


def build(root: Path, per_class: int) -> Path:
    prep = str(Path(sys.executable).with_name("prep"))
    shards = root / "shards"
    if not (shards / "_info.json").exists():
        subprocess.run([prep, "sample", "--classes", "10", "--train-per-class", str(per_class),
                        "--val-per-class", "2", "--size", "96", str(root / "src")], check=True)
        subprocess.run([prep, "imagenet", "-q", "--src", str(root / "src"), "--link",
                        str(root / "data")], check=True)
        subprocess.run([prep, "shard", "-q", "--data", str(root / "data/imagenet"), "--out",
                        str(shards), "--splits", "train", "--num-shards", "8"], check=True)
    return shards


def first_batch(rows, workers: int, consumed: int, drop: bool) -> float:
    """Seconds from a new loader to the first batch at `consumed` (seek, or read and
    drop)."""
    t = time.perf_counter()
    loader = ResumableLoader(rows, TrainDecoder(64, 0.35, True, seed=0), batch_size=BATCH,
                             workers=workers, collate=collate)
    if not drop:
        loader.load_state_dict({"version": STATE_VERSION, "epoch": 0, "consumed": consumed,
                                "num_samples": len(rows.keys), "seed": 0})
    it = iter(loader)
    for _ in range(consumed // BATCH if drop else 0):
        next(it)
    next(it)
    elapsed = time.perf_counter() - t
    loader.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/resume-bench"))
    ap.add_argument("--per-class", type=int, default=400, help="train images per class")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    rows = read_rows(build(a.root, a.per_class), "train")
    n = len(rows.keys)
    cuts = {f: int(n * f) // BATCH * BATCH for f in (0.1, 0.9)}
    cases = [(f"seek, {int(f * 100)}%", c, False) for f, c in cuts.items()] + \
            [(f"read and drop, {int(f * 100)}%", c, True) for f, c in cuts.items()]
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(a.trials):  # alternate the cases within each trial
        for name, consumed, drop in cases:
            times[name].append(first_batch(rows, a.workers, consumed, drop))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["seek, 10%"]
    print(f"{n} train samples, batch {BATCH}, {a.workers} workers, {a.trials} trials "
          "(median s to the first batch; ratio to seek at 10%)")
    for name in times:
        print(f"  {name:24s} {med[name]:8.3f} s   x{med[name] / base:6.2f}")


if __name__ == "__main__":
    main()
