"""`prep shard --src` on a compressed release (the face-blurred tar.gz, Hugging Face's
tar.gz or Parquet): the first of two passes.

A gzip stream or a Parquet column cannot be read at an offset, and a train shard holds a
seeded permutation of the whole split, so no shard could be finished before the last
file is read. So each file is read twice, one process per file, never unpacked to disk:

1. here: every member is judged by the extraction's own rules (prep.packed.members),
   checked and measured as the shard writer would store it
   (shards.image.encode_image: the strict check, repairs, --max-size): its stored size,
   CRC-32, dimensions, or why it cannot be stored. From the names the release is listed
   and checked exactly as `prep imagenet` lists and checks the extracted folders
   (prep.imagenet.listed_scan, validate_scan), and planned as the view would be; the
   shards' layouts are then fixed to the byte;
2. shards/packed_write.py: each file is read again and each sample written at its final
   offset in shards created at their final size.

What a first pass found is kept per file in the release's cache folder
(shards.release.checked_record_dir), under the file's identity (size, mtime, ctime, inode,
device) and the options that change what is stored: a later run (a rerun after a kill,
another OUT, another shard count) reads each file once, not twice.

A gzip file with more than one core's share of the work (the face-blurred train archive)
is read on that many threads where rapidgzip is installed, and its seek index is kept beside
its first pass: the second pass then splits it over as many workers (prep/gzindex.py).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from prep.archive_listing import sort_members
from prep.atomic import write_atomic
from prep.checked import identity
from prep.crc import crc32
from prep.errors import PrepError
from prep.extract import OutputNames, member_origin
from prep.hf import Member, row_origin
from prep.imagenet import SourceScan, listed_scan
from prep.layout import Layout
from prep.packed import cores_per_file, inflated_once
from prep.packed import members as packed_members
from prep.progress import FileProgress
from prep.scan import IMAGE_EXTS, Problems
from prep.workers import in_workers
from shards.image import UndecodableImage, encode_image
from shards.settings import ShardSettings

FORMAT = 3  # of the kept first passes: bump when FileScan or what it measures changes


def members(kind: str, path: Path, split: str, names: OutputNames,
            inflated: IO[bytes] | None = None) -> Iterator[Member]:
    """Each image of one file of a compressed release, in file order, judged as the
    extraction judges them (prep.packed.members); each path is added to `names` (one path
    twice: refused, naming both). `inflated`: a tar.gz file's tar, already inflated."""
    for m in packed_members(kind, path, split, inflated):
        names.add(m.rel, m.origin)
        yield m


@dataclass
class FileScan:
    """The first pass over one file, by column, one row per member in file order."""

    names: list[str] = field(default_factory=list)  # as the release names them
    rels: list[str] = field(default_factory=list)  # path under the split once extracted
    wnids: list[str | None] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # the member's own size
    offsets: list[int] = field(default_factory=list)  # of its bytes in the tar (-1: unknown)
    # what the shard stores: its size and CRC-32, dimensions, the json's fields; `error`
    # says why it cannot be stored ("" when it can), `reencoded` that the stored bytes are
    # not the member's (a repair or a resize: encoded again, the same bytes, in pass 2)
    stored: list[int] = field(default_factory=list)
    crcs: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    resized: list[bool] = field(default_factory=list)
    reencoded: list[bool] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def scan_file(kind: str, path: Path, split: str, settings: ShardSettings, threads: int = 1,
              index_to: str = "", progress: str = "", slot: int = 0) -> FileScan:
    """Worker task: the first pass over one file (see the module docstring). `threads` > 1:
    the members are checked on that many threads while this one reads on (the C check
    releases the GIL), for a file too large to be read while the others are (the
    face-blurred train archive holds the whole split); a tar.gz file is then inflated on as
    many threads, its seek index written to `index_to` (prep.gzindex), where rapidgzip is
    installed. The bytes read so far go to slot `slot` of the SharedProgress at
    `progress`."""
    read = FileProgress(os.stat(path).st_size, progress, slot)
    try:
        return inflated_once(
            path, threads if index_to and kind != "hf-parquet" else 1,
            lambda inflated, _again: _scan(kind, path, split, settings, threads, read,
                                           inflated),
            Path(index_to) if index_to else None)
    finally:
        read.close()


