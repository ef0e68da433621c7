"""WebDataset input pipelines for DDP training and exact evaluation (docs/design-notes.md).

Train: shards shuffled per epoch identically on every rank (seed + epoch), split by rank
then by worker, a sample shuffle buffer before decode, decode + RandomResizedCrop + flip
to uint8 in the workers, batches built in the workers. The shard stream repeats, and the
loader is cut at the same number of steps on every rank (`with_epoch`), so a rank whose
shards hold fewer samples can never leave the others waiting in an all-reduce.

Eval: every sample exactly once across ranks, no repeat, no padding; shards split by rank
then worker, or, when there are fewer shards than ranks x workers, every worker reads all
shards and keeps every (ranks x workers)-th sample.
"""

from __future__ import annotations

import math
import os
import random
import re
import warnings
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import count
from pathlib import Path

import torch
import webdataset as wds

from prep.crc import crc32
from prep.errors import PrepError, SampleError, SettingError
from prep.workers import (
    die_with_parent,
    keep_image_buffers_in_heap,
    terminate_only_from,
    worker_context,
)
from shards import tarread
from shards.cache import ShardCache
from shards.manifest import find_split, parquet_table, parse_info
from shards.store import Store, StoreError, is_store_url
from train.batch_ring import BatchRing, RingLoader, RingSlot
from train.config import TrainConfig
from train.decode import TrainDecoder, ValDecoder, derive_seed, worker_slot
from train.device_decode import RawTrainDecoder, RawValDecoder, collate_raw


@dataclass(kw_only=True)
class SplitInfo:
    urls: list[str]
    num_samples: int
    num_classes: int
    classes: list[str] | None = None  # WNIDs in label order, when the manifest has them
    evalset: dict | None = None  # `prep evalset` shards: kind, classes present (manifest)
    # per shard URL, the CRC-32 of each jpg member in member order (index.parquet); None
    # for shards without one (timm's): then nothing is checked
    checksums: dict[str, array] | None = None
    split: str = ""  # its name as asked for: "test" holds unlabelled samples
    cache: ShardCache | None = None  # s3:// --data: this node's cache of the shards


def default_cache_dir() -> str:
    """Where shards from object storage are cached by default: $XDG_CACHE_HOME/prep-shards
    (~/.cache/prep-shards), one folder for every rank and worker of the node."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "prep-shards")


def local_world() -> int:
    """Processes of this run on this node (torchrun's LOCAL_WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def open_store_cache(data: str, cache_dir: str | None, cache_size: str | None,
                     shards_at_once: int) -> ShardCache | None:
    """The node's cache for an s3:// --data (None for any other): bounded by `cache_size`
    (`200GB`, `500MiB`, bytes; default: the whole output, or half the free disk), which must
    hold `shards_at_once` of the largest shard (what the loaders of a node pin at once)."""
    from shards.cache import human, open_cache, parse_size

    if not is_store_url(data):
        return None
    try:
        limit = parse_size(cache_size) if cache_size is not None else None
    except ValueError as exc:
        raise SettingError(f"--cache-size {exc}") from None
    root = cache_dir or default_cache_dir()
    try:
        cache = open_cache(Store(data), root, limit)
    except OSError as exc:
        raise SettingError(f"--cache-dir {root}: cannot use it ({exc.strerror})") from None
    need = shards_at_once * cache.largest()
    if cache.limit < need:
        raise SettingError(
            f"--cache-size {human(cache.limit)} is too small for {data}: the loaders of this "
            f"node hold up to {shards_at_once} shards at once (2 x shard_window + 2, or ranks "
            f"x workers + 1) of up to {human(cache.largest())}: give at least {human(need)}"
            + ("" if cache_size else f" (free space under {root} is short)"))
    return cache


