"""`prep shard`: plan, resume, write shards in parallel, merge the manifest.

State lives in `OUT/.prep-shard/`: `plan.json` (options, input fingerprint, the shard names
of the plan), one record per finished shard in `parts/` and `manifest.json` (the manifest
files written, with their sizes and mtimes). A record is written (atomically) only after its
tar was fsynced and renamed, so after any kill a rerun redoes exactly the unfinished shards,
and because every shard's content is fixed by the plan, the result is byte-identical.

A rerun keeps a shard only when it can show it is complete and its own: the tar has the
recorded size, inode and mtime, and every source image the recorded size and mtime (a
replaced image redoes its shard; for `--src`, where the images are read in place from a
release's tars (shards/release.py), the source is the archive). Only files those records
name are ever removed or replaced (`--force` included); anything else in OUT stays, and a
file prep shard would write but did not make stops the run. One writer per output:
OUT/.prep-shard.lock (shared by `--shard-range` parts, each of which also locks its own
part) names the running process.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    wait,
)
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prep.atomic import write_atomic
from prep.checked import CheckedRecord
from prep.errors import PrepError, refuse_inside, write_error
from prep.evalset import read_evalset
from prep.formats import SHARDS, stamp
from prep.gcpause import gc_paused, unfrozen_after
from prep.progress import progress_bar
from prep.scan import Problems
from prep.workers import interrupt_at_checks, process_pool, thread_map, worker_context
from shards.dali_index import index_path
from shards.manifest import INDEX, INFO, SUMS, preload_manifest_libs, write_manifest
from shards.plan import ShardInput, ShardPlan, assign, shard_count
from shards.record import INDEX_COLUMNS, ShardRecord
from shards.settings import ShardSettings
from shards.source import read_classes, read_samples
from shards.write import source_paths, write_shard

STATE = ".prep-shard"
LOCK = ".prep-shard.lock"
FORMAT = 4  # bump when the bytes written for the same plan (or the records) change


@dataclass
class ShardReport:
    out: Path
    written: list[ShardRecord] = field(default_factory=list)
    kept: int = 0  # shards finished by an earlier run
    pending: int = 0  # shards left to other --shard-range parts
    trusted: int = 0  # sources the strict check passed before, unchanged since (not checked)
    record: str = ""  # the record of checked sources (prep.checked)
    problems: Problems | None = None  # --src: what the listing of the release found
    notes: list[str] = field(default_factory=list)
    info: dict | None = None  # the manifest, once complete
    seconds: float = 0.0


def view_input(data: Path, s: ShardSettings) -> ShardInput:
    """The plans of a view (--data); its record of checked sources lives in it."""
    with gc_paused():
        wnids, plans, evalset = make_plans(data, s)
    return ShardInput(data, wnids, plans, {"evalset": evalset} if evalset else {}, data)


def make_plans(data: Path, s: ShardSettings
               ) -> tuple[list[str], list[ShardPlan], dict | None]:
    """(classes, shard plans, the evaluation set's description or None)."""
    wnids = read_classes(data)
    evalset = read_evalset(data)  # an evaluation set: its one split, class-prefixed keys
    plans = []
    for split in ("val",) if evalset else s.splits:
        if split == "test" and not (data / "meta" / "test.txt").is_file():
            continue  # test is optional: present only when the copy has test images
        samples = read_samples(data, split, wnids, class_keys=evalset is not None)
        plans += assign(split, samples, shard_count(len(samples), s.num_shards,
                                                    s.samples_per_shard), s.seed)
    return wnids, plans, evalset


def fingerprint(plans: list[ShardPlan], s: ShardSettings) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, **asdict(s)}, sort_keys=True).encode())
    for p in plans:
        h.update(p.name.encode())
        # one update per shard: the same bytes, so the same digest, as one per sample
        h.update("".join([f"{key}\t{path}\t{label}\n" for key, path, label, _, _
                          in p.samples]).encode())
        if p.members is not None:  # read in place: which member of which archive
            h.update("\n".join([p.archive, *(m[2] for m in p.members)]).encode())
    return h.hexdigest()


