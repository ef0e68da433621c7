"""A shard loader whose position is a few integers: resume at any step, every sample exactly
once per epoch, on any number of ranks and workers.

The order: each epoch is a seeded permutation of the whole split (`epoch_order`), the ideal
shuffle, read by random access through index.parquet's (shard, offset) of every sample
(`shards.tarread.sample_at` over memory-mapped local shards). The position: (epoch,
consumed), `consumed` being how many samples of the epoch's order all ranks together have
taken. Global step k of an epoch takes order[consumed + k*W*B : consumed + (k+1)*W*B]
(W ranks, B per rank) and rank r the r-th block of B in it; so the rest of an epoch after a
resume is exactly order[consumed:], split evenly over however many ranks there are now,
every rank running the same number of steps (no DDP hang). A rest that does not fill a
whole global batch (fewer than W*B samples) is left out of that epoch and said in the
receipt. Augmentation draws from a stream seeded by (seed, epoch, sample index): the same
crop and flip whatever the worker count, so a resumed run sees exactly the same batches.

The receipt: `coverage` is the XOR, over the samples consumed in the epoch (all ranks), of
the first 8 bytes (big-endian) of sha256(`__key__` as UTF-8), printed as 16 hex digits;
`planned_coverage` computes the same from the index alone, for the epoch's planned set.

The loader follows the `state_dict()` / `load_state_dict()` protocol of torchdata's
StatefulDataLoader (Lightning, accelerate, own loops): see docs/readers.md.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import compress

import numpy as np
import torch

from prep.errors import PrepError, SampleError
from shards import tarread
from shards.cache import Pinned, ShardCache
from train.data import jpg_mismatch, read_manifest_file, shard_url, worker_settings
from train.decode import derive_seed

STATE_VERSION = 1


def epoch_order(num_samples: int, seed: int, epoch: int, window: int = 0,
                shard_sizes: tuple[int, ...] = ()) -> np.ndarray:
    """The epoch's order: a permutation of 0..num_samples-1, the same on every rank.
    `window` 0: the ideal shuffle, any sample next to any other. `window` W (object
    storage, where a node caches a bounded number of shards): the shards in a seeded order,
    taken W at a time, and the samples of each window of W shards shuffled together;
    `shard_sizes` are the samples of each shard, in index order (their samples are
    consecutive there). Every sample still comes once per epoch."""
    rng = np.random.default_rng([seed, epoch])
    if not window:
        return rng.permutation(num_samples)
    starts = np.cumsum([0, *shard_sizes])
    shards = rng.permutation(len(shard_sizes))  # the first draw: see window_of_shard
    parts = []
    for g in range(0, len(shards), window):
        members = np.concatenate([np.arange(starts[s], starts[s + 1])
                                  for s in shards[g : g + window]])
        parts.append(members[rng.permutation(len(members))])
    return np.concatenate(parts) if parts else np.arange(0)


def window_of_shard(num_shards: int, seed: int, epoch: int, window: int) -> np.ndarray:
    """The window (0, 1, ...) each shard falls in, in `epoch_order` of that epoch."""
    where = np.empty(num_shards, dtype=np.int64)
    where[np.random.default_rng([seed, epoch]).permutation(num_shards)] = \
        np.arange(num_shards) // window
    return where


def key_hash(key: str) -> int:
    """The first 8 bytes (big-endian) of sha256(key as UTF-8): one sample's share of the
    receipt."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def coverage_hex(value: int) -> str:
    return f"{value:016x}"


def key_hashes(keys: list[str]) -> np.ndarray:
    """key_hash of every key, as uint64 (1.28 M keys: ~1 s, once per run): the digests'
    first 8 bytes joined and read as big-endian numbers (1.6 s through key_hash per key)."""
    sha = hashlib.sha256
    heads = b"".join([sha(k.encode("utf-8")).digest()[:8] for k in keys])
    return np.frombuffer(heads, dtype=">u8").astype(np.uint64)


