"""`prep verify`: check a shard directory against its manifest, pinpointing shard and member.

Every manifest file is checked against the shards, since readers trust each of them:
`_info.json` (names, counts), `SHA256SUMS`, `index.parquet` (one row per member in order:
key, offset, jpg size and CRC-32, label, source as the sample's own json says), the wids
`<split>.shardindex.json` (counts, sizes), DALI's `NAME.idx`, and no `*.tar` in the
directory that the manifest does not list."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from prep.crc import crc32
from prep.errors import PrepError
from prep.extract import open_tar
from prep.jpeg import jpeg_sof, size_problem, strict_problem
from prep.progress import progress_bar
from prep.workers import process_pool
from shards.dali_index import dali_index_of, index_path
from shards.manifest import (
    INDEX,
    INFO,
    INFO_NAMES,
    INFO_SPLIT_NAMES,
    SUMS,
    parquet_table,
    parse_info,
    parse_sums,
)


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class LocalFiles:
    """The files of a shard directory (for verify_shards and its workers)."""

    def __init__(self, root: Path):
        self.root = root

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def tars(self) -> list[str]:
        return sorted(p.name for p in self.root.glob("*.tar"))

    def where(self, name: str) -> str:
        return str(self.root / name)


class StoreFiles:
    """The objects of a store prefix (shards.store), read whole or streamed."""

    def __init__(self, url: str):
        from shards.store import Store

        self.store = Store(url)

    def read(self, name: str) -> bytes | None:
        return self.store.get(name)

    def tars(self) -> list[str]:
        return sorted(n for n in self.store.list() if n.endswith(".tar") and "/" not in n)

    def where(self, name: str) -> str:
        return self.store.where.url(name)


def _read_manifest(files: LocalFiles | StoreFiles) -> tuple[dict, dict[str, str]]:
    info_name = INFO
    raw = None
    for n in INFO_NAMES:
        raw = files.read(n)
        if raw is not None:
            info_name = n
            break
    if raw is None:
        raise PrepError(f"{files.where(INFO)}: missing; is it a finished `prep shard` output? "
                        "(a partial one: rerun `prep shard` to finish it)")
    info = parse_info(raw, files.where(info_name))
    sums = files.read(SUMS)
    if sums is None:
        if info.get("format") == "timm":  # timm's published shards carry no checksums
            return info, {}
        raise PrepError(f"{files.where(SUMS)}: missing")
    return info, parse_sums(sums, files.where(SUMS))


def check_shard(files: LocalFiles | StoreFiles, name: str, expected_len: int,
                digest: str | None, num_classes: int | None, labelled: bool, deep: bool,
                ours: bool = True, rows: dict[str, list] | None = None
                ) -> tuple[list[str], list[str], int]:
    """(problems, keys, file size) for one shard; `ours`: written by prep shard (it has
    DALI's index beside it; timm's published shards do not); `rows`: its index.parquet rows
    by column, compared member by member."""
    data = files.read(name)
    if data is None:
        return [f"{name}: missing"], [], 0
    problems: list[str] = []
    if digest and hashlib.sha256(data).hexdigest() != digest:
        problems.append(f"{name}: sha256 differs from {SUMS} (corrupt or replaced)")
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    starts: dict[str, int] = {}
    try:
        with open_tar(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    problems.append(f"{name}: member {m.name}: not a regular file")
                    continue
                key, _, ext = m.name.partition(".")
                if order and order[-1] != key and key in samples:
                    problems.append(f"{name}: member {m.name}: sample {key} is not contiguous")
                if not order or order[-1] != key:
                    order.append(key)
                    starts.setdefault(key, m.offset)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError) as exc:
        problems.append(f"{name}: unreadable tar ({exc}) after {len(order)} samples")
    for key in order:
        problems += _check_sample(name, key, samples[key], num_classes, labelled, deep)
    if len(order) != expected_len:
        problems.append(f"{name}: {len(order)} samples, manifest says {expected_len}")
    idx = index_path(name).name
    idx_bytes = files.read(idx) if ours else None
    if not ours:
        pass
    elif idx_bytes is None:
        problems.append(f"{idx}: missing (DALI's index of {name}; rerun prep shard)")
    elif not problems and idx_bytes != dali_index_of(data, name):
        problems.append(f"{idx}: does not match {name} (DALI would read wrong offsets)")
    if len(set(order)) != len(order):
        problems.append(f"{name}: repeated sample keys")
    if rows is not None:
        problems += _check_rows(name, order, samples, starts, rows)
    return problems, order, len(data)


def _check_rows(name: str, order: list[str], samples: dict[str, dict[str, bytes]],
                starts: dict[str, int], rows: dict[str, list]) -> list[str]:
    """The shard's index.parquet rows against its members, in order (at most 5 named)."""
    if len(rows["key"]) != len(order):
        return [f"{INDEX}: {len(rows['key'])} rows for {name}, the shard has {len(order)} "
                "samples"]
    out = []
    for i, key in enumerate(order):
        m = samples[key]
        jpg, meta = m.get("jpg", b""), _json(m.get("json"))
        actual = {"key": key, "offset": starts[key], "jpg_bytes": len(jpg),
                  "jpg_crc32": crc32(jpg), "label": _int(m.get("cls")),
                  "source": meta.get("source")}
        for column, value in actual.items():
            if column in rows and rows[column][i] != value:
                out.append(f"{INDEX}: row {i} of {name} says {column} = {rows[column][i]!r}, "
                           f"the shard's sample {key} has {value!r}")
                break
        if len(out) == 5:
            out.append(f"{INDEX}: ... (first 5 rows of {name} that differ shown)")
            break
    return out


