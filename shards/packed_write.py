"""`prep shard --src` on a compressed release: the second pass (the first:
shards/packed_scan.py).

The first pass fixed every sample's stored size, so each shard's layout is known to the
byte before any is written: the same members, headers and padding that shards/write.py
would write for the same plan. Each shard is created at its final size as
`NAME.partial`; then every file of the release is read again, one worker process per
file, and each sample is written at its offset (`pwrite`), after its bytes are checked
against the first pass (size and CRC-32: a file that changed in between stops the run,
naming the member). When every file is done, each shard is fsynced, hashed, renamed and
given its DALI index, as shards/write.py finishes a shard. A kill leaves only partials,
which a rerun writes again (the first pass is kept).

A file whose first pass left a seek index (prep/gzindex.py: the face-blurred train
archive, with rapidgzip) and that has more than one worker's share of the work is split
into as many ranges of members, each read by its own worker from its first member's offset.

The disk holds the shards and nothing else: no spool, no extracted file.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path
from typing import Any

from prep import gzindex
from prep.crc import crc32
from prep.errors import PrepError, write_error
from prep.extract import OutputNames
from prep.progress import SharedProgress, WorkerProgress, progress_bar
from prep.workers import interrupt_at_checks, process_pool, thread_map
from shards.dali_index import write_dali_index
from shards.image import encode_image
from shards.packed_scan import FileScan, PackedRelease, file_and_member, members
from shards.plan import ShardPlan
from shards.record import ShardRecord, sample_json
from shards.settings import ShardSettings
from shards.source import file_digest
from shards.tario import archive_size, member_parts, padded
from shards.write import add_row

# per sample to write: (ordinal in its file, shard number, offset of its first header,
# key, cls bytes, json bytes, stored size, CRC-32, encoded again)
Entry = tuple[int, int, int, str, bytes, bytes, int, int, bool]


def write_packed(todo: list[ShardPlan], packed: PackedRelease, out: Path,
                 settings: ShardSettings, workers: int, progress: bool
                 ) -> Iterator[ShardRecord]:
    """Write the shards `todo` (see the module docstring); their records, once all are
    finished. On any error (or Ctrl-C) the partials are removed."""
    if not todo:
        return
    partials = [out / f"{p.name}.partial" for p in todo]
    jobs: dict[tuple[str, int], list[Entry]] = {}
    stats = {split: _stats(paths) for split, paths in packed.files.items()}
    layouts = [_layout(n, p, packed, stats[p.split], settings, jobs)
               for n, p in enumerate(todo)]
    _room_for(out, [rec.filesize for rec, _ in layouts], partials)
    total = sum(len(entries) for entries in jobs.values())
    bar = progress_bar(total=total, unit="img", desc="write shards (2/2)",
                       disable=not progress)
    try:
        for path, (rec, _) in zip(partials, layouts):
            _create(path, rec.filesize)
        _second_pass(jobs, packed, [str(p) for p in partials], settings, workers, bar)
        bar.close()
        records = thread_map(lambda a: _finish(*a), zip(partials, layouts), max(workers, 2))
    except BaseException:
        bar.close()
        for path in partials:  # ours (planned names, under the lock): a rerun redoes them
            path.unlink(missing_ok=True)
        raise
    yield from records


def _layout(n: int, plan: ShardPlan, packed: PackedRelease, stats: list[list[int]],
            settings: ShardSettings, jobs: dict[tuple[str, int], list[Entry]]
            ) -> tuple[ShardRecord, list[tuple[str, int, int]]]:
    """Shard n's record (all but its digest and the tar's stat) and its members as DALI's
    index lists them; adds each sample to write to `jobs` {(split, file): entries}."""
    rec = ShardRecord(plan.name, plan.split, 0, 0, "")
    tar_members: list[tuple[str, int, int]] = []
    scans = packed.scans[plan.split]
    offset = 0
    for s, (sid, _, source) in zip(plan.samples, plan.members or []):
        f, o = file_and_member(sid)
        scan = scans[f]
        rec.source_stats.append(stats[f])
        if scan.errors[o]:
            if settings.on_error == "skip":
                rec.skipped.append(f"{source}: {scan.errors[o]}")
                continue
            raise PrepError(f"{source}: {scan.errors[o]}; rerun with --on-error skip to "
                            "leave it out (skips are listed in the manifest)")
        meta = sample_json(fmt=scan.formats[o], height=scan.heights[o], key=s.key,
                           label=s.label, mode=scan.modes[o], repaired=scan.repaired[o],
                           resized=scan.resized[o], source=source, width=scan.widths[o],
                           wnid=s.wnid).encode()
        cls = str(s.label).encode()
        size, crc = scan.stored[o], scan.crcs[o]
        jobs.setdefault((plan.split, f), []).append(
            (o, n, offset, s.key, cls, meta, size, crc, scan.reencoded[o]))
        add_row(rec, plan, s, offset, size, crc, scan.widths[o], scan.heights[o],
                scan.repaired[o], source)
        for ext, length in (("cls", len(cls)), ("jpg", size), ("json", len(meta))):
            tar_members.append((f"{s.key}.{ext}", offset + 512, length))
            offset += padded(length)
    rec.filesize = archive_size(offset)
    return rec, tar_members


def _room_for(out: Path, sizes: list[int], partials: list[Path]) -> None:
    """Refuse now, not after the first pass's hours, when OUT's file system cannot hold the
    shards (created sparse, they would fill it only while the second pass writes). The
    partials a killed run left count as free: they are written again from the start."""
    need = sum(sizes)
    try:
        st = os.statvfs(out)
        free = st.f_bavail * st.f_frsize + sum(p.stat().st_blocks * 512 for p in partials
                                               if p.exists())
    except OSError:
        return  # not knowable here: a full disk is still named when a write fails
    if need > free:
        raise PrepError(f"{out}: the shards need {need / 1e9:,.2f} GB and its file system has "
                        f"{free / 1e9:,.2f} GB free; make room or choose another --out, then "
                        "rerun (nothing was written; the first pass is kept)")


def _stats(paths: list[Path]) -> list[list[int]]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([st.st_size, st.st_mtime_ns])
    return out


def _create(path: Path, size: int) -> None:
    """An empty (sparse) file of the shard's final size; the second pass fills it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from exc


