"""The original ILSVRC2012 tars extracted on several cores.

`ILSVRC2012_img_train.tar` holds 1,000 class tars and is not compressed, so each class tar
can be read where it lies: its offset comes from the train tar's headers
(prep.archive_listing.class_tars, the listing `prep shard --src` makes, with the same
refusals). The class tars and the val (and test) tar are the tasks of one pool of
`--workers` processes, largest first; `tar -x` and the earlier extraction read the train
tar front to back in one process. Members are judged and written as before
(prep.extract: flat regular files with plain names only, one name twice refused, each file
under a temp name then renamed); each class is built in `.nXXXXXXXX.partial` inside the
split's partial folder and renamed when whole, and each split is renamed from
`.NAME.partial` when all of its tasks are done: a rerun after a kill keeps the finished
classes and files.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from prep.archive_listing import class_tars
from prep.errors import PrepError
from prep.extract import (
    CORRUPT,
    claim_split,
    corrupt,
    extract_flat,
    finish_split,
    open_tar,
)
from prep.progress import FileProgress
from prep.workers import in_workers


def extract_ilsvrc2012(archives: dict[str, Path], dest: Path, workers: int = 1,
                       progress: bool = True) -> dict[str, Path]:
    """{split: tar} ("train": ILSVRC2012_img_train.tar; "val", "test": flat tars) into
    `dest/<split>` ({split: folder}); a split finished earlier from the same tar is reused."""
    tasks: list[tuple[int, str, tuple]] = []  # (bytes, split, extract_part's arguments)
    partials: dict[str, Path] = {}
    files: dict[str, int] = {}
    for split, archive in archives.items():
        partial = claim_split(dest / split, [archive])
        if partial is None:  # finished earlier, from this very tar
            continue
        partials[split], files[split] = partial, 0
        if split != "train":
            size = archive.stat().st_size
            tasks.append((size, split, (str(archive), str(archive), 0, size, str(partial),
                                        "")))
            continue
        for wnid, offset, size in class_tars(archive):
            if (partial / wnid).is_dir():  # finished by an interrupted run of this tar
                files[split] += sum(1 for _ in os.scandir(partial / wnid))
                continue
            tasks.append((size, split, (str(archive), f"{archive}:{wnid}.tar", offset,
                                        size, str(partial), wnid)))
    tasks.sort(key=lambda t: -t[0])  # largest first

    def done(i: int, n: int) -> None:
        files[tasks[i][1]] += n

    in_workers(extract_part, [(size, args) for size, _, args in tasks], workers,
               "extract archives", progress, done)
    for split, partial in partials.items():
        finish_split(dest / split, partial, [archives[split]], files[split])
    return {split: dest / split for split in archives}


def extract_part(archive: str, where: str, offset: int, size: int, into: str, wnid: str,
                 progress: str = "", slot: int = 0) -> int:
    """Worker task: the flat tar at bytes [offset, offset + size) of `archive` (`where`
    names it in errors) into folder `into`; a class tar (`wnid`) into `into/.wnid.partial`,
    renamed to `into/wnid` once whole. How many files it holds."""
    target = Path(into) / f".{wnid}.partial" if wnid else Path(into)
    target.mkdir(exist_ok=True)
    read = FileProgress(size, progress, slot)
    with open(archive, "rb") as raw:
        raw.seek(offset)
        try:
            tar = open_tar(fileobj=_Window(raw, size), mode="r|")
        except (tarfile.TarError, OSError) as exc:
            raise PrepError(f"{where}: cannot open as a tar archive ({exc})") from exc
        try:
            with tar:
                n = extract_flat(tar, where, target, read.add)
        except CORRUPT as exc:
            raise corrupt(archive, exc) from exc
        finally:
            read.close()
    if wnid:
        os.replace(target, Path(into) / wnid)
    return n


class _Window:
    """Bytes [start, start + size) of an open file, read front to back (a class tar inside
    the train tar)."""

    def __init__(self, raw: object, size: int) -> None:
        self.raw, self.left = raw, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.raw.read(n)  # type: ignore[attr-defined]
        self.left -= len(data)
        return data

