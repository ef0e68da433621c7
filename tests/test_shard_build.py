import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from prep.cli import main
from prep.errors import PrepError
from shards.build import ShardSettings, shard_dataset
from tests.conftest import descendants, running, sha256_files, tmpfs

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
    from prep.imagenet import prepare_imagenet

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
        family = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer does
        proc.wait()
        deadline = time.time() + 10  # its workers follow it (prep.workers.die_with_parent)
        while time.time() < deadline and any(running(p) for p in family):
            time.sleep(0.02)
        assert [p for p in family if running(p)] == []
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
