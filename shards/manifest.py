"""The manifest files other readers use, merged from the per-shard records.

- `_info.json`: timm's reader_wds split info (name, num_samples, filenames, shard_lengths),
  plus a `prep` block with options, tool version, input fingerprint, repairs and skips.
- `index.parquet`: one row per sample (key, split, shard, member offset, sizes, label, ...).
- `SHA256SUMS`: `sha256sum -c` format.
- `<split>.shardindex.json`: the wids shard index (`wids-shard-index-v1`).
"""

from __future__ import annotations

import json
import re
from array import array
from collections import Counter
from pathlib import Path

from prep.atomic import write_atomic
from prep.errors import PrepError
from prep.formats import SHARDS, refuse_newer
from shards.record import INDEX_COLUMNS, ShardRecord

INFO, INDEX, SUMS = "_info.json", "index.parquet", "SHA256SUMS"
INFO_NAMES = (INFO, "_info.yaml")  # timm's shards may carry the YAML one
# The toolkit says `val` (meta/val.txt, shard names, --split val); timm, Hugging Face and
# TFDS say `validation`, and timm's reader looks the split up in `_info.json` by that name
# (`create_dataset("wds/...", split="validation")`, its train.py's default). `_info.json`
# uses theirs; readers here accept either (`find_split`).
INFO_SPLIT_NAMES = {"val": "validation"}


def info_split_name(split: str) -> str:
    return INFO_SPLIT_NAMES.get(split, split)


def find_split(info: dict, split: str) -> str | None:
    """The key of `split` in an `_info.json`'s splits: `val` and `validation` are one."""
    aliases = {split, INFO_SPLIT_NAMES.get(split, split)}
    aliases |= {k for k, v in INFO_SPLIT_NAMES.items() if v == split}
    return next((k for k in info["splits"] if k in aliases), None)


def write_manifest(out: Path, records: list[ShardRecord], wnids: list[str], prep: dict,
                   extra: dict | None = None) -> dict:
    """Write all manifest files; returns the `_info.json` content. `extra` goes into
    `_info.json` as it is (`evalset`: kind and classes of an evaluation set)."""
    splits: dict[str, list[ShardRecord]] = {}
    order = {"train": 0, "val": 1, "test": 2}
    for r in sorted(records, key=lambda r: (order.get(r.split, 3), r.name)):
        splits.setdefault(r.split, []).append(r)
    repairs = Counter(x for r in records for x in r.rows["repaired"] if x)
    info = {
        "name": "imagenet",
        "num_classes": len(wnids),
        "classes": wnids,
        "splits": {
            info_split_name(split): {"name": info_split_name(split),
                                     "num_samples": sum(r.num_samples for r in recs),
                                     "filenames": [r.name for r in recs],
                                     "shard_lengths": [r.num_samples for r in recs]}
            for split, recs in splits.items()
        },
        **(extra or {}),
        "prep": {**prep, "repairs": dict(sorted(repairs.items())),
                 "repaired_files": sorted(src for r in records for src, why in
                                          zip(r.rows["source"], r.rows["repaired"]) if why),
                 "skipped": sorted(s for r in records for s in r.skipped)},
    }
    _write_index(out / INDEX, records)
    sums = "".join(f"{r.sha256}  {r.name}\n" for r in sorted(records, key=lambda r: r.name))
    write_atomic(out / SUMS, sums.encode())
    for split, recs in splits.items():
        wids = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
                "shardlist": [{"url": r.name, "nsamples": r.num_samples,
                               "filesize": r.filesize} for r in recs]}  # md5sum: optional
        write_atomic(out / f"{split}.shardindex.json", json.dumps(wids, indent=1).encode())
    write_atomic(out / INFO, (json.dumps(info, indent=1) + "\n").encode())  # last: "done"
    return info


def preload_manifest_libs() -> None:
    """Import pyarrow (~0.2 s here) ahead of `write_manifest`, e.g. while workers write."""
    import pyarrow.compute  # noqa: F401
    import pyarrow.parquet  # noqa: F401


_TYPES = {"offset": "int64", "jpg_bytes": "int64", "jpg_crc32": "int64", "label": "int32",
          "width": "int32", "height": "int32"}  # the others are strings


