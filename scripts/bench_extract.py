#!/usr/bin/env python
"""Benchmark extracting the Hugging Face ImageNet releases, ratios to baselines in the same run.

1. One `train_images_N.tar.gz` of real photographs (500x375 q90, scripts/photo_corpus.py,
   members named `<stem>_<wnid>.JPEG`): `tar -xzf` into a folder (baseline: gzip
   decompression is the floor) vs prep's extraction of the same archive (one process:
   names checked, suffix stripped, class folders, temp file + rename per file).
2. One `train-NNNNN-of-NNNNN.parquet` of the same photos: a plain pyarrow loop reading the
   `image` column batch by batch and writing each image to a file (baseline) vs prep's.
Trials alternate baseline and candidate; the table shows medians and ratios (goal: >= 0.8x).

    .venv/bin/python scripts/bench_extract.py [--root /tmp/extract-bench] [--trials 3]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

def plain_parquet_loop(parquet: Path, out: Path) -> None:
    """The baseline: read the image column batch by batch, write each image to a file."""
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(parquet).iter_batches(batch_size=256, columns=["image"]):
        image = batch.column("image")
        for path, data in zip(image.field("path").to_pylist(),
                              image.field("bytes").to_pylist()):
            (out / path).write_bytes(data)


def build(root: Path, per_class: int) -> tuple[Path, Path, int, int]:
    from photo_corpus import build_photo_tree

    tree = build_photo_tree(root / "photos", per_class, 1, root / "wheels")
    files = sorted((tree / "train").rglob("*.JPEG"))
    archive, parquet = root / "train_images_0.tar.gz", root / "train-00000-of-00001.parquet"
    if not archive.exists():
        with tarfile.open(archive, "w:gz", compresslevel=6) as t:
            for f in files:
                data = f.read_bytes()
                info = tarfile.TarInfo(f"{f.stem}_{f.parent.name}.JPEG")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    if not parquet.exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        from prep.scoring import global_index

        image = pa.array([{"bytes": f.read_bytes(), "path": f"{f.stem}_{f.parent.name}.JPEG"}
                          for f in files],
                         pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        labels = pa.array([global_index()[f.parent.name] for f in files], pa.int64())
        pq.write_table(pa.table({"image": image, "label": labels}), parquet,
                       row_group_size=1000)
    return archive, parquet, len(files), sum(f.stat().st_size for f in files)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def tar_xzf(archive: Path, out: Path) -> None:
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(out)], check=True)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    subprocess.run(["sync"], check=False)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/extract-bench"))
    ap.add_argument("--per-class", type=int, default=300, help="photos per class (x10)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None,
                    help="where files are extracted (default ROOT/out; /dev/shm/... takes the "
                         "disk's file-creation cost, noisy on this VM, out of the comparison)")
    a = ap.parse_args()
    from prep.hf import _parquet_job, _tar_job

    archive, parquet, n, nbytes = build(a.root, a.per_class)
    out = a.out or a.root / "out"
    rows: dict[str, list[float]] = {k: [] for k in (
        "tar -xzf (baseline 1)", "prep, hf-tar, 1 process",
        "pyarrow loop writing files (baseline 2)", "prep, hf-parquet, 1 process")}
    names = list(rows)
    runs = [(tar_xzf, archive), (_tar_job, archive, "train"),
            (plain_parquet_loop, parquet), (_parquet_job, parquet, "train")]
    for _ in range(a.trials):
        for name, (fn, *args) in zip(names, runs):
            d = fresh(out)
            if fn in (_tar_job, _parquet_job):
                rows[name].append(timed(fn, args[0], args[1], d))
            else:
                rows[name].append(timed(fn, args[0], d))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\n{platform.node()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}, "
          f"{a.trials} trials, output in {out}; {n:,} photos, {nbytes / 1e6:,.0f} MB "
          f"(tar.gz {archive.stat().st_size / 1e6:,.0f} MB, "
          f"parquet {parquet.stat().st_size / 1e6:,.0f} MB)\n")
    print("| run | median s | img/s | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for i, k in enumerate(names):
        base = med[names[0]] if i < 2 else med[names[2]]
        print(f"| {k} | {med[k]:.2f} | {n / med[k]:,.0f} | {base / med[k]:.2f}x |")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