def shard_url(data: str, name: str) -> str:
    """Where file `name` of a `prep shard` output lives. `data` is a directory, a URL prefix
    (`http://host/shards`, any scheme webdataset opens) or a template with `{}` for the
    name (`pipe:aws s3 cp s3://bucket/shards/{} -`, `pipe:cat /mnt/shards/{}`)."""
    if "{}" in data:
        return data.replace("{}", name)
    if tarread.is_local(data):
        return str(Path(data.removeprefix("file://")) / name)
    return data.rstrip("/") + "/" + name


def local_dir(data: str) -> str | None:
    """The directory of a local --data (None for a URL prefix, a store or a pipe template)."""
    return data.removeprefix("file://") if tarread.is_local(data) and "{}" not in data else None


_FETCHED: dict[str, tuple[str, bytes]] = {}  # object URL -> (its ETag, its bytes)


def _store_manifest_file(store: Store, name: str) -> bytes | None:
    """A manifest object, downloaded once per process while its ETag stays the same (the
    trainer reads index.parquet for the checksums and again for the rows: on ImageNet, tens
    of MB per rank). Each read is one request that still asks the store whether it changed
    (a conditional GET)."""
    url = store.where.url(name)
    memo = _FETCHED.get(url)
    got = store.get_unless(name, memo[0] if memo and memo[0] else None)
    if got is None:
        _FETCHED.pop(url, None)
        return None
    if isinstance(got, str):  # unchanged since the memo
        return memo[1]
    if len(_FETCHED) >= 4:
        _FETCHED.clear()
    _FETCHED[url] = got
    return got[1]


def read_manifest_file(data: str, name: str) -> bytes | None:
    """File `name` of a shard output (directory, URL prefix or pipe template); None when a
    local one does not exist."""
    where = shard_url(data, name)
    if is_store_url(data):
        return _store_manifest_file(Store(data), name)
    if tarread.is_local(where):
        return Path(where).read_bytes() if Path(where).is_file() else None
    try:
        with wds.gopen(where) as f:
            return f.read()
    except Exception as exc:  # curl / the pipe command failed: say which URL
        status = re.search(r"exit (\d+)", str(exc))
        why = f"the command exited with status {status[1]}" if status else repr(exc)
        raise PrepError(f"{where}: cannot read it ({why}); check the URL or command") from exc


def read_split(data: str, split: str) -> SplitInfo:
    """Shard URLs, counts and per-sample checksums of `split` from the manifest of `data`
    (`_info.json`, `index.parquet`; see shard_url)."""
    return read_splits(data, split)[0]


def read_splits(data: str, *splits: str) -> list[SplitInfo]:
    """read_split for several splits, the manifest read once (index.parquet is ~100 MB for
    ImageNet: training reads train and val)."""
    where = shard_url(data, "_info.json")
    text = read_manifest_file(data, "_info.json")
    if text is None and (alt := read_manifest_file(data, "_info.yaml")) is not None:
        where, text = shard_url(data, "_info.yaml"), alt  # timm's shards may carry this one
    if text is None:
        raise PrepError(f"{where}: missing; --data must be a `prep shard` output "
                        "(a directory, a URL prefix or a pipe:...{} template)")
    info = parse_info(text, where)
    keys = [find_split(info, split) for split in splits]
    for split, key in zip(splits, keys):
        if key is None:
            raise PrepError(f"{where}: no split {split!r} (has {sorted(info['splits'])})")
    classes = info.get("classes")
    if not (isinstance(classes, list) and len(classes) == info["num_classes"]
            and all(isinstance(c, str) for c in classes)):
        classes = None
    evalset = info.get("evalset") if isinstance(info.get("evalset"), dict) else None
    # a `prep shard` output carries per-sample checksums; other shards (timm's) carry none
    shards = [info["splits"][key] for key in keys]
    checksums = read_checksums(data, [f for s in shards for f in s["filenames"]],
                               [n for s in shards for n in s["shard_lengths"]]) \
        if isinstance(info.get("prep"), dict) else None
    return [SplitInfo(urls=[shard_url(data, f) for f in s["filenames"]],
                      num_samples=s["num_samples"], num_classes=info["num_classes"],
                      classes=classes, evalset=evalset,
                      checksums={shard_url(data, f): checksums[f] for f in s["filenames"]}
                      if checksums is not None else None, split=split)
            for split, s in zip(splits, shards)]