def _write_index(path: Path, records: list[ShardRecord]) -> None:
    """index.parquet, its columns made from raw buffers: `pa.array` on Python lists imports
    pandas whenever it is installed (0.45 s, 0.9 s of CPU here) and is slower (0.32 vs
    0.19 s for a column of 1.28 M paths)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = sorted(records, key=lambda r: r.name)
    cols = {}
    for name in INDEX_COLUMNS:
        values = [v for r in records for v in r.rows[name]]
        kind = _TYPES.get(name)
        cols[name] = _int_column(values, kind) if kind else _string_column(values)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), buf)
    write_atomic(path, buf.getvalue().to_pybytes())


def _int_column(values: list[int], kind: str):
    import pyarrow as pa

    code, typ = {"int64": ("q", pa.int64()), "int32": ("i", pa.int32())}[kind]
    data = array(code, values)  # OverflowError beyond the type's range
    return pa.Array.from_buffers(typ, len(values), [None, pa.py_buffer(data)])


def _string_column(values: list[str]):
    """One UTF-8 buffer split at newlines, which no value holds (they come from the lines
    of meta/*.txt); the count is checked all the same."""
    import pyarrow as pa
    import pyarrow.compute as pc

    data = "\n".join(values).encode()
    large = len(data) >= 2**31  # beyond int32 offsets
    typ, code = (pa.large_string(), "q") if large else (pa.string(), "i")
    if not values:
        return pa.Array.from_buffers(typ, 0, [None, pa.py_buffer(array(code, [0])),
                                              pa.py_buffer(b"")])
    offsets = array(code, [0, len(data)])
    whole = pa.Array.from_buffers(typ, 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    col = pc.split_pattern(whole, "\n").flatten()
    if len(col) != len(values):
        raise ValueError("a string for index.parquet holds a newline")
    return col.cast(pa.string()) if large else col


_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar")  # a plain file name: no paths
_HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_info(text: str | bytes, where: str) -> dict:
    """`_info.json` as written by `write_manifest`, checked: every split has whole-number
    counts that add up, and shard names are plain file names (a name such as
    `../../x.tar` or `/etc/x.tar` would make readers open files outside the directory).
    Raises PrepError naming `where`."""
    def bad(why: str) -> PrepError:
        return PrepError(f"{where}: not a valid `prep shard` manifest: {why}")

    try:
        if where.endswith((".yaml", ".yml")):  # timm writes either (_info.json, _info.yaml)
            import yaml

            info = yaml.safe_load(text)
        else:
            info = json.loads(text)
    except Exception as exc:  # json's ValueError, yaml's YAMLError, bad bytes
        raise bad(f"not {'YAML' if where.endswith(('.yaml', '.yml')) else 'JSON'} "
                  f"({str(exc)[:200]})") from exc
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict) or \
            not info["splits"]:
        raise bad('no "splits" object listing the splits')
    if isinstance(info.get("prep"), dict):
        refuse_newer(info["prep"], SHARDS, where, "rerun `prep shard` with this one")
    else:
        # not written by `prep shard` (timm/imagenet-1k-wds, with or without a class count):
        # no checksums, no index; ImageNet-1k's 1000 classes in sorted-WNID order, which
        # its `cls` labels use, unless it names its own count
        from prep.classes import reference_words

        if "num_classes" not in info:
            info["num_classes"] = len(reference_words())
            info.setdefault("classes", sorted(reference_words()))
        info["format"] = "timm"
    ncls = info.get("num_classes")
    if not _count(ncls) or ncls == 0:
        raise bad(f'"num_classes" is {ncls!r}, not a positive integer')
    for name, split in info["splits"].items():
        if not isinstance(split, dict):
            raise bad(f"split {name!r} is not an object")
        files, lens, n = (split.get(k) for k in ("filenames", "shard_lengths", "num_samples"))
        if not isinstance(files, list) or not all(
                isinstance(f, str) and _SHARD_NAME.fullmatch(f) for f in files):
            raise bad(f"split {name!r}: filenames must be a list of plain NAME.tar names")
        if len(set(files)) != len(files):
            raise bad(f"split {name!r}: a shard is listed twice")
        if not isinstance(lens, list) or len(lens) != len(files) or not all(map(_count, lens)):
            raise bad(f"split {name!r}: shard_lengths must be one count per shard")
        if not _count(n) or n != sum(lens):
            raise bad(f"split {name!r}: num_samples {n!r} is not the sum of shard_lengths")
    return info


def parquet_table(raw: bytes, columns: list[str] | None = None) -> pyarrow.Table:  # noqa: F821
    """A Parquet file held in memory (index.parquet, read from disk or a store) as a table.
    The bytes are first copied into memory Arrow owns: a reader over Python-owned bytes can
    leave Arrow's I/O threads holding them until interpreter shutdown, and the release then
    needs the GIL that no longer exists (the process aborts: "terminate called without an
    active exception", seen in 1 of 3 runs that stop right after such a read).
    ParquetFile, not pq.read_table: read_table imports pyarrow.dataset and with it pandas,
    0.2-0.3 s at the start of every trainer and loader process here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = pa.BufferOutputStream()
    out.write(raw)
    return pq.ParquetFile(pa.BufferReader(out.getvalue())).read(columns=columns)


def parse_sums(text: str | bytes, where: str) -> dict[str, str]:
    """`SHA256SUMS` (`sha256sum` format: 64 hex digits, two spaces, a plain shard name)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError as exc:
            raise PrepError(f"{where}: not a SHA256SUMS file (non-ASCII bytes)") from exc
    sums: dict[str, str] = {}
    for no, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        digest, sep, name = line.partition("  ")
        if not sep or not _HEX64.fullmatch(digest) or not _SHARD_NAME.fullmatch(name):
            raise PrepError(f"{where}:{no}: expected '<sha256>  <NAME.tar>', got {line[:80]!r}")
        if name in sums:
            raise PrepError(f"{where}:{no}: {name} listed twice")
        sums[name] = digest
    return sums


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