def _scan(kind: str, path: Path, split: str, settings: ShardSettings, threads: int,
          read: FileProgress, inflated: IO[bytes] | None) -> FileScan:
    out, names = FileScan(), OutputNames()
    read.n = 0
    if threads <= 1:
        for m in members(kind, path, split, names, inflated):
            _listed(out, m)
            read.add(len(m.data))
            _row(out, _measure(m.rel, m.data, settings))
    else:
        with ThreadPoolExecutor(threads) as pool:
            pending: deque[Future] = deque()
            batch: list[tuple[str, bytes]] = []
            for m in members(kind, path, split, names, inflated):
                _listed(out, m)
                read.add(len(m.data))
                batch.append((m.rel, m.data))
                if len(batch) == BATCH:
                    pending.append(pool.submit(_measure_batch, batch, settings))
                    batch = []
                    while len(pending) > 4 * threads:  # a bounded read-ahead
                        _rows(out, pending.popleft().result())
            pending.append(pool.submit(_measure_batch, batch, settings))
            while pending:
                _rows(out, pending.popleft().result())
    return out


BATCH = 16  # members per task of the checking threads


def _listed(out: FileScan, m: Member) -> None:
    out.names.append(m.name)
    out.rels.append(m.rel)
    out.wnids.append(m.wnid)
    out.offsets.append(m.offset)
    out.sizes.append(len(m.data))


def _measure(rel: str, data: bytes, settings: ShardSettings) -> tuple:
    """What the shard would store for one member (FileScan's columns from `stored` on)."""
    if not rel.endswith(IMAGE_EXTS):  # listed as another file, never stored
        return 0, 0, 0, 0, "", "", "", False, False, "not an image by its name"
    try:
        jpg, info = encode_image(data, settings.max_size, settings.quality, settings.strict)
    except UndecodableImage as exc:
        return 0, 0, 0, 0, "", "", "", False, False, str(exc)
    return (len(jpg), crc32(jpg), info.width, info.height, info.format, info.mode,
            info.repaired or "", info.resized, jpg is not data, "")


def _measure_batch(batch: list[tuple[str, bytes]], settings: ShardSettings) -> list[tuple]:
    return [_measure(rel, data, settings) for rel, data in batch]


def _rows(out: FileScan, rows: list[tuple]) -> None:
    for values in rows:
        _row(out, values)


def _row(out: FileScan, values: tuple) -> None:
    for column, v in zip((out.stored, out.crcs, out.widths, out.heights, out.formats,
                          out.modes, out.repaired, out.resized, out.reencoded, out.errors),
                         values):
        column.append(v)


def _kept_path(folder: Path, path: Path, settings: ShardSettings) -> Path:
    st = os.stat(path)
    key = repr((FORMAT, os.path.realpath(path), identity(st), settings.max_size,
                settings.quality, settings.strict))
    return folder / f"first-pass-{path.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def index_path(folder: Path | None, path: Path, settings: ShardSettings) -> Path | None:
    """Where the seek index of `path` is kept (prep.gzindex), beside its first pass."""
    if folder is None:
        return None
    kept = _kept_path(folder, path, settings)
    return kept.with_name(kept.name + ".gzindex")


def _kept(folder: Path | None, path: Path, settings: ShardSettings) -> FileScan | None:
    if folder is None:
        return None
    try:
        with open(_kept_path(folder, path, settings), "rb") as f:
            scan = pickle.load(f)  # our own cache folder, written by this code
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError):
        return None
    return scan if isinstance(scan, FileScan) else None


