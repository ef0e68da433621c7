"""Write one shard: a reproducible, uncompressed WebDataset tar, atomically.

Byte-reproducible: members in sample order, each sample's members sorted by extension
(`cls`, `jpg`, `json`, webdataset's TarWriter order), fixed mtime, owner and mode. The tar
is written as `NAME.partial`, fsynced, then renamed: a killed run never leaves a file
that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds

from prep.errors import PrepError
from shards.image import UndecodableImage, encode_image
from shards.plan import ShardPlan

MTIME = 1335830400  # 2012-05-01, the ILSVRC2012 release: any fixed value makes tars reproducible


@dataclass
class ShardOptions:
    max_size: int | None = None  # px, longer side; None keeps sizes
    quality: int = 90  # JPEG quality when resizing
    on_error: str = "fail"  # "fail" | "skip" for undecodable images


@dataclass
class ShardRecord:
    """What finalize needs from a written shard (stored as JSON beside the outputs)."""

    name: str
    split: str
    num_samples: int
    filesize: int
    sha256: str
    md5: str
    rows: list[dict] = field(default_factory=list)  # the per-sample index
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


class _HashingFile:
    """Write-through file object that hashes as it goes (no second read of the shard)."""

    def __init__(self, f):
        self.f, self.sha, self.md5, self.size = f, hashlib.sha256(), hashlib.md5(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.md5.update(b)
        self.size += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.size


def write_shard(plan: ShardPlan, data: Path, out: Path, opts: ShardOptions) -> ShardRecord:
    """Write `out/plan.name` from the images under `data/<split>/`; returns its record."""
    final = out / plan.name
    partial = out / f"{plan.name}.partial"
    rec = ShardRecord(plan.name, plan.split, 0, 0, "", "")
    try:
        with open(partial, "wb") as raw:
            hf = _HashingFile(raw)
            with wds.TarWriter(hf, user="", group="", mode=0o444, encoder=False,
                               mtime=MTIME) as tw:
                for s in plan.samples:
                    _write_sample(tw, s, data, plan, opts, rec)
            raw.flush()
            os.fsync(raw.fileno())
        rec.filesize, rec.sha256, rec.md5 = hf.size, hf.sha.hexdigest(), hf.md5.hexdigest()
        os.replace(partial, final)
    except OSError as exc:
        _remove(partial)
        raise PrepError(f"{final}: write failed ({exc.strerror or exc}); no partial shard was "
                        "left. Free space or fix the disk, then rerun: finished shards are kept"
                        ) from exc
    except BaseException:
        _remove(partial)
        raise
    return rec


def _write_sample(tw: wds.TarWriter, s, data: Path, plan: ShardPlan, opts: ShardOptions,
                  rec: ShardRecord) -> None:
    src = data / plan.split / s.path
    try:
        raw = src.read_bytes()
    except FileNotFoundError as exc:
        raise PrepError(f"{data}/meta/{plan.split}.txt:{s.line}: {src} does not exist; "
                        "rerun `prep imagenet` to refresh meta/") from exc
    try:
        jpg, info = encode_image(raw, opts.max_size, opts.quality)
    except UndecodableImage as exc:
        if opts.on_error == "skip":
            rec.skipped.append(f"{plan.split}/{s.path}: {exc}")
            return
        raise PrepError(f"{src}: {exc}; rerun with --on-error skip to leave it out "
                        "(skips are listed in the manifest)") from exc
    meta = {"key": s.key, "wnid": s.wnid, "label": s.label, "source": f"{plan.split}/{s.path}",
            "width": info.width, "height": info.height, "format": info.format,
            "mode": info.mode, "repaired": info.repaired, "resized": info.resized}
    sample = {"__key__": s.key, "jpg": jpg,
              "json": json.dumps(meta, sort_keys=True).encode()}
    if s.label >= 0:
        sample["cls"] = str(s.label).encode()
    offset = tw.tarstream.offset
    tw.write(sample)
    rec.num_samples += 1
    rec.rows.append({"key": s.key, "split": plan.split, "shard": plan.name, "offset": offset,
                     "jpg_bytes": len(jpg), "label": s.label, "wnid": s.wnid,
                     "width": info.width, "height": info.height,
                     "repaired": info.repaired or "", "source": f"{plan.split}/{s.path}"})


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