def planned_coverage(hashes: np.ndarray, order: np.ndarray) -> str:
    """The receipt of the samples `order` names (indices into `hashes`, key_hashes of the
    index's keys): computed from the index alone."""
    picked = hashes[order]
    return coverage_hex(int(np.bitwise_xor.reduce(picked)) if len(picked) else 0)


@dataclass
class SplitRows:
    """Where every sample of a split is: index.parquet's rows in manifest order."""

    keys: list[str]
    shards: list[str]  # each sample's shard: a local path, or its s3:// URL
    offsets: list[int]
    crcs: list[int]

    def __reduce__(self) -> tuple:
        # sent to every loader worker: as lists, ImageNet's 1.28 M rows took 0.6 s of the
        # trainer's main process per worker to pickle and 0.3 s to unpickle; packed (keys
        # joined, a shard number per row, arrays), 0.2 s each
        urls = list(dict.fromkeys(self.shards))
        number = {u: i for i, u in enumerate(urls)}
        keys: str | list[str] = "\n".join(self.keys)
        if keys.count("\n") != max(len(self.keys) - 1, 0):  # a key with a newline: as a list
            keys = self.keys
        return _unpack_rows, (keys, urls,
                              np.fromiter((number[s] for s in self.shards), np.int32,
                                          len(self.shards)),
                              np.array(self.offsets, np.int64), np.array(self.crcs, np.int64))

    def shard_sizes(self) -> tuple[int, ...]:
        """Samples per shard, in index order (a shard's samples are consecutive)."""
        sizes: list[int] = []
        last = None
        for shard in self.shards:
            if shard != last:
                sizes.append(0)
                last = shard
            sizes[-1] += 1
        return tuple(sizes)


def _unpack_rows(keys: str | list[str], urls: list[str], shards: np.ndarray,
                 offsets: np.ndarray, crcs: np.ndarray) -> SplitRows:
    if isinstance(keys, str):
        keys = keys.split("\n") if len(offsets) else []
    return SplitRows(keys, [urls[i] for i in shards.tolist()], offsets.tolist(), crcs.tolist())


def read_rows(data: str | os.PathLike, split: str) -> SplitRows:
    """index.parquet's rows of `split` (`val` or `validation` alike) of a `prep shard`
    output: a local directory or an object-storage prefix (s3://)."""

    from shards.manifest import INFO_SPLIT_NAMES, parquet_table

    names = {split, INFO_SPLIT_NAMES.get(split, split)} | {
        k for k, v in INFO_SPLIT_NAMES.items() if v == split}
    data = os.fspath(data)
    raw = read_manifest_file(data, "index.parquet")
    if raw is None:
        raise PrepError(f"{shard_url(data, 'index.parquet')}: missing; rerun `prep shard`")
    table = parquet_table(raw, columns=["key", "split", "shard", "offset", "jpg_crc32"])
    cols = table.to_pydict()
    # C loops (compress) and one URL per shard, not per row: ImageNet's 1.33 M rows took
    # 10 s of every trainer's start when each row's shard URL was made on its own
    mask = [s in names for s in cols["split"]]
    shards = list(compress(cols["shard"], mask))
    urls = {name: shard_url(data, name) for name in set(shards)}
    return SplitRows(list(compress(cols["key"], mask)), [urls[s] for s in shards],
                     list(compress(cols["offset"], mask)),
                     list(compress(cols["jpg_crc32"], mask)))


