#!/usr/bin/env python
"""Benchmark: `prep imagenet` on a full-scale ILSVRC2017 tree vs `find SRC -type f | wc -l`.

Tree: 1000 classes x 1281 zero-byte train files (1,281,000), the 50,000 real val files
and their 50,000 XMLs as the only label source (built once, reused). Trials alternate
the baseline and the candidates on the same warm tree, each `prep` run into a fresh
--link dir, and the table reports medians and the ratio to the baseline's median.
Goal: prep with its default check <= 3x find.

    .venv/bin/python scripts/bench_prep_imagenet.py [--root /tmp/prep-bench] [--trials 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str] | str, shell: bool = False) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=shell, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def io_pressure() -> float:
    """Share of the last 10 s some task waited on I/O (Linux PSI), in percent; 0 if unknown."""
    try:
        first = Path("/proc/pressure/io").read_text().splitlines()[0]
        return float(first.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0.0


def wait_for_quiet_disk(limit_s: float = 120.0) -> float:
    """Deleting many links (an earlier run's outputs) triggers a storm of ext4 discards that
    stalls later writes for tens of seconds on this VM; time nothing until it has passed."""
    t = time.perf_counter()
    while io_pressure() > 0.5 and time.perf_counter() - t < limit_s:
        time.sleep(2)
    return io_pressure()


def symlink_cost(folder: Path, n: int = 2000) -> float:
    """Microseconds of system CPU per symlink made in a new scratch folder under `folder`
    (kept: deleting it would slow the next links). On this VM the cost of new links rises
    up to 50x for minutes after a mass deletion, as kernel CPU that the I/O-pressure wait
    does not see; printed beside the results so a slow state shows."""
    scratch = folder / f"{time.time_ns()}"
    scratch.mkdir(parents=True)
    fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    before = os.times().system
    try:
        for i in range(n):
            os.symlink(f"../../.src-val/ILSVRC2012_val_{i:08d}.JPEG", f"l{i}", dir_fd=fd)
    finally:
        os.close(fd)
    return (os.times().system - before) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/prep-bench"),
                    help="where the tree and outputs go (default: /tmp/prep-bench)")
    ap.add_argument("--trials", type=int, default=5, help="alternating trials (default: 5)")
    args = ap.parse_args()
    prep = str(Path(sys.executable).with_name("prep"))
    src = args.root / "ILSVRC2017"
    if not src.is_dir():
        print(f"building the full-scale tree in {src} (~1.5 min) ...", flush=True)
        subprocess.run([prep, "sample", str(src), "--layout", "ilsvrc2017", "--classes", "1000",
                        "--train-per-class", "1281", "--val-per-class", "50", "--empty-files"],
                       check=True)
    outs = args.root / "outs"
    # An earlier run's outputs (500,000+ links) are set aside, not deleted: deleting them
    # now would slow the kernel's new links for minutes, right when they are timed. They
    # are deleted after this run's trials.
    trash = args.root / "trash"
    if outs.exists():
        trash.mkdir(exist_ok=True)
        outs.rename(trash / f"outs-{time.time_ns()}")
    print(f"waiting for a quiet disk ... I/O pressure {wait_for_quiet_disk():.2f}%", flush=True)
    probes = args.root / "symlink-probes"
    cost_before = symlink_cost(probes)
    find = f"find {src} -type f | wc -l"
    timed(find, shell=True)  # warm the dentry and inode caches
    rows: dict[str, list[float]] = {"find SRC -type f | wc -l": [],
                                    "prep imagenet (default: fast check, 2 workers)": [],
                                    "prep imagenet --workers 1": []}
    names = list(rows)
    for t in range(args.trials):
        rows[names[0]].append(timed(find, shell=True))
        rows[names[1]].append(timed([prep, "imagenet", "-q", "--src", str(src),
                                     "--link", str(outs / f"a{t}")]))
        rows[names[2]].append(timed([prep, "imagenet", "-q", "--workers", "1", "--src",
                                     str(src), "--link", str(outs / f"b{t}")]))
    base = statistics.median(rows[names[0]])
    files = int(subprocess.run(find, shell=True, capture_output=True, text=True).stdout)
    print(f"\n{files:,} files; {platform.node()} ({os.cpu_count()} cores), "
          f"{time.strftime('%Y-%m-%d')}, {args.trials} trials\n")
    print(f"| {'command':<48} | median s | min s | max s | ratio to find |")
    print(f"| {'-' * 48} | -------: | ----: | ----: | ------------: |")
    for name, times in rows.items():
        med = statistics.median(times)
        print(f"| {name:<48} | {med:8.2f} | {min(times):5.2f} | {max(times):5.2f} | "
              f"{med / base:12.2f}x |")
    print(f"I/O pressure after the trials: {io_pressure():.2f}% (avg10)")
    print(f"system CPU per new symlink before / after the trials: {cost_before:.0f} / "
          f"{symlink_cost(probes):.0f} us (6-14 us at quiet times on the vm; more: the "
          "kernel may still be slow from an earlier deletion, distrust the prep rows)")
    rerun = timed([prep, "imagenet", "-q", "--src", str(src), "--link", str(outs / "a0")])
    print(f"\nsecond run on an existing output (nothing to do): {rerun:.2f} s "
          f"({rerun / base:.2f}x find)")
    shutil.rmtree(trash, ignore_errors=True)  # after the timing: the next run waits it out
    print(f"outputs left in {outs} (the next run sets them aside and deletes them after "
          "its trials)")


if __name__ == "__main__":
    main()