def read_checksums(data: str, names: list[str], lengths: list[int]) -> dict[str, array]:
    """{shard name: CRC-32 of each jpg member, in member order} from index.parquet. A
    `prep shard` output without them (or with rows that do not match `_info.json`) is an
    error: the loader never reads unchecked bytes from shards that should carry checks."""
    import pyarrow as pa

    where = shard_url(data, "index.parquet")
    raw = read_manifest_file(data, "index.parquet")
    if raw is None:
        raise PrepError(f"{where}: missing; rerun `prep shard` to write the manifest")
    try:
        table = parquet_table(raw, ["shard", "jpg_crc32"])
    except (pa.ArrowException, OSError) as exc:
        raise PrepError(f"{where}: unreadable or without the jpg_crc32 column (written by an "
                        f"older prep?): rerun `prep shard` ({str(exc)[:120]})") from exc
    wanted = set(names)
    out: dict[str, array] = {n: array("L") for n in names}
    for shard, crc in zip(table.column("shard").to_pylist(),
                          table.column("jpg_crc32").to_pylist()):
        if shard in wanted:
            out[shard].append(crc)
    for name, n in zip(names, lengths):
        if len(out[name]) != n:
            raise PrepError(f"{where}: {len(out[name])} rows for {name}, _info.json says {n}; "
                            "the manifest does not match the shards (`prep verify`)")
    return out


class EpochShards(torch.utils.data.IterableDataset):
    """Yields {"url": ...} for this rank and worker. Train: a fresh permutation per epoch,
    the same on all ranks, repeated forever (the loader decides where an epoch ends)."""

    def __init__(self, urls: list[str], rank: int, world: int, seed: int, epoch: int,
                 repeat: bool):
        self.urls, self.rank, self.world = urls, rank, world
        self.seed, self.epoch, self.repeat = seed, epoch, repeat

    def __iter__(self):
        worker, workers = worker_slot()
        number = {url: i for i, url in enumerate(self.urls)}  # _info.json's order
        for ep in count(self.epoch) if self.repeat else [self.epoch]:
            order = list(self.urls)
            if self.repeat:
                random.Random(derive_seed(self.seed, ep)).shuffle(order)
            for url in order[self.rank :: self.world][worker::workers]:
                yield {"url": url, "shard": number[url]}


class AllShards(torch.utils.data.IterableDataset):
    """Eval fallback: every worker reads every shard (then `keep_every` picks its samples)."""

    def __init__(self, urls: list[str]):
        self.urls = urls

    def __iter__(self):
        for i, url in enumerate(self.urls):
            yield {"url": url, "shard": i}


