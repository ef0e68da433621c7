"""Write a file so that it is whole or absent: a temp file beside it, then a rename.

The durability rule, stated once. `write_atomic(path, data)` writes `.NAME.<pid>.tmp` next
to `path` and renames it over `path`: a reader sees the old file or the new one, never a
part; an error removes the temp file; a kill leaves at most a `.tmp` that nothing reads.
With `durable=True` the data is fsynced before the rename: for files whose loss after a
power cut would cost real work or mislead a rerun (checkpoints and shards do the same in
their own writers, which stream). Index and report files are rebuilt by a rerun, so they
skip the fsync. The pid in the temp name keeps two processes (`--shard-range` parts on one
shared output) from writing the same temp file.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes | str, durable: bool = False) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
