"""`prep shard --out s3://bucket/prefix`: the same shards and manifest as on disk, written
to object storage (shards.store), with the same guarantees.

Each shard is written by the same worker code into a local staging folder (at most
`workers + 2` shards there at once), uploaded (in parts, several at once), and removed
locally; then its record goes to `PREFIX/.prep-shard/parts/NAME.json` with the uploaded
object's size and ETag. A rerun keeps a shard whose object still has the recorded size and
ETag and whose sources are unchanged (size, mtime); the rest are written again (the same
bytes: the plan fixes them). The manifest (`index.parquet`, `SHA256SUMS`, the wids indexes,
then `_info.json`) goes up only when every shard is there, `_info.json` last: a reader that
finds `_info.json` finds the whole dataset.

One writer at a time: `PREFIX/.prep-shard.lock`, created with a conditional PUT
(`If-None-Match: *`), names its holder and is rewritten every minute (a heartbeat). A second
writer is refused at once, naming the holder; a lock whose holder is gone (same host, no
such process) or whose heartbeat is older than LOCK_STALE_S is stale and taken over.
`--force` deletes only objects the records name. A prefix holding objects that prep shard
did not write (someone else's, or a different dataset's) is refused for a new output.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from prep.checked import CheckedRecord
from prep.errors import PrepError
from prep.formats import SHARDS, stamp
from prep.gcpause import unfrozen_after
from prep.progress import progress_bar
from prep.workers import interrupt_at_checks, process_pool, thread_map
from shards.build import (
    STATE,
    ShardReport,
    ShardSettings,
    fingerprint,
    open_record,
    sources_unchanged,
    view_input,
)
from shards.dali_index import index_path
from shards.manifest import INFO, write_manifest
from shards.plan import ShardInput, ShardPlan
from shards.record import ShardRecord
from shards.store import Store
from shards.write import source_paths, write_shard

LOCK = ".prep-shard.lock"
LOCK_STALE_S = 600.0  # a lock not rewritten for this long is stale
HEARTBEAT_S = 60.0
PLAN, MANIFEST = f"{STATE}/plan.json", f"{STATE}/manifest.json"


def _part(name: str) -> str:
    return f"{STATE}/parts/{name}.json"


def _json(raw: bytes | None) -> dict:
    try:
        doc = json.loads(raw) if raw is not None else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


@contextmanager
def store_lock(store: Store) -> Iterator[None]:
    """Hold PREFIX/.prep-shard.lock for the block (see the module's docstring)."""
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "command": " ".join(sys.argv)[:200]}

    def body() -> bytes:
        return json.dumps({**me, "heartbeat": time.time()}).encode()

    for _ in range(3):
        if store.put(LOCK, body(), only_new=True):
            break
        held = _json(store.get(LOCK))
        if not _stale(held):
            raise PrepError(f"{store.where}: another `prep shard` is writing it ({_who(held)}); "
                            "wait for it to finish, or use another --out")
        store.delete([LOCK])  # stale: take it over (two takers: one conditional PUT wins)
    else:
        raise PrepError(f"{store.where}: could not take {LOCK}; rerun")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                store.put(LOCK, body())
            except Exception:  # noqa: BLE001 - a missed beat is retried next minute
                pass
    thread = threading.Thread(target=beat, daemon=True, name="lock-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        store.delete([LOCK])


def _stale(held: dict) -> bool:
    if not held:
        return True  # unreadable or vanished: nobody can be shown to hold it
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) \
            and not os.path.exists(f"/proc/{held['pid']}"):
        return True
    beat = held.get("heartbeat")
    return not isinstance(beat, (int, float)) or time.time() - beat > LOCK_STALE_S


def _who(held: dict) -> str:
    age = time.time() - held["heartbeat"] if isinstance(held.get("heartbeat"), (int, float)) \
        else float("nan")
    return (f"pid {held.get('pid')} on {held.get('host')}: {held.get('command', '')}; "
            f"last heartbeat {age:.0f} s ago")


def _owned(store: Store, listing: dict[str, dict]) -> list[str]:
    """Objects the records say prep shard wrote: recorded shards and DALI indexes, recorded
    manifest objects, the state objects, and the shards (and indexes) the plan names: the
    plan is written before the first upload into a prefix that was empty, and under the
    lock only prep writes those names, so one uploaded by a run killed before it recorded
    it is ours too."""
    names = [n for n in listing if n.startswith(f"{STATE}/")]
    planned = [s for s in (_json(store.get(PLAN)).get("shards") or []) if isinstance(s, str)] \
        if PLAN in listing else []
    for n in names:
        if n.startswith(f"{STATE}/parts/") and n.endswith(".json"):
            planned.append(n[len(f"{STATE}/parts/"):-len(".json")])
    names += [x for shard in planned for x in (shard, index_path(shard).name) if x in listing]
    names += [n for n in _json(store.get(MANIFEST)) if n in listing]
    return sorted(set(names))


