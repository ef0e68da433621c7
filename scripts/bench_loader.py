#!/usr/bin/env python
"""Benchmark the training loader (shards -> uint8 224x224 batches) against the reference loaders.

Same real photographs (500x375 q90, scripts/photo_corpus.py) for every loader, each loader
in its own process, trials alternating, medians reported with ratios to the baselines of
the same run:

- decode only: `Image.open(f).convert("RGB")` over the files, one process (per-core ceiling)
- torchvision ImageFolder + RandomResizedCrop/RandomHorizontalFlip/ToTensor/Normalize
  (the reference recipe; baseline), and the same with PILToTensor (uint8, as FFCV's figures)
- this toolkit's train loader on pass-through shards and on `prep shard --max-size 384`
- FFCV 1.0.2 (`--ffcv-python`: the python of a separate venv with ffcv installed) on
  .beton files written from the same files (JPEG q90, like the originals): one at full
  resolution (against the pass-through shards), one with `max_resolution=384` (against the
  `--max-size 384` shards). Its loader with the settings that read fastest here
  (docs/benchmarks.md): os_cache=True, OrderOption.RANDOM, batches_ahead=3.

Rates are steady-state: the first batches (worker start, numba compile) are not timed.
"CPU ms/img" is the CPU of the loader's whole process tree (main process, workers,
threads) over the timed batches, per image (scripts/proc_cpu.py).

    .venv/bin/python scripts/bench_loader.py [--root /tmp/loader-bench] [--trials 3]
        [--workers 1,2] [--ffcv-python /tmp/ffcv-venv/bin/python] [--only toolkit]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from proc_cpu import cpu_between, tree_cpu  # noqa: E402

BATCH = 64
WARM_BATCHES = 8


def timed(batches, n_batches: int) -> tuple[float, float | None]:
    """(img/s, CPU ms per image of the whole process tree) over `n_batches` batches after
    WARM_BATCHES untimed ones."""
    it = iter(batches)
    for _ in range(WARM_BATCHES):
        next(it)
    cpu, t, n = tree_cpu(), time.perf_counter(), 0
    for _ in range(n_batches):
        n += len(next(it)[0])
    rate, spent = n / (time.perf_counter() - t), cpu_between(cpu, tree_cpu())
    return rate, None if spent is None else 1000 * spent / n


def child_decode(files: list[Path], n_images: int) -> tuple[float, float]:
    from PIL import Image

    files = (files * (n_images // len(files) + 1))[:n_images]
    t, cpu = time.perf_counter(), time.process_time()
    for f in files:
        Image.open(f).convert("RGB")
    return (len(files) / (time.perf_counter() - t),
            1000 * (time.process_time() - cpu) / len(files))


def child_imagefolder(tree: Path, workers: int, n_batches: int, uint8: bool
                      ) -> tuple[float, float | None]:
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tail = [T.PILToTensor()] if uint8 else [
        T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    ds = ImageFolder(str(tree), T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(),
                                           *tail]))
    n = (n_batches + WARM_BATCHES + 2 * workers + 1) * BATCH
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=n)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=sampler,
                                         num_workers=workers)
    return timed(loader, n_batches)


def child_toolkit(shards: Path, workers: int, n_batches: int, checked: bool = True
                  ) -> tuple[float, float | None]:
    """checked: each jpg's CRC-32 compared with index.parquet (what training does)."""
    from train.config import TrainConfig
    from train.data import SkipCounter, SplitInfo, make_train_loader, read_split

    split = read_split(str(shards), "train")
    n = (n_batches + WARM_BATCHES + 1) * BATCH
    split = SplitInfo(urls=split.urls, num_samples=n,  # the shard stream repeats
                      num_classes=split.num_classes,
                      checksums=split.checksums if checked else None)
    cfg = TrainConfig(batch_size=BATCH, workers=workers, shuffle_buffer=1000)
    loader = make_train_loader(split, cfg, 0, 1, 0, SkipCounter(cfg.max_skip_rate))
    return timed(loader, n_batches)


def child_resumable(shards: Path, workers: int, n_batches: int) -> tuple[float, float | None]:
    """train/resumable.py: the whole-split permutation read by random access (offsets from
    index.parquet), per-sample augmentation seeds; epochs repeat to fill the timed run."""
    from train.data import collate_with_ring
    from train.decode import TrainDecoder
    from train.resumable import ResumableLoader, read_rows

    collate, ring = collate_with_ring(workers, BATCH, 224, False, "cpu")
    loader = ResumableLoader(read_rows(shards, "train"), TrainDecoder(224, 0.08, True, 0),
                             batch_size=BATCH, workers=workers, collate=collate, ring=ring)

    def forever():
        while True:
            yield from loader

    return timed(forever(), n_batches)


