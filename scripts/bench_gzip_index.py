#!/usr/bin/env python
"""One gzip archive read whole by ISA-L (what the extraction and `prep shard --src` use for
most files) and by rapidgzip on 1 and 2 threads (what `--src` uses for a file with more than
one worker's share, prep/gzindex.py), alternating trials, medians, ratios to ISA-L; then
rapidgzip's seek index at three spacings and a read of the second half from the middle
through it.

    .venv/bin/python scripts/bench_gzip_index.py ARCHIVE.tar.gz

(docs/benchmarks.md, "One gzip archive, several readers"; run there before rapidgzip was a
dependency, from a folder on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

CHUNK = 4 << 20


def drain(f) -> int:
    n = 0
    while b := f.read(CHUNK):
        n += len(b)
    return n


def isal_read(path: str) -> int:
    from isal import igzip

    with igzip.open(path) as f:
        return drain(f)


def rapidgzip_read(path: str, threads: int, chunk: int = 4 << 20, index: str = "") -> int:
    import rapidgzip

    with rapidgzip.RapidgzipFile(path, parallelization=threads, chunk_size=chunk) as f:
        n = drain(f)
        if index:
            f.export_index(index)
        return n


def timed(fn) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive")
    ap.add_argument("--trials", type=int, default=3)
    a = ap.parse_args()
    import rapidgzip

    runs = {"ISA-L (isal.igzip), 1 thread": lambda: isal_read(a.archive),
            "rapidgzip, 1 thread": lambda: rapidgzip_read(a.archive, 1),
            "rapidgzip, 2 threads": lambda: rapidgzip_read(a.archive, 2)}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(a.trials):  # alternating
        for name, fn in runs.items():
            times[name].append(timed(fn))
    base = statistics.median(w for w, _ in times["ISA-L (isal.igzip), 1 thread"])
    print(f"{a.archive}: {os.path.getsize(a.archive) / 1e6:,.0f} MB, {a.trials} trials each\n")
    print("| read of the whole archive | median wall s | range s | CPU-s (median) | vs ISA-L |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, ts in times.items():
        walls = [w for w, _ in ts]
        med = statistics.median(walls)
        print(f"| {name} | {med:.2f} | {min(walls):.2f}-{max(walls):.2f} | "
              f"{statistics.median(c for _, c in ts):.2f} | {base / med:.2f}x |")
    print("\n| seek points every | 2-thread read s | index bytes |")
    print("| ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for mib in (4, 32, 128):
            index = os.path.join(tmp, f"index-{mib}")
            wall, _ = timed(lambda m=mib, i=index: rapidgzip_read(a.archive, 2, m << 20, i))
            print(f"| {mib} MiB | {wall:.2f} | {os.path.getsize(index):,} |")
        index = os.path.join(tmp, "index-32")
        t = time.perf_counter()
        with rapidgzip.RapidgzipFile(a.archive, parallelization=1) as f:
            f.import_index(index)
            imported = time.perf_counter() - t
            f.seek(f.seek(0, os.SEEK_END) // 2)
            drain(f)
        print(f"\nwith the 32 MiB index, 1 thread: import {imported * 1e3:.1f} ms; seek to the "
              f"middle and read the second half: {time.perf_counter() - t:.2f} s "
              f"(the whole read on 1 thread: {base:.2f} s through ISA-L)")


if __name__ == "__main__":
    main()