class IndexedSamples(torch.utils.data.Dataset):
    """Map-style: item (epoch, i) is sample i of the split, read at its offset and checked
    against its CRC-32, then `decode(sample)` with `decode.rng` seeded from (seed, epoch, i)
    when it has one (the same augmentation whatever the worker count)."""

    def __init__(self, rows: SplitRows, decode: Callable[[dict], tuple], seed: int,
                 cache: ShardCache | None = None, window: int = 0):
        """`cache`: shards in object storage, read through it (window: epoch_order's), each
        process holding the shards of its current window only (the loader reads windows in
        order, so the older ones are done with)."""
        self.rows, self.decode, self.seed = rows, decode, seed
        self.cache, self.window = cache, window
        self._maps: dict[str, mmap.mmap] = {}  # per worker process: opened on first use
        self._pins: dict[str, tuple[tuple, Pinned]] = {}  # cached: ((epoch, window), pin)
        self._numbers = {u: i for i, u in enumerate(dict.fromkeys(rows.shards))} \
            if cache is not None else {}
        self._windows: dict[int, np.ndarray] = {}  # per epoch: each shard's window

    def __len__(self) -> int:
        return len(self.rows.keys)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}, "_pins": {}}  # per process

    def _map(self, path: str, epoch: int) -> mmap.mmap:
        if path not in self._maps:
            if self.cache is not None:
                self._open_cached(path, epoch)
            else:
                with open(path, "rb") as f:
                    self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def _window_map(self, epoch: int) -> np.ndarray:
        if epoch not in self._windows:
            self._windows = {e: w for e, w in self._windows.items() if e >= epoch - 1}
            self._windows[epoch] = window_of_shard(len(self._numbers), self.seed, epoch,
                                                   self.window or len(self._numbers))
        return self._windows[epoch]

    def _open_cached(self, url: str, epoch: int) -> None:
        """Pin and map a cached shard (the loader's own process has it fetched ahead:
        WindowFetch; when that is behind, the cache downloads it here); let go of those
        of earlier windows."""
        seq = (epoch, int(self._window_map(epoch)[self._numbers[url]]))
        for old in [u for u, (s, _) in self._pins.items() if s < seq]:
            self._maps.pop(old).close()
            self._pins.pop(old)[1].close()
        pinned = self.cache.open(self.cache.name(url))
        self._pins[url] = (seq, pinned)
        self._maps[url] = pinned.map()

    def release(self) -> None:
        """Unmap the shards this process holds (and let go of cached ones)."""
        for m in self._maps.values():
            m.close()
        for _, pinned in self._pins.values():
            pinned.close()
        self._maps, self._pins = {}, {}

    def __getitem__(self, item: tuple[int, int]) -> tuple | Skipped:
        """The decoded sample and its key; a sample that cannot be used (bytes unlike the
        index's, undecodable, a bad label) comes back as Skipped, naming why."""
        epoch, i = item
        path = self.rows.shards[i]
        try:
            sample = tarread.sample_at(self._map(path, epoch), path, self.rows.offsets[i])
            if sample["__key__"] != self.rows.keys[i]:
                raise SampleError(f"{path}: no sample {self.rows.keys[i]} at offset "
                                  f"{self.rows.offsets[i]} (index.parquet does not match it)")
            err = jpg_mismatch(sample, self.rows.crcs[i])
            if err is not None:
                raise err
            if hasattr(self.decode, "rng"):
                self.decode.rng = random.Random(derive_seed(self.seed, epoch, i))
            return (*self.decode(sample), sample["__key__"])
        except SampleError as exc:
            return Skipped(self.rows.keys[i], str(exc))


@dataclass
class Skipped:
    """A sample left out of its batch: its key and why."""

    key: str
    why: str


class SkipAware:
    """Collate that leaves Skipped samples out of the batch and appends them as a last
    column (the loader reports them and leaves them out of the receipt)."""

    def __init__(self, collate: Callable[[list], tuple]):
        self.collate = collate

    def __call__(self, batch: list) -> tuple:
        good = [s for s in batch if not isinstance(s, Skipped)]
        skipped = [s for s in batch if isinstance(s, Skipped)]
        if not good:
            raise SampleError("every sample of a batch was unusable: " +
                              "; ".join(s.why for s in skipped[:3]))
        return (*self.collate(good), skipped)