FFCV_WRITE = """
import sys
from pathlib import Path
import numpy as np
from ffcv.writer import DatasetWriter
from ffcv.fields import RGBImageField, IntField
from PIL import Image
tree, out, max_res = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) or None
classes = sorted(p.name for p in tree.iterdir())
items = [(f, i) for i, c in enumerate(classes) for f in sorted((tree / c).iterdir())]
class DS:
    def __len__(self): return len(items)
    def __getitem__(self, i):
        return Image.open(items[i][0]).convert("RGB"), items[i][1]
DatasetWriter(out, {"image": RGBImageField(write_mode="jpg", jpeg_quality=90,
                                           max_resolution=max_res),
                    "label": IntField()}, num_workers=1).from_indexed_dataset(DS())
"""

FFCV_LOAD = """
import json, sys, time
import numpy as np
from ffcv.loader import Loader, OrderOption
from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder, IntDecoder
from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage, Squeeze
beton, scripts, workers, n_batches, batch, warm = *sys.argv[1:3], *map(int, sys.argv[3:])
sys.path.insert(0, scripts)
from proc_cpu import cpu_between, tree_cpu
loader = Loader(beton, batch_size=batch, num_workers=workers, order=OrderOption.RANDOM,
                drop_last=True, os_cache=True, batches_ahead=3, pipelines={
    "image": [RandomResizedCropRGBImageDecoder((224, 224)), RandomHorizontalFlip(),
              ToTensor(), ToTorchImage()],
    "label": [IntDecoder(), ToTensor(), Squeeze()]})
def forever():
    while True:
        yield from loader
it = forever()
for _ in range(max(warm, len(loader))):  # a whole first epoch: numba compiles in it
    next(it)
cpu, t, n = tree_cpu(), time.perf_counter(), 0
for _ in range(n_batches):
    n += len(next(it)[0])
rate, spent = n / (time.perf_counter() - t), cpu_between(cpu, tree_cpu())
print(json.dumps([rate, None if spent is None else 1000 * spent / n]))
"""


