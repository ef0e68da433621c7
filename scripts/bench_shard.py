#!/usr/bin/env python
"""Benchmark `prep shard` on real photographs (500x375 q90), ratios to baselines in the same run.

1. Pass-through: MB/s of `prep shard` vs `tar -cf` of the same files to the same disk, at 1
   and 2 workers: a first run with the default `--check full` (every JPEG entropy-decoded;
   the record of checked files removed before it) against the strict check alone over the
   same files with as many processes (goal: <= 1.15x its time); a reshard of sources checked
   before (the record kept, another OUT; goal: >= 0.8x tar); `--check header`.
2. `--max-size 384`, 1 worker: images/s vs a plain open/convert/thumbnail/save loop on the
   same images, run with stock Pillow in its own venv (goal: >= 1.5x) and, for honesty,
   the same loop on this venv's Pillow-SIMD.
Trials alternate baseline and candidate; the table shows medians (CLI start-up included).

    .venv/bin/python scripts/bench_shard.py [--root /tmp/shard-bench] [--trials 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_prep_imagenet import wait_for_quiet_disk  # noqa: E402
from photo_corpus import build_photo_tree  # noqa: E402

LOOP = """
import io, sys, time
from pathlib import Path
from PIL import Image
files = sorted(Path(sys.argv[1]).rglob("*.JPEG"))
t = time.perf_counter()
for f in files:
    im = Image.open(f)
    im = im.convert("RGB")
    im.thumbnail((384, 384))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
print(len(files) / (time.perf_counter() - t), Image.__version__)
"""


CHECK = """
import os, sys, time
from multiprocessing import get_context
from pathlib import Path
from prep.jpeg import strict_problem

def check(paths):
    bad = 0
    for p in paths:
        with open(p, "rb") as f:
            bad += strict_problem(f.read()) is not None
    return bad

if __name__ == "__main__":
    files = sorted(map(str, Path(sys.argv[1]).rglob("*.JPEG")))
    n = int(sys.argv[2])
    with get_context("fork").Pool(n) as pool:  # nothing runs threads here yet
        print(sum(pool.map(check, [files[i::n] for i in range(n)])))