def _second_pass(jobs: dict[tuple[str, int], list[Entry]], packed: PackedRelease,
                 partials: list[str], settings: ShardSettings, workers: int, bar: Any) -> None:
    """Every file with samples to write, one worker task each (or one per range of its
    members: `_tasks`), largest first."""
    tasks = _tasks(jobs, packed, workers)
    pool = process_pool(min(workers, len(tasks)))
    shared = SharedProgress(len(tasks))
    try:
        with interrupt_at_checks() as check:
            futures = {pool.submit(*task, partials, settings.max_size, settings.quality,
                                   shared.path, slot)
                       for slot, task in enumerate(tasks)}
            while futures:
                done, futures = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                check()
                for fut in done:
                    fut.result()
                bar.update(shared.total() - bar.n)
            pool.shutdown(wait=True)
    except BaseException:
        pool.stop()  # the workers are gone before the partials are removed
        raise
    finally:
        shared.close()


def _tasks(jobs: dict[tuple[str, int], list[Entry]], packed: PackedRelease, workers: int
           ) -> list[tuple]:
    """(function, its first arguments) per worker task, largest file first: write_file for
    a whole file; write_range for each of the n ranges of a file with a seek index and n
    workers' share of the bytes to read (n > 1), equal in the members' bytes."""
    sizes = {k: packed.files[k[0]][k[1]].stat().st_size for k in jobs}
    total = max(sum(sizes.values()), 1)
    tasks = []
    for split, f in sorted(jobs, key=lambda k: -sizes[k]):
        path, entries = packed.files[split][f], jobs[split, f]
        index = packed.indexes.get(split, [None] * (f + 1))[f]
        n = min(round(workers * sizes[split, f] / total), len(entries))
        if n <= 1 or index is None or not gzindex.available():
            tasks.append((write_file, packed.kind, path, split, entries))
            continue
        scan = packed.scans[split][f]
        entries = sorted(entries)  # by ordinal: each range reads forward
        weights = [scan.sizes[e[0]] for e in entries]
        total_w, cut, acc, start = max(sum(weights), 1), 1, 0, 0
        for i, w in enumerate(weights):
            acc += w
            if acc * n >= cut * total_w and cut < n:  # range `cut` ends here
                tasks.append(_range_task(path, index, scan, entries[start:i + 1]))
                start, cut = i + 1, cut + 1
        if entries[start:]:
            tasks.append(_range_task(path, index, scan, entries[start:]))
    return tasks


def _range_task(path: Path, index: Path, scan: FileScan, entries: list[Entry]) -> tuple:
    where = [(scan.offsets[e[0]], scan.sizes[e[0]], scan.names[e[0]]) for e in entries]
    return (write_range, path, index, entries, where)