def rank_batches(num_samples: int, seed: int, epoch: int, consumed: int, world: int,
                 rank: int, batch_size: int, window: int = 0,
                 shard_sizes: tuple[int, ...] = ()) -> Iterator[list[int]]:
    """This rank's sample indices, step by step, for the rest of `epoch` from `consumed`:
    global step k takes the next world x batch samples of the epoch's order, rank r the
    r-th block of them."""
    order = epoch_order(num_samples, seed, epoch, window, shard_sizes)
    step = world * batch_size
    for k in range((num_samples - consumed) // step):
        start = consumed + k * step + rank * batch_size
        yield order[start : start + batch_size].tolist()


class _Batches(torch.utils.data.Sampler):
    """This rank's batches of (epoch, sample index), from a position on, epoch after epoch:
    one DataLoader serves every epoch, so its workers never restart at an epoch's end.
    It holds numbers only (and the rank's WindowFetch, which holds no loader): a reference
    back to the loader would put the DataLoader iterator in a reference cycle, and a cycle's
    collection closes the worker queues before the iterator's shutdown can tell the workers
    to stop (each then hung 5 s). It runs in the loader's own process, ahead of the workers
    (DataLoader hands indices out prefetch_factor batches early): where the order enters
    a window, `fetch` is told."""

    def __init__(self, num_samples: int, seed: int, epoch: int, consumed: int, world: int,
                 rank: int, batch_size: int, window: int, shard_sizes: tuple[int, ...],
                 fetch: WindowFetch | None = None):
        self.args = (num_samples, seed, epoch, consumed, world, rank, batch_size)
        self.window, self.shard_sizes, self.fetch = window, shard_sizes, fetch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        num_samples, seed, epoch, consumed, world, rank, batch_size = self.args
        while True:
            for k, batch in enumerate(rank_batches(num_samples, seed, epoch, consumed, world,
                                                   rank, batch_size, self.window,
                                                   self.shard_sizes)):
                if self.fetch is not None:
                    start = consumed + k * world * batch_size + rank * batch_size
                    self.fetch.reach(epoch, start, start + batch_size)
                yield [(epoch, i) for i in batch]
            epoch, consumed = epoch + 1, 0


class ResumableLoader:
    """Batches of (decoded columns..., keys) for one rank; iterating gives the rest of the
    current epoch. `state_dict()` is (epoch, consumed) plus what a load must match (sample
    count, seed); another world size, batch or worker count resumes the same rest."""

    def __init__(self, rows: SplitRows, decode: Callable[[dict], tuple], *, batch_size: int,
                 rank: int = 0, world: int = 1, seed: int = 0, workers: int = 0,
                 collate: Callable | None = None, ring: object | None = None,
                 on_skip: Callable[[Skipped], None] | None = None, pin: bool = False,
                 cache: ShardCache | None = None, window: int = 0):
        """`collate` / `ring`: train.data's batch collation into reused shared buffers
        (BatchRing), for image batches; by default each column comes as a list/tensor.
        `on_skip(skipped)`: called for each unusable sample (left out of its batch and of the
        receipt); without it, an unusable sample stops the iteration (SampleError).
        `cache`: shards in object storage, read through this node's cache; `window`: shards
        shuffled together (epoch_order), part of the position's meaning."""
        self.on_skip, self.pin = on_skip, pin
        self.rows, self.batch_size, self.rank, self.world = rows, batch_size, rank, world
        self.seed, self.workers, self.collate, self.ring = seed, workers, collate, ring
        self.window = window
        self.shard_sizes = rows.shard_sizes() if window else ()
        self.dataset = IndexedSamples(rows, decode, seed, cache, window)
        self.epoch, self.consumed = 0, 0
        self.coverage = 0  # this rank's XOR of key hashes in the current epoch
        # (epoch, consumed, this rank's coverage) of the last epoch iterated to its end
        self.finished: tuple[int, int, int] | None = None
        self._stream: Iterator | None = None  # batches from (epoch, consumed) on
        self._fetch = WindowFetch(cache, list(dict.fromkeys(rows.shards)), seed, window,
                                  self.shard_sizes or rows.shard_sizes(), rank, world) \
            if cache is not None else None

    def steps_left(self) -> int:
        """Global steps to the end of the epoch (the same on every rank)."""
        return (len(self.rows.keys) - self.consumed) // (self.world * self.batch_size)

    def _open(self) -> Iterator:
        if self._fetch is not None:  # the first window's downloads start before the workers
            self._fetch.restart()
            start = self.consumed + self.rank * self.batch_size
            self._fetch.reach(self.epoch, start, start + self.batch_size)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_Batches(len(self.rows.keys), self.seed, self.epoch,
                                                 self.consumed, self.world, self.rank,
                                                 self.batch_size, self.window,
                                                 self.shard_sizes, self._fetch),
            collate_fn=SkipAware(self.collate or _columns), pin_memory=self.pin,
            **worker_settings(self.workers, store=self.dataset.cache is not None))
        if self.ring is not None:
            from train.batch_ring import RingLoader

            return iter(RingLoader(loader, self.ring))
        return iter(loader)

    def __iter__(self) -> Iterator:
        """The rest of the current epoch; then the position moves to the next epoch."""
        if self._stream is None:
            self._stream = self._open()
        for _ in range(self.steps_left()):
            *batch, skipped = next(self._stream)
            self.consumed += self.world * self.batch_size  # every rank advances alike
            if self._fetch is not None:
                self._fetch.consumed(self.epoch, self.consumed)
            for s in skipped:
                if self.on_skip is None:
                    raise SampleError(s.why)
                self.on_skip(s)
            for key in batch[-1]:
                self.coverage ^= key_hash(key)
            yield batch
        self.finished = (self.epoch, self.consumed, self.coverage)
        self.epoch, self.consumed, self.coverage = self.epoch + 1, 0, 0

    def close(self) -> None:
        """Stop the workers now (they would otherwise stop when the loader is collected)."""
        self._stream = None
        if self._fetch is not None:
            self._fetch.stop()
        self.dataset.release()

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "consumed": self.consumed,
                "num_samples": len(self.rows.keys), "seed": self.seed, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        """Seek to a saved position: nothing read and dropped. Refuses a state from another
        split size or seed, naming the difference."""
        for name, mine in (("num_samples", len(self.rows.keys)), ("seed", self.seed),
                           ("window", self.window)):
            if state.get(name, 0 if name == "window" else None) != mine:
                raise ValueError(f"loader state from another run: {name} {state.get(name)!r}, "
                                 f"this loader has {mine!r}")
        if not 0 <= state["consumed"] <= len(self.rows.keys):
            raise ValueError(f"loader state: consumed {state['consumed']} is outside the epoch")
        self.epoch, self.consumed, self.coverage = state["epoch"], state["consumed"], 0
        self._stream = None  # the next iteration starts from here


