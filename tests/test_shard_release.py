"""`prep shard --src`: shards read in place from the original ILSVRC2012 tars, the same
samples in the same shards and order as `prep imagenet --extract-to` then `prep shard`."""

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from prep.cli import main
from prep.errors import PrepError
from prep.imagenet import prepare_imagenet
from shards import tarpack, write
from shards.build import ShardSettings, shard_dataset, shard_release
from shards.release import release_input
from shards.write import write_shard
from tests.conftest import sigkill_with_workers, tree_hash

SPEC = dict(classes=4, train_per_class=6, val_per_class=3, test_images=3, size=32)


def _direct(src, out, **kw):
    return shard_release(src, out, ShardSettings(**kw), workers=2, progress=False)


def _two_step(src, tmp_path, out, **kw):
    prepare_imagenet(src, tmp_path / "view", extract_to=tmp_path / "x", progress=False,
                     workers=1)
    return shard_dataset(tmp_path / "view" / "imagenet", out, ShardSettings(**kw), workers=2,
                         progress=False)


def _members(shard: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of each member; a json without its `source` (what differs)."""
    out = []
    with tarfile.open(shard) as t:
        for m in t:
            data = t.extractfile(m).read()
            if m.name.endswith(".json"):
                doc = json.loads(data)
                assert doc.pop("source")
                data = json.dumps(doc, sort_keys=True).encode()
            out.append((m.name, data))
    return out


def _sources(out: Path) -> list[str]:
    return pq.read_table(out / "index.parquet", columns=["source"]).column(0).to_pylist()


@pytest.mark.parametrize("bad_files, devkit", [(False, True), (True, True), (False, False)])
def test_same_samples_shards_and_order_as_the_two_step_path(make_sample, tmp_path, bad_files,
                                                            devkit):
    """Without the devkit (the two image tars alone) val takes the real labels shipped."""
    src, plan = make_sample("ilsvrc2012-tar", bad_files=bad_files, **SPEC)
    if not devkit:
        (src / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    before = tree_hash(src)
    opts = dict(num_shards=3, on_error="skip" if bad_files else "fail")
    direct = _direct(src, tmp_path / "direct", **opts)
    two = _two_step(src, tmp_path, tmp_path / "two", **opts)
    assert tree_hash(src) == before  # the release is only read
    same_as_two_step(direct, two, 9, 1 if bad_files else 0)  # train, val and test
    # the source names the archive and member instead of a file
    sources = _sources(tmp_path / "direct")
    assert any(s.startswith("ILSVRC2012_img_train.tar:n") and ".tar/n" in s for s in sources)
    assert any(s.startswith("ILSVRC2012_img_val.tar:ILSVRC2012_val_") for s in sources)
    assert any(s.startswith("ILSVRC2012_img_test") for s in sources)


def same_as_two_step(direct, two, shards: int, skipped: int) -> None:
    """The reports of `--src` and of the two-step path wrote the same shards: names,
    members and bytes (json minus `source`), splits, skips, repairs, index columns."""
    names = sorted(p.name for p in direct.out.glob("*.tar"))
    assert names == sorted(p.name for p in two.out.glob("*.tar")) and len(names) == shards
    for name in names:
        assert _members(direct.out / name) == _members(two.out / name), name
    assert direct.info["splits"] == two.info["splits"]
    assert len(direct.info["prep"]["skipped"]) == len(two.info["prep"]["skipped"]) == \
        skipped  # the truncated JPEG, on both paths
    assert direct.info["prep"]["repairs"] == two.info["prep"]["repairs"]
    columns = ["key", "label", "split", "shard", "jpg_bytes", "jpg_crc32", "width", "height"]
    assert pq.read_table(direct.out / "index.parquet", columns=columns).equals(
        pq.read_table(two.out / "index.parquet", columns=columns))


@pytest.mark.parametrize("layout", ["ilsvrc2012-tar", "hf-parquet"])
def test_shard_range_parts_then_one_run_give_the_same_output(make_sample, tmp_path, layout):
    src, _ = make_sample(layout, **SPEC)
    for part in (0, 1):
        shard_release(src, tmp_path / "parts", ShardSettings(num_shards=3), workers=1,
                      shard_range=(part, 2), progress=False)
    _direct(src, tmp_path / "one", num_shards=3)
    assert (tmp_path / "parts" / "SHA256SUMS").read_text() == \
        (tmp_path / "one" / "SHA256SUMS").read_text()


def test_c_and_python_writers_write_the_same_shard(make_sample, tmp_path, monkeypatch):
    if not tarpack.available():
        pytest.skip("shards/tarpack.c not built")
    src, _ = make_sample("ilsvrc2012-tar", **SPEC)
    settings = ShardSettings(num_shards=2)
    plans = release_input(src, settings, progress=False).plans
    python_writes = []
    for p in plans[:1] + [p for p in plans if p.split == "val"][:1]:
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "py").mkdir(exist_ok=True)
        with monkeypatch.context() as m:  # every clean JPEG goes through C, read in place
            m.setattr(write, "_write_sample", lambda *a: python_writes.append(a))
            rec_c = write_shard(p, src, tmp_path / "c", settings)
        assert python_writes == []
        with monkeypatch.context() as m:
            m.setattr(tarpack, "available", lambda: False)
            rec_py = write_shard(p, src, tmp_path / "py", settings)
        assert (tmp_path / "c" / p.name).read_bytes() == (tmp_path / "py" / p.name).read_bytes()
        assert rec_c.rows == rec_py.rows and rec_c.source_stats == rec_py.source_stats


def test_rerun_keeps_shards_and_a_changed_archive_is_noticed(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2012-tar", **SPEC)
    first = _direct(src, tmp_path / "out", num_shards=2)
    assert len(first.written) == 6
    again = _direct(src, tmp_path / "out", num_shards=2)
    assert (len(again.written), again.kept) == (0, 6)
    val_tar = src / "ILSVRC2012_img_val.tar"
    st = val_tar.stat()
    os.utime(val_tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # re-downloaded
    third = _direct(src, tmp_path / "out", num_shards=2)
    assert sorted(r.name for r in third.written) == ["val-000000.tar", "val-000001.tar"]
    assert third.kept == 4


def _rewrite_tar(path: Path, edit) -> None:
    """Rewrite a tar (gzip-compressed when its name ends in .gz) with `edit(members)`
    applied to its [(TarInfo, bytes)]."""
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else b"") for m in t]
    members = edit(members)
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if info.isfile() else None)


def _member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return info, data


@pytest.mark.parametrize("case, expected", [
    ("symlink", r"member 'ILSVRC2012_val_99999999.JPEG' is a symlink"),
    ("dotdot", r"member name '../evil.JPEG' is not a plain file name"),
    ("not utf-8", r"member name 'caf\\udce9.JPEG' is not a plain file name"),
    ("twice", r"both be extracted as ILSVRC2012_val_\d+\.JPEG"),
    ("one key", r"would both be sample 'ILSVRC2012_val_\d+'"),
])
def test_hostile_or_duplicate_members_are_refused(make_sample, tmp_path, case, expected):
    src, _ = make_sample("ilsvrc2012-tar", **SPEC)
    val_tar = src / "ILSVRC2012_img_val.tar"

    def edit(members):
        name, first = members[0][0].name, members[0][1]
        extra = {"symlink": _member("ILSVRC2012_val_99999999.JPEG", kind=tarfile.SYMTYPE),
                 "dotdot": _member("../evil.JPEG", first),
                 "not utf-8": _member(b"caf\xe9.JPEG".decode("utf-8", "surrogateescape"),
                                      first),
                 "twice": _member(name, first),
                 "one key": _member(name.replace(".JPEG", ".jpg"), first)}[case]
        return [*members, extra]

    _rewrite_tar(val_tar, edit)
    before = tree_hash(src)
    r = CliRunner().invoke(main, ["shard", "--src", str(src), "--out", str(tmp_path / "out"),
                                  "-q"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert "ILSVRC2012_img_val.tar" in r.output and re.search(expected, r.output), r.output
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert tree_hash(src) == before


def test_truncated_archive_is_named(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2012-tar", **SPEC)
    train = src / "ILSVRC2012_img_train.tar"
    with open(train, "r+b") as f:
        f.truncate(train.stat().st_size // 2)
    with pytest.raises(PrepError, match=r"ILSVRC2012_img_train.tar.*truncated or corrupt"):
        _direct(src, tmp_path / "out")


def test_archive_cut_short_after_listing_is_named(make_sample, tmp_path, monkeypatch):
    """An archive that shrinks between the listing and the write: the member is named."""
    src, _ = make_sample("ilsvrc2012-tar", **SPEC)
    settings = ShardSettings(num_shards=1, splits=("val",))
    plan = release_input(src, settings, progress=False).plans[0]
    with open(plan.archive, "r+b") as f:
        f.truncate(plan.members[-1][0] + 10)
    for c_writer in (True, False):
        with monkeypatch.context() as m:
            if not c_writer:
                m.setattr(tarpack, "available", lambda: False)
            with pytest.raises(PrepError, match=r"ILSVRC2012_img_val.tar:ILSVRC2012_val_\d+"
                                                r"\.JPEG: the archive ends before"):
                write_shard(plan, src, tmp_path, settings)
        assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("layout", ["blurred", "blurred-half", "ilsvrc2017"])
def test_unpacked_copies_are_refused_with_the_two_step_path(make_sample, tmp_path, layout):
    src, _ = make_sample(layout.replace("-half", "-tar"), **{**SPEC, "test_images": 0})
    if layout == "blurred-half":  # train unpacked beside the val archive
        with tarfile.open(src / "train_blurred.tar.gz") as t:
            t.extractall(src, filter="data")
        (src / "train_blurred.tar.gz").unlink()
    what = {"ilsvrc2017": "an unpacked ilsvrc2017 copy", "blurred": "an unpacked blurred copy",
            "blurred-half": r"a \(partly\) unpacked blurred copy"}[layout]
    with pytest.raises(PrepError, match=rf"holds {what}, .*`prep imagenet --src {src} --link "
                                        r"DIR.*`, then `prep shard --data DIR/imagenet`"):
        _direct(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_takes_data_or_src(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2012-tar", **SPEC)
    r = CliRunner().invoke(main, ["shard", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--data" in r.output and "--src" in r.output
    r = CliRunner().invoke(main, ["shard", "--src", str(src), "--data", str(src),
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["shard", "--src", str(src), "--out", str(tmp_path / "o"),
                                  "-q", "--num-shards", "2"])
    assert r.exit_code == 0, r.output
    assert "wrote 6 shards" in r.output and "subset: 4 of 1000 classes" in r.output


def test_a_second_pass_checks_no_member_again(make_sample, tmp_path, monkeypatch):
    """The members the strict check passed are recorded in a cache folder (never the
    release, never OUT): another pass into another OUT checks none of them again, until
    their archive changes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src, plan = make_sample("ilsvrc2012-tar", **SPEC)
    before = tree_hash(src)
    n_val = len(plan.val)
    n = sum(map(len, plan.train.values())) + n_val + SPEC["test_images"]
    first = _direct(src, tmp_path / "a", num_shards=2)
    assert (first.trusted, sum(r.num_samples for r in first.written)) == (0, n)
    records = list((tmp_path / "cache").rglob(".checked.sqlite"))
    assert len(records) == 1 and str(src) in (records[0].parent / "release.txt").read_text()
    second = _direct(src, tmp_path / "b", num_shards=3)
    assert second.trusted == n and second.record == str(records[0])
    # the same samples as the pass that checked everything
    keys = pq.read_table(tmp_path / "a" / "index.parquet", columns=["key", "jpg_crc32"])
    keys2 = pq.read_table(tmp_path / "b" / "index.parquet", columns=["key", "jpg_crc32"])
    assert sorted(keys.to_pylist(), key=str) == sorted(keys2.to_pylist(), key=str)
    val_tar = src / "ILSVRC2012_img_val.tar"
    st = val_tar.stat()
    os.utime(val_tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # re-downloaded
    third = _direct(src, tmp_path / "c", num_shards=2)
    assert third.trusted == n - n_val  # the val members are checked again
    os.utime(val_tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tree_hash(src) == before


def test_sigkill_then_rerun_is_byte_identical(make_sample, tmp_path):
    """A `prep shard --src` killed mid-run (kill -9) resumes: the rerun keeps what was
    finished and ends with the bytes of an uninterrupted run."""
    src, _ = make_sample("ilsvrc2012-tar", classes=8, train_per_class=60, val_per_class=4,
                         size=96)
    ref = tmp_path / "ref"
    opts = ["--num-shards", "16", "--max-size", "64", "--workers", "1"]  # resized: slow
    cmd = [sys.executable, "-m", "prep.cli", "shard", "-q", "--src", str(src), *opts]
    assert subprocess.run([*cmd, "--out", str(ref)], capture_output=True).returncode == 0
    total = len(list(ref.glob("*.tar")))
    for attempt in range(3):  # a stalled test process can miss the window: try again
        out = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen([*cmd, "--out", str(out)], start_new_session=True)
        parts, deadline = out / ".prep-shard" / "parts", time.time() + 60
        while time.time() < deadline and len(list(parts.glob("train-*.json"))) < 3:
            time.sleep(0.01)
        sigkill_with_workers(proc)
        recorded, written = len(list(parts.glob("*.json"))), len(list(out.glob("*.tar")))
        if written < total:
            break
    assert recorded >= 3 and written < total and not (out / "_info.json").exists()
    rerun = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert int(re.search(r"kept (\d+) finished earlier", rerun.stdout).group(1)) >= recorded
    assert (out / "SHA256SUMS").read_bytes() == (ref / "SHA256SUMS").read_bytes()


def test_the_listing_in_worker_processes_equals_the_listing_here(make_sample):
    from prep.archive_listing import list_archives
    from prep.workers import process_pool

    src, _ = make_sample("ilsvrc2012-tar", bad_files=True, **SPEC)
    archives = {s: src / f"ILSVRC2012_img_{s}.tar" for s in ("train", "val")}
    here = list_archives(archives, progress=False)
    with process_pool(2) as pool:
        there = list_archives(archives, progress=False, pool=pool)
    assert here == there and sum(map(len, here.train.values())) == 24
    assert len(here.where["train"]) == 24 and len(here.where["val"]) == 12
