#!/usr/bin/env python
"""Benchmark `prep shard --src` (shards read in place from the original ILSVRC2012 tars)
against the two-step path it replaces, in one run, with the disk each one needs.

Release: `prep sample --layout ilsvrc2012-tar --size 500` (the train tar of class tars, the
val tar, the devkit; synthetic 500 px JPEGs of ~75 KB). Runs, alternating, each from a
clean output (the release stays in the page cache, as for every row):
1. `tar -xf` of the train tar, then of each class tar inside it, and of the val tar: the
   plain extraction (baseline 1);
2. `prep imagenet --extract-to X --link V`: prep's extraction, listing, checks and links;
3. `prep shard --data V/imagenet`, after 2 (the second step; the two-step path is 2 + 3);
4. `prep shard --src RELEASE`: one pass, nothing extracted (its record of checked members
   removed before: a first pass);
5. the same again into a new OUT: the members checked in 4 are not checked again (a
   reshard: another shard count or --max-size);
6. `--src` with `--check header` (what the pass costs without the strict JPEG check);
7. the strict check alone: every member read in place and entropy-decoded
   (prep.jpeg.strict_problem), in as many processes as cores: the floor of rows 3 and 4;
8. (a gzip release) rows 4 and 5 with rapidgzip hidden from prep (a module of that name
   that fails to import, first on PYTHONPATH): each file read whole by one ISA-L reader in
   both passes, as where rapidgzip is not installed.
`--layout blurred-tar | hf-tar | hf-parquet`: a compressed release instead (each file read
twice by `--src`; row 1 is then `tar -xzf` of every archive at once, none for Parquet,
and there is no row 7). All with the defaults (--check full, every core) unless said.
Disk: the peak growth of the file system's used space while each run ran (statvfs every
20 ms), against the shards' size.

    .venv/bin/python scripts/bench_direct.py [--root /tmp/direct-bench] [--trials 3]
        [--layout ilsvrc2012-tar]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
PREP = str(Path(sys.executable).with_name("prep"))


class DiskPeak:
    """The peak growth of used space on the file system of `path` while running."""

    def __init__(self, path: Path) -> None:
        self.path, self.peak, self._stop = path, 0, threading.Event()
        self.base = self._used()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _used(self) -> int:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._used() - self.base)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._used() - self.base)


def run(args: list[str], where: Path, env: dict[str, str] | None = None
        ) -> tuple[float, int]:
    """Wall seconds and peak disk growth of one command."""
    peak = DiskPeak(where)
    t = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env)
    seconds = time.perf_counter() - t
    return seconds, peak.stop()


def plain_tar_x(release: Path, out: Path, layout: str) -> list[str]:
    """The shell command of baseline 1: every archive and class tar extracted with tar (a
    compressed release: each .tar.gz by its own `tar -xzf`, all at once)."""
    if layout != "ilsvrc2012-tar":
        return ["bash", "-c", f"set -e; mkdir -p {out}; cd {out}; for a in "
                f"{release}/*.tar.gz; do mkdir $(basename $a); tar -xzf $a -C $(basename $a) "
                "& done; wait"]
    script = (f"set -e; mkdir -p {out}/train {out}/val; cd {out}/train; "
              f"tar -xf {release}/ILSVRC2012_img_train.tar; "
              "for t in *.tar; do d=${t%.tar}; mkdir $d; tar -xf $t -C $d; rm $t; done; "
              f"tar -xf {release}/ILSVRC2012_img_val.tar -C {out}/val")
    return ["bash", "-c", script]


def _check_members(archive: str, members: list[tuple[int, int]]) -> int:
    from prep import jpeg

    bad = 0
    with open(archive, "rb") as f:
        for offset, size in members:
            bad += jpeg.strict_problem(os.pread(f.fileno(), size, offset)) is not None
    return bad


def check_alone(release: Path) -> None:
    """Row 7 (run as `bench_direct.py --check-alone RELEASE`, timed from outside): list the
    archives, then check every member in one process per core."""
    from concurrent.futures import ProcessPoolExecutor

    from prep.archive_listing import list_archives
    from prep.workers import worker_context

    arch = {"train": release / "ILSVRC2012_img_train.tar",
            "val": release / "ILSVRC2012_img_val.tar"}
    where = list_archives(arch, progress=False).where
    n = len(os.sched_getaffinity(0))
    jobs = [(str(arch[s]), list(w.values())[i::n]) for s, w in where.items() for i in range(n)]
    with ProcessPoolExecutor(n, mp_context=worker_context()) as pool:
        if sum(pool.map(_check_members, *zip(*jobs))):
            raise SystemExit("a member failed the strict check")


def clean(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    subprocess.run(["sync"], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/direct-bench"))
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=600)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--layout", default="ilsvrc2012-tar",
                    choices=["ilsvrc2012-tar", "blurred-tar", "hf-tar", "hf-parquet"],
                    help="the release to shard (compressed ones: no row 7; Parquet: no "
                    "row 1, prep's extraction is the baseline)")
    ap.add_argument("--check-alone", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.check_alone:
        return check_alone(a.check_alone)
    root = a.root
    release = root / f"release-{a.layout}" if a.layout != "ilsvrc2012-tar" else \
        root / "release"
    if not (release / "SAMPLE.json").is_file():
        clean(release)
        subprocess.run([PREP, "sample", "--layout", a.layout, "--size", "500",
                        "--classes", str(a.classes), "--train-per-class",
                        str(a.train_per_class), "--val-per-class", str(a.val_per_class),
                        str(release)], check=True)
    nbytes = sum(p.stat().st_size for p in release.rglob("*") if p.suffix in (".tar", ".gz",
                                                                             ".parquet"))
    n = a.classes * (a.train_per_class + a.val_per_class)
    x, view, two, direct, plain, cache = (root / d for d in ("x", "view", "two", "direct",
                                                            "plain", "cache"))
    os.environ["XDG_CACHE_HOME"] = str(cache)  # prep shard --src's record: this bench's own
    tar, ext, step2, one, again, header, alone = (
        "tar -xf of every archive (baseline 1)", "prep imagenet --extract-to (step 1)",
        "prep shard --data, after step 1 (step 2)", "prep shard --src (one pass)",
        "prep shard --src again, new OUT (members checked before)",
        "prep shard --src --check header", "strict check alone (every core)")
    packed = a.layout != "ilsvrc2012-tar"
    if packed:
        tar = "tar -xzf of every archive, all at once (baseline 1)"
    one_isal, again_isal = (f"{one[:-1]}, without rapidgzip)",
                            f"{again[:-1]}, without rapidgzip)")
    hidden = root / "no-rapidgzip"
    hidden.mkdir(parents=True, exist_ok=True)
    (hidden / "rapidgzip.py").write_text('raise ImportError("hidden by bench_direct.py")\n')
    no_rapidgzip = {**os.environ, "PYTHONPATH": str(hidden)}
    rows: dict[str, list[tuple[float, int]]] = {
        k: [] for k in (tar, ext, step2, one, again, one_isal, again_isal, header, alone)}
    for _ in range(a.trials):
        clean(plain)
        if a.layout != "hf-parquet":  # Parquet: no tar; prep's extraction is the baseline
            rows[tar].append(run(plain_tar_x(release, plain, a.layout), root))
        clean(plain, x, view, two)
        rows[ext].append(run([PREP, "imagenet", "--src", str(release), "--link",
                              str(view), "--extract-to", str(x), "-q"], root))
        rows[step2].append(run([PREP, "shard", "--data", str(view / "imagenet"), "--out",
                                str(two), "-q"], root))
        clean(x, view, two, direct, cache)
        rows[one].append(run([PREP, "shard", "--src", str(release), "--out",
                              str(direct), "-q"], root))
        clean(direct)
        rows[again].append(run([PREP, "shard", "--src", str(release), "--out",
                                str(direct), "-q"], root))
        clean(direct)
        rows[header].append(run([PREP, "shard", "--src", str(release), "--out",
                                 str(direct), "-q", "--check", "header"], root))
        if not packed:  # a compressed release has no member to check in place
            rows[alone].append(run([sys.executable, __file__, "--check-alone",
                                    str(release)], root))
        elif a.layout != "hf-parquet":
            clean(direct, cache)
            rows[one_isal].append(run([PREP, "shard", "--src", str(release), "--out",
                                       str(direct), "-q"], root, no_rapidgzip))
            clean(direct)
            rows[again_isal].append(run([PREP, "shard", "--src", str(release), "--out",
                                         str(direct), "-q"], root, no_rapidgzip))
    shards = sum(p.stat().st_size for p in direct.glob("*.tar"))
    clean(plain, x, view, two, direct, cache)
    rows = {k: v for k, v in rows.items() if v}
    base = tar if tar in rows else ext
    med = {k: statistics.median(s for s, _ in v) for k, v in rows.items()}
    peak = {k: max(d for _, d in v) for k, v in rows.items()}
    two_step = [s1 + s2 for (s1, _), (s2, _) in zip(rows[ext], rows[step2])]
    print(f"\n{platform.node()} ({len(os.sched_getaffinity(0))} cores), "
          f"{time.strftime('%Y-%m-%d')}, {a.trials} trials; {a.layout}, {n:,} images, "
          f"release {nbytes / 1e6:,.0f} MB, shards {shards / 1e6:,.0f} MB\n")
    print("| run | median s | range s | peak disk MB | vs baseline |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k in rows:
        lo, hi = min(s for s, _ in rows[k]), max(s for s, _ in rows[k])
        print(f"| {k} | {med[k]:.2f} | {lo:.2f}-{hi:.2f} | {peak[k] / 1e6:,.0f} | "
              f"{med[k] / med[base]:.2f}x |")
    t2 = statistics.median(two_step)
    print(f"| two-step path (steps 1 + 2) | {t2:.2f} | {min(two_step):.2f}-"
          f"{max(two_step):.2f} | {(peak[ext] + peak[step2]) / 1e6:,.0f} | "
          f"{t2 / med[base]:.2f}x |")
    d = med[one]
    print(f"\none pass: {d / med[ext]:.2f}x prep's extraction (goal <= 1.1x), "
          f"{d / med[base]:.2f}x the baseline, {d / t2:.2f}x the two-step path "
          f"(goal <= 0.6x); its peak disk {peak[one] / 1e6:,.0f} MB for "
          f"{shards / 1e6:,.0f} MB of shards")
    print(f"again into a new OUT (checked before): {med[again] / med[ext]:.2f}x prep's "
          f"extraction, {med[again] / t2:.2f}x the two-step path")

if __name__ == "__main__":
    main()
