"""The compressed releases, file by file: the face-blurred release's tar.gz files of class
folders, Hugging Face's tar.gz and Parquet files.

`members` yields each image of one file front to back, judged as the extraction judges it
(prep.extract, prep.hf). `extract_packed` writes every split into `--extract-to` with one
worker process per file, several files at once; a tar.gz with more than one worker's share
of the release's bytes (the face-blurred train archive holds the whole split, ~140 GB) is
inflated on its share of the cores where rapidgzip is installed (prep.gzindex, whose
fallback to ISA-L decides wherever rapidgzip's read cannot be trusted). `prep shard --src`
reads the same members, the same way (shards.packed_scan).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from prep import gzindex
from prep.errors import PrepError
from prep.extract import (
    OutputNames,
    claim_split,
    class_archive_members,
    finish_split,
    member_origin,
    read_record,
    write_member,
)
from prep.hf import Member, release_members
from prep.layout import Layout
from prep.progress import FileProgress
from prep.workers import in_workers

T = TypeVar("T")


def packed_files(lay: Layout) -> dict[str, list[Path]]:
    """{split: its files} of a compressed release, in the order the extraction reads them."""
    if lay.hf_files:
        return {split: list(paths) for split, paths in lay.hf_files.items()}
    return {split: [archive] for split, archive in lay.archives.items()}


def members(kind: str, path: Path, split: str, inflated: IO[bytes] | None = None
            ) -> Iterator[Member]:
    """Each image of one file of a compressed release ("blurred", "hf-tar", "hf-parquet"),
    in file order, judged as the extraction judges it. `inflated`: a tar.gz file's tar,
    already inflated (prep.gzindex)."""
    if kind != "blurred":
        yield from release_members(kind, path, split, inflated)
        return
    with nullcontext(inflated) if inflated is not None else open(path, "rb") as raw:
        for n, (m, rel, data) in enumerate(class_archive_members(path, raw, OutputNames())):
            yield Member(m.name, rel, rel.split("/", 1)[0], member_origin(path, m.name, n),
                         data, m.offset_data)


def cores_per_file(paths: list[Path], workers: int) -> dict[Path, int]:
    """Each file's share of `workers` by its bytes, at least 1: the threads that inflate a
    large tar.gz (and, in `prep shard --src`, check its members)."""
    total = sum(p.stat().st_size for p in paths)
    return {p: max(1, round(workers * p.stat().st_size / max(total, 1))) for p in paths}


def inflated_once(path: Path, threads: int, read: Callable[[IO[bytes] | None, bool], T],
                  index_to: Path | None = None) -> T:
    """read(inflated, again) over one file: a gzip file with `threads` > 1 is inflated by
    rapidgzip on that many threads (its seek index to `index_to`), where installed; else
    read(None, False) reads the file itself (ISA-L). Where rapidgzip's read cannot be
    trusted (prep.gzindex.Unsure), read(None, True) reads it all again through ISA-L."""
    if threads > 1 and gzindex.available() and gzindex.is_gzip(path):
        try:
            with gzindex.reading(path, threads, index_to) as inflated:
                return read(inflated, False)
        except gzindex.Unsure:
            return read(None, True)
    return read(None, False)


@dataclass
class Extracted:
    files: int
    labels: dict[str, str]  # val stem -> wnid from the names' suffixes (Hugging Face's val)
    names: dict[str, str]  # output path -> the member or row it came from


def extract_packed(kind: str, files: dict[str, list[Path]], dest: Path, workers: int,
                   progress: bool = True) -> tuple[dict[str, Path], dict[str, str]]:
    """Extract every split of a compressed release into `dest/<split>`, one worker per file
    (a large tar.gz on its share of the cores); ({split: folder}, Hugging Face's val labels
    from the names' suffixes: {stem: WNID}). Each split is built in `.NAME.partial` and
    renamed when all of its files are done (prep.extract: records, reuse, resume)."""
    dirs, labels, todo, partials = {}, {}, [], {}
    for split, paths in files.items():
        dirs[split] = dest / split
        partial = claim_split(dest / split, paths)
        if partial is None:  # finished earlier, from these very files
            if split == "val" and kind != "blurred":
                labels |= _recorded_labels(dest / split)
            continue
        partials[split] = partial
        todo += [(p, split, partial) for p in paths]
    cores = cores_per_file([p for p, _, _ in todo], workers)
    results: dict[int, Extracted] = {}
    in_workers(_extract_file, [(p.stat().st_size, (kind, p, split, partial, cores[p]))
                               for p, split, partial in todo],
               workers, f"extract {kind}", progress, results.__setitem__)
    for split, partial in partials.items():
        done = [results[i] for i, task in enumerate(todo) if task[1] == split]  # file order
        names = OutputNames()  # one name from two archives or Parquet files: refused
        for e in done:
            names.merge(e.names)
        split_labels = {k: v for e in done for k, v in e.labels.items()}
        finish_split(dest / split, partial, files[split], len(names.origin),
                     {"labels": split_labels} if split == "val" and kind != "blurred"
                     else None)
        labels |= split_labels
    return dirs, labels


def _extract_file(kind: str, path: Path, split: str, partial: Path, threads: int,
                  progress: str = "", slot: int = 0) -> Extracted:
    """Worker task: one file into the split's partial folder. Read again through ISA-L
    after a read of rapidgzip's that cannot be trusted, every file is written again."""
    read = FileProgress(os.stat(path).st_size, progress, slot)
    try:
        return inflated_once(path, threads, lambda inflated, again: _write(
            members(kind, path, split, inflated), kind, split, partial, read, again))
    finally:
        read.close()


def _write(members: Iterator[Member], kind: str, split: str, partial: Path,
           read: FileProgress, again: bool) -> Extracted:
    labels: dict[str, str] = {}
    made: set[str] = set()
    names = OutputNames()
    read.n = 0
    for m in members:
        names.add(m.rel, m.origin)
        folder = m.rel.rpartition("/")[0]
        if folder and folder not in made:
            (partial / folder).mkdir(exist_ok=True)
            made.add(folder)
        write_member(partial / m.rel, m.data, len(m.data), again=again)
        read.add(len(m.data))
        if split == "val" and kind != "blurred":
            labels[m.rel.rsplit(".", 1)[0]] = m.wnid  # type: ignore[assignment]
    return Extracted(len(names.origin), labels, names.origin)


def _recorded_labels(val: Path) -> dict[str, str]:
    rec = read_record(val) or {}
    labels = rec.get("labels")
    if not isinstance(labels, dict) or not labels or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise PrepError(f"{val}: its record holds no val labels; remove {val} and rerun to "
                        "extract val again")
    return labels
