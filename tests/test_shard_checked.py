"""prep/checked.py: a reshard of sources the strict check passed before checks them not
again, writes the same bytes, and checks again any file changed since, even one whose size
and modification time were kept."""

import os
import sqlite3

import pytest

from prep import jpeg
from prep.checked import NAME
from prep.errors import PrepError
from shards.build import ShardSettings, shard_dataset
from tests.conftest import sha256_files

pytestmark = pytest.mark.skipif(not jpeg.available(),
                                reason="the strict JPEG check (prep/jpegcheck.c) was not built")


def _shard(data, out, **settings):
    return shard_dataset(data, out, ShardSettings(**settings), workers=1, progress=False)


def _samples(r) -> int:
    return sum(s["num_samples"] for s in r.info["splits"].values())


# the C pass-through writer, and the Python one (resizing re-encodes every image)
WRITERS = pytest.mark.parametrize("max_size", [None, 40], ids=["C", "Python"])


@WRITERS
def test_a_reshard_trusts_what_was_checked_and_writes_the_same_shards(prepared, tmp_path,
                                                                       max_size):
    data, _ = prepared("ilsvrc2017")
    first = _shard(data, tmp_path / "s1", num_shards=2, max_size=max_size)
    assert first.trusted == 0 and (data / NAME).is_file()
    assert not list((tmp_path / "s1").glob("*.sqlite"))  # kept with the view, not in OUT
    again = _shard(data, tmp_path / "s2", num_shards=3, max_size=max_size)
    assert again.trusted == _samples(again) > 0
    (data / NAME).unlink()
    fresh = _shard(data, tmp_path / "s3", num_shards=3, max_size=max_size)
    assert fresh.trusted == 0
    assert sha256_files((tmp_path / "s2").glob("*.tar")) == \
        sha256_files((tmp_path / "s3").glob("*.tar"))


def test_a_header_only_run_neither_trusts_nor_records(prepared, tmp_path):
    data, _ = prepared("ilsvrc2017")
    r = _shard(data, tmp_path / "s1", num_shards=2, check="header")
    assert r.trusted == 0 and not (data / NAME).exists()
    assert _shard(data, tmp_path / "s2", num_shards=2).trusted == 0


def _cut_short(path):
    """Same size, an EOI marker in the middle of the entropy data: Pillow and the header
    check take it; only the strict check finds it (premature end of data)."""
    raw = path.read_bytes()
    scan = raw.index(b"\xff\xda")  # start of scan: the entropy data follows its header
    mid = (scan + len(raw)) // 2
    bad = raw[:mid] + b"\xff\xd9" + raw[mid + 2 :]
    assert jpeg.strict_problem(bad) and not jpeg.strict_problem(raw)
    path.write_bytes(bad)


@WRITERS
@pytest.mark.parametrize("how", ["rewritten", "mtime put back", "replaced, mtime put back"])
def test_a_source_changed_since_its_check_is_checked_again(prepared, tmp_path, how, max_size):
    data, _ = prepared("ilsvrc2017")
    _shard(data, tmp_path / "s1", num_shards=2, max_size=max_size)
    first = (data / "meta/train.txt").read_text().split()[0]
    target = data / "train" / first
    before = os.stat(target)
    if how.startswith("replaced"):
        new = target.with_name(".new")
        new.write_bytes(target.read_bytes())
        _cut_short(new)
        os.replace(new, target)
    else:
        _cut_short(target)
    if "mtime put back" in how:
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(target)
    assert after.st_size == before.st_size
    with pytest.raises(PrepError, match="premature end of data") as e:
        _shard(data, tmp_path / "s2", num_shards=3, max_size=max_size)
    assert first in str(e.value)


def test_a_record_from_a_view_that_cannot_be_written_is_no_error(prepared, tmp_path):
    """A damaged record file: the run checks everything and still writes its shards."""
    data, _ = prepared("ilsvrc2017")
    (data / NAME).write_bytes(b"not a database")
    r = _shard(data, tmp_path / "s1", num_shards=2)
    assert r.trusted == 0 and _samples(r) > 0
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(data / NAME).execute("SELECT * FROM checked").fetchall()


@pytest.mark.parametrize("layout", ["ilsvrc2017", "kaggle"])
def test_what_prep_imagenet_check_full_passed_is_not_checked_again(make_sample, tmp_path,
                                                                   layout):
    from prep.imagenet import prepare_imagenet

    src, _ = make_sample(layout)
    prepare_imagenet(src, tmp_path / "data", check="full", progress=False, workers=1)
    data = tmp_path / "data/imagenet"
    r = _shard(data, tmp_path / "s1", num_shards=2)
    splits = r.info["splits"]  # --check full decodes train and val (through the val links)
    assert r.trusted == splits["train"]["num_samples"] + splits["validation"]["num_samples"]
    assert r.trusted > 0


def test_the_record_answers_for_more_paths_than_one_query_holds(tmp_path):
    """A shard of thousands of samples asks for thousands of paths at once (SQLite before
    3.32 takes at most 999 parameters a query)."""
    from prep.checked import CheckedRecord

    record = CheckedRecord(tmp_path, strict=True)
    rows = [(f"train/n0/{i}.JPEG", i + 1, 2, 3, 4, 5) for i in range(2500)]
    record.add(rows)
    got = record.trusted([r[0] for r in rows] + ["train/n0/missing.JPEG"])
    record.close()
    assert got == {r[0]: tuple(r[1:]) for r in rows}
