"""Write one shard: a reproducible, uncompressed WebDataset tar, atomically.

Byte-reproducible: members in sample order, each sample's members sorted by extension
(`cls`, `jpg`, `json`, as webdataset's TarWriter orders them), fixed mtime, owner and mode
(shards/tario.py). The tar
is written as `NAME.partial`, fsynced, then renamed: a killed run never leaves a file
that looks finished. DALI's index of it (`NAME.idx`, shards/dali_index.py) follows.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from prep import jpeg
from prep.checked import Identity, identity
from prep.crc import crc32
from prep.errors import PrepError, read_error, write_error
from shards import tarpack
from shards.dali_index import write_dali_index
from shards.digest import BackgroundDigest
from shards.image import UndecodableImage, encode_image
from shards.plan import ShardPlan
from shards.record import INDEX_COLUMNS, ShardRecord, sample_json
from shards.settings import ShardSettings
from shards.source import Sample
from shards.tario import FdSink, TarStream


def write_shard(plan: ShardPlan, data: Path, out: Path, settings: ShardSettings,
                trusted: dict[str, Identity] | None = None) -> ShardRecord:
    """Write `out/plan.name` from the images under `data/<split>/`; returns its record.
    `trusted`: {`split/path`: identity} of sources that passed the strict check before
    (prep.checked); one that still has that identity is not checked again. The record's
    `checked` lists the sources this write checked, for the caller to remember."""
    trusted = trusted or {}
    final = out / plan.name
    partial = out / f"{plan.name}.partial"
    rec = ShardRecord(plan.name, plan.split, 0, 0, "")
    src = SampleReader(plan, data)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        digest = BackgroundDigest(partial, fd)
        try:
            tar = TarStream(FdSink(fd, digest))
            i, samples = 0, plan.samples
            # pass-through: good JPEGs in C, a sample it stops at in Python. Not when
            # resizing: nearly every image is then re-encoded by Pillow anyway
            use_c = tarpack.available() and not settings.max_size
            ahead = CheckAhead(src, trusted) if use_c and settings.strict and \
                jpeg.available() else None
            try:
                while i < len(samples):
                    n = min(RUN, len(samples) - i)
                    if ahead:
                        ahead.writer_at(i + n)
                    done = _write_run(tar, digest, src, i, n, rec, settings, trusted,
                                      ahead) if use_c else 0
                    i += done
                    if done < n:
                        _write_sample(tar, src, i, plan, settings, rec, trusted)
                        i += 1
            finally:
                if ahead:
                    ahead.stop()
            tar.close()
            rec.sha256 = digest.hexdigest()
            os.fsync(fd)
        finally:
            digest.close()
            os.close(fd)
        rec.filesize = tar.offset
        os.replace(partial, final)
        st = os.stat(final)
        rec.tar_inode, rec.tar_mtime_ns = st.st_ino, st.st_mtime_ns
        write_dali_index(final, tar.members)  # NAME.idx for DALI's webdataset reader
    except OSError as exc:
        _remove(partial)
        err = write_error(final, exc)
        raise PrepError(f"{err}; no partial shard was left, finished shards are kept") from exc
    except BaseException:
        _remove(partial)
        raise
    finally:
        src.close()
    return rec


def source_paths(plan: ShardPlan) -> list[str]:
    """The plan's sources as `split/path` under --data, or `ARCHIVE:MEMBER` for a plan read
    from an archive (their `source` in the json and the index)."""
    if plan.members is not None:
        return [m[2] for m in plan.members]
    return [f"{plan.split}/{s.path}" for s in plan.samples]


class SampleReader:
    """The bytes of a plan's samples: files under DATA/<split>/, or members of one archive
    read in place (`prep shard --src`), each with the stat of what it was read from."""

    def __init__(self, plan: ShardPlan, data: Path) -> None:
        self.plan, self.data = plan, data
        self.base = f"{data}/{plan.split}/"
        self.fd = -1
        if plan.members is not None:
            try:
                self.fd = os.open(plan.archive, os.O_RDONLY)
            except OSError as exc:
                raise read_error(plan.archive, exc) from exc
            self.st = os.fstat(self.fd)

    def source(self, i: int) -> str:
        if self.plan.members is not None:
            return self.plan.members[i][2]
        return f"{self.plan.split}/{self.plan.samples[i].path}"

    def read(self, i: int) -> tuple[bytes, os.stat_result]:
        """Sample i's bytes and the stat of their file (of the archive, for a member)."""
        if self.fd < 0:
            s = self.plan.samples[i]
            path = self.base + s.path
            try:
                return read_file(path)
            except FileNotFoundError as exc:
                raise PrepError(f"{self.data}/meta/{self.plan.split}.txt:{s.line}: {path} "
                                "does not exist; rerun `prep imagenet` to refresh meta/") \
                    from exc
            except OSError as exc:  # a source that cannot be read: not the shard's disk
                raise read_error(path, exc) from exc
        offset, size, name = self.plan.members[i]
        try:
            raw = os.pread(self.fd, size, offset)
            while 0 < len(raw) < size:  # short read (network file systems): keep going
                more = os.pread(self.fd, size - len(raw), offset + len(raw))
                if not more:
                    break
                raw += more
        except OSError as exc:
            raise read_error(self.plan.archive, exc) from exc
        if len(raw) != size:
            raise PrepError(f"{name}: the archive ends before this member ends; it changed "
                            "since it was listed (re-download it, then rerun)")
        return raw, self.st

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


RUN = 64  # samples per C call: the hashing thread catches up between calls