def _keep(folder: Path | None, path: Path, settings: ShardSettings, scan: FileScan) -> None:
    if folder is None:
        return
    kept = _kept_path(folder, path, settings)
    for old in folder.glob(f"first-pass-{path.name}-*"):  # of an earlier state of the file
        if not old.name.startswith(kept.name):  # its seek index, just written, stays
            old.unlink(missing_ok=True)
    try:
        write_atomic(kept,
                     pickle.dumps(scan, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError:
        pass  # a cache: without it the next run reads the file twice again


@dataclass
class PackedRelease:
    """A compressed release after its first pass: per split, its files (in the order the
    samples' ids count them) and what the pass found in each."""

    kind: str  # blurred | hf-tar | hf-parquet
    files: dict[str, list[Path]]
    scans: dict[str, list[FileScan]]
    reused: int = 0  # files whose first pass was kept from an earlier run
    # per split, each file's seek index (prep.gzindex) where its first pass made one
    indexes: dict[str, list[Path | None]] = field(default_factory=dict)


def sample_id(file_no: int, ordinal: int) -> int:
    """One int for (file of the split, member of the file): a plan's member offset."""
    return file_no << 32 | ordinal


def file_and_member(sid: int) -> tuple[int, int]:
    """(file of the split, member of the file) of a sample_id."""
    return sid >> 32, sid & 0xFFFFFFFF


def first_pass(kind: str, files: dict[str, list[Path]], settings: ShardSettings,
               keep: Path | None, progress: bool, workers: int) -> PackedRelease:
    """The first pass over every file, one worker process per file, kept in `keep`."""
    scans: dict[str, list[FileScan | None]] = {
        split: [_kept(keep, p, settings) for p in paths] for split, paths in files.items()}
    todo = [(split, i, p) for split, paths in files.items() for i, p in enumerate(paths)
            if scans[split][i] is None]
    reused = sum(len(paths) for paths in files.values()) - len(todo)
    # a file's share of the cores checks its members on threads, and inflates it too where
    # it can (the face-blurred release holds its whole train split in one file)
    cores = cores_per_file([p for _, _, p in todo], workers)

    def done(task: int, scan: FileScan) -> None:
        split, i, p = todo[task]
        scans[split][i] = scan
        _keep(keep, p, settings, scan)

    in_workers(scan_file, [(p.stat().st_size, (kind, p, split, settings, cores[p],
                                              str(index_path(keep, p, settings) or "")))
                           for split, _, p in todo],
               workers, "read release (1/2)", progress, done)
    indexes = {split: [ix if ix is not None and ix.is_file() else None
                       for ix in (index_path(keep, p, settings) for p in paths)]
               for split, paths in files.items()}
    return PackedRelease(kind, files, scans, reused, indexes)  # type: ignore[arg-type]


def packed_scan(lay: Layout, packed: PackedRelease) -> SourceScan:
    """The release's listing as `prep imagenet` lists its extracted folders: the same
    images, problems and label sources; `.where`: each image's sample_id and size. Sets the
    layout's split folders to the release's files (errors name them)."""
    problems, where = Problems(), {}
    listing: dict[str, dict[str, list[str]] | list[str]] = {}
    for split, scans in packed.scans.items():
        _one_file_per_path(packed, split)
        folders: dict[str, list[tuple[str, int, int]]] = {}
        for f, s in enumerate(scans):
            for o, (rel, size) in enumerate(zip(s.rels, s.sizes)):
                folder, _, name = rel.rpartition("/")
                folders.setdefault(folder, []).append((name, sample_id(f, o), size))
        where[split] = {}
        sorted_folders = {
            folder: sort_members(str(packed.files[split][0]), iter(items),
                                 f"{split}/{folder}".rstrip("/"), where[split],
                                 f"{folder}/" if folder else "", problems)
            for folder, items in sorted(folders.items())}
        in_folders = split == "train" or (split == "val" and packed.kind == "blurred")
        listing[split] = sorted_folders if in_folders else sorted_folders.get("", [])
    for split in ("train", "val", "test"):
        paths = packed.files.get(split, [])
        setattr(lay, f"{split}_dir", (paths[0] if len(paths) == 1 else paths[0].parent)
                if paths else None)
    lay.val_in_folders = packed.kind == "blurred"
    if packed.kind != "blurred":  # Hugging Face: the names' suffixes label val
        lay.suffix_labels = {rel.rsplit(".", 1)[0]: w for s in packed.scans["val"]
                             for rel, w in zip(s.rels, s.wnids)}
    if "train" not in listing or "val" not in listing:
        raise PrepError(f"--src {lay.src}: the {lay.name} release without its "
                        f"{'train' if 'train' not in listing else 'val'} files")
    return listed_scan(lay, listing["train"], listing["val"], listing.get("test", []),
                       problems, where)


def _one_file_per_path(packed: PackedRelease, split: str) -> None:
    """One path from two files of a split: refused, naming both members as the extraction
    names them (each file was checked on its own in its first pass)."""
    scans = packed.scans[split]
    if len(scans) < 2:
        return
    first: dict[str, tuple[int, int]] = {}
    for f, s in enumerate(scans):
        for o, rel in enumerate(s.rels):
            was = first.setdefault(rel, (f, o))
            if was != (f, o):
                names = OutputNames()
                for f2, o2 in (was, (f, o)):
                    path, name = packed.files[split][f2], scans[f2].names[o2]
                    names.add(rel, row_origin(path, o2, name) if packed.kind == "hf-parquet"
                              else member_origin(path, name, o2))