class WindowFetch:
    """One rank's downloads into the node's cache, from the loader's own process: where
    the order enters a window, the shards of that window and then of the next are fetched
    by threads here, each rank starting at another place in each list, so the ranks of a
    node download different shards at once. The loader workers only open what is cached
    (waiting on a download under way; fetching a shard themselves when this is behind):
    downloads and sha256 in a worker took its decoder's CPU and GIL (a cold epoch's worker
    spent 0.25-0.4 s more CPU than from disk, 0.25 s of it beyond the downloads' own cost)."""

    def __init__(self, cache: ShardCache, urls: list[str], seed: int, window: int,
                 shard_sizes: tuple[int, ...], rank: int = 0, world: int = 1,
                 threads: int = 2):
        """`urls`: the shards in index order; `window` 0: all of them one window."""
        self.cache, self.urls, self.seed = cache, urls, seed
        self.window = window or len(urls)
        self.sizes, self.turn, self.threads = np.asarray(shard_sizes, np.int64), \
            (rank, world), threads
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # windows (epoch, g): the one being read, the furthest handed out to the workers
        self._low: tuple[int, int] | None = None
        self._ahead: tuple[int, int] | None = None
        self._at: tuple | None = None  # (_low, _ahead) of the last list asked for
        self._prefetcher: _Prefetcher | None = None

    def _windows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(each shard's window, where each window ends in the epoch's order)."""
        if epoch not in self._epochs:
            self._epochs = {e: w for e, w in self._epochs.items() if e >= epoch - 1}
            where = window_of_shard(len(self.urls), self.seed, epoch, self.window)
            ends = np.cumsum(np.bincount(where, weights=self.sizes))
            self._epochs[epoch] = where, ends
        return self._epochs[epoch]

    def _window_at(self, epoch: int, position: int) -> int:
        return int(np.searchsorted(self._windows(epoch)[1], position, side="right"))

    def reach(self, epoch: int, start: int, stop: int) -> None:
        """The order is handed out to the workers up to position `stop` (exclusive) of
        `epoch`: fetch up to the window after the one it falls in."""
        self._ahead = (epoch, self._window_at(epoch, stop - 1))
        if self._low is None:
            self._low = (epoch, self._window_at(epoch, start))
        self._update()

    def consumed(self, epoch: int, position: int) -> None:
        """The batches up to `position` of `epoch` are done: their windows no longer need
        fetching (the workers read them already)."""
        self._low = (epoch, self._window_at(epoch, position))  # past the last: none left
        self._update()

    def _update(self) -> None:
        if self._ahead is None or self._low is None or (self._low, self._ahead) == self._at:
            return
        self._at = (self._low, self._ahead)
        seqs, (epoch, g) = [], self._low
        while (epoch, g) <= self._ahead:
            seqs.append((epoch, g))
            epoch, g = (epoch, g + 1) if g + 1 < len(self._windows(epoch)[1]) else (epoch + 1, 0)
        seqs.append((epoch, g))  # the window after the furthest handed out
        wanted = []
        for e, g in seqs:
            shards = np.flatnonzero(self._windows(e)[0] == g).tolist()
            start_at = self.turn[0] * len(shards) // self.turn[1]
            wanted += [self.urls[i] for i in shards[start_at:] + shards[:start_at]]
        if self._prefetcher is None:
            self._prefetcher = _Prefetcher(self.cache, self.threads)
        self._prefetcher.want(wanted)

    def restart(self) -> None:
        """A new stream of batches (a resume may move backwards): forget where it was."""
        self._low = self._ahead = self._at = None

    def stop(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None
        self.restart()


class _Prefetcher:
    """Threads that bring shards into the cache, in the order last asked for, and let go
    of them; a failure is left to the read that needs the shard (it retries, or says what
    is wrong), and drops what was asked for."""

    def __init__(self, cache: ShardCache, threads: int):
        self.cache, self.wanted, self.changed = cache, [], threading.Condition()
        self.stopped = False
        for _ in range(threads):
            threading.Thread(target=self._run, daemon=True, name="shard-prefetch").start()

    def want(self, urls: list[str]) -> None:
        with self.changed:
            self.wanted = list(urls)
            self.changed.notify_all()

    def stop(self) -> None:
        """The threads end once their download under way is over."""
        with self.changed:
            self.stopped, self.wanted = True, []
            self.changed.notify_all()

    def _run(self) -> None:
        while True:
            with self.changed:
                while not self.wanted and not self.stopped:
                    self.changed.wait()
                if self.stopped:
                    return
                url = self.wanted.pop(0)
            try:
                self.cache.open(self.cache.name(url)).close()
            except Exception:  # noqa: BLE001 - reported by the read itself
                with self.changed:
                    self.wanted = []


def _columns(batch: list[tuple]) -> tuple:
    """Default collate: each column as a list (a tensor for numeric ones)."""
    cols = list(zip(*batch))
    return tuple(torch.tensor(c) if isinstance(c[0], (int, float)) else list(c) for c in cols)
