"""A bounded local cache of shard objects from a store, shared by every rank and loader
worker of one node.

`open(name)` gives a local file holding the object's bytes, checked against its sha256
(SHA256SUMS) before anyone reads it, and pinned (a shared flock on it) until the caller
closes it. Bookkeeping decisions take an exclusive flock on `ROOT/.lock`, so any number of
processes use one cache folder safely, and a process killed at any point leaves nothing
that blocks the others (flocks die with their holder; a `.partial` nobody holds is removed).

The bound: every file under ROOT counts (complete shards, and a download's `.partial`, which
is given its full size before the first byte arrives), and a download starts only once the
total plus its size fits under `limit`, after evicting least recently opened shards that
nobody holds. So the bound holds at every moment. When everything is in use and nothing
fits, `open` waits for a reader to let go; past `wait_for` seconds it stops with an error
that says how big the cache must be.

A download: ranged GETs several at once (shards.store), then sha256 over the file; bytes
unlike SHA256SUMS are fetched once more, then a StoreError names the object. Nothing is read
from a file before its digest matched.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shards.store import Outage, Store, StoreError

LOCK = ".lock"
PARTIAL = ".partial"
AWAY = ".store-away"  # since when the store has not answered (shards.store.Outage)


def parse_size(text: str) -> int:
    """`200GB`, `500MiB`, `1.5T` or bytes -> bytes (decimal units, binary with `i`)."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"{text!r}: not a size (e.g. 200GB, 500MiB, 1000000)")
    power = " kmgt".index(m[2].lower() or " ")
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


@dataclass
class Pinned:
    """A cached shard held open (and so never evicted) until close()."""

    path: str
    fd: int

    def map(self) -> mmap.mmap:
        return mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the shared flock
            self.fd = -1


class ShardCache:
    """Objects of one store prefix, cached under `root` (see the module's docstring).
    `objects`: {name: (size, sha256)} of every object it may be asked for."""

    def __init__(self, store: Store, root: str | os.PathLike, limit: int,
                 objects: dict[str, tuple[int, str]], wait_for: float = 600.0):
        self.store, self.root, self.limit = store, Path(root), limit
        self.objects, self.wait_for = objects, wait_for
        self.dir = self.root / store.where.bucket / (store.where.prefix or "_")
        self.fetched = 0  # bytes this process downloaded (tests, benchmarks)
        store.away = Outage(self.root / AWAY)  # one retry budget for the node's processes

    def largest(self) -> int:
        return max((size for size, _ in self.objects.values()), default=0)

    def name(self, url: str) -> str:
        """The object name of a shard URL under this cache's prefix."""
        return url.rsplit("/", 1)[-1]

    def path(self, name: str) -> Path:
        return self.dir / name

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def usage(self) -> int:
        """Bytes of every file under the cache root (partials at their full size)."""
        return cache_usage(self.root)

    def open(self, name: str) -> Pinned:
        """The object `name` as a pinned, checked local file (downloaded when missing)."""
        if name not in self.objects:
            raise StoreError(f"{self.store.where.url(name)}: not in SHA256SUMS; the manifest "
                            "does not match the shards (`prep verify`)")
        size, digest = self.objects[name]
        final, partial = self.path(name), self.path(name + PARTIAL)
        deadline = time.monotonic() + self.wait_for
        for _attempt in range(2):
            while True:
                with self._locked():
                    held = self._hold(final, size)
                    if held is not None:
                        return held
                    fd = self._start(partial, size, deadline)
                if fd is not None:
                    break
                _wait_for_download(partial)  # another process is fetching it, or no room yet
            try:
                self.store.download(name, fd, size)
                ok = _sha256(fd, size) == digest
            except BaseException:
                os.close(fd)
                partial.unlink(missing_ok=True)
                raise
            self.fetched += size
            if ok:
                with self._locked():
                    os.rename(partial, final)
                    fcntl.flock(fd, fcntl.LOCK_SH)  # EX -> SH under the cache lock: no gap
                return Pinned(str(final), fd)
            os.close(fd)
            partial.unlink(missing_ok=True)
        raise StoreError(f"{self.store.where.url(name)}: its bytes differ from SHA256SUMS, twice "
                        "(corrupt or replaced in the store); nothing was read from it. "
                        "`prep verify` the store, or rerun `prep shard` to rewrite it")

    def _hold(self, final: Path, size: int) -> Pinned | None:
        try:
            fd = os.open(final, os.O_RDONLY)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_size != size:  # not ours (a changed manifest): fetch again
            os.close(fd)
            final.unlink(missing_ok=True)
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.utime(final)  # least recently opened goes first
        return Pinned(str(final), fd)

    def _start(self, partial: Path, size: int, deadline: float) -> int | None:
        """Under the lock: a new partial file of `size` bytes, exclusively locked; None while
        another process downloads it or no room can be made yet."""
        if partial.exists():
            if _holder_alive(partial):
                return None
            partial.unlink(missing_ok=True)  # its downloader died
        if not self._make_room(size):
            if time.monotonic() > deadline:
                raise StoreError(
                    f"{self.root}: --cache-size {human(self.limit)} is too small: the shards "
                    f"in use by this node's ranks and workers fill it and the next one "
                    f"({human(size)}) does not fit; give it at least (window + 2) x the "
                    "largest shard")
            return None
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, size)  # counted at its full size from now on
        return fd

    def _make_room(self, size: int) -> bool:
        """Evict least recently opened unheld shards until `size` more bytes fit."""
        if size > self.limit:
            raise StoreError(f"{self.root}: --cache-size {human(self.limit)} is smaller than "
                            f"one shard ({human(size)})")
        used = self.usage()
        if used + size <= self.limit:
            return True
        candidates = []
        for folder, _, files in os.walk(self.root):
            for f in files:
                p = os.path.join(folder, f)
                if f in (LOCK, AWAY):
                    continue
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                candidates.append((st.st_mtime_ns, p, st.st_size))
        for _, p, nbytes in sorted(candidates):
            if used + size <= self.limit:
                break
            if _evict(p):
                used -= nbytes
        return used + size <= self.limit


