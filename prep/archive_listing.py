"""List the original ILSVRC2012 tars without extracting them: every image's name, and where
its bytes lie in the archive (offset, size), for `prep shard --src` to read them in place.

The archives are plain (uncompressed) tars, so a member is read with one `pread` at its
data offset. The train tar holds 1,000 class tars (`n01440764.tar`); their members' offsets
are those inside the outer file. Only the 512-byte headers are read (a memory map walked by
prep.tarheaders.entries, every header's checksum checked: ~5 us a member where tarfile takes
~19), not the images between them. Members are judged exactly as `prep imagenet --extract-to`
judges them (prep.extract): anything but a flat regular file with a plain name is refused,
two members with one name are refused naming both, and names are sorted into images,
litter, bad names and other files as the listing of an extracted folder sorts them
(prep.scan), so both paths find the same samples and the same problems.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prep.classes import is_wnid
from prep.errors import PrepError
from prep.extract import OutputNames, corrupt, not_a_file, plain_name
from prep.progress import progress_bar
from prep.scan import IMAGE_EXTS, Problems, all_plain_images, bad_name, is_litter, run_chunks
from prep.tarheaders import REGULAR, TarError, entries

Where = tuple[int, int]  # (offset of the member's bytes in the archive, size)


@dataclass
class ArchiveListing:
    """The images of the ILSVRC2012 tars, as the listing of their extraction would give."""

    archives: dict[str, Path]  # split -> archive
    train: dict[str, list[str]] = field(default_factory=dict)  # wnid -> sorted image names
    val: list[str] = field(default_factory=list)  # sorted image names
    test: list[str] = field(default_factory=list)
    # split -> {path relative to the split's folder once extracted: where in the archive}
    where: dict[str, dict[str, Where]] = field(default_factory=dict)
    problems: Problems = field(default_factory=Problems)


def list_archives(archives: dict[str, Path], progress: bool = True,
                  pool: Executor | None = None) -> ArchiveListing:
    """`archives`: {"train": ILSVRC2012_img_train.tar, "val": ..., optional "test": ...};
    the class tars of the train tar are listed in `pool`'s processes when given."""
    out = ArchiveListing(dict(archives))
    total = sum(p.stat().st_size for p in archives.values())
    bar = progress_bar(total=total, unit="B", unit_scale=True, desc="list archives",
                       disable=not progress)
    try:
        done = 0
        for split, archive in archives.items():
            where: dict[str, Where] = {}
            if split == "train":
                out.train = _list_train(archive, where, out.problems, bar, pool)
            else:
                setattr(out, split, _list_flat(archive, where, out.problems, bar))
            out.where[split] = where
            done += archive.stat().st_size
            bar.update(done - bar.n)  # the headers and padding between the members too
    finally:
        bar.close()
    return out


_KINDS = {b"1": "hardlink", b"2": "symlink", b"5": "directory"}  # tar type flags