def build(root: Path) -> dict[str, Path]:
    from photo_corpus import build_photo_tree

    tree = build_photo_tree(root / "photos", 300, 2, root / "wheels")
    prep = str(Path(sys.executable).with_name("prep"))
    paths = {"tree": tree / "train", "shards": root / "shards",
             "shards384": root / "shards384"}
    if not (root / "data").exists():
        subprocess.run([prep, "imagenet", "-q", "--src", str(tree), "--link",
                        str(root / "data")], check=True)
    for key, extra in (("shards", []), ("shards384", ["--max-size", "384", "--quality", "90"])):
        if not (paths[key] / "_info.json").exists():
            subprocess.run([prep, "shard", "-q", "--data", str(root / "data/imagenet"),
                            "--out", str(paths[key]), "--splits", "train", "--num-shards", "8",
                            *extra], check=True)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/loader-bench"))
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--batches", type=int, default=60, help="timed batches of 64 per run")
    ap.add_argument("--ffcv-python", default=None)
    ap.add_argument("--only", default="", help="comma-separated parts of the loader names "
                    "to run (e.g. toolkit)")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, path, workers = a.child[0], Path(a.child[1]), int(a.child[2])
        if kind == "decode":
            rate = child_decode(sorted(path.rglob("*.JPEG")), a.batches * BATCH)
        elif kind.startswith("imagefolder"):
            rate = child_imagefolder(path, workers, a.batches, kind.endswith("uint8"))
        elif kind == "resumable":
            rate = child_resumable(path, workers, a.batches)
        else:
            rate = child_toolkit(path, workers, a.batches, kind != "toolkit-unchecked")
        print(json.dumps(rate))
        return

    paths = build(a.root)
    betons = {0: a.root / "photos.beton", 384: a.root / "photos384.beton"}
    for max_res, beton in betons.items():
        if a.ffcv_python and not beton.exists():
            subprocess.run([a.ffcv_python, "-c", FFCV_WRITE, str(paths["tree"]), str(beton),
                            str(max_res)], check=True, capture_output=True)
    worker_counts = [int(w) for w in a.workers.split(",")]
    runs: list[tuple[str, int, list[str]]] = [("decode only, 1 process", 1, [
        "decode", str(paths["tree"]), "1"])]
    for w in worker_counts:
        runs += [
            (f"ImageFolder + ToTensor/Normalize (baseline), {w} worker(s)", w,
             ["imagefolder", str(paths["tree"]), str(w)]),
            (f"ImageFolder + PILToTensor (uint8), {w} worker(s)", w,
             ["imagefolder-uint8", str(paths["tree"]), str(w)]),
            (f"toolkit, pass-through shards, {w} worker(s)", w,
             ["toolkit", str(paths["shards"]), str(w)]),
            (f"toolkit without the per-sample CRC check, pass-through shards, {w} worker(s)",
             w, ["toolkit-unchecked", str(paths["shards"]), str(w)]),
            (f"resumable loader (random access by index), pass-through shards, {w} worker(s)",
             w, ["resumable", str(paths["shards"]), str(w)]),
            (f"toolkit, --max-size 384 shards, {w} worker(s)", w,
             ["toolkit", str(paths["shards384"]), str(w)]),
        ]
        if a.ffcv_python:
            runs += [(f"FFCV 1.0.2, full resolution, {w} worker(s)", w,
                      ["ffcv", str(betons[0]), str(w)]),
                     (f"FFCV 1.0.2, max_resolution 384, {w} worker(s)", w,
                      ["ffcv", str(betons[384]), str(w)])]
    if a.only:  # keep the decode-only reference and the runs named
        runs = runs[:1] + [r for r in runs[1:] if any(s in r[0] for s in a.only.split(","))]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    cpus: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for trial in range(a.trials):
        for name, _, child in runs:
            if child[0] == "ffcv":
                cmd = [a.ffcv_python, "-c", FFCV_LOAD, child[1], str(REPO / "scripts"),
                       child[2], str(a.batches), str(BATCH), str(WARM_BATCHES)]
            else:
                cmd = [sys.executable, __file__, "--batches", str(a.batches), "--child", *child]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rate, cpu = json.loads(out.strip().splitlines()[-1])
            rates[name].append(rate)
            if cpu is not None:
                cpus[name].append(cpu)
            print(f"trial {trial + 1}: {name}: {rate:,.0f} img/s", file=sys.stderr)

    import PIL

    med = {k: statistics.median(v) for k, v in rates.items()}
    decode = med[runs[0][0]]
    print(f"\n{platform.node()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}, "
          f"{a.trials} trials x {a.batches} batches of {BATCH}, 224x224 output; Pillow "
          f"{PIL.__version__}; {sum(1 for _ in paths['tree'].rglob('*.JPEG')):,} photos\n")
    print("| loader | workers | median img/s | per worker | vs baseline | vs decode-only "
          "| CPU ms/img |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, w, _ in runs:
        base = med.get(f"ImageFolder + ToTensor/Normalize (baseline), {w} worker(s)", med[name])
        cpu = f"{statistics.median(cpus[name]):.2f}" if cpus[name] else "-"
        print(f"| {name.rsplit(',', 1)[0]} | {w} | {med[name]:,.0f} | {med[name] / w:,.0f} | "
              f"{med[name] / base:.2f}x | {med[name] / w / decode:.2f} | {cpu} |")
    if a.ffcv_python:
        print("\nthe toolkit against FFCV on images of the same size:")
        for w in worker_counts:
            for ours, theirs in (("pass-through shards", "full resolution"),
                                 ("--max-size 384 shards", "max_resolution 384")):
                mine = med.get(f"toolkit, {ours}, {w} worker(s)")
                other = med.get(f"FFCV 1.0.2, {theirs}, {w} worker(s)")
                if mine and other:
                    print(f"- {w} worker(s), toolkit {ours} vs FFCV {theirs}: "
                          f"{mine / other:.2f}x")
    if len(worker_counts) > 1:
        lo, hi = worker_counts[0], worker_counts[-1]
        print(f"\nscaling {lo} -> {hi} workers:")
        for name, w, _ in runs:
            if w == lo and name.replace(f"{lo} worker", f"{hi} worker") in med:
                other = med[name.replace(f"{lo} worker", f"{hi} worker")]
                print(f"- {name.rsplit(',', 1)[0]}: {other / med[name]:.2f}x")


if __name__ == "__main__":
    main()
