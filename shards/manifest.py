"""The manifest files other readers use, merged from the per-shard records.

- `_info.json`: timm's reader_wds split info (name, num_samples, filenames, shard_lengths),
  plus a `prep` block with options, tool version, input fingerprint, repairs and skips.
- `index.parquet`: one row per sample (key, split, shard, member offset, sizes, label, ...).
- `SHA256SUMS`: `sha256sum -c` format.
- `<split>.shardindex.json`: the wids shard index (`wids-shard-index-v1`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from shards.write import ShardRecord

INFO, INDEX, SUMS = "_info.json", "index.parquet", "SHA256SUMS"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(out: Path, records: list[ShardRecord], wnids: list[str], prep: dict) -> dict:
    """Write all manifest files; returns the `_info.json` content."""
    splits: dict[str, list[ShardRecord]] = {}
    order = {"train": 0, "val": 1, "test": 2}
    for r in sorted(records, key=lambda r: (order.get(r.split, 3), r.name)):
        splits.setdefault(r.split, []).append(r)
    repairs = Counter(row["repaired"] for r in records for row in r.rows if row["repaired"])
    info = {
        "name": "imagenet",
        "num_classes": len(wnids),
        "classes": wnids,
        "splits": {
            split: {"name": split, "num_samples": sum(r.num_samples for r in recs),
                    "filenames": [r.name for r in recs],
                    "shard_lengths": [r.num_samples for r in recs]}
            for split, recs in splits.items()
        },
        "prep": {**prep, "repairs": dict(sorted(repairs.items())),
                 "repaired_files": sorted(row["source"] for r in records for row in r.rows
                                          if row["repaired"]),
                 "skipped": sorted(s for r in records for s in r.skipped)},
    }
    _write_index(out / INDEX, records)
    sums = "".join(f"{r.sha256}  {r.name}\n" for r in sorted(records, key=lambda r: r.name))
    _atomic_write(out / SUMS, sums.encode())
    for split, recs in splits.items():
        wids = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
                "shardlist": [{"url": r.name, "nsamples": r.num_samples,
                               "filesize": r.filesize} for r in recs]}  # md5sum: optional
        _atomic_write(out / f"{split}.shardindex.json", json.dumps(wids, indent=1).encode())
    _atomic_write(out / INFO, (json.dumps(info, indent=1) + "\n").encode())  # last: "done"
    return info


def preload_manifest_libs() -> None:
    """Import pyarrow (~0.5 s here) ahead of `write_manifest`, e.g. while workers write.
    pyarrow's first array conversion also imports pandas when installed (~0.4 s more)."""
    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401

    pa.array([], pa.int64())


def _write_index(path: Path, records: list[ShardRecord]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [row for r in sorted(records, key=lambda r: r.name) for row in r.rows]
    schema = pa.schema([("key", pa.string()), ("split", pa.string()), ("shard", pa.string()),
                        ("offset", pa.int64()), ("jpg_bytes", pa.int64()),
                        ("label", pa.int32()), ("wnid", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32()), ("repaired", pa.string()),
                        ("source", pa.string())])
    cols = {f.name: [row[f.name] for row in rows] for f in schema}
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(cols, schema=schema), tmp)
    os.replace(tmp, path)