def _write_run(tar: TarStream, digest: BackgroundDigest, src: SampleReader, start: int,
               n: int, rec: ShardRecord, settings: ShardSettings,
               trusted: dict[str, Identity], ahead: CheckAhead | None) -> int:
    """Write the leading good JPEGs of the plan's samples [start, start + n) through
    shards/tarpack; how many. Sources `ahead` has checked already (unchanged since) are
    not checked again here, and count as checked by this write."""
    plan = src.plan
    samples = plan.samples[start : start + n]
    sources = [src.source(i) for i in range(start, start + n)]
    passed = ahead.passed if ahead else {}
    members = plan.members[start : start + n] if plan.members is not None else None
    done, end, written = tarpack.write_samples(
        digest.fd, tar.offset, [src.base + s.path for s in samples], samples, sources,
        settings.strict, [passed.get(x) or trusted.get(x) for x in sources], src.fd, members)
    digest.advance(end - tar.offset)
    for s, source, (offset, size, w, h, ident, checked, crc, json_size) in zip(
            samples, sources, written):
        tar.appended(tarpack.members_of(s, size, json_size))
        add_row(rec, plan, s, offset, size, crc, w, h, None, source)
        rec.source_stats.append([ident[0], ident[1]])  # the file's (the archive's) size, mtime
        if settings.strict:
            _count_check(rec, source, ident, checked or passed.get(source) == ident)
    if tar.offset != end:
        raise RuntimeError(f"shards/tarpack.c wrote up to {end}, its layout says {tar.offset}")
    return done


class CheckAhead:
    """The strict check of a shard's sources on a helper thread, from the last sample
    backwards, while the writing thread checks and writes from the first sample forwards;
    the two meet in the middle, and no file is checked twice (but the one both reach at
    once). `passed`: {source: identity of the bytes that passed}. The C check and the file
    reads release the GIL, so with a spare core a first run takes about the time of the
    check alone. A file that fails here is simply not in `passed`: the writer checks it
    again and applies --on-error as always. Sources trusted from the record are skipped."""

    def __init__(self, src: SampleReader, trusted: dict[str, Identity]) -> None:
        self.passed: dict[str, Identity] = {}
        self._src, self._trusted = src, trusted
        self._limit = 0  # samples the writer has taken on
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="shard-check-ahead",
                                        daemon=True)
        self._thread.start()

    def writer_at(self, n: int) -> None:
        """The writer is about to take on samples up to index n (exclusive)."""
        self._limit = n

    def stop(self) -> None:
        self._stopping = True
        self._thread.join()

    def _run(self) -> None:
        for j in range(len(self._src.plan.samples) - 1, -1, -1):
            if self._stopping or j < self._limit:
                return
            src = self._src.source(j)
            if src in self._trusted:
                continue
            try:
                raw, st = self._src.read(j)
            except PrepError:  # the writer reports it
                continue
            if raw.startswith(b"\xff\xd8") and jpeg.strict_problem(raw) is None:
                self.passed[src] = identity(st)


def _count_check(rec: ShardRecord, source: str, ident: Identity, checked: bool) -> None:
    if checked:
        rec.checked.append([source, *ident])
    else:
        rec.trusted += 1


def add_row(rec: ShardRecord, plan: ShardPlan, s: Sample, offset: int, jpg_bytes: int,
             jpg_crc32: int, width: int, height: int, repaired: str | None,
             source: str) -> None:
    """Count a written sample and add its per-sample index row."""
    rec.num_samples += 1
    for column, value in zip(INDEX_COLUMNS, (
            s.key, plan.split, plan.name, offset, jpg_bytes, jpg_crc32, s.label, s.wnid,
            width, height, repaired or "", source)):
        rec.rows[column].append(value)


def _write_sample(tar: TarStream, src: SampleReader, i: int, plan: ShardPlan,
                  settings: ShardSettings, rec: ShardRecord, trusted: dict[str, Identity]) -> None:
    s, source = plan.samples[i], src.source(i)
    raw, st = src.read(i)
    rec.source_stats.append([st.st_size, st.st_mtime_ns])
    ident = identity(st)
    strict = settings.strict and trusted.get(source) != ident
    try:
        jpg, info = encode_image(raw, settings.max_size, settings.quality, strict)
    except UndecodableImage as exc:
        if settings.on_error == "skip":
            rec.skipped.append(f"{source}: {exc}")
            return
        where = source if plan.members is not None else src.base + s.path
        raise PrepError(f"{where}: {exc}; rerun with --on-error skip to leave it out "
                        "(skips are listed in the manifest)") from exc
    meta = sample_json(fmt=info.format, height=info.height, key=s.key, label=s.label,
                       mode=info.mode, repaired=info.repaired or "", resized=info.resized,
                       source=source, width=info.width, wnid=s.wnid)
    offset = tar.offset
    members = [(f"{s.key}.cls", str(s.label).encode()),  # -1 on unlabelled test samples
               (f"{s.key}.jpg", jpg), (f"{s.key}.json", meta.encode())]
    tar.add_many(members)
    add_row(rec, plan, s, offset, len(jpg), crc32(jpg), info.width, info.height,
             info.repaired, source)
    if settings.strict:
        _count_check(rec, source, ident, strict)


def read_file(path: str | Path) -> tuple[bytes, os.stat_result]:
    """The whole file in one read of its known size (Path.read_bytes: ~1.6x slower here),
    and the stat of the descriptor it was read from."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        size = st.st_size
        data = os.read(fd, size + 1)
        while len(data) <= size:  # short read (network file systems): keep going
            more = os.read(fd, size + 1 - len(data))
            if not more:
                break
            data += more
        return data, st
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
