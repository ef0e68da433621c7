"""`prep verify`: check a shard directory against its manifest, pinpointing shard and member."""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from prep.errors import PrepError
from prep.jpeg import jpeg_sof, size_problem, strict_problem
from prep.progress import progress_bar
from prep.workers import process_pool
from shards.dali_index import dali_index, index_path
from shards.manifest import INFO, SUMS, parse_info, parse_sums


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_manifest(out: Path) -> tuple[dict, dict[str, str]]:
    info_file, sums_file = out / INFO, out / SUMS
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
                labelled: bool, deep: bool, ours: bool = True) -> tuple[list[str], list[str]]:
    """(problems, keys) for one shard file; `ours`: written by prep shard (it has DALI's
    index beside it; timm's published shards do not)."""
    name = path.name
    if not path.is_file():
        return [f"{name}: missing"], []
    problems: list[str] = []
    data = path.read_bytes()
    if digest and hashlib.sha256(data).hexdigest() != digest:
        problems.append(f"{name}: sha256 differs from {SUMS} (corrupt or replaced)")
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
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
    return problems, order


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


def _check_job(args: tuple) -> tuple[list[str], list[str]]:
    return check_shard(*args)


def verify_shards(out: Path, deep: bool = False, workers: int = 1,
                  progress: bool = True) -> VerifyReport:
    info, sums = _read_manifest(out)
    report = VerifyReport()
    jobs, splits_of = [], []
    for split, s in info["splits"].items():
        for fname, n in zip(s["filenames"], s["shard_lengths"]):
            jobs.append((out / fname, n, sums.get(fname), info["num_classes"],
                         split != "test", deep, info.get("format") != "timm"))
            splits_of.append(split)
            if fname not in sums and info.get("format") != "timm":
                report.problems.append(f"{fname}: no checksum in {SUMS}")
    seen: dict[str, dict[str, str]] = {}
    bar = progress_bar(total=len(jobs), unit="shard", desc="verify", disable=not progress)
    with process_pool(workers) as pool:
        for job, split, (problems, keys) in zip(jobs, splits_of, pool.map(_check_job, jobs)):
            report.problems += problems
            report.shards += 1
            report.samples += len(keys)
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
    return report