class read_shards:  # noqa: N801 - a pipeline stage, named like webdataset's stages
    """Pipeline stage: {"url"} -> samples. Local shards through a memory map
    (shards.tarread: ~10x less time per sample than tarfile), remote URLs (`pipe:`, http)
    through webdataset. An unreadable shard goes to `handler` (True: go on with the next
    shard, keeping the samples read before the damage), or raises without one. A class:
    the loader's workers receive the pipeline pickled (prep.workers)."""

    def __init__(self, handler: Callable[[Exception], bool] | None = None,
                 keep: tuple[str, ...] = ("jpg", "cls"),
                 checksums: dict[str, array] | None = None, cache: ShardCache | None = None):
        self.handler, self.keep, self.checksums, self.cache = handler, keep, checksums, cache

    def __call__(self, sources: Iterable[dict]) -> Iterator[dict]:
        for source in sources:
            url = source["url"]
            crcs = self.checksums.get(url) if self.checksums is not None else None
            pinned = None
            try:
                if self.cache is not None:  # object storage: a checked, pinned local copy
                    pinned = self.cache.open(self.cache.name(url))
                    files = tarread.local_files(pinned.path)
                elif tarread.is_local(url):
                    files = tarread.local_files(url.removeprefix("file://"))
                else:  # webdataset opens URLs and pipes; the grouping is the same stage
                    files = ((f["fname"], lambda d=f["data"]: d)
                             for f in wds.tariterators.tar_file_expander(
                                 wds.tariterators.url_opener([source]), eof_value=None))
                for pos, sample in enumerate(tarread.group_samples(files, url, self.keep)):
                    sample["__pos__"] = (source.get("shard", -1), pos)  # manifest order
                    if crcs is not None and not self._intact(sample, crcs, pos):
                        continue  # skipped under the handler's rule (it raised otherwise)
                    yield sample
            except StoreError:
                raise  # the store stayed away, or its bytes are not SHA256SUMS's: stop
            except Exception as exc:
                if self.handler is None or not self.handler(exc):
                    raise
            finally:
                if pinned is not None:
                    pinned.close()

    def _intact(self, sample: dict, crcs: array, pos: int) -> bool:
        """Whether the jpg is the one the index recorded; a sample that is not goes to the
        handler (skipped) or, without one, stops the run naming shard and member."""
        err = jpg_mismatch(sample, crcs[pos] if pos < len(crcs) else None)
        if err is None:
            return True
        if self.handler is None or not self.handler(err):
            raise err
        return False


def jpg_mismatch(sample: dict, crc: int | None) -> SampleError | None:
    """None when the sample's jpg has the CRC-32 index.parquet recorded for it; else the
    error naming shard, member and what differs (`crc` None: no row for it)."""
    data = sample.get("jpg")
    if data is not None and crc is not None and crc32(data) == crc:
        return None
    why = "no jpg member" if data is None else "beyond the index" if crc is None \
        else ("its CRC-32 differs from index.parquet: not the bytes index.parquet "
              "recorded (corrupt or replaced)")
    return SampleError(f"{sample['__url__']}: member {sample['__key__']}.jpg: {why}")