def _json(raw: bytes | None) -> dict:
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _int(raw: bytes | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _check_sample(name: str, key: str, members: dict[str, bytes], num_classes: int | None,
                  labelled: bool, deep: bool) -> list[str]:
    out = []
    if "jpg" not in members:
        out.append(f"{name}: sample {key}: no jpg member")
    cls = members.get("cls")
    if cls is None:
        out.append(f"{name}: sample {key}: no cls member")
    elif not labelled and cls.strip() != b"-1":
        out.append(f"{name}: sample {key}.cls = {cls[:20]!r}: test samples are labelled -1")
    elif labelled and (not cls.strip().isdigit() or (num_classes and int(cls) >= num_classes)):
        out.append(f"{name}: sample {key}.cls = {cls[:20]!r}: not a label in "
                   f"0..{(num_classes or 0) - 1}")
    jpg = members.get("jpg")
    sof = jpeg_sof(jpg) if jpg is not None else None
    problem = sof and size_problem(sof[0], sof[1])  # from the header: no decode needed
    if problem:
        out.append(f"{name}: member {key}.jpg: {problem}")
    elif deep and jpg is not None:
        from PIL import Image

        problem = strict_problem(jpg)  # libjpeg's "premature end of data" counts as corrupt
        if problem:
            out.append(f"{name}: member {key}.jpg: {problem}")
        else:
            with Image.open(io.BytesIO(jpg)) as im:
                if im.format != "JPEG" or im.mode != "RGB":
                    out.append(f"{name}: member {key}.jpg: {im.format} {im.mode}, not RGB JPEG")
    return out


def _check_job(args: tuple) -> tuple[list[str], list[str], int]:
    return check_shard(*args)


def verify_shards(out: Path | str, deep: bool = False, workers: int = 1,
                  progress: bool = True) -> VerifyReport:
    """Check a shard directory, or a store prefix `s3://bucket/prefix` (its objects read
    by the workers, each shard whole, as from disk)."""
    from shards.store import is_store_url

    files = StoreFiles(str(out)) if is_store_url(out) else LocalFiles(Path(out))
    info, sums = _read_manifest(files)
    ours = isinstance(info.get("prep"), dict)  # a prep shard output: every manifest file
    index = _read_index(files) if ours else {}
    report = VerifyReport()
    jobs, splits_of = [], []
    for split, s in info["splits"].items():
        for fname, n in zip(s["filenames"], s["shard_lengths"]):
            jobs.append((files, fname, n, sums.get(fname), info["num_classes"],
                         split != "test", deep, info.get("format") != "timm",
                         index.get(fname, _EMPTY_ROWS) if ours else None))
            splits_of.append(split)
            if fname not in sums and info.get("format") != "timm":
                report.problems.append(f"{fname}: no checksum in {SUMS}")
    listed = {j[1] for j in jobs}
    report.problems += [f"{n}: in {out} but not in {INFO}; move it away (readers that glob "
                        "*.tar would read it)" for n in files.tars() if n not in listed]
    report.problems += [f"{INDEX}: rows for {n}, which {INFO} does not list"
                        for n in sorted(set(index) - listed)]
    seen: dict[str, dict[str, str]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    bar = progress_bar(total=len(jobs), unit="shard", desc="verify", disable=not progress)
    with process_pool(workers) as pool:
        for job, split, (problems, keys, size) in zip(jobs, splits_of,
                                                      pool.map(_check_job, jobs)):
            report.problems += problems
            report.shards += 1
            report.samples += len(keys)
            sizes[job[1]] = (len(keys), size)
            where = seen.setdefault(split, {})
            for k in keys:
                if k in where:
                    report.problems.append(f"{job[1]}: key {k} also in {where[k]}")
                where[k] = job[1]
            bar.update()
    bar.close()
    for split, s in info["splits"].items():
        if len(seen.get(split, {})) != s["num_samples"] and not report.problems:
            report.problems.append(f"{split}: {len(seen.get(split, {}))} samples, manifest "
                                   f"says {s['num_samples']}")
        if ours:
            report.problems += _check_wids(files, split, s["filenames"], sizes)
    return report


_EMPTY_ROWS: dict[str, list] = {"key": []}


def _read_index(files: LocalFiles | StoreFiles) -> dict[str, dict[str, list]]:
    """index.parquet's rows, by shard then column."""
    import pyarrow as pa

    path, raw = files.where(INDEX), files.read(INDEX)
    if raw is None:
        raise PrepError(f"{path}: missing; rerun `prep shard` to finish the manifest")
    try:
        table = parquet_table(raw)
    except (pa.ArrowException, OSError) as exc:
        raise PrepError(f"{path}: not a readable Parquet file ({exc})") from exc
    shards: dict[str, dict[str, list]] = {}
    columns = {c: table.column(c).to_pylist() for c in table.column_names}
    for i, name in enumerate(columns.get("shard", [])):
        rows = shards.setdefault(name, {c: [] for c in columns})
        for c, values in columns.items():
            rows[c].append(values[i])
    return shards


def _check_wids(files: LocalFiles | StoreFiles, split: str, names: list[str],
                sizes: dict[str, tuple[int, int]]) -> list[str]:
    """`<split>.shardindex.json` (wids): each listed shard's nsamples and filesize."""
    split = next((k for k, v in INFO_SPLIT_NAMES.items() if v == split), split)
    name = f"{split}.shardindex.json"
    raw = files.read(name)
    if raw is None:
        return [f"{name}: missing (wids reads it); rerun prep shard"]
    try:
        listed = json.loads(raw)["shardlist"]
        have = [(e["url"], e["nsamples"], e["filesize"]) for e in listed]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{name}: not a wids shard index ({exc})"]
    want = [(n, *sizes.get(n, (0, 0))) for n in names]
    if have != want:
        pad = max(len(have), len(want))
        first = next((h, w) for h, w in zip(have + [None] * pad, want + [None] * pad)
                     if h != w)
        return [f"{name}: lists {first[0]}, the shard is {first[1]} (url, nsamples, "
                "filesize): wids would read wrong samples"]
    return []
