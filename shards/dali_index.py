"""NVIDIA DALI's index file for a WebDataset shard, as its `wds2idx` tool writes it.

DALI's `fn.readers.webdataset(paths=..., index_paths=...)` reads samples by offset and
needs one index per shard: a line `v1.2 <samples>`, then one line per sample listing, for
each member in tar order, `<extension> <data offset> <size> <member name>`. `prep shard`
writes `NAME.idx` beside each `NAME.tar` (DALI's own default name: up to the first dot of
the file name), so DALI users have nothing to run. `prep shard` makes it from the members it
wrote (the writer's own account: reading the headers back took ~24% of a reshard's worker
time); `prep verify` from the tar's headers (shards.tarread.members), and compares.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from pathlib import Path

from prep.atomic import write_atomic
from shards.tarread import members

VERSION = "v1.2"


def index_path(tar: str | os.PathLike) -> Path:
    """`train-000000.tar` -> `train-000000.idx` (wds2idx's default for an archive)."""
    tar = Path(tar)
    return tar.with_name(tar.name.split(".", 1)[0] + ".idx")


def dali_index(tar: str | os.PathLike) -> bytes:
    """The index wds2idx would write for the shard file `tar`."""
    with open(tar, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{tar}: empty shard")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return dali_index_of(buf, str(tar))


def dali_index_of(buf: bytes | mmap.mmap, where: str) -> bytes:
    """The index wds2idx would write for the tar held by `buf`."""
    return dali_index_from(members(buf, where), where)


def dali_index_from(tar_members: Iterable[tuple[str, int, int]], where: str) -> bytes:
    """The index wds2idx would write for a tar of `tar_members` ((name, data offset, size),
    in tar order): samples grouped by consecutive key (the member name up to the first dot
    of its file name), hidden-file members skipped."""
    samples: list[list[str]] = []
    last = None
    for name, offset, size in tar_members:
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        base, ext = (name[:dot], name[dot + 1 :]) if dot >= 0 else (name[:-1], name)
        if not base or base.endswith("/"):
            continue
        entry = f"{ext} {offset} {size} {name}"
        if base != last:
            samples.append([entry])
            last = base
        else:
            samples[-1].append(entry)
    if not samples:
        raise ValueError(f"{where}: no samples")
    lines = [f"{VERSION} {len(samples)}"] + [" ".join(s) for s in samples]
    return ("\n".join(lines) + "\n").encode()


def write_dali_index(tar: str | os.PathLike, tar_members: list[tuple[str, int, int]]) -> Path:
    """Write `index_path(tar)` atomically from `tar_members`, what the writer wrote ((name,
    data offset, size) in order); returns its path."""
    return write_atomic(index_path(tar), dali_index_from(tar_members, str(tar)))
