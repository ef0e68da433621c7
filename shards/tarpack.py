"""Pass-through shard writing in C (shards/tarpack.c, loaded with ctypes).

Why: per 51 KB image the Python writer spent ~30 µs of Python (paths, JSON, headers, index
row) around the system calls that `tar` also makes, and it held the GIL the hashing thread
needs (shards/digest.py). `write_samples` reads, checks and appends a run of good JPEGs in
one call without the GIL, producing exactly the bytes shards/write.py writes for them
(tests compare whole shards); it stops at the first sample that needs Python (a repair,
an unreadable file; resizing runs do not use it) before writing anything of it.

Built by scripts/setup.sh (`python -m shards.tarpack`, a C compiler only, < 1 s). Without
the library, `available()` is False and the Python writer does everything.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from prep import cbuild, jpeg
from prep.crc import crc_function_address
from shards.record import sample_json
from shards.source import Sample

SOURCE = Path(__file__).with_name("tarpack.c")
LIBRARY = Path(__file__).with_name("_tarpack.so")
_I64 = ctypes.c_longlong
ABI = 5  # tarpack.c's tp_abi(): the signature of tp_write
ID_FIELDS = 5  # prep.checked.Identity: size, mtime, ctime, inode, device


_p = ctypes.POINTER
_lib = cbuild.load(LIBRARY, "tp_write", ctypes.c_int,
                   [ctypes.c_int, ctypes.c_int, _p(ctypes.c_char_p), _p(ctypes.c_char_p),
                    _p(ctypes.c_int), _p(ctypes.c_char_p), _p(ctypes.c_char_p), _p(_I64),
                    _p(_I64), _p(_I64), _p(ctypes.c_int), _p(ctypes.c_int), _p(_I64),
                    _p(_I64), _p(ctypes.c_int), _p(ctypes.c_uint), ctypes.c_void_p,
                    ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_int, _p(_I64), _p(_I64)],
                   abi=("tp_abi", ABI), use_errno=True)


def available() -> bool:
    return _lib is not None


C_PREFIX = '{"format": "JPEG", "height": '  # what tarpack.c writes before the height
_HEIGHT, _WIDTH = -1234567, -7654321  # placeholders the real sizes replace


def _json_parts(s: Sample, source: str) -> tuple[bytes, bytes]:
    """(between height and width, after width) of a pass-through sample's json."""
    text = sample_json(fmt="JPEG", height=_HEIGHT, key=s.key, label=s.label, mode="RGB",
                       repaired="", resized=False, source=source, width=_WIDTH, wnid=s.wnid)
    head, rest = text.split(str(_HEIGHT), 1)
    mid, end = rest.split(str(_WIDTH), 1)
    if head != C_PREFIX:
        raise RuntimeError(f"shards/tarpack.c writes {C_PREFIX!r}, sample_json {head!r}")
    return mid.encode(), end.encode()


def write_samples(fd: int, offset: int, paths: list[str], samples: list, sources: list[str],
                  strict: bool = True, trusted: list[tuple | None] | None = None,
                  archive_fd: int = -1, members: list[tuple[int, int, str]] | None = None,
                  ) -> tuple[int, int, list[tuple]]:
    """Append `samples` (shards.source.Sample, files at `paths`; or, with `archive_fd`,
    `members` (offset, size, _) of that open archive) to the tar open as `fd`, whose next
    member goes at `offset`; `sources`: their json's `source`. Returns (how many were
    written, the new offset, [(sample start offset, jpg bytes, width, height, source
    identity, checked, jpg crc32, json bytes)] for them); the identity is
    prep.checked.Identity (the archive's for members), `checked` whether the strict check
    ran. `trusted`: per sample, the identity under which it passed the strict check
    before, or None; a file with that identity now is not checked again. Raises OSError
    on a write error; stops early at a sample Python must handle: not a clean RGB JPEG,
    size 0 or above prep.jpeg.MAX_PIXELS, unreadable, or (`strict`, with prep/jpegcheck.c
    built) one whose entropy data ends early."""
    n = len(samples)
    enc = [p.encode() for p in paths]
    keys = [s.key.encode() for s in samples]
    mids, ends = [], []
    for s, source in zip(samples, sources):  # the one json definition, cut around the sizes
        mid, end = _json_parts(s, source)
        mids.append(mid)
        ends.append(end)
    strs = ctypes.c_char_p * n
    off = _I64(offset)
    starts, sizes = (_I64 * n)(), (_I64 * n)()
    widths, heights = (ctypes.c_int * n)(), (ctypes.c_int * n)()
    ids, checked, crcs = (_I64 * (n * ID_FIELDS))(), (ctypes.c_int * n)(), (ctypes.c_uint * n)()
    trust = [-1] * (n * ID_FIELDS)
    for i, t in enumerate(trusted or ()):
        if t is not None:
            trust[i * ID_FIELDS : (i + 1) * ID_FIELDS] = t
    check = jpeg.check_function_address() if strict else None
    at = (_I64 * n)(*(m[0] for m in members)) if members is not None else None
    lengths = (_I64 * n)(*(m[1] for m in members)) if members is not None else None
    done = _lib.tp_write(fd, n, strs(*enc), strs(*keys),
                         (ctypes.c_int * n)(*(s.label for s in samples)), strs(*mids),
                         strs(*ends), ctypes.byref(off), starts, sizes, widths, heights,
                         (_I64 * (n * ID_FIELDS))(*trust), ids, checked, crcs, check,
                         crc_function_address(), jpeg.MAX_PIXELS, archive_fd, at, lengths)
    if done < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    idents = [tuple(ids[i * ID_FIELDS : (i + 1) * ID_FIELDS]) for i in range(done)]
    json_sizes = [len(C_PREFIX) + len(str(heights[i])) + len(mids[i]) + len(str(widths[i]))
                  + len(ends[i]) for i in range(done)]
    return done, off.value, list(zip(starts[:done], sizes[:done], widths[:done],
                                     heights[:done], idents, map(bool, checked[:done]),
                                     crcs[:done], json_sizes))


def members_of(sample: Sample, jpg_bytes: int, json_bytes: int) -> list[tuple[str, int]]:
    """The members (name, size) tarpack.c writes for a sample, in its order."""
    return [(f"{sample.key}.cls", len(str(sample.label))), (f"{sample.key}.jpg", jpg_bytes),
            (f"{sample.key}.json", json_bytes)]


if __name__ == "__main__":
    cbuild.main(SOURCE, LIBRARY, ("-lz",), "prep shard uses its Python writer")
