"""A large gzip archive read on several cores: by `prep imagenet --extract-to`, and in
both passes of `prep shard --src`.

The face-blurred release holds its whole train split (~140 GB) in one train_blurred.tar.gz.
Read by one process with ISA-L, its extraction and both passes of `--src` were bound by that
one inflate stream, however many cores. Instead, a gzip file that has more than one core's
share of the work is read through rapidgzip on that many threads (prep.packed). The first
pass of `--src` also exports rapidgzip's seek index (a point every 32 MiB of the archive,
`spacing`; ~0.1% of its size) beside the kept first pass; the second pass splits the file's
members into as many ranges, and each worker imports the index and starts at its first
member's offset (recorded by the first pass).

rapidgzip (PyPI), because it inflates on several threads and exports and imports a seek
index, maintained, with manylinux wheels (indexed_gzip's zran also indexes, but inflates on
one thread through zlib, ~1.7x slower than ISA-L here). It is optional: without it (the GPU
machine has no package index), every reader reads the file whole through ISA-L, as before.
It only speeds up: a read is kept only where rapidgzip read the whole file without
an error, to the end of the compressed data (a file cut at the end of a deflate block reads
"fine" in rapidgzip), and where the gzip trailer's size matches what it inflated (rapidgzip
passes over non-gzip bytes after the data); otherwise the file is read again through ISA-L,
whose verdict and error are the ones the user gets. rapidgzip's own messages on stderr are
kept out of the log, and a reader is always closed (one left open at the interpreter's exit
aborts the process).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from prep.errors import WriteError


def spacing(size: int, threads: int) -> int:
    """rapidgzip's chunk, the distance between seek points: 32 MiB (its fastest here, 1.5x
    ISA-L on 2 threads; an index of ~0.1% of the archive), less for a file of fewer than 4
    chunks per thread (too few to share), at least 1 MiB."""
    return min(32 << 20, max(1 << 20, size // (4 * threads)))


def reason(exc: BaseException) -> str:
    """rapidgzip's error in a few words: its first sentence, without the `[Wrapper][Thread
    N]` tags (`Decoding failed with error code -3: Invalid lookback distance found`)."""
    text = re.sub(r"^(\[[^\]]*\])+\s*", "", str(exc)).strip()
    return re.split(r"(?<=[.!])\s", text, maxsplit=1)[0].rstrip(".!") or type(exc).__name__


class Unsure(Exception):
    """rapidgzip's read of a file cannot be trusted: read it again through ISA-L."""


def available() -> bool:
    try:
        import rapidgzip  # noqa: F401
    except ImportError:
        return False
    return True


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


@contextmanager
def reading(path: Path, threads: int, index_to: Path | None = None) -> Iterator[IO[bytes]]:
    """The inflated bytes of gzip file `path` on `threads` threads, read front to back by
    the caller; once the caller has read them all, the seek index goes to `index_to` (if
    given). Raises Unsure (for any error inside too, the caller's own included: what it made
    of bytes rapidgzip may have got wrong) where the read cannot be trusted: the caller then
    reads the file through ISA-L. An output that cannot be written (WriteError) is raised as
    it is."""
    import rapidgzip

    with _quiet_stderr():
        try:
            with rapidgzip.RapidgzipFile(str(path), parallelization=threads, chunk_size=spacing(
                    os.path.getsize(path), threads)) as f:
                yield f
                if f.read(1):
                    raise Unsure("the caller stopped before the end")
                _check_end(path, f, f.tell())
                if index_to is not None:
                    _export(f, index_to)
        except (Unsure, WriteError):
            raise
        except Exception as exc:  # rapidgzip's, or the caller's on its bytes
            raise Unsure(str(exc)) from exc


@contextmanager
def reading_at(path: Path, index: Path) -> Iterator[IO[bytes]]:
    """`path` inflated on one thread, seekable through the seek index `index` (made by
    `reading`; a damaged one is left out: each seek then inflates from the start, slower).
    Errors: rapidgzip's (the file changed since its first pass: the caller names it)."""
    import rapidgzip

    with _quiet_stderr():
        with rapidgzip.RapidgzipFile(str(path), parallelization=1) as f:
            try:
                f.import_index(str(index))
            except (RuntimeError, ValueError, OSError):
                pass  # read it without (below), on a reader with nothing half-imported
            else:
                yield f
                return
        with rapidgzip.RapidgzipFile(str(path), parallelization=1) as f:
            yield f


def _export(f: object, index_to: Path) -> None:
    """The seek index to `index_to`, whole or not at all; where it cannot be written (a full
    disk under the cache folder), the read stands and the second pass reads the file whole."""
    tmp = index_to.with_name(index_to.name + ".tmp")
    try:
        f.export_index(str(tmp))  # type: ignore[attr-defined]
        os.replace(tmp, index_to)
    except Exception:  # rapidgzip reports a failed write as RuntimeError or OSError
        tmp.unlink(missing_ok=True)


def _check_end(path: Path, f: object, inflated: int) -> None:
    """Raise Unsure unless rapidgzip read `path` to its end and the gzip trailer's size
    (ISIZE, the last member's size modulo 2**32) matches what it inflated: true for the
    usual one-member file; a file of several members is read again through ISA-L."""
    size = os.path.getsize(path)
    if f.tell_compressed() != size * 8:  # type: ignore[attr-defined]
        raise Unsure(f"read to byte {f.tell_compressed() // 8} of {size}")  # type: ignore
    with open(path, "rb") as raw:
        raw.seek(size - 4)
        (isize,) = struct.unpack("<I", raw.read(4))
    if isize != inflated % (1 << 32):
        raise Unsure("the gzip trailer does not match what was read")


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """rapidgzip prints its own lines on a bad read ('Unexpected end of file when getting
    block ...') before raising; the file is then read through ISA-L, which names the damage.
    Only in worker processes, which print nothing else meanwhile."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
