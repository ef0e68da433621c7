import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from prep.cli import main
from prep.cli import main as prep_main
from prep.errors import PrepError
from prep.imagenet import prepare_imagenet
from prep.synth import encode_jpeg, render_class_image
from shards.build import ShardSettings, shard_dataset
from tests.conftest import (
    set_jpeg_size,
    sha256_files,
    sigkill_with_workers,
    tmpfs,
    tree_hash,
)

ROOT = Path(__file__).resolve().parents[1]


def _shard(data, out, workers=1, **kw):
    rng = kw.pop("shard_range", (0, 1))
    force = kw.pop("force", False)
    return shard_dataset(data, out, ShardSettings(**kw), workers=workers, shard_range=rng,
                         force=force, progress=False)


def test_manifest_and_samples(prepared, tmp_path):
    data, plan = prepared()
    r = _shard(data, tmp_path / "shards", num_shards=3)
    out = tmp_path / "shards"
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 20
    assert info["splits"]["train"]["filenames"] == [f"train-00000{i}.tar" for i in range(3)]
    assert sum(info["splits"]["validation"]["shard_lengths"]) == 15  # timm/HF/TFDS name
    assert info["splits"]["test"]["num_samples"] == 2
    assert info["prep"]["settings"]["num_shards"] == 3 and info["prep"]["tool"]
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert info["splits"]["test"]["filenames"] == ["test-000000.tar", "test-000001.tar"]
    assert len(sums) == 8 and all(len(line.split("  ")[0]) == 64 for line in sums)
    wids = json.loads((out / "train.shardindex.json").read_text())
    assert wids["__kind__"] == "wids-shard-index-v1"
    assert [s["nsamples"] for s in wids["shardlist"]] == info["splits"]["train"]["shard_lengths"]
    assert len(r.written) == 8  # 3 train + 3 val + 2 test (never an empty shard)
    with tarfile.open(out / "val-000000.tar") as t:
        members = t.getmembers()
        names = [m.name for m in members]
        first = sorted(plan.val)[0]
        assert names[:3] == [f"{first}.cls", f"{first}.jpg", f"{first}.json"]
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(1335830400, 0, 0, 0o444)}
        raw_meta = t.extractfile(names[2]).read()
        meta = json.loads(raw_meta)
        assert raw_meta == json.dumps(meta, sort_keys=True).encode()  # canonical bytes
        assert meta["wnid"] == plan.val[first] and meta["source"] == f"val/{plan.val[first]}/" \
            f"{first}.JPEG"
        src_bytes = (data / "val" / plan.val[first] / f"{first}.JPEG").read_bytes()
        assert t.extractfile(names[1]).read() == src_bytes  # stored byte for byte


def test_parquet_index_points_at_members(prepared, tmp_path):
    import pyarrow.parquet as pq

    data, _ = prepared()
    out = tmp_path / "s"
    _shard(data, out, num_shards=2)
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert len(rows) == 20 + 15 + 2
    row = next(r for r in rows if r["split"] == "train")
    with open(out / row["shard"], "rb") as f:
        f.seek(row["offset"])
        header = f.read(512)
    assert header[:100].rstrip(b"\0").decode() == f"{row['key']}.cls"
    assert {r["repaired"] for r in rows} == {""}


