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
import zlib
from pathlib import Path

from prep import jpeg
from prep.checked import Identity, identity
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
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        digest = BackgroundDigest(partial, fd)
        try:
            tar = TarStream(FdSink(fd, digest))
            base = f"{data}/{plan.split}/"  # str concatenation: pathlib cost ~25 µs a sample
            i, samples = 0, plan.samples
            # pass-through: good JPEGs in C, a sample it stops at in Python. Not when
            # resizing: nearly every image is then re-encoded by Pillow anyway
            use_c = tarpack.available() and not settings.max_size
            ahead = CheckAhead(plan, base, trusted) if use_c and settings.strict and \
                jpeg.available() else None
            try:
                while i < len(samples):
                    run = samples[i : i + RUN]
                    if ahead:
                        ahead.writer_at(i + len(run))
                    done = _write_run(tar, digest, run, base, plan, rec, settings, trusted,
                                      ahead) if use_c else 0
                    i += done
                    if done < len(run):
                        _write_sample(tar, samples[i], base, data, plan, settings, rec,
                                      trusted)
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
    return rec


def source_paths(plan: ShardPlan) -> list[str]:
    """The plan's sources as `split/path` under --data (their `source` in the json)."""
    return [f"{plan.split}/{s.path}" for s in plan.samples]


RUN = 64  # samples per C call: the hashing thread catches up between calls


def _write_run(tar: TarStream, digest: BackgroundDigest, samples: list, base: str,
               plan: ShardPlan, rec: ShardRecord, settings: ShardSettings,
               trusted: dict[str, Identity], ahead: CheckAhead | None) -> int:
    """Write the leading good JPEGs of `samples` through shards/tarpack; how many.
    Sources `ahead` has checked already (unchanged since) are not checked again here, and
    count as checked by this write."""
    sources = [f"{plan.split}/{s.path}" for s in samples]
    passed = ahead.passed if ahead else {}
    done, end, written = tarpack.write_samples(
        digest.fd, tar.offset, [base + s.path for s in samples], samples, plan.split,
        settings.strict, [passed.get(src) or trusted.get(src) for src in sources])
    digest.advance(end - tar.offset)
    for s, src, (offset, size, w, h, ident, checked, crc, json_size) in zip(samples, sources,
                                                                            written):
        tar.appended(tarpack.members_of(s, size, json_size))
        _add_row(rec, plan, s, offset, size, crc, w, h, None)
        rec.source_stats.append([size, ident[1]])
        if settings.strict:
            _count_check(rec, src, ident, checked or passed.get(src) == ident)
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

    def __init__(self, plan: ShardPlan, base: str, trusted: dict[str, Identity]) -> None:
        self.passed: dict[str, Identity] = {}
        self._plan, self._base, self._trusted = plan, base, trusted
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
        split, samples = self._plan.split, self._plan.samples
        for j in range(len(samples) - 1, -1, -1):
            if self._stopping or j < self._limit:
                return
            src = f"{split}/{samples[j].path}"
            if src in self._trusted:
                continue
            try:
                raw, st = read_file(self._base + samples[j].path)
            except OSError:  # the writer reports it
                continue
            if raw.startswith(b"\xff\xd8") and jpeg.strict_problem(raw) is None:
                self.passed[src] = identity(st)


def _count_check(rec: ShardRecord, source: str, ident: Identity, checked: bool) -> None:
    if checked:
        rec.checked.append([source, *ident])
    else:
        rec.trusted += 1


def _add_row(rec: ShardRecord, plan: ShardPlan, s: Sample, offset: int, jpg_bytes: int,
             jpg_crc32: int, width: int, height: int, repaired: str | None) -> None:
    """Count a written sample and add its per-sample index row."""
    rec.num_samples += 1
    for column, value in zip(INDEX_COLUMNS, (
            s.key, plan.split, plan.name, offset, jpg_bytes, jpg_crc32, s.label, s.wnid,
            width, height, repaired or "", f"{plan.split}/{s.path}")):
        rec.rows[column].append(value)


def _write_sample(tar: TarStream, s: Sample, base: str, data: Path, plan: ShardPlan,
                  settings: ShardSettings, rec: ShardRecord, trusted: dict[str, Identity]) -> None:
    src = base + s.path
    try:
        raw, st = read_file(src)
    except FileNotFoundError as exc:
        raise PrepError(f"{data}/meta/{plan.split}.txt:{s.line}: {src} does not exist; "
                        "rerun `prep imagenet` to refresh meta/") from exc
    except OSError as exc:  # a source that cannot be read: not the shard's disk
        raise read_error(src, exc) from exc
    rec.source_stats.append([st.st_size, st.st_mtime_ns])
    source, ident = f"{plan.split}/{s.path}", identity(st)
    strict = settings.strict and trusted.get(source) != ident
    try:
        jpg, info = encode_image(raw, settings.max_size, settings.quality, strict)
    except UndecodableImage as exc:
        if settings.on_error == "skip":
            rec.skipped.append(f"{plan.split}/{s.path}: {exc}")
            return
        raise PrepError(f"{src}: {exc}; rerun with --on-error skip to leave it out "
                        "(skips are listed in the manifest)") from exc
    meta = sample_json(fmt=info.format, height=info.height, key=s.key, label=s.label,
                       mode=info.mode, repaired=info.repaired or "", resized=info.resized,
                       source=f"{plan.split}/{s.path}", width=info.width, wnid=s.wnid)
    offset = tar.offset
    members = [(f"{s.key}.cls", str(s.label).encode()),  # -1 on unlabelled test samples
               (f"{s.key}.jpg", jpg), (f"{s.key}.json", meta.encode())]
    tar.add_many(members)
    _add_row(rec, plan, s, offset, len(jpg), zlib.crc32(jpg), info.width, info.height,
             info.repaired)
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