def _holder(path: Path) -> str:
    """What the holder wrote into its lock file; when that process is gone (on this host)
    but the lock is still held, the processes that hold it now (from /proc)."""
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    m = re.match(r"pid (\d+) on (\S+):", text)
    if m and m[2] == socket.gethostname() and not os.path.exists(f"/proc/{m[1]}"):
        pids = _processes_holding(path)
        return (f"{text[:m.end() - 1]} is no longer running, yet the lock is held by "
                f"{'pids ' + ', '.join(pids) if pids else 'another process'}, which it left "
                "behind; end them (kill PID) and rerun")
    return text or "another process"


def _processes_holding(path: Path) -> list[str]:
    """Pids with an open descriptor on `path` (Linux /proc; empty elsewhere)."""
    target, pids = os.stat(path), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
                    pids.append(pid)
                    break
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return pids


@contextmanager
def output_lock(out: Path, shard_range: tuple[int, int], exclusive: bool) -> Iterator[None]:
    """One writer per output. The whole run (or --force, --finalize) takes OUT/.prep-shard.lock
    exclusively; a --shard-range part takes it shared plus its own part's lock, so parts run
    side by side but never twice, and never beside a whole run. flock: released by the
    kernel when the process dies."""
    part, nparts = shard_range
    files = [(out / LOCK, exclusive or nparts == 1)]
    if nparts > 1 and not exclusive:
        files.append((out / f"{LOCK}.part-{part}-of-{nparts}", True))
    me = f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:200]}"
    with ExitStack() as stack:
        for path, excl in files:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise write_error(path, exc) from exc
            stack.callback(os.close, fd)
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if excl else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PrepError(f"{out}: another `prep shard` is writing it ({_running(out)}); "
                                "wait for it to finish, or use another --out") from None
            if excl:
                os.ftruncate(fd, 0)
                os.pwrite(fd, me.encode() + b"\n", 0)
        yield


def _running(out: Path) -> str:
    """Who holds the locks of `out`, from what each holder wrote into its lock file."""
    held = []
    for path in sorted(out.glob(f"{LOCK}*")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            held.append(_holder(path))
        finally:
            os.close(fd)
    return "; ".join(held) or "it holds " + LOCK


OWN_MANIFEST = (INFO, INDEX, SUMS)  # plus <split>.shardindex.json


def _manifest_names(out: Path) -> list[str]:
    return [*OWN_MANIFEST, *sorted(p.name for p in out.glob("*.shardindex.json"))]


def _stat_key(path: Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_ino, st.st_mtime_ns]


def _read_json(path: Path) -> dict:
    """A JSON object from a file; {} when it is missing, damaged or not an object."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def owned_files(out: Path) -> list[Path]:
    """The files in `out` that prep shard's own records say it wrote: the shards (and their
    partials) of the recorded plan, and the manifest files recorded as written (unchanged
    since) or being written. Outputs of prep 0.1.0 before these records: the shards named
    by its per-shard records, and a manifest whose `_info.json` names the plan's fingerprint."""
    state = out / STATE
    plan = _read_json(state / "plan.json")
    planned = plan.get("shards")
    if not isinstance(planned, list):
        planned = [p.name[: -len(".json")] for p in (state / "parts").glob("*.tar.json")]
    owned = [out / f for n in planned for f in _shard_files(str(n)) if (out / f).is_file()]
    manifest = _read_json(state / "manifest.json")
    made_by = _read_json(out / INFO).get("prep")
    if not manifest and plan.get("fingerprint") and isinstance(made_by, dict) and \
            made_by.get("fingerprint") == plan["fingerprint"]:
        manifest = dict.fromkeys(_manifest_names(out))
    owned += [out / n for n, key in sorted(manifest.items())
              if (out / n).is_file() and key in (None, _stat_key(out / n))]
    return owned


def _shard_files(name: str) -> tuple[str, str, str]:
    """The files of one shard: the tar, its partial, DALI's index."""
    return name, f"{name}.partial", index_path(name).name


def foreign_files(out: Path, names: set[str]) -> list[str]:
    """Files in `out` with a name prep shard writes (its shards `names` with their partials
    and DALI indexes, the manifest) that prep's records do not claim."""
    owned = {p.name for p in owned_files(out)}
    ours = {f for n in names for f in _shard_files(n)} | set(_manifest_names(out))
    return sorted(n for n in ours if n not in owned and (out / n).exists())