"""


CPU: dict[str, list[float]] = {}  # CPU seconds (user + sys) of the timed commands, by row


def run(cmd: list[str], row: str | None = None) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if row:
        CPU.setdefault(row, []).append(after.ru_utime - before.ru_utime
                                       + after.ru_stime - before.ru_stime)
    return wall


def stock_pillow(root: Path) -> Path:
    venv = root / "stock-pillow-venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "pillow"], check=True)
    return venv / "bin" / "python"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/shard-bench"))
    ap.add_argument("--per-class", type=int, default=300, help="unique photos per class (x10)")
    ap.add_argument("--copies", type=int, default=4, help="pass-through corpus = copies x unique")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--num-shards", type=int, default=8)
    ap.add_argument("--skip-resize", action="store_true", help="pass-through rows only")
    ap.add_argument("--workers", default="1,2",
                    help="worker counts of the pass-through rows (default: 1,2)")
    ap.add_argument("--skip-header", action="store_true", help="no --check header rows")
    a = ap.parse_args()
    prep = str(Path(sys.executable).with_name("prep"))
    tree = build_photo_tree(a.root / "photos", a.per_class, 2, a.root / "wheels")
    big = a.root / ("photos-x" if a.copies == 4 else f"photos-x{a.copies}")
    if not big.exists():  # more bytes for the pass-through test: copies under new names
        for f in sorted((tree / "train").rglob("*.JPEG")):
            for c in range(a.copies):
                d = big / "train" / f.parent.name
                d.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, d / f"{f.stem}{c}.JPEG")
        shutil.copytree(tree / "val", big / "val")
    for src, link in ((tree, a.root / "data"), (big, a.root / f"data-{big.name}")):
        subprocess.run([prep, "imagenet", "-q", "--src", str(src), "--link", str(link)],
                       check=True, stdout=subprocess.DEVNULL)
    data, data_x = a.root / "data/imagenet", a.root / f"data-{big.name}/imagenet"
    out = a.root / "out"
    nfiles_x = sum(1 for _ in (big / "train").rglob("*.JPEG"))
    mb_x = sum(f.stat().st_size for f in (big / "train").rglob("*.JPEG")) / 1e6
    n_unique = sum(1 for _ in (tree / "train").rglob("*.JPEG"))
    stock = stock_pillow(a.root)

    def shard(row: str, d: Path, workers: int, *extra: str, fresh: bool = False) -> float:
        """fresh: without the record of files checked before (a first run)."""
        shutil.rmtree(out, ignore_errors=True)
        if fresh:
            (d / ".checked.sqlite").unlink(missing_ok=True)
        wait_for_quiet_disk(60)  # an earlier output's deletion stalls writes on this VM
        return run([prep, "shard", "-q", "--data", str(d), "--out", str(out), "--splits",
                    "train", "--workers", str(workers), "--num-shards", str(a.num_shards),
                    *extra], row)

    def tar(row: str, sync: bool) -> float:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        wait_for_quiet_disk(60)  # an earlier output's deletion stalls writes on this VM
        t = run(["tar", "-cf", str(out / "all.tar"), "-C", str(big / "train"), "."], row)
        # prep shard fsyncs each shard before renaming it (durable); plain tar does not
        return t + (run(["sync", str(out / "all.tar")]) if sync else 0.0)

    def loop(python: Path) -> float:
        r = subprocess.run([str(python), "-c", LOOP, str(tree / "train")], check=True,
                           capture_output=True, text=True)
        return n_unique / float(r.stdout.split()[0])  # seconds for the corpus

    def check_alone(row: str, workers: int) -> float:
        return run([sys.executable, "-c", CHECK, str(big / "train"), str(workers)], row)

    tar_rows = ["tar -cf (baseline 1)", "tar -cf, then fsync the tar"]
    counts = [int(w) for w in a.workers.split(",")]
    check_rows = [f"strict check alone, {w} worker{'s' * (w > 1)}" for w in counts]
    first_rows = [f"prep shard (first run), {w} worker{'s' * (w > 1)}" for w in counts]
    again_rows = [f"prep shard (reshard, checked before), {w} worker{'s' * (w > 1)}"
                  for w in counts]
    header_rows = [] if a.skip_header else \
        [f"prep shard --check header, {w} worker{'s' * (w > 1)}" for w in counts]
    resize_rows = ["loop, stock Pillow (baseline 2)", "loop, Pillow-SIMD",
                   "prep shard --max-size 384, 1 worker"]
    passing = tar_rows + check_rows + first_rows + again_rows + header_rows
    rows: dict[str, list[float]] = {k: [] for k in passing + resize_rows}
    run(["tar", "-cf", "/dev/null", "-C", str(big / "train"), "."])  # warm the page cache
    for _ in range(a.trials):
        rows[tar_rows[0]].append(tar(tar_rows[0], sync=False))
        rows[tar_rows[1]].append(tar(tar_rows[1], sync=True))
        for i, w in enumerate(counts):
            rows[check_rows[i]].append(check_alone(check_rows[i], w))
            rows[first_rows[i]].append(shard(first_rows[i], data_x, w, fresh=True))
            rows[again_rows[i]].append(shard(again_rows[i], data_x, w))
            if header_rows:
                rows[header_rows[i]].append(shard(header_rows[i], data_x, w, "--check",
                                                  "header"))
        if a.skip_resize:
            continue
        rows[resize_rows[0]].append(loop(stock))
        rows[resize_rows[1]].append(loop(Path(sys.executable)))
        rows[resize_rows[2]].append(shard(resize_rows[2], data, 1, "--max-size", "384",
                                          "--quality", "90"))
    med = {k: statistics.median(v) if v else float("nan") for k, v in rows.items()}
    print(f"\n{platform.node()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}, "
          f"{a.trials} trials; pass-through corpus {nfiles_x:,} files / {mb_x:,.0f} MB; "
          f"resize corpus {n_unique:,} unique 500x375 q90 photos\n")
    print("| run | median s | CPU s (user+sys) | rate | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k in passing:
        cpu = statistics.median(CPU[k]) if k in CPU else float("nan")
        print(f"| {k} | {med[k]:.2f} | {cpu:.2f} | {mb_x / med[k]:,.0f} MB/s | "
              f"{med[tar_rows[0]] / med[k]:.2f}x tar |")
    for k in resize_rows if not a.skip_resize else []:
        print(f"| {k} | {med[k]:.2f} | | {n_unique / med[k]:,.0f} img/s | "
              f"{med[resize_rows[0]] / med[k]:.2f}x stock loop |")
    for i, w in enumerate(counts):
        print(f"\n{w} worker(s): first run / strict check alone "
              f"{med[first_rows[i]] / med[check_rows[i]]:.2f}x (goal <= 1.15x); reshard of "
              f"checked sources {med[tar_rows[0]] / med[again_rows[i]]:.2f}x tar (goal >= 0.8x)",
              end="")
    if not a.skip_resize:
        print(f"\n--max-size vs the same loop on Pillow-SIMD: "
              f"{med[resize_rows[1]] / med[resize_rows[2]]:.2f}x", end="")
    print()
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