class keep_every:  # noqa: N801 - a pipeline stage
    """Eval fallback stage: this worker's share, every (ranks x workers)-th sample."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        worker, workers = worker_slot()
        slot, slots = self.rank * workers + worker, self.world * workers
        for i, s in enumerate(samples):
            if i % slots == slot:
                yield s


class SkipCounter:
    """Counts decode/read failures; raises once they exceed `max_rate` of samples seen
    (webdataset's warn_and_continue sleeps 0.5 s per error and never stops)."""

    def __init__(self, max_rate: float):
        self.max_rate, self.errors, self.seen = max_rate, 0, 0

    def __call__(self, exc: Exception) -> bool:
        if isinstance(exc, (TypeError, NameError, AttributeError)):
            return False  # a code error: never swallowed
        self.errors += 1
        if self.errors > max(10, self.max_rate * self.seen):  # allow a few at the start
            raise RuntimeError(f"{self.errors} unreadable samples out of ~{self.seen}: above "
                               f"max_skip_rate {self.max_rate}; last: {exc}") from exc
        print(f"warning: skipping a sample: {exc}", flush=True)
        return True

    def count(self, samples: Iterable[dict]) -> Iterator[dict]:
        """Pipeline stage: counts samples that reached decoding."""
        for s in samples:
            self.seen += 1
            yield s


def train_size(cfg: TrainConfig, epoch: int) -> int:
    """Train crop size of an epoch: FFCV progressive resizing (e.g. 160 -> 192), in steps of
    32 px, linear up to `progressive_end_epoch`; `image_size` when it is off."""
    if not cfg.progressive_start or epoch >= cfg.progressive_end_epoch:
        return cfg.image_size
    frac = epoch / max(cfg.progressive_end_epoch, 1)
    size = cfg.progressive_start + frac * (cfg.image_size - cfg.progressive_start)
    return int(round(size / 32) * 32)


def worker_init(_: int, main_pid: int) -> None:
    """DataLoader workers: die with the trainer, keep Pillow's image buffers in the heap,
    and leave a preemption's SIGTERM to the trainer (SLURM sends it to every process of
    the job: a worker ended by it would fail the step the trainer is finishing)."""
    terminate_only_from(main_pid)  # first: before any thread (die_with_parent starts one)
    die_with_parent(main_pid)
    keep_image_buffers_in_heap()


def worker_settings(workers: int, store: bool = False) -> dict:
    """DataLoader arguments for `workers` processes. They start from a forkserver, never
    forked from the trainer, which runs threads by then (process group, TensorBoard): see
    prep.workers. The forkserver imports this module (torch, webdataset, Pillow) once, and
    boto3 with its S3 model when the workers read object storage (`store`)."""
    if workers == 0:
        return {"num_workers": 0}
    preload = ["train.data", "shards.s3_preload"] if store else ["train.data"]
    return {"num_workers": workers, "multiprocessing_context": worker_context(preload),
            "worker_init_fn": partial(worker_init, main_pid=os.getpid())}


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialized uint8 tensor; inside a DataLoader worker its storage is shared
    memory from the start (as torch's default_collate does), so handing the batch to the
    main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def collate(batch: list[tuple], ring: BatchRing | None = None) -> tuple:
    """(N x 3 x H x W uint8 in channels-last memory, labels, extra columns...): each image is
    copied once, straight into the batch; a flipped view (`pixels[:, ::-1]`) is flipped by
    torch on the way (numpy copies a 3-byte-pixel flip 10x slower). In a worker with a
    `ring`, the batch goes into a reused shared buffer and a RingSlot stands for its images
    and labels."""
    cols = list(zip(*batch))
    shape = cols[0][0].shape
    slot, worker = None, torch.utils.data.get_worker_info()
    if ring is not None and worker is not None and ring.fits(len(batch), shape):
        index = ring.acquire(worker.id)
        if index is not None:
            slot = RingSlot(index, len(batch))
    images = ring.images[slot.index, : slot.n] if slot else _batch_tensor((len(batch), *shape))
    with warnings.catch_warnings():  # read-only arrays from Pillow: only read here
        warnings.simplefilter("ignore", UserWarning)
        for i, pixels in enumerate(cols[0]):
            if pixels.strides[1] < 0:
                images[i].copy_(torch.from_numpy(pixels[:, ::-1]).flip(1))
            else:
                images[i].copy_(torch.from_numpy(pixels))
    labels = torch.tensor(cols[1], dtype=torch.long)
    if slot is not None:
        ring.labels[slot.index, : slot.n] = labels
        return (slot, None, *cols[2:])  # RingLoader puts the ring's images and labels back
    return (images.permute(0, 3, 1, 2), labels, *cols[2:])


def collate_with_ring(workers: int, batch: int, size: int, pin: bool, decode: str
                      ) -> tuple[Callable[[list], tuple], BatchRing | None]:
    """(collate function, ring or None): how the trainer's loaders hand batches over. No ring
    for GPU decode (bytes, not pixels), without workers, or with pinned memory (DataLoader's
    pin thread copies batches anyway)."""
    if decode == "gpu":
        return collate_raw, None
    if workers == 0 or pin:
        return collate, None
    ring = BatchRing(workers, batch, size, size)
    return partial(collate, ring=ring), ring


def train_steps(num_samples: int, world: int, batch_size: int) -> int:
    """Steps per epoch, the same on every rank: full global batches only."""
    return num_samples // (world * batch_size)


def make_train_loader(split: SplitInfo, cfg: TrainConfig, rank: int, world: int, epoch: int,
                      skips: SkipCounter, pin: bool = False,
                      decode: str = "cpu") -> wds.WebLoader:
    """decode: "cpu" (region decoder, Pillow fallback), "pil" (Pillow only: the plain
    reference path) or "gpu" (workers send JPEG bytes + boxes; train.device_decode)."""
    workers = max(cfg.workers, 1)
    if len(split.urls) < world * workers:
        raise SettingError(
            f"{len(split.urls)} train shards for {world} ranks x {workers} workers: every "
            "worker needs at least one shard. Use fewer workers, or reshard with "
            f"`prep shard --num-shards {world * workers}` (or a multiple)")
    steps = train_steps(split.num_samples, world, cfg.batch_size)
    if steps == 0:
        raise SettingError(f"{split.num_samples} train samples are fewer than one global "
                           f"batch ({world} x {cfg.batch_size}): lower batch_size")
    seed = derive_seed(cfg.seed, epoch, rank)
    collate_fn, ring = collate_with_ring(cfg.workers, cfg.batch_size, train_size(cfg, epoch),
                                         pin, decode)
    pipeline = wds.DataPipeline(
        EpochShards(split.urls, rank, world, cfg.seed, epoch, repeat=True),
        read_shards(skips, checksums=split.checksums, cache=split.cache),
        skips.count,
        wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 1000),
                    rng=random.Random(seed)),
        wds.map(_train_map(cfg, epoch, seed, decode, split.num_classes), handler=skips),
        wds.batched(cfg.batch_size, collation_fn=collate_fn, partial=False),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, pin_memory=pin, persistent_workers=False,
                           **worker_settings(cfg.workers, store=split.cache is not None))
    return RingLoader(loader.with_epoch(steps), ring) if ring else loader.with_epoch(steps)


