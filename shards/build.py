"""`prep shard`: plan, resume, write shards in parallel, merge the manifest.

State lives in `OUT/.prep-shard/`: `plan.json` (options + input fingerprint) and one record
per finished shard in `parts/`. A record is written (atomically) only after its tar was
fsynced and renamed, so after any kill a rerun redoes exactly the unfinished shards, and
because every shard's content is fixed by the plan, the result is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from prep import __version__
from prep.errors import PrepError
from shards.image import keep_image_buffers_in_heap
from shards.manifest import INFO, preload_manifest_libs, write_manifest
from shards.plan import ShardPlan, assign, default_num_shards
from shards.source import read_classes, read_split
from shards.write import ShardOptions, ShardRecord, write_shard

STATE = ".prep-shard"
FORMAT = 3  # bump when the bytes written for the same plan change


@dataclass
class ShardSettings:
    splits: tuple[str, ...] = ("train", "val", "test")
    num_shards: int | None = None  # per split; None: default_num_shards
    samples_per_shard: int | None = None
    seed: int = 0
    max_size: int | None = None
    quality: int = 90
    on_error: str = "fail"


@dataclass
class ShardReport:
    out: Path
    written: list[ShardRecord] = field(default_factory=list)
    kept: int = 0  # shards finished by an earlier run
    pending: int = 0  # shards left to other --shard-range parts
    info: dict | None = None  # the manifest, once complete
    seconds: float = 0.0


def make_plans(data: Path, s: ShardSettings) -> tuple[list[str], list[ShardPlan]]:
    wnids = read_classes(data)
    plans = []
    for split in s.splits:
        if split == "test" and not (data / "meta" / "test.txt").is_file():
            continue  # test is optional: present only when the copy has test images
        samples = read_split(data, split, wnids)
        if s.num_shards:
            n = s.num_shards
        elif s.samples_per_shard:
            n = -(-len(samples) // s.samples_per_shard)
        else:
            n = default_num_shards(len(samples))
        plans += assign(split, samples, min(n, len(samples)), s.seed)  # no empty shards
    return wnids, plans


def fingerprint(plans: list[ShardPlan], s: ShardSettings) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, **asdict(s)}, sort_keys=True).encode())
    for p in plans:
        h.update(p.name.encode())
        for smp in p.samples:
            h.update(f"{smp.key}\t{smp.path}\t{smp.label}\n".encode())
    return h.hexdigest()


def _claim(out: Path, fp: str, settings: ShardSettings, data: Path, force: bool) -> Path:
    """Make OUT ours for this plan; refuse shards from another input or options."""
    state = out / STATE
    plan_file = state / "plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old.get("fingerprint") != fp:
            if not force:
                raise PrepError(
                    f"{out}: holds shards made from {old.get('data')} with options "
                    f"{old.get('settings')}; this run differs (input or options). Use a new "
                    "--out, or --force to delete those shards and write new ones")
            clean(out)
    elif out.is_dir() and any(out.glob("*.tar")):
        if not force:
            raise PrepError(f"{out}: holds .tar files not made by prep shard; choose another "
                            "--out (or --force to delete the *-NNNNNN.tar files there)")
        clean(out)
    (state / "parts").mkdir(parents=True, exist_ok=True)
    if not plan_file.is_file():
        doc = {"fingerprint": fp, "data": str(data), "settings": asdict(settings),
               "tool": f"prep {__version__}"}
        tmp = state / f".plan.json.{os.getpid()}.tmp"  # parts on several machines race here
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, plan_file)
    return state / "parts"


def clean(out: Path) -> None:
    """Remove what prep shard writes (shards, manifest, state); nothing else."""
    for p in list(out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar*")):
        p.unlink()
    for name in (INFO, "index.parquet", "SHA256SUMS"):
        (out / name).unlink(missing_ok=True)
    for p in out.glob("*.shardindex.json"):
        p.unlink()
    shutil.rmtree(out / STATE, ignore_errors=True)


def _finished(parts: Path, out: Path, plan: ShardPlan) -> ShardRecord | None:
    rec_file = parts / f"{plan.name}.json"
    tar = out / plan.name
    if not rec_file.is_file() or not tar.is_file():
        return None
    rec = ShardRecord(**json.loads(rec_file.read_text()))
    if not isinstance(rec.rows, dict):  # a record from before columns: redo (same bytes)
        return None
    return rec if tar.stat().st_size == rec.filesize else None


def _save(parts: Path, rec: ShardRecord) -> None:
    tmp = parts / f".{rec.name}.json.tmp"
    tmp.write_text(rec.to_json())
    os.replace(tmp, parts / f"{rec.name}.json")


def shard_dataset(data: Path, out: Path, settings: ShardSettings, *, workers: int = 1,
                  shard_range: tuple[int, int] = (0, 1), force: bool = False,
                  finalize_only: bool = False, progress: bool = True) -> ShardReport:
    """Write (or finish) the shards of `data` (DIR/imagenet) into `out`. With `shard_range`
    (i, N), write only shards i, i+N, i+2N, ... (one part of a multi-machine run); the
    manifest is written by whichever run finds every shard finished (or `finalize_only`)."""
    t0 = time.perf_counter()
    data, out = Path(os.path.abspath(data)), Path(os.path.abspath(out))
    wnids, plans = make_plans(data, settings)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(plans, settings)
    parts = _claim(out, fp, settings, data, force)
    report = ShardReport(out)
    records, todo = {}, []
    part, nparts = shard_range
    for i, p in enumerate(plans):
        rec = _finished(parts, out, p)
        if rec:
            records[p.name] = rec
            report.kept += 1
        elif i % nparts == part:
            todo.append(p)
        else:
            report.pending += 1
    if finalize_only and (todo or report.pending):
        raise PrepError(f"{out}: {len(todo) + report.pending} of {len(plans)} shards are not "
                        "finished yet; run the missing --shard-range parts first")
    opts = ShardOptions(settings.max_size, settings.quality, settings.on_error)
    for rec in _run(todo, data, out, opts, workers, progress):
        _save(parts, rec)
        records[rec.name] = rec
        report.written.append(rec)
    if report.pending == 0 and not report.written and (out / INFO).is_file():
        report.info = json.loads((out / INFO).read_text())  # finished earlier: nothing to redo
    elif report.pending == 0:
        prep = {"tool": f"prep {__version__}", "data": str(data), "fingerprint": fp,
                "settings": asdict(settings)}
        report.info = write_manifest(out, [records[p.name] for p in plans], wnids, prep)
    report.seconds = time.perf_counter() - t0
    return report


def _run(todo: list[ShardPlan], data: Path, out: Path, opts: ShardOptions, workers: int,
         progress: bool):
    """Yield records as shards finish; stop at the first error (after cancelling the rest)."""
    total = sum(len(p.samples) for p in todo)
    bar = tqdm(total=total, unit="img", desc="shard", disable=not progress or not todo)
    nbytes, t0 = 0, time.perf_counter()
    with ProcessPoolExecutor(max(1, workers), initializer=keep_image_buffers_in_heap) as pool:
        futures: set[Future] = {pool.submit(write_shard, p, data, out, opts) for p in todo}
        preload_manifest_libs()  # ~0.2 s of imports, done while the workers write
        while futures:
            # FIRST_COMPLETED: each finished shard is recorded at once (a kill keeps it, the
            # bar moves); FIRST_EXCEPTION would wait for all of them unless one failed
            done, futures = wait(futures, return_when=FIRST_COMPLETED)
            for f in done:
                if f.exception():
                    for other in futures:
                        other.cancel()
                    bar.close()
                    raise f.exception()
                rec = f.result()
                nbytes += rec.filesize
                bar.set_postfix_str(f"{nbytes / 1e6 / (time.perf_counter() - t0):.1f} MB/s")
                bar.update(rec.num_samples + len(rec.skipped))
                yield rec
    bar.close()