def _claim(out: Path, fp: str, settings: ShardSettings, data: Path, force: bool,
           names: list[str]) -> Path:
    """Make OUT ours for this plan; refuse shards from another input or options, and files
    prep shard would write but did not make."""
    state = out / STATE
    plan_file = state / "plan.json"
    old = _read_json(plan_file) if plan_file.is_file() else None
    if old is not None and old.get("fingerprint") != fp:
        removable = owned_files(out)
        if not force:
            listed = ", ".join(p.name for p in removable[:5])
            more = f" and {len(removable) - 5} more" if len(removable) > 5 else ""
            raise PrepError(
                f"{out}: holds shards made from {old.get('data')} with options "
                f"{old.get('settings')}; this run differs (input or options). Use a new "
                f"--out, or --force to remove the {len(removable)} file(s) prep shard wrote "
                f"there ({listed}{more}) and write new ones; nothing else in it is touched")
        clean(out)
        old = None
    foreign = foreign_files(out, set(names))
    if old is None:  # a new output: no tars of others mixed in (kept, never deleted)
        foreign += sorted({p.name for p in out.glob("*.tar")} - set(foreign))
    if foreign:
        raise PrepError(
            f"{out}: holds {len(foreign)} tar or manifest file(s) not made by prep shard "
            f"({', '.join(foreign[:5])}); prep never replaces or deletes a file it did not "
            "write, --force included. Move them away or choose another --out")
    (state / "parts").mkdir(parents=True, exist_ok=True)
    if old is None:
        doc = {**stamp(SHARDS), "fingerprint": fp, "data": str(data),
               "settings": asdict(settings), "shards": names}
        write_atomic(plan_file, json.dumps(doc, indent=1) + "\n")  # parts may race here
    return state / "parts"


def clean(out: Path) -> None:
    """Remove what prep shard's records say it wrote (shards, partials, manifest) and its
    state; nothing else."""
    for p in owned_files(out):
        p.unlink(missing_ok=True)
    shutil.rmtree(out / STATE, ignore_errors=True)


