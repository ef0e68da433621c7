#!/usr/bin/env python
"""How well each train loader mixes classes, against an ideal permutation of the split.

On `prep shard` output of a synthetic tree (train samples are dealt to shards as a seeded
permutation), per loader: mean distinct classes per batch, and the lag-1 autocorrelation of
the batch-mean label (consecutive batches alike -> near 1). The ideal is a fresh uniform
permutation of all samples per epoch. The streaming loader runs with the default
shuffle_buffer (5000, here more than the split) and with one scaled as on ImageNet (5000 of
1.28 M samples = 0.4%).

    .venv/bin/python scripts/bench_mixing.py [--root /tmp/mixing] [--classes 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def stats(batches: list[np.ndarray]) -> tuple[float, float]:
    distinct = float(np.mean([len(set(b.tolist())) for b in batches]))
    means = np.array([b.mean() for b in batches])
    ac = float(np.corrcoef(means[:-1], means[1:])[0, 1]) if means.std() > 0 else 1.0
    return distinct, ac


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/mixing"))
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shards", type=int, default=8)
    a = ap.parse_args()
    from tests.conftest import sharded_sample
    from train.config import TrainConfig
    from train.data import SkipCounter, make_train_loader, read_split
    from train.decode import TrainDecoder
    from train.resumable import ResumableLoader, epoch_order, read_rows

    shards = a.root / "shards"
    if not (shards / "_info.json").exists():
        sharded_sample(a.root, "ilsvrc2017", a.shards, classes=a.classes,
                       train_per_class=a.per_class, val_per_class=1, size=32)
    split = read_split(str(shards), "train")
    rows = read_rows(shards, "train")
    labels = {}
    import pyarrow.parquet as pq

    for r in pq.read_table(shards / "index.parquet").to_pylist():
        labels[r["key"]] = r["label"]
    runs = {}
    for buffer in (5000, max(2, round(0.004 * len(rows.keys)))):
        cfg = TrainConfig(batch_size=a.batch, workers=1, image_size=32, shuffle_buffer=buffer)
        runs[f"streaming (train/data.py), shuffle_buffer {buffer}"] = [
            b[1].numpy() for b in make_train_loader(split, cfg, 0, 1, 0, SkipCounter(0.01))]
    loader = ResumableLoader(rows, TrainDecoder(32, 0.08, True, 0), batch_size=a.batch)
    resumable = [np.array([labels[k] for k in b[-1]]) for b in loader]
    n = len(rows.keys)
    order = epoch_order(n, 123, 0)
    all_labels = np.array([labels[k] for k in rows.keys])
    ideal = [all_labels[order[i : i + a.batch]] for i in range(0, n - a.batch + 1, a.batch)]
    for window in (1, 2):  # s3:// data: shards shuffled in windows (train/resumable.py)
        o = epoch_order(n, 123, 0, window, rows.shard_sizes())
        runs[f"resumable, shard_window {window} (s3:// order)"] = [
            all_labels[o[i : i + a.batch]] for i in range(0, n - a.batch + 1, a.batch)]
    print(f"{a.classes} classes x {a.per_class} train images in {a.shards} shards; batch "
          f"{a.batch}\n")
    print("| loader | distinct classes per batch | lag-1 autocorrelation of batch-mean label |")
    print("| --- | ---: | ---: |")
    for name, batches in (("ideal permutation", ideal), *runs.items(),
                          ("resumable (train/resumable.py)", resumable)):
        d, ac = stats(batches)
        print(f"| {name} | {d:.1f} | {ac:+.2f} |")


if __name__ == "__main__":
    main()