@unfrozen_after()
def shard_to_store(data: Path, url: str, settings: ShardSettings, *, workers: int = 1,
                   force: bool = False, progress: bool = True,
                   staging: str | None = None, src: bool = False) -> ShardReport:
    """Write (or finish) the shards of `data` (a view; with `src`, a release read in place,
    shards/release.py) to the store prefix `url`."""
    t0 = time.perf_counter()
    data = Path(os.path.abspath(data))
    store = Store(url)
    if src:
        from shards.release import release_input

        inp = release_input(data, settings, progress, workers)
    else:
        inp = view_input(data, settings)
    plans = inp.plans
    fp = fingerprint(plans, settings)
    with store_lock(store):
        listing = store.list()
        old = _json(store.get(PLAN)) if PLAN in listing else None
        if old is not None and old.get("fingerprint") != fp:
            owned = _owned(store, listing)
            if not force:
                raise PrepError(
                    f"{store.where}: holds shards made from {old.get('data')} with options "
                    f"{old.get('settings')}; this run differs (input or options). Use a new "
                    f"--out, or --force to delete the {len(owned)} object(s) prep shard wrote "
                    "there; nothing else in it is touched")
            store.delete([n for n in owned if n != LOCK])
            listing, old, replaced = store.list(), None, True
        else:
            replaced = False
        ours = set(_owned(store, listing)) | {LOCK}
        names = {p.name for p in plans}
        ours_by_name = names | {index_path(n).name for n in names} | {INFO, "index.parquet",
                                                                      "SHA256SUMS"}
        # a new prefix must be empty; beside our own output (kept or replaced by --force),
        # only objects with the names prep shard writes are in the way
        fresh = old is None and not replaced
        foreign = sorted(n for n in listing if n not in ours and
                         (fresh or n in ours_by_name or n.endswith(".shardindex.json")))
        if foreign:
            raise PrepError(
                f"{store.where}: holds {len(foreign)} object(s) not made by prep shard "
                f"({', '.join(foreign[:5])}); prep never replaces or deletes an object it did "
                "not write, --force included. Choose another --out prefix")
        if old is None:
            store.put(PLAN, (json.dumps({**stamp(SHARDS), "fingerprint": fp,
                                         "data": str(data), "settings": asdict(settings),
                                         "shards": [p.name for p in plans]}, indent=1)
                             + "\n").encode())
        report = _write(store, inp, fp, settings, listing, workers, progress, staging, t0)
    report.problems, report.notes = inp.problems, inp.notes
    return report


def _kept(store: Store, plan: ShardPlan, listing: dict[str, dict], data: Path
          ) -> ShardRecord | None:
    """The record of a shard an earlier run uploaded, when its object still has the
    recorded size and ETag, DALI's index is there and every source is unchanged."""
    if _part(plan.name) not in listing:
        return None
    doc = _json(store.get(_part(plan.name)))
    try:
        rec, obj = ShardRecord(**doc["record"]), doc["object"]
    except (KeyError, TypeError):
        return None
    now = listing.get(plan.name)
    if now is None or [now["size"], now["etag"]] != [obj.get("size"), obj.get("etag")] \
            or index_path(plan.name).name not in listing:
        return None
    return rec if sources_unchanged(data, plan, rec) else None