def test_parquet_index_is_the_records_rows_with_its_types(prepared, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, _ = prepared()
    r = _shard(data, tmp_path / "s", num_shards=3)
    table = pq.read_table(tmp_path / "s" / "index.parquet")
    s, i64, i32 = pa.string(), pa.int64(), pa.int32()
    assert table.schema.names == ["key", "split", "shard", "offset", "jpg_bytes", "jpg_crc32",
                                  "label", "wnid", "width", "height", "repaired", "source"]
    assert table.schema.types == [s, s, s, i64, i64, i64, i32, s, i32, i32, s, s]
    recs = sorted(r.written, key=lambda rec: rec.name)
    assert table.to_pydict() == {c: [v for rec in recs for v in rec.rows[c]]
                                 for c in table.schema.names}
    assert table.num_rows == 37


def test_string_column_refuses_a_newline_and_takes_none():
    from shards.manifest import _string_column

    assert _string_column([]).to_pylist() == []
    assert _string_column(["a", "é", ""]).to_pylist() == ["a", "é", ""]
    with pytest.raises(ValueError, match="newline"):
        _string_column(["a\nb"])


def test_prep_shard_does_not_import_pandas(prepared, tmp_path):
    pytest.importorskip("pandas")  # pyarrow imports it on its first pa.array when present
    data, _ = prepared()
    code = ("import sys; from prep.cli import main; main(['shard', '-q', '--data', sys.argv[1], "
            "'--out', sys.argv[2]], standalone_mode=False); print('pandas' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(data), str(tmp_path / "s")],
                       capture_output=True, text=True, check=True)
    assert r.stdout.split()[-1] == "False"  # 0.45 s and 0.9 s of CPU saved per run here
    assert (tmp_path / "s" / "index.parquet").is_file()


def test_byte_identical_whatever_the_worker_count(prepared, tmp_path):
    data, _ = prepared(classes=6)
    _shard(data, tmp_path / "a", workers=1, num_shards=4)
    _shard(data, tmp_path / "b", workers=2, num_shards=4)
    a, b = tmp_path / "a", tmp_path / "b"
    assert sha256_files(a.glob("*.tar")) == sha256_files(b.glob("*.tar"))
    for name in ("SHA256SUMS", "train.shardindex.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_rerun_does_nothing_and_resume_after_loss(prepared, tmp_path):
    data, _ = prepared()
    out = tmp_path / "s"
    _shard(data, out, num_shards=3)
    before = sha256_files(out.glob("*.tar"))
    again = _shard(data, out, num_shards=3)
    assert again.written == [] and again.kept == 8
    # what a kill leaves: a .partial, a shard without its record, a record without a shard
    (out / "train-000001.tar").rename(out / "train-000001.tar.partial")
    (out / ".prep-shard/parts/val-000002.tar.json").unlink()
    (out / "test-000000.tar").unlink()
    old = out / ".prep-shard/parts/train-000000.tar.json"  # a record not written whole
    rec = json.loads(old.read_text())
    old.write_text(json.dumps({**rec, "rows": [dict(zip(rec["rows"], v))
                                              for v in zip(*rec["rows"].values())]}))
    r = _shard(data, out, num_shards=3)
    assert sorted(x.name for x in r.written) == ["test-000000.tar", "train-000000.tar",
                                                  "train-000001.tar", "val-000002.tar"]
    assert sha256_files(out.glob("*.tar")) == before
    assert not list(out.glob("*.partial"))


def test_sigkill_then_rerun_is_byte_identical(make_sample, tmp_path):

    src, _ = make_sample("ilsvrc2017", classes=8, train_per_class=60, size=96)
    prepare_imagenet(src, tmp_path / "data", progress=False, workers=1)
    data = tmp_path / "data/imagenet"
    ref = tmp_path / "ref"
    _shard(data, ref, num_shards=16, max_size=64)  # resizing: shards slow enough to kill
    total = len(list(ref.glob("*.tar")))
    for attempt in range(3):  # a stalled test process can miss the window: try again
        out = tmp_path / f"killed{attempt}"
        cmd = [sys.executable, "-m", "prep.cli", "shard", "-q", "--data", str(data), "--out",
               str(out), "--num-shards", "16", "--max-size", "64", "--workers", "1"]
        proc = subprocess.Popen(cmd, start_new_session=True)
        deadline = time.time() + 60
        parts = out / ".prep-shard" / "parts"  # a shard's record is saved once it is done
        while time.time() < deadline and len(list(parts.glob("train-*.json"))) < 3:
            time.sleep(0.01)
        assert not sigkill_with_workers(proc)  # the main process only, as the OOM killer
        recorded = len(list(parts.glob("*.json")))
        written = len(list(out.glob("*.tar")))
        if written < total:  # killed mid-run (a records-at-the-end bug never gets here)
            break
    assert recorded >= 3 and written < total  # records come as shards finish, not at the end
    assert not (out / "_info.json").exists()  # never looks finished
    rerun = subprocess.run(cmd, capture_output=True, text=True)  # the lock died with it
    assert rerun.returncode == 0, rerun.stderr
    kept = int(re.search(r"kept (\d+) finished earlier", rerun.stdout).group(1))
    assert kept >= recorded  # the rerun did not redo the shards finished before the kill
    assert sha256_files(out.glob("*.tar")) == sha256_files(ref.glob("*.tar"))
    assert (out / "SHA256SUMS").read_bytes() == (ref / "SHA256SUMS").read_bytes()


def test_shard_range_parts_then_finalize_equal_one_run(prepared, tmp_path):
    data, _ = prepared()
    _shard(data, tmp_path / "one", num_shards=3)
    parts = tmp_path / "parts"
    r0 = _shard(data, parts, num_shards=3, shard_range=(0, 2))
    assert r0.pending > 0 and r0.info is None and not (parts / "_info.json").exists()
    r1 = _shard(data, parts, num_shards=3, shard_range=(1, 2))
    assert r1.pending == 0 and r1.info is not None
    for name in ("SHA256SUMS", "_info.json", "train.shardindex.json"):
        assert (parts / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    fin = CliRunner().invoke(main, ["shard", "-q", "--data", str(data), "--out", str(parts),
                                    "--num-shards", "3", "--finalize"])
    assert fin.exit_code == 0, fin.output


def test_finalize_refuses_unfinished(prepared, tmp_path):
    data, _ = prepared()
    _shard(data, tmp_path / "p", num_shards=3, shard_range=(0, 3))
    r = CliRunner().invoke(main, ["shard", "-q", "--data", str(data), "--out",
                                  str(tmp_path / "p"), "--num-shards", "3", "--finalize"])
    assert r.exit_code != 0 and "not finished yet" in r.output


def test_other_options_refused_unless_force(prepared, tmp_path):
    data, _ = prepared()
    out = tmp_path / "s"
    _shard(data, out, num_shards=3)
    before = sha256_files(out.glob("*.tar"))
    with pytest.raises(PrepError, match="differs .input or options"):
        _shard(data, out, num_shards=2)
    assert sha256_files(out.glob("*.tar")) == before
    _shard(data, out, num_shards=2, force=True)
    assert len(list(out.glob("train-*.tar"))) == 2


def test_foreign_tars_refused(prepared, tmp_path):
    data, _ = prepared()
    out = tmp_path / "s"
    out.mkdir()
    (out / "mine.tar").write_bytes(b"x")
    with pytest.raises(PrepError, match="not made by prep shard"):
        _shard(data, out)
    assert (out / "mine.tar").read_bytes() == b"x"


def test_repairs_and_errors(prepared, tmp_path):
    data, plan = prepared("ilsvrc2012", bad_files=True)
    bad = {k: s for s, k in plan.bad.items()}
    with pytest.raises(PrepError, match=rf"{bad['truncated']}.JPEG: (cannot decode|not an "
                       r"image).*--on-error skip"):
        _shard(data, tmp_path / "fail", num_shards=2)
    assert not list((tmp_path / "fail").glob("*.partial"))
    r = _shard(data, tmp_path / "skip", num_shards=2, on_error="skip")
    prep = r.info["prep"]
    assert prep["repairs"] == {"cmyk": 1, "grayscale": 1, "png": 1}
    assert len(prep["skipped"]) == 1 and bad["truncated"] in prep["skipped"][0]
    assert r.info["splits"]["train"]["num_samples"] == 19


def test_missing_image_named_with_meta_line(prepared, tmp_path):
    data, plan = prepared()
    w = plan.wnids[0]
    victim = sorted((data / "train" / w).iterdir())[0]
    victim.unlink()  # (the sample tree is the test's own copy)
    with pytest.raises(PrepError, match=r"meta/train.txt:1: .* does not exist"):
        _shard(data, tmp_path / "s")


def test_disk_error_leaves_no_partial(prepared, tmp_path, monkeypatch):
    import errno

    import shards.write as w
    from shards.plan import assign
    from shards.source import read_classes, read_samples

    data, _ = prepared()
    monkeypatch.setattr(w.tarpack, "_lib", None)  # the Python writer (C: tests/test_disk_full)
    real = os.writev

    def full(fd, bufs):  # the disk fills up after 4 KB
        if os.lseek(fd, 0, os.SEEK_CUR) > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs)

    monkeypatch.setattr(os, "writev", full)
    plan = assign("train", read_samples(data, "train", read_classes(data)), 1, 0)[0]
    out = tmp_path / "s"
    out.mkdir()
    with pytest.raises(PrepError, match="No space left on device.*no partial shard"):
        w.write_shard(plan, data, out, ShardSettings())
    assert list(out.iterdir()) == []


def test_cli_summary(prepared, tmp_path):
    data, _ = prepared()
    r = CliRunner().invoke(main, ["shard", "-q", "--data", str(data), "--out",
                                  str(tmp_path / "s"), "--samples-per-shard", "8"])
    assert r.exit_code == 0, r.output
    assert "wrote 6 shards" in r.output
    assert re.search(r"train +20 samples in +3 shards \(6\.\.7 per shard\)", r.output)
    assert r.output.index(" train ") < r.output.index(" validation ") < r.output.index(" test ")


def test_read_only_out_is_one_line(prepared, tmp_path):
    data, _ = prepared()
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        r = CliRunner().invoke(main, ["shard", "-q", "--data", str(data), "--out", str(ro),
                                      "--workers", "1"])
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert r.output.strip() == f"error: {ro}: cannot write it (Read-only file system); " \
            "the file system is read-only: choose another output"


def test_unreadable_source_image_is_not_blamed_on_the_disk(prepared, shared_tmp):
    """Reading the source failed, not writing the shard: the error says which."""
    import shutil

    from tests.conftest import as_nobody

    data, plan = prepared()
    src = data.parent.parent / "src-ilsvrc2017"
    shutil.copytree(src, shared_tmp / "src-ilsvrc2017", symlinks=True)
    for d, _, _ in os.walk(shared_tmp):
        os.chmod(d, 0o777)
    view = shared_tmp / "data"
    prepare = [sys.executable, "-c", "import sys; from prep.imagenet import prepare_imagenet;"
               f"prepare_imagenet({str(shared_tmp / 'src-ilsvrc2017')!r}, {str(view)!r}, "
               "progress=False, workers=1)"]
    assert as_nobody(prepare, cwd=ROOT).returncode == 0
    w = plan.wnids[0]
    locked = shared_tmp / "src-ilsvrc2017/Data/CLS-LOC/train" / w / f"{plan.train[w][0]}.JPEG"
    locked.chmod(0o000)
    script = ("from pathlib import Path; from prep.errors import PrepError\n"
              "from shards.build import ShardSettings, make_plans\n"
              "from shards.write import write_shard\n"
              f"data, out = Path({str(view / 'imagenet')!r}), Path({str(shared_tmp / 's')!r})\n"
              "out.mkdir()\n"
              "try:\n"
              "    [write_shard(p, data, out, ShardSettings()) for p in "
              "make_plans(data, ShardSettings(num_shards=1))[1]]\n"
              "except PrepError as exc:\n"
              "    print(exc)\n")
    r = as_nobody([sys.executable, "-c", script], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "cannot read it (Permission denied)" in r.stdout and locked.name in r.stdout
    assert "write" not in r.stdout and "free space" not in r.stdout
    assert not list((shared_tmp / "s").glob("*.partial"))


USER_FILES = {"photos-202405.tar.gz": b"family photos", "train-000000.tar.bak": b"my backup",
              "notes.txt": b"do not delete", "val-000007.tar.old": b"older shard"}


def test_force_removes_only_what_prep_wrote(prepared, tmp_path):
    data, _ = prepared()
    out = tmp_path / "s"
    _shard(data, out, num_shards=3)
    for name, content in USER_FILES.items():
        (out / name).write_bytes(content)
    with pytest.raises(PrepError) as info:
        _shard(data, out, num_shards=2)
    message = str(info.value)
    assert "--force to remove the" in message and "train-000000.tar" in message
    assert "photos-202405" not in message and "notes.txt" not in message
    _shard(data, out, num_shards=2, force=True)
    for name, content in USER_FILES.items():
        assert (out / name).read_bytes() == content, name
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar",
                                                               "train-000001.tar"]


@pytest.mark.parametrize("name", ["laion-000001.tar", "train-000000.tar", "index.parquet",
                                  "SHA256SUMS", "_info.json", "train.shardindex.json"])
@pytest.mark.parametrize("force", [False, True])
def test_user_files_with_prep_names_are_never_replaced(prepared, tmp_path, name, force):
    data, _ = prepared()
    out = tmp_path / "s"
    out.mkdir()
    (out / name).write_bytes(b"the user's own")
    with pytest.raises(PrepError, match=rf"not made by prep shard \({name}\)"):
        _shard(data, out, num_shards=2, force=force)
    assert (out / name).read_bytes() == b"the user's own"


def test_user_manifest_file_put_into_a_finished_output_is_not_replaced(prepared, tmp_path):
    data, _ = prepared()
    out = tmp_path / "s"
    _shard(data, out, num_shards=2)
    (out / "SHA256SUMS").write_bytes(b"edited by the user\n")
    with pytest.raises(PrepError, match=r"SHA256SUMS"):
        _shard(data, out, num_shards=2)
    assert (out / "SHA256SUMS").read_bytes() == b"edited by the user\n"


def test_shard_out_through_a_link_into_the_source_is_refused(prepared, tmp_path):
    data, _ = prepared()
    src = tmp_path / "src-ilsvrc2017"
    before = tree_hash(src)
    link = data.parent / src.name  # the view's own link to the source (DIR/ILSVRC2017)
    for out in (data / "train", data / "train" / "shards", data / "val", data / "shards",
                data / ".src-val" / "x", src / "shards", link / "shards",
                data / ".." / src.name / "x", src / "Data" / "shards"):
        r = CliRunner().invoke(prep_main, ["shard", "-q", "--data", str(data), "--out",
                                           str(out), "--workers", "1"])
        assert r.exit_code == 1 and "nothing is written into a source" in r.output, r.output
    assert tree_hash(src) == before


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from shards.build import output_lock
    with output_lock(Path({out!r}), ({part}, {nparts}), exclusive=False):
        print("locked", flush=True)
        time.sleep(60)
""")


def _hold(out: Path, part: int, nparts: int) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    code = HOLD.format(root=str(ROOT), out=str(out), part=part, nparts=nparts)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_of_one_output_gets_a_clear_error(prepared, tmp_path):
    data, _ = prepared()
    out = tmp_path / "s"
    proc = _hold(out, 0, 1)  # a whole run in progress
    try:
        for kwargs in ({}, {"force": True, "num_shards": 5}, {"shard_range": (1, 2)}):
            with pytest.raises(PrepError, match=rf"another `prep shard` is writing it \(pid "
                               rf"{proc.pid} on "):
                _shard(data, out, **kwargs)
    finally:
        proc.kill()
        proc.wait()
    _shard(data, out)  # the lock dies with its process


def test_shard_range_parts_run_side_by_side_but_not_twice(prepared, tmp_path):
    data, _ = prepared()
    out = tmp_path / "s"
    proc = _hold(out, 0, 2)  # part 0/2 is running
    try:
        r = _shard(data, out, num_shards=2, shard_range=(1, 2))  # part 1/2 runs beside it
        assert r.written and r.pending
        with pytest.raises(PrepError, match="another `prep shard` is writing it"):
            _shard(data, out, num_shards=2, shard_range=(0, 2))
        with pytest.raises(PrepError, match="another `prep shard` is writing it"):
            _shard(data, out, num_shards=2)  # a whole run must wait for the parts
    finally:
        proc.kill()
        proc.wait()
    r = _shard(data, out, num_shards=2, shard_range=(0, 2))
    assert r.info is not None  # the last part writes the manifest


@pytest.mark.slow
def test_two_real_runs_on_one_output(make_sample, tmp_path):
    """Two `prep shard` processes at once: one finishes, the other stops with a clear error
    naming it (never a misleading disk-space error, never a wrong digest kept)."""
    from shards.verify import verify_shards

    src, _ = make_sample("ilsvrc2017", classes=8, train_per_class=80, size=160)
    prepare_imagenet(src, tmp_path / "data", progress=False, workers=1)
    data, out = tmp_path / "data/imagenet", tmp_path / "s"
    cmd = [sys.executable, "-m", "prep.cli", "shard", "-q", "--data", str(data), "--out",
           str(out), "--num-shards", "24", "--max-size", "32", "--workers", "1"]
    first = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(out.glob(".prep-shard/parts/*.json")) and time.time() < deadline:
        time.sleep(0.01)  # the first run is writing shards
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    first_err = first.communicate(timeout=120)[1]
    results = sorted([(first.returncode, first_err), (second.returncode, second.stderr)])
    if results[1][0] == 0:  # the first finished before the second started: try is moot
        pytest.skip("the first run ended before the second one started")
    assert results[0][0] == 0
    assert "another `prep shard` is writing it (pid" in results[1][1], results[1][1]
    assert "space" not in results[1][1] and "Traceback" not in results[1][1]
    assert verify_shards(out, progress=False).ok


def test_resume_redoes_a_shard_another_process_replaced(prepared, tmp_path):
    data, _ = prepared()
    out = tmp_path / "s"
    _shard(data, out, num_shards=3)
    before = sha256_files(out.glob("*.tar"))
    tar = out / "train-000001.tar"
    mixed = bytearray(tar.read_bytes())
    mixed[2000:2010] = b"0123456789"  # same size, other bytes: what a race leaves
    tmp = out / "x.tmp"
    tmp.write_bytes(bytes(mixed))
    os.replace(tmp, tar)
    r = _shard(data, out, num_shards=3)
    assert [x.name for x in r.written] == ["train-000001.tar"]
    assert sha256_files(out.glob("*.tar")) == before


def test_resume_notices_a_replaced_source_image(prepared, tmp_path):
    from shards.tarread import samples

    data, _ = prepared()
    out = tmp_path / "s"
    _shard(data, out, num_shards=3)
    first = (data / "meta/train.txt").read_text().split()[0]
    new = encode_jpeg(render_class_image(2, 5, np.random.default_rng(99), 32))
    time.sleep(0.01)
    (data / "train" / first).write_bytes(new)
    r = _shard(data, out, num_shards=3)
    assert len(r.written) == 1 and r.written[0].split == "train"
    key = Path(first).stem
    stored = [s["jpg"] for t in out.glob("train-*.tar") for s in samples(str(t))
              if s["__key__"] == key]
    assert stored == [new]
    again = _shard(data, out, num_shards=3)
    assert again.written == []


def _patch_first_sof(path: Path, width: int, height: int) -> None:
    data = bytearray(path.read_bytes())
    set_jpeg_size(data, width, height)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("size", [(0, 40), (40, 0), (20000, 20000)])
def test_pass_through_applies_on_error_to_bad_sizes(prepared, tmp_path, size):
    data, _ = prepared()
    first = (data / "meta/train.txt").read_text().split()[0]
    _patch_first_sof(data / "train" / first, *size)
    with pytest.raises(PrepError, match=rf"{first}: image is {size[0]}x{size[1]}.*--on-error"):
        shard_dataset(data, tmp_path / "fail", ShardSettings(num_shards=2), progress=False)
    r = shard_dataset(data, tmp_path / "skip", ShardSettings(num_shards=2, on_error="skip"),
                      progress=False)
    assert any(first in s for s in r.info["prep"]["skipped"])
