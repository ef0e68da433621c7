#!/usr/bin/env python
"""Fault injection: SIGKILL a trainer that reads `s3://` shards through a small cache, at a
random moment, again and again; then check what it leaves.

A local SeaweedFS (scripts/s3_server.py) holds the shards of a synthetic sample. Each trial
starts `train/main.py --data s3://... --cache-dir C --cache-size LIMIT` (2 loader workers,
each with its prefetch thread; windows of 2 shards, so that the cache, smaller than the
shards, evicts) in a session of its own, kills the whole session with
SIGKILL at a random time in [--after, --before] s, and checks:
- no process of that session is alive 10 s later (workers and their forkserver die with
  the trainer);
- the cache never held more than LIMIT (sampled every 20 ms while the trainer ran);
- every --finish-every trials, a new run on the same cache dir trains to its end (a killed
  downloader's partial file is taken over, no lock is left held).

    .venv/bin/python scripts/fault_kill_store.py [--trials 12] [--root /tmp/fault-store]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is `sid` (field 6 of /proc/PID/stat)."""
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(p))
    return out


def watch(proc: subprocess.Popen, cache: Path, until: float) -> int:
    """The largest cache size seen while `proc` runs, up to time `until`."""
    from shards.cache import cache_usage

    peak = 0
    while proc.poll() is None and time.monotonic() < until:
        peak = max(peak, cache_usage(cache))
        time.sleep(0.02)
    return peak


def main() -> None:
    from s3_server import SeaweedFS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--after", type=float, default=4.0, help="earliest kill, s")
    ap.add_argument("--before", type=float, default=7.0, help="latest kill, s")
    ap.add_argument("--finish-every", type=int, default=4)
    ap.add_argument("--cache-size", default="600KB",
                    help="below the shards' total (~1.2 MB), above what shard_window 2 needs")
    ap.add_argument("--root", type=Path, default=Path("/tmp/fault-store"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    root, rng = a.root, random.Random(a.seed)
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run([bin_dir / "prep", "sample", str(root / "src"), "--classes", "4",
                    "--train-per-class", "60", "--val-per-class", "5", "--size", "48"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run([bin_dir / "prep", "imagenet", "-q", "--src", str(root / "src"), "--link",
                    str(root / "data")], check=True, stdout=subprocess.DEVNULL)
    server = SeaweedFS(root / "seaweedfs")
    server.start()
    try:
        env = {**os.environ, **server.env}
        server.make_bucket("faults")
        subprocess.run([bin_dir / "prep", "shard", "-q", "--data", str(root / "data/imagenet"),
                        "--out", "s3://faults/ds", "--num-shards", "16"], check=True,
                       env=env, stdout=subprocess.DEVNULL)
        from shards.cache import parse_size

        limit, cache = parse_size(a.cache_size), root / "cache"
        cmd = [sys.executable, str(REPO / "train/main.py"), "--data", "s3://faults/ds",
               "--cache-dir", str(cache), "--cache-size", a.cache_size,
               "--recipe", str(REPO / "train/recipes/cpu_demo.yaml"), "--device", "cpu",
               "--set", "num_classes=4", "--set", "workers=2", "--set", "epochs=2",
               "--set", "batch_size=8", "--set", "image_size=32", "--set", "val_resize=36",
               "--set", "val_crop=32", "--set", "shard_window=2"]
        rows, peak_all, orphans, finished = [], 0, 0, 0
        for t in range(a.trials):
            out = root / f"run{t}"
            proc = subprocess.Popen([*cmd, "--output-dir", str(out)], env=env,
                                    start_new_session=True, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            delay = rng.uniform(a.after, a.before)
            peak = watch(proc, cache, time.monotonic() + delay)
            killed = proc.poll() is None
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            deadline, left = time.monotonic() + 10, session_pids(proc.pid)
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = session_pids(proc.pid)
            orphans += bool(left)
            done = ""
            if (t + 1) % a.finish_every == 0:
                fin = subprocess.Popen([*cmd, "--output-dir", str(root / f"finish{t}")],
                                       env=env, start_new_session=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True)
                peak = max(peak, watch(fin, cache, time.monotonic() + 600))
                err = fin.communicate()[1]
                done = "finished" if fin.returncode == 0 else f"FAILED ({err[-300:]!r})"
                finished += fin.returncode == 0
            peak_all = max(peak_all, peak)
            rows.append((t, delay, killed, len(left), peak, done))
            print(f"trial {t}: killed at {delay:.1f} s: {killed}; processes left after 10 s: "
                  f"{len(left)}; cache peak {peak / 1e6:.2f} MB (limit {limit / 1e6:.2f}) "
                  f"{done}", flush=True)
    finally:
        server.kill()
    runs = a.trials // a.finish_every
    print(f"\n{a.trials} kills at {a.after}-{a.before} s, {time.strftime('%Y-%m-%d')}: "
          f"{orphans} left processes behind; cache peak {peak_all / 1e6:.2f} MB of "
          f"{limit / 1e6:.2f} MB; {finished}/{runs} runs after a kill finished")
    if orphans or peak_all > limit or finished != runs:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