def _map(archive: Path) -> mmap.mmap:
    try:
        with open(archive, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: an empty file
        raise PrepError(f"{archive}: cannot read it as a tar archive ({exc})") from exc
    buf.madvise(mmap.MADV_RANDOM)  # headers only: no read-ahead of the images between them
    return buf


def _members(buf: mmap.mmap, archive: str, start: int, end: int
             ) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each member of the tar in buf[start:end], refused as
    the extraction refuses it when it is not a regular file with a plain name, or when
    the archive (or a class tar in it) is cut short."""
    try:
        # names that are not UTF-8 kept as tarfile keeps them: listed as bad names (prep.scan)
        for name, kind, data, size in entries(buf, archive, start, end, "surrogateescape"):
            if kind not in REGULAR:
                raise not_a_file(archive, name, _KINDS.get(kind, ""))
            if data + size > end:
                raise TarError(f"member {name!r} runs past the end")
            yield plain_name(archive, name), data, size
    except TarError as exc:
        raise corrupt(archive, exc) from exc


def sort_members(archive: str, members: Iterator[tuple[str, int, int]], rel: str,
                 where: dict[str, Where], folder: str, probs: Problems) -> list[str]:
    """Sorted image names of one flat member list (a class tar, the val tar); the rest
    sorted into `probs` as prep.scan.list_images sorts the files of a folder."""
    listed = list(members)
    names = [m[0] for m in listed]
    if len(set(names)) != len(names):  # name both members, as the extraction does
        seen = OutputNames()
        for i, name in enumerate(names, 1):
            seen.add(name, f"{archive}: member {name!r} (#{i})")
    images = listed
    if not all_plain_images(names):  # names test by name only where one can fail (rare)
        images = []
        for name, offset, size in listed:
            path = f"{rel}/{name}"
            if is_litter(name):
                probs.ignored.append(path)
            elif bad_name(name):
                probs.bad_names.append(path)
            elif not name.endswith(IMAGE_EXTS):
                probs.extra.append(path)
            else:
                images.append((name, offset, size))
    where.update((folder + name, (offset, size)) for name, offset, size in images)
    probs.empty += sorted(f"{rel}/{name}" for name, _, size in images if size == 0)
    return sorted(name for name, _, _ in images)


def _list_flat(archive: Path, where: dict[str, Where], probs: Problems, bar: Any) -> list[str]:
    buf = _map(archive)
    try:
        names = sort_members(str(archive), _members(buf, str(archive), 0, len(buf)),
                             archive.name, where, "", probs)
    finally:
        buf.close()
    return names


def _list_train(archive: Path, where: dict[str, Where], probs: Problems, bar: Any,
                pool: Executor | None) -> dict[str, list[str]]:
    """{wnid: sorted names} of the class tars inside the train tar, each walked where it
    lies (so its members' offsets are offsets in the outer archive), 25 class tars per task
    of `pool` (in this process without one, or when there is only one task)."""
    jobs = class_tars(archive)
    train: dict[str, list[str]] = {}
    chunks = [(str(archive), jobs[i : i + 25]) for i in range(0, len(jobs), 25)]
    for part in run_chunks(pool if len(chunks) > 1 else None, _list_classes, chunks):
        for wnid, size, names, offsets, sizes, p in part:
            train[wnid] = names
            where.update(zip([f"{wnid}/{n}" for n in names], zip(offsets, sizes)))
            probs.merge(p)
            bar.update(size + 512)
    return dict(sorted(train.items()))


def class_tars(archive: Path) -> list[tuple[str, int, int]]:
    """(wnid, offset, size) of each class tar (`nXXXXXXXX.tar`) of the ILSVRC2012 train tar,
    from its headers: any other member, a class tar twice, or a file cut short is refused,
    named as the extraction names it."""
    buf = _map(archive)
    try:
        tars = list(_members(buf, str(archive), 0, len(buf)))
    finally:
        buf.close()
    classes, jobs = OutputNames(), []
    for name, offset, size in tars:
        wnid = name[:-4] if name.endswith(".tar") else ""
        if not is_wnid(wnid):
            raise PrepError(f"{archive}: member {name!r} is not a class tar "
                            "(expected nXXXXXXXX.tar)")
        classes.add(wnid, f"{archive}: member {name!r} (#{len(classes.origin) + 1})")
        jobs.append((wnid, offset, size))
    return jobs


def _list_classes(chunk: tuple[str, list[tuple[str, int, int]]]) -> list[tuple]:
    """Worker task: (wnid, class tar size, sorted image names, their offsets and sizes,
    problems) of some class tars (wnid, offset, size) of the train tar."""
    archive, jobs = chunk
    out = []
    buf = _map(Path(archive))
    try:
        for wnid, offset, size in jobs:
            inner, where, probs = f"{archive}:{wnid}.tar", {}, Problems()
            names = sort_members(inner, _members(buf, inner, offset, offset + size),
                                 f"{Path(archive).name}/{wnid}", where, "", probs)
            out.append((wnid, size, names, [where[n][0] for n in names],
                        [where[n][1] for n in names], probs))
    finally:
        buf.close()
    return out