def write_file(kind: str, path: Path, split: str, entries: list[Entry], partials: list[str],
               max_size: int | None, quality: int, progress: str = "", slot: int = 0) -> int:
    """Worker task: read one file of the release again and write its samples `entries` at
    their places in the partial shards; how many were written (also to slot `slot` of the
    SharedProgress at `progress`)."""
    todo = {e[0]: e for e in entries}
    fds = _Descriptors(partials)
    shared = WorkerProgress(progress, slot)
    written = 0
    try:
        for o, m in enumerate(members(kind, path, split, OutputNames())):
            e = todo.pop(o, None)
            if e is None:
                continue
            _put(fds, path, m.name, m.data, e, max_size, quality)
            written += 1
            shared.set(written)
            if not todo:
                break
    finally:
        shared.set(written, force=True)
        shared.close()
        fds.close()
    if todo:
        raise PrepError(f"{path}: ends before member #{min(todo) + 1}, which this run read "
                        "in its first pass; it changed meanwhile (re-download it, then rerun)")
    return written


def write_range(path: Path, index: Path, entries: list[Entry],
                where: list[tuple[int, int, str]], partials: list[str], max_size: int | None,
                quality: int, progress: str = "", slot: int = 0) -> int:
    """Worker task: write_file for the members `entries` of one gzip file only (in file
    order; `where`: each one's offset in the inflated tar, size and name), read from the
    first one's offset through the file's seek index `index`."""
    fds = _Descriptors(partials)
    shared = WorkerProgress(progress, slot)
    written, name = 0, where[0][2] if where else ""
    try:
        with gzindex.reading_at(path, index) as f:
            for e, (offset, size, name) in zip(entries, where):
                if f.tell() != offset:
                    f.seek(offset)
                _put(fds, path, name, f.read(size), e, max_size, quality)
                written += 1
                shared.set(written)
    except (RuntimeError, ValueError, OSError) as exc:  # rapidgzip's (opening or reading)
        if isinstance(exc, PrepError):
            raise
        raise PrepError(f"{path}: cannot be read at member {name!r} any more "
                        f"({gzindex.reason(exc)}); it changed since this run first read it: "
                        "rerun when the release is no longer being written") from exc
    finally:
        shared.set(written, force=True)
        shared.close()
        fds.close()
    return written


def _put(fds: _Descriptors, path: Path, name: str, data: bytes, e: Entry,
         max_size: int | None, quality: int) -> None:
    """Write one sample (its member's bytes `data`) at its place, after checking them
    against the first pass."""
    _, shard, offset, key, cls, meta, size, crc, reencoded = e
    jpg = encode_image(data, max_size, quality, False)[0] if reencoded else data
    if len(jpg) != size or crc32(jpg) != crc:
        raise PrepError(f"{path}: member {name!r} changed since this run first read "
                        "it (other bytes); rerun when the release is no longer being "
                        "written")
    parts = member_parts([(f"{key}.cls", cls), (f"{key}.jpg", jpg), (f"{key}.json", meta)])
    fds.pwritev(shard, parts, offset)


class _Descriptors:
    """Open partial shards, the 128 last used (a file's samples go to every shard)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths, self.open = paths, OrderedDict()

    def pwritev(self, shard: int, parts: list[bytes], offset: int) -> None:
        fd = self.open.pop(shard, None)
        if fd is None:
            if len(self.open) >= 128:
                os.close(self.open.popitem(last=False)[1])
            try:
                fd = os.open(self.paths[shard], os.O_WRONLY)
            except OSError as exc:
                raise write_error(self.paths[shard], exc) from exc
        self.open[shard] = fd
        view = [memoryview(b) for b in parts if b]
        try:
            while view:
                n = os.pwritev(fd, view, offset)
                offset += n
                while view and n >= len(view[0]):
                    n -= len(view[0])
                    view.pop(0)
                if view and n:
                    view[0] = view[0][n:]
        except OSError as exc:
            raise write_error(self.paths[shard], exc) from exc

    def close(self) -> None:
        for fd in self.open.values():
            os.close(fd)
        self.open.clear()


def _finish(partial: Path, layout: tuple[ShardRecord, list[tuple[str, int, int]]]
            ) -> ShardRecord:
    """fsync, hash and rename one written shard; its DALI index; its record."""
    rec, tar_members = layout
    final = partial.with_name(partial.name[: -len(".partial")])
    try:
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        rec.sha256 = file_digest(partial)
        os.replace(partial, final)
        st = os.stat(final)
        rec.tar_inode, rec.tar_mtime_ns = st.st_ino, st.st_mtime_ns
        write_dali_index(final, tar_members)
    except OSError as exc:
        raise write_error(final, exc) from exc
    return rec
