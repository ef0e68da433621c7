"""What a written shard leaves for the manifest and for resume: its record, and the columns
of the per-sample index (index.parquet)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

_JSON = json.JSONEncoder().encode  # keys already in sorted order: same bytes as sort_keys


def sample_json(*, fmt: str, height: int, key: str, label: int, mode: str, repaired: str,
                resized: bool, source: str, width: int, wnid: str) -> str:
    """A sample's `json` member, the one definition (shards/tarpack.c fills in the size of
    pass-through JPEGs around the same text; a test proves the bytes equal). Sorted keys;
    one type per field in every sample of every split: Hugging Face infers the schema from
    the first rows (a null in most samples and a string in a repaired one failed its load),
    so `repaired` is "" when nothing was repaired; `label` is -1 on unlabelled test."""
    return _JSON({"format": fmt, "height": height, "key": key, "label": label, "mode": mode,
                  "repaired": repaired, "resized": resized, "source": source, "width": width,
                  "wnid": wnid})

INDEX_COLUMNS = ("key", "split", "shard", "offset", "jpg_bytes", "jpg_crc32", "label", "wnid",
                 "width", "height", "repaired", "source")  # index.parquet's, in this order
# jpg_crc32: zlib's CRC-32 of the jpg member, checked by the loader on every read (27 us per
# 110 KB JPEG here, in the standard library of every machine; sha256 stays per shard)


@dataclass
class ShardRecord:
    """What finalize needs from a written shard (stored as JSON beside the outputs)."""

    name: str
    split: str
    num_samples: int
    filesize: int
    sha256: str
    # the per-sample index by column (INDEX_COLUMNS): lists pickle and dump to JSON ~3x
    # faster than one dict per sample, and the workers send 1.28 M of them to the main process
    rows: dict[str, list] = field(default_factory=lambda: {c: [] for c in INDEX_COLUMNS})
    skipped: list[str] = field(default_factory=list)
    # what resume compares before keeping the shard: every source's size and mtime (plan
    # order, skipped ones included) and the finished tar's own inode and mtime, so that a
    # changed image or a tar another process replaced is never kept
    source_stats: list[list[int]] = field(default_factory=list)
    tar_inode: int = 0
    tar_mtime_ns: int = 0
    # for prep.checked, not stored: sources the strict check passed in this write ([path,
    # *identity]), and how many it trusted from an earlier check
    checked: list[list] = field(default_factory=list)
    trusted: int = 0

    def stored(self) -> dict:
        """The fields kept beside the outputs (vars(), not dataclasses.asdict: asdict
        deep-copies every column)."""
        return {k: v for k, v in vars(self).items() if k not in ("checked", "trusted")}

    def to_json(self) -> str:
        return json.dumps(self.stored(), separators=(",", ":"))