def _write(store: Store, inp: ShardInput, fp: str, settings: ShardSettings,
           listing: dict[str, dict], workers: int, progress: bool, staging: str | None,
           t0: float) -> ShardReport:
    data, plans = inp.root, inp.plans
    report = ShardReport(Path(str(store.where)))
    kept = thread_map(lambda p: _kept(store, p, listing, data), plans, 8)
    records = {p.name: r for p, r in zip(plans, kept) if r is not None}
    report.kept = len(records)
    todo = [p for p in plans if p.name not in records]
    manifest = _json(store.get(MANIFEST)) if MANIFEST in listing else {}
    done_before = not todo and manifest and all(
        n in listing and listing[n]["etag"] == etag for n, etag in manifest.items())
    if done_before:
        report.info = json.loads(store.get(INFO) or b"{}")
        report.seconds = time.perf_counter() - t0
        return report
    tmp = Path(tempfile.mkdtemp(prefix="prep-shard-", dir=staging))
    checked = open_record(inp, settings)
    report.record = str(checked.path)
    try:
        if inp.packed:  # a compressed release: every shard staged, then uploaded
            written = _upload_packed(store, todo, inp, tmp, settings, workers, progress)
        else:
            written = _upload_all(store, todo, data, tmp, settings, workers, progress, checked)
        for rec in written:
            records[rec.name] = rec
            report.written.append(rec)
        report.trusted = checked.trusted_count
        prep = {**stamp(SHARDS), "data": str(data), "fingerprint": fp,
                "settings": asdict(settings)}
        report.info = write_manifest(tmp, [records[p.name] for p in plans], inp.wnids, prep,
                                     inp.extra)
        names = sorted(n.name for n in tmp.iterdir() if n.name != INFO) + [INFO]
        store.put(MANIFEST, json.dumps(dict.fromkeys(names, "")).encode())  # being written
        etags = {}
        for n in names:  # _info.json last: a reader that sees it sees the whole dataset
            store.upload(n, tmp / n)
            etags[n] = store.head(n)["etag"]
        store.put(MANIFEST, json.dumps(etags).encode())
    finally:
        checked.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    return report


def _upload_all(store: Store, todo: list[ShardPlan], data: Path, tmp: Path,
                settings: ShardSettings, workers: int, progress: bool,
                checked: CheckedRecord) -> Iterator[ShardRecord]:
    """Write shards in the process pool and upload each as it finishes; at most
    workers + 2 shards wait on local disk. Yields records once uploaded and recorded."""
    total = sum(len(p.samples) for p in todo)
    bar = progress_bar(total=total, unit="img", desc="shard", disable=not progress or not todo)
    pool = process_pool(workers)
    uploads = ThreadPoolExecutor(4)
    pending = list(reversed(todo))
    writing: set[Future] = set()
    sending: set[Future] = set()
    try:
        with interrupt_at_checks() as check:
            while pending or writing or sending:
                while pending and len(writing) + len(sending) < workers + 2:
                    plan = pending.pop()
                    writing.add(pool.submit(write_shard, plan, data, tmp, settings,
                                            checked.trusted(source_paths(plan))))
                done, _ = wait(writing | sending, timeout=0.2, return_when=FIRST_COMPLETED)
                check()
                for f in done:
                    if f.exception():
                        raise f.exception()
                    if f in writing:
                        writing.discard(f)
                        sending.add(uploads.submit(_send, store, f.result(), tmp))
                    else:
                        sending.discard(f)
                        rec = f.result()
                        checked.keep(rec.checked, rec.trusted)
                        bar.update(rec.num_samples + len(rec.skipped))
                        yield rec
                        check()
            pool.shutdown(wait=True)  # a Ctrl-C in their thread joins would be one more hang
            uploads.shutdown(wait=True)
    except BaseException:
        bar.close()
        pool.stop()
        uploads.shutdown(wait=True, cancel_futures=True)
        raise
    bar.close()


def _upload_packed(store: Store, todo: list[ShardPlan], inp: ShardInput, tmp: Path,
                   settings: ShardSettings, workers: int, progress: bool
                   ) -> Iterator[ShardRecord]:
    """The shards of a compressed release (written together by its second pass,
    shards/packed_write.py: the staging folder holds them all), uploaded 4 at a time."""
    from shards.packed_write import write_packed

    records = list(write_packed(todo, inp.packed, tmp, settings, workers, progress))
    yield from thread_map(lambda rec: _send(store, rec, tmp), records, 4)


def _send(store: Store, rec: ShardRecord, tmp: Path) -> ShardRecord:
    """Upload a written shard and DALI's index of it, record it, remove the local copy."""
    tar, idx = tmp / rec.name, index_path(tmp / rec.name)
    store.upload(idx.name, idx)
    store.upload(rec.name, tar)
    head = store.head(rec.name)
    if head is None or head["size"] != rec.filesize:
        raise PrepError(f"{store.where.url(rec.name)}: the store holds "
                        f"{head and head['size']} bytes after the upload, not {rec.filesize}")
    rec.tar_inode = rec.tar_mtime_ns = 0  # local facts of the staging copy: meaningless here
    store.put(_part(rec.name), json.dumps({"record": rec.stored(), "object": head}).encode())
    tar.unlink()
    idx.unlink()
    return rec