def _read_record(rec_file: Path) -> ShardRecord | None:
    """A shard's record, or None when it is missing or not one this version wrote whole
    (then the shard is redone: same bytes)."""
    try:
        rec = ShardRecord(**json.loads(rec_file.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    rows = rec.rows
    if not (isinstance(rows, dict) and set(rows) == set(INDEX_COLUMNS)
            and all(isinstance(v, list) and len(v) == rec.num_samples for v in rows.values())
            and isinstance(rec.source_stats, list)):
        return None
    return rec


def _finished(parts: Path, out: Path, plan: ShardPlan, data: Path) -> ShardRecord | None:
    """The record of a shard an earlier run finished, when the tar is still the one it
    wrote (size, inode, mtime) and every source is unchanged (size, mtime); else None."""
    rec = _read_record(parts / f"{plan.name}.json")
    if rec is None or _stat_key(out / plan.name) != [rec.filesize, rec.tar_inode,
                                                      rec.tar_mtime_ns]:
        return None
    if not index_path(out / plan.name).is_file():  # DALI's index: redo the shard (same bytes)
        return None
    return rec if sources_unchanged(data, plan, rec) else None


def sources_unchanged(data: Path, plan: ShardPlan, rec: ShardRecord) -> bool:
    """Whether every source file of a recorded shard still has the size and mtime the record
    holds (a changed one: the shard is written again)."""
    if len(rec.source_stats) != len(plan.samples):
        return False
    if plan.members is not None:  # read from archives: a sample's archive is its source
        try:
            now = [[st.st_size, st.st_mtime_ns] for st in map(os.stat, plan.files or
                                                               [plan.archive])]
        except OSError:
            return False
        if plan.files is None:
            return all(recorded == now[0] for recorded in rec.source_stats)
        return all(recorded == now[m[0] >> 32]  # sample_id: file number, member number
                   for recorded, m in zip(rec.source_stats, plan.members))
    base = f"{data}/{plan.split}/"
    for s, recorded in zip(plan.samples, rec.source_stats):
        try:
            st = os.stat(base + s.path)
        except OSError:
            return False
        if [st.st_size, st.st_mtime_ns] != recorded:
            return False
    return True


def open_record(inp: ShardInput, settings: ShardSettings) -> CheckedRecord:
    """The record of sources the strict check passed, for this input (one that keeps
    nothing when the input has no place for it)."""
    return CheckedRecord(inp.record or inp.root, settings.strict and inp.record is not None)


def _save(parts: Path, rec: ShardRecord) -> None:
    write_atomic(parts / f"{rec.name}.json", rec.to_json())


def _record_manifest(path: Path, entries: dict[str, list[int] | None]) -> None:
    write_atomic(path, json.dumps(entries) + "\n")


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def _source_roots(data: Path) -> dict[str, Path]:
    """The trees `prep shard` reads: the view, what its split links point into, and the
    whole source tree they come from (meta/prep.json's `src`; also the folders archives were
    extracted to), so that `--out SRC/shards`, reached directly, through the view's
    `DIR/ILSVRC2017` link or through `..`, is refused."""
    roots: dict[str, Path] = {"dataset view": data}
    for split in ("train", "val", "test"):
        p = data / split
        if p.exists():
            roots[f"{split} source"] = p
    for p in data.glob(".src-*"):
        roots["val source"] = p
    try:
        made = json.loads((data / "meta" / "prep.json").read_text())
    except (OSError, ValueError):
        made = {}
    if isinstance(made, dict):
        for what, key in (("source", "src"), ("extracted train", "train_dir"),
                          ("extracted val", "val_dir")):
            if isinstance(made.get(key), str) and made[key] not in ("", "None"):
                roots[what] = Path(made[key])
    return roots


@unfrozen_after()
def shard_dataset(data: Path, out: Path, settings: ShardSettings, *, workers: int = 1,
                  shard_range: tuple[int, int] = (0, 1), force: bool = False,
                  finalize_only: bool = False, progress: bool = True) -> ShardReport:
    """Write (or finish) the shards of `data` (DIR/imagenet) into `out`. With `shard_range`
    (i, N), write only shards i, i+N, i+2N, ... (one part of a multi-machine run); the
    manifest is written by whichever run finds every shard finished (or `finalize_only`)."""
    t0 = time.perf_counter()
    data, out = Path(os.path.abspath(data)), Path(os.path.abspath(out))
    refuse_inside(out, _source_roots(data), "--out")
    inp = view_input(data, settings)
    _make_out(out)
    return _shard_input(inp, out, settings, workers=workers, shard_range=shard_range,
                        force=force, finalize_only=finalize_only, progress=progress, t0=t0)


@unfrozen_after()
def shard_release(src: Path, out: Path, settings: ShardSettings, *, workers: int = 1,
                  shard_range: tuple[int, int] = (0, 1), force: bool = False,
                  finalize_only: bool = False, progress: bool = True) -> ShardReport:
    """`prep shard --src`: the shards of a release, read in place from its archives
    (shards/release.py); the same shards, manifest, resumption and locks as from a view.
    A changed archive (size or mtime) has its shards written again."""
    from shards.release import release_input

    t0 = time.perf_counter()
    src, out = Path(os.path.abspath(src)), Path(os.path.abspath(out))
    refuse_inside(out, {"source": src}, "--out")
    worker_context(["shards.write"])  # the workers' server starts while the release is listed
    inp = release_input(src, settings, progress, workers)
    _make_out(out)
    return _shard_input(inp, out, settings, workers=workers, shard_range=shard_range,
                        force=force, finalize_only=finalize_only, progress=progress, t0=t0)


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):  # read-only file system or permissions: say it now
            code = errno.EROFS if _read_only(out) else errno.EACCES
            raise OSError(code, os.strerror(code))
    except OSError as exc:
        raise write_error(out, exc) from exc


def _shard_input(inp: ShardInput, out: Path, settings: ShardSettings, *, workers: int,
                 shard_range: tuple[int, int], force: bool, finalize_only: bool,
                 progress: bool, t0: float) -> ShardReport:
    fp = fingerprint(inp.plans, settings)
    with output_lock(out, shard_range, exclusive=force or finalize_only):
        parts = _claim(out, fp, settings, inp.root, force, [p.name for p in inp.plans])
        report = _shard_locked(inp, out, settings, fp=fp, parts=parts, workers=workers,
                               shard_range=shard_range, finalize_only=finalize_only,
                               progress=progress, t0=t0)
    report.problems, report.notes = inp.problems, inp.notes
    return report


def _shard_locked(inp: ShardInput, out: Path, settings: ShardSettings, *, fp: str,
                  parts: Path, workers: int, shard_range: tuple[int, int],
                  finalize_only: bool, progress: bool, t0: float) -> ShardReport:
    data, plans = inp.root, inp.plans
    report = ShardReport(out)
    records, todo = {}, []
    part, nparts = shard_range
    # stat calls release the GIL (cold caches, NFS)
    kept = thread_map(lambda p: _finished(parts, out, p, data), plans, 8)
    for i, (p, rec) in enumerate(zip(plans, kept)):
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
    checked = open_record(inp, settings)
    report.record = str(checked.path)
    try:
        if inp.packed:  # a compressed release: every shard from every file, in two passes
            from shards.packed_write import write_packed

            written = write_packed(todo, inp.packed, out, settings, workers, progress)
        else:
            written = _run(todo, data, out, settings, workers, progress, checked)
        for rec in written:
            _save(parts, rec)
            checked.keep(rec.checked, rec.trusted)
            records[rec.name] = rec
            report.written.append(rec)
    finally:
        checked.close()
    report.trusted = checked.trusted_count
    manifest_file = parts.parent / "manifest.json"
    if report.pending == 0 and not report.written and manifest_file.is_file() and \
            not foreign_files(out, set()) and None not in _read_json(manifest_file).values():
        report.info = json.loads((out / INFO).read_text())  # finished earlier: nothing to redo
    elif report.pending == 0:
        prep = {**stamp(SHARDS), "data": str(data), "fingerprint": fp,
                "settings": asdict(settings)}
        foreign = foreign_files(out, set())
        if foreign:  # a file the user put there since the run started
            raise PrepError(f"{out}: {', '.join(foreign)} appeared while shards were written "
                            "and prep shard did not make it; move it away and rerun")
        splits = sorted({p.split for p in plans})
        names = [*OWN_MANIFEST, *(f"{s}.shardindex.json" for s in splits)]
        _record_manifest(manifest_file, dict.fromkeys(names))  # being written: ours
        report.info = write_manifest(out, [records[p.name] for p in plans], inp.wnids, prep,
                                     inp.extra)
        _record_manifest(manifest_file, {n: _stat_key(out / n) for n in names})
    report.seconds = time.perf_counter() - t0
    return report


def _run(todo: list[ShardPlan], data: Path, out: Path, settings: ShardSettings, workers: int,
         progress: bool, checked: CheckedRecord):
    """Yield records as shards finish; stop at the first error (after cancelling the rest)."""
    total = sum(len(p.samples) for p in todo)
    bar = progress_bar(total=total, unit="img", desc="shard", disable=not progress or not todo)
    nbytes, t0 = 0, time.perf_counter()
    pool = process_pool(workers)
    try:
        with interrupt_at_checks() as check:
            futures: set[Future] = {pool.submit(write_shard, p, data, out, settings,
                                                checked.trusted(source_paths(p))) for p in todo}
            preload_manifest_libs()  # ~0.2 s of imports, done while the workers write
            while futures:
                # FIRST_COMPLETED: each finished shard is recorded at once (a kill keeps it,
                # the bar moves); FIRST_EXCEPTION would wait for all unless one failed
                done, futures = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                check()
                for f in done:
                    if f.exception():
                        raise f.exception()
                    rec = f.result()
                    nbytes += rec.filesize
                    bar.set_postfix_str(
                        f"{nbytes / 1e6 / (time.perf_counter() - t0):.1f} MB/s")
                    bar.update(rec.num_samples + len(rec.skipped))
                    yield rec
                    check()
            pool.shutdown(wait=True)  # a Ctrl-C in its thread join would be one more hang
    except BaseException:
        bar.close()
        pool.stop()  # workers ignore SIGINT themselves
        for p in todo:  # ours (planned names, under the lock): a rerun redoes them
            (out / f"{p.name}.partial").unlink(missing_ok=True)
        raise
    bar.close()