def cache_usage(root: str | os.PathLike) -> int:
    """Bytes of every file under a cache folder: what its bound counts."""
    total = 0
    for folder, _, files in os.walk(root):
        for f in files:
            try:
                total += os.stat(os.path.join(folder, f)).st_size
            except FileNotFoundError:
                pass
    return total


def open_cache(store: Store, root: str | os.PathLike, limit: int | None,
               wait_for: float = 600.0) -> ShardCache:
    """The cache of the `prep shard` output at `store`'s prefix: sizes from one listing,
    digests from its SHA256SUMS. `limit` None: the whole output, or half the free space of
    `root`'s file system when that is less."""
    from shards.manifest import SUMS, parse_sums

    raw = store.get(SUMS)
    if raw is None:
        raise StoreError(f"{store.where.url(SUMS)}: missing; --data must be a whole `prep shard` "
                        "output (rerun `prep shard` to finish it)")
    sums = parse_sums(raw, store.where.url(SUMS))
    listed = store.list()
    missing = sorted(set(sums) - set(listed))
    if missing:
        raise StoreError(f"{store.where.url(missing[0])}: missing from the store "
                        f"({len(missing)} shard(s) SHA256SUMS names are not there); "
                        f"`prep verify {store.where}`")
    objects = {name: (listed[name]["size"], digest) for name, digest in sums.items()}
    if limit is None:
        Path(root).mkdir(parents=True, exist_ok=True)
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
        limit = min(sum(size for size, _ in objects.values()) + (1 << 20), free // 2)
    return ShardCache(store, root, limit, objects, wait_for)


def _wait_for_download(partial: Path) -> None:
    """Return once the download of `partial` by another process or thread is over (its
    downloader holds an exclusive flock on it until the file is complete or gone); when
    there is none (no room in the cache yet), after a short sleep."""
    try:
        fd = os.open(partial, os.O_RDONLY)
    except FileNotFoundError:
        time.sleep(0.05)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _holder_alive(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _evict(path: str) -> bool:
    """Remove a cached file nobody holds (True), or leave a held one (False)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    os.unlink(path)
    os.close(fd)
    return True


def _sha256(fd: int, size: int) -> str:
    h = hashlib.sha256()
    if size:
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as buf:
            h.update(buf)
    return h.hexdigest()
