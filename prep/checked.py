"""The record of source images that passed the strict JPEG check (`prep shard`, `prep imagenet
--check full`), kept with the dataset view
(`DATA/.checked.sqlite`, beside `meta/`), so that a reshard of unchanged sources into
another OUT (another --max-size, another shard count) checks nothing again.

A file counts as checked while its identity is the one recorded when its bytes were
checked: size, modification time, change time, inode and device, all read from the
descriptor the bytes were read from. Writing a file changes its mtime and ctime; restoring
the mtime afterwards (`touch -d`, `cp -p` over it) changes its ctime, which no user call can
set; replacing it changes the inode. What escapes: bytes changed under the file system
(a raw write to the block device, a bad disk); docs/reliability.md says so.

SQLite (the standard library's): one file, safe for several `prep shard` processes at once
(--shard-range parts), keyed lookups without loading 1.28 M rows per run.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from prep import jpeg

NAME = ".checked.sqlite"
Identity = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, inode, device


def identity(st: os.stat_result) -> Identity:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class CheckedRecord:
    """`DATA/.checked.sqlite`; without write access to DATA, an empty record that keeps
    nothing (every file is checked, as without a record)."""

    def __init__(self, data: Path, strict: bool) -> None:
        """`strict` False (no strict check this run), or prep/jpegcheck.c not built (what
        passes then is Pillow's weaker decode): a record that neither trusts nor keeps."""
        self.path = data / NAME
        self.db: sqlite3.Connection | None = None
        self.trusted_count = 0  # sources not checked again in this run
        if not (strict and jpeg.available()):
            return
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.execute("CREATE TABLE IF NOT EXISTS checked (path TEXT PRIMARY KEY, "
                            "size INT, mtime INT, ctime INT, ino INT, dev INT)")
        except sqlite3.Error:
            self.close()

    def trusted(self, paths: list[str]) -> dict[str, Identity]:
        """{path: identity when checked} for those of `paths` the record holds."""
        if self.db is None:
            return {}
        out: dict[str, Identity] = {}
        try:
            for i in range(0, len(paths), 900):  # SQLite before 3.32 allows 999 parameters
                part = paths[i : i + 900]
                marks = ",".join("?" * len(part))
                for row in self.db.execute("SELECT path, size, mtime, ctime, ino, dev FROM "
                                           f"checked WHERE path IN ({marks})", part):
                    out[row[0]] = tuple(row[1:])
        except sqlite3.Error:  # damaged, or locked past the timeout: check everything
            return {}
        return out

    def keep(self, checked: list, trusted: int) -> None:
        """After a write: remember what it checked ([path, *identity] rows), count what it
        trusted."""
        self.trusted_count += trusted
        self.add(checked)

    def add(self, rows: Iterable[Iterable]) -> None:
        """Record files whose bytes were just checked (path, then their identity)."""
        if self.db is None:
            return
        try:
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany("INSERT OR REPLACE INTO checked VALUES (?, ?, ?, ?, ?, ?)",
                                    rows)
        except sqlite3.Error:  # a full disk or a read-only view: the record is only a saving
            pass

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.db = None