def _train_map(cfg: TrainConfig, epoch: int, seed: int, decode: str,
               num_classes: int) -> Callable:
    if decode == "gpu":
        if cfg.rotation or cfg.color_jitter:
            raise SettingError("--decode gpu does not do rotation or color_jitter; use "
                               "--decode cpu for recipes that set them")
        return RawTrainDecoder(cfg.min_scale, cfg.hflip, seed, num_classes)
    return TrainDecoder(train_size(cfg, epoch), cfg.min_scale, cfg.hflip, seed, cfg.rotation,
                        cfg.color_jitter, region=decode != "pil", num_classes=num_classes)


def make_eval_loader(split: SplitInfo, cfg: TrainConfig, rank: int, world: int,
                     batch_size: int,
                     pin: bool = False, decode: str = "cpu") -> wds.WebLoader:
    workers = max(cfg.workers, 1)
    labelled = split.split != "test"  # test samples carry cls -1, or none (timm's)
    # json: what the predictions pickle says of a sample comes from the sample itself
    read = read_shards(keep=("jpg", "cls", "json"), checksums=split.checksums,
                       cache=split.cache)
    if len(split.urls) >= world * workers:
        stages = [EpochShards(split.urls, rank, world, 0, 0, repeat=False), read]
    else:  # too few shards: split at the sample level instead
        stages = [AllShards(split.urls), read, keep_every(rank, world)]
    collate_fn, ring = collate_with_ring(cfg.workers, batch_size, cfg.val_crop, pin, decode)
    pipeline = wds.DataPipeline(
        *stages,
        wds.map(RawValDecoder(cfg.val_resize, cfg.val_crop, split.num_classes, labelled)
                if decode == "gpu" else
                ValDecoder(cfg.val_resize, cfg.val_crop, region=decode != "pil",
                           num_classes=split.num_classes, labelled=labelled)),
        wds.batched(batch_size, collation_fn=collate_fn, partial=True),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, pin_memory=pin,
                           **worker_settings(cfg.workers, store=split.cache is not None))
    return RingLoader(loader, ring) if ring else loader
