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
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from prep.errors import PrepError
from prep.jpeg import jpeg_sof, size_problem, strict_problem
from prep.progress import progress_bar
from prep.workers import process_pool
from shards.dali_index import dali_index, index_path
from shards.manifest import (
    INDEX,
    INFO,
    INFO_NAMES,
    INFO_SPLIT_NAMES,
    SUMS,
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


def _read_manifest(out: Path) -> tuple[dict, dict[str, str]]:
    info_file = next((out / n for n in INFO_NAMES if (out / n).is_file()), out / INFO)
    sums_file = out / SUMS
    if not info_file.is_file():
        raise PrepError(f"{info_file}: missing; is {out} a finished `prep shard` output? "
                        "(a partial one: rerun `prep shard` to finish it)")
    info = parse_info(info_file.read_bytes(), str(info_file))
    if not sums_file.is_file():
        if info.get("format") == "timm":  # timm's published shards carry no checksums
            return info, {}
        raise PrepError(f"{sums_file}: missing")
    return info, parse_sums(sums_file.read_bytes(), str(sums_file))


def check_shard(path: Path, expected_len: int, digest: str | None, num_classes: int | None,
                labelled: bool, deep: bool, ours: bool = True,
                rows: dict[str, list] | None = None) -> tuple[list[str], list[str], int]:
    """(problems, keys, file size) for one shard file; `ours`: written by prep shard (it has
    DALI's index beside it; timm's published shards do not); `rows`: its index.parquet rows
    by column, compared member by member."""
    name = path.name
    if not path.is_file():
        return [f"{name}: missing"], [], 0
    problems: list[str] = []
    data = path.read_bytes()
    if digest and hashlib.sha256(data).hexdigest() != digest:
        problems.append(f"{name}: sha256 differs from {SUMS} (corrupt or replaced)")
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    starts: dict[str, int] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
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
    idx = index_path(path)
    if not ours:
        pass
    elif not idx.is_file():
        problems.append(f"{idx.name}: missing (DALI's index of {name}; rerun prep shard)")
    elif not problems and idx.read_bytes() != dali_index(path):
        problems.append(f"{idx.name}: does not match {name} (DALI would read wrong offsets)")
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
                  "jpg_crc32": zlib.crc32(jpg), "label": _int(m.get("cls")),
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


def verify_shards(out: Path, deep: bool = False, workers: int = 1,
                  progress: bool = True) -> VerifyReport:
    info, sums = _read_manifest(out)
    ours = isinstance(info.get("prep"), dict)  # a prep shard output: every manifest file
    index = _read_index(out) if ours else {}
    report = VerifyReport()
    jobs, splits_of = [], []
    for split, s in info["splits"].items():
        for fname, n in zip(s["filenames"], s["shard_lengths"]):
            jobs.append((out / fname, n, sums.get(fname), info["num_classes"],
                         split != "test", deep, info.get("format") != "timm",
                         index.get(fname, _EMPTY_ROWS) if ours else None))
            splits_of.append(split)
            if fname not in sums and info.get("format") != "timm":
                report.problems.append(f"{fname}: no checksum in {SUMS}")
    listed = {j[0].name for j in jobs}
    report.problems += [f"{n}: in {out} but not in {INFO}; move it away (readers that glob "
                        "*.tar would read it)" for n in sorted(p.name for p in out.glob("*.tar"))
                        if n not in listed]
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
            sizes[job[0].name] = (len(keys), size)
            where = seen.setdefault(split, {})
            for k in keys:
                if k in where:
                    report.problems.append(f"{job[0].name}: key {k} also in {where[k]}")
                where[k] = job[0].name
            bar.update()
    bar.close()
    for split, s in info["splits"].items():
        if len(seen.get(split, {})) != s["num_samples"] and not report.problems:
            report.problems.append(f"{split}: {len(seen.get(split, {}))} samples, manifest "
                                   f"says {s['num_samples']}")
        if ours:
            report.problems += _check_wids(out, split, s["filenames"], sizes)
    return report


_EMPTY_ROWS: dict[str, list] = {"key": []}


def _read_index(out: Path) -> dict[str, dict[str, list]]:
    """index.parquet's rows, by shard then column (empty when missing: then every shard's
    rows are reported missing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = out / INDEX
    if not path.is_file():
        raise PrepError(f"{path}: missing; rerun `prep shard` to finish the manifest")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise PrepError(f"{path}: not a readable Parquet file ({exc})") from exc
    shards: dict[str, dict[str, list]] = {}
    columns = {c: table.column(c).to_pylist() for c in table.column_names}
    for i, name in enumerate(columns.get("shard", [])):
        rows = shards.setdefault(name, {c: [] for c in columns})
        for c, values in columns.items():
            rows[c].append(values[i])
    return shards


def _check_wids(out: Path, split: str, names: list[str],
                sizes: dict[str, tuple[int, int]]) -> list[str]:
    """`<split>.shardindex.json` (wids): each listed shard's nsamples and filesize."""
    split = next((k for k, v in INFO_SPLIT_NAMES.items() if v == split), split)
    path = out / f"{split}.shardindex.json"
    try:
        listed = json.loads(path.read_text())["shardlist"]
        have = [(e["url"], e["nsamples"], e["filesize"]) for e in listed]
    except FileNotFoundError:
        return [f"{path.name}: missing (wids reads it); rerun prep shard"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{path.name}: not a wids shard index ({exc})"]
    want = [(n, *sizes.get(n, (0, 0))) for n in names]
    if have != want:
        pad = max(len(have), len(want))
        first = next((h, w) for h, w in zip(have + [None] * pad, want + [None] * pad)
                     if h != w)
        return [f"{path.name}: lists {first[0]}, the shard is {first[1]} (url, nsamples, "
                "filesize): wids would read wrong samples"]
    return []
