"""Folder work in single C calls (prep/fastdir.c, through ctypes, which releases the GIL
for the call): the fast path of the listing (prep/scan.py) and of the val links
(prep/link.py). Python's os.scandir spends ~1 us per name on 1.28 M train names (a
DirEntry, a str, the checks, the sort); the C listing returns one string per folder and
says whether every entry is a regular file with a printable ASCII name. Without the built
library (another machine, no compiler) both take their Python path: the same result,
slower. `python -m prep.fastdir` builds it."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from prep import cbuild

SOURCE = Path(__file__).with_name("fastdir.c")
LIBRARY = Path(__file__).with_name("_fastdir.so")
_ALL_REGULAR, _ALL_PRINTABLE = 1, 2

_lib = cbuild.load(LIBRARY, "fd_list", ctypes.c_long,
                   [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p),
                    ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_int)],
                   abi=("fd_abi", 1))
if _lib is not None:
    _lib.fd_free.restype, _lib.fd_free.argtypes = None, [ctypes.c_void_p]
    _lib.fd_symlinks.restype = ctypes.c_long
    _lib.fd_symlinks.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_long,
                                 ctypes.POINTER(ctypes.c_int)]


def available() -> bool:
    return _lib is not None


def plain_listing(directory: str | os.PathLike) -> str | None:
    """The names in `directory`, sorted and joined by newlines, when every entry is a regular
    file (by d_type, symlinks not followed) with a printable ASCII name; None when anything
    else is there, when it cannot be listed, or without the library: the caller then looks
    at each entry, and names what is wrong."""
    if _lib is None:
        return None
    out, length, flags = ctypes.c_void_p(), ctypes.c_size_t(), ctypes.c_int()
    n = _lib.fd_list(os.fsencode(directory), ctypes.byref(out), ctypes.byref(length),
                     ctypes.byref(flags))
    if n < 0:
        return None
    try:
        data = ctypes.string_at(out, length.value) if length.value else b""
    finally:
        _lib.fd_free(out)
    if flags.value != _ALL_REGULAR | _ALL_PRINTABLE:
        return None
    return data.decode("ascii")


def make_symlinks(dir_fd: int, names: list[str], targets: list[str]) -> tuple[int, int]:
    """Make the links `names[i]` -> `targets[i]` in the open directory `dir_fd`, in order,
    until one fails: (how many were made, the failure's errno or 0). Without the library,
    one os.symlink per link."""
    if _lib is None:
        for i, (name, target) in enumerate(zip(names, targets)):
            try:
                os.symlink(target, name, dir_fd=dir_fd)
            except OSError as exc:
                return i, exc.errno or 0
        return len(names), 0
    err = ctypes.c_int()
    done = _lib.fd_symlinks(dir_fd, b"\0".join(map(os.fsencode, names)) + b"\0",
                            b"\0".join(map(os.fsencode, targets)) + b"\0", len(names),
                            ctypes.byref(err))
    return done, err.value


if __name__ == "__main__":
    cbuild.main(SOURCE, LIBRARY, (), "the listing uses os.scandir (slower)")
