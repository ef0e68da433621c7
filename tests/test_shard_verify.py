import io
import tarfile

import pytest
from click.testing import CliRunner

from prep.cli import main
from prep.errors import PrepError
from prep.imagenet import prepare_imagenet
from shards.build import ShardSettings, shard_dataset
from tests.conftest import set_jpeg_size, truncated_with_eoi


@pytest.fixture
def shards(prepared, tmp_path):
    data, _ = prepared()
    out = tmp_path / "shards"
    shard_dataset(data, out, ShardSettings(num_shards=2), workers=1, progress=False)
    return out


def verify(out, *extra):
    r = CliRunner().invoke(main, ["verify", "-q", "--workers", "1", str(out), *extra])
    return r.exit_code, r.output


def test_clean_shards_verify(shards):
    code, out = verify(shards, "--deep")
    assert code == 0 and "9 shards... " not in out and ": OK" in out and "37 samples" in out


def test_flipped_byte_is_found(shards):
    p = shards / "train-000001.tar"
    data = bytearray(p.read_bytes())
    data[5000] ^= 0xFF
    p.write_bytes(bytes(data))
    code, out = verify(shards)
    assert code == 1 and "train-000001.tar: sha256 differs" in out


def _rewrite(path, drop_ext=None, jpg=None):
    """Rewrite a shard without one member type, or with broken jpg bytes."""
    src = tarfile.open(fileobj=io.BytesIO(path.read_bytes()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if drop_ext and m.name.endswith(drop_ext):
                continue
            if jpg is not None and m.name.endswith(".jpg"):
                data = jpg
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return src.getmembers()[0].name.split(".")[0]


def test_missing_cls_is_pinpointed(shards):
    key = _rewrite(shards / "val-000000.tar", drop_ext=".cls")
    code, out = verify(shards)
    assert code == 1 and f"val-000000.tar: sample {key}: no cls member" in out


def test_undecodable_jpg_found_by_deep(shards):
    key = _rewrite(shards / "train-000000.tar", jpg=b"\xff\xd8\xff garbage")
    code, out = verify(shards)
    assert code == 1 and "sha256 differs" in out
    code, out = verify(shards, "--deep")
    assert f"train-000000.tar: member {key}.jpg: cannot decode" in out


def test_truncated_tar(shards):
    p = shards / "train-000000.tar"
    p.write_bytes(p.read_bytes()[:3000])
    code, out = verify(shards)
    assert code == 1 and "train-000000.tar" in out and "samples, manifest says" in out


def test_missing_manifest(tmp_path):
    code, out = verify(tmp_path)
    assert code != 0 and "_info.json: missing" in out


def _rewrite_index(shards, change):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(shards / "index.parquet").to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows), shards / "index.parquet")


def test_index_rows_with_swapped_sources_are_found(shards):
    """The ILSVRC export once put each prediction on the other image's line from this."""
    def swap(rows):
        i, j = [k for k, r in enumerate(rows) if r["split"] == "val"][:2]
        rows[i]["source"], rows[j]["source"] = rows[j]["source"], rows[i]["source"]

    _rewrite_index(shards, swap)
    code, out = verify(shards)
    assert code == 1 and "index.parquet: row 0 of val-000000.tar says source =" in out


@pytest.mark.parametrize("column,value", [("label", 3), ("jpg_crc32", 12345),
                                          ("offset", 7), ("key", "other")])
def test_index_rows_that_differ_from_the_shards_are_found(shards, column, value):
    def change(rows):
        r = next(r for r in rows if r["split"] == "train")
        r[column] = value if r[column] != value else value + 1

    _rewrite_index(shards, change)
    code, out = verify(shards)
    assert code == 1 and f"of train-000000.tar says {column} = " in out


def test_wids_index_and_unlisted_tars_are_checked(shards):
    import json

    wids = shards / "train.shardindex.json"
    doc = json.loads(wids.read_text())
    doc["shardlist"][1]["nsamples"] += 1
    wids.write_text(json.dumps(doc))
    (shards / "train-000099.tar").write_bytes((shards / "train-000000.tar").read_bytes())
    code, out = verify(shards)
    assert code == 1
    assert "train.shardindex.json: lists ('train-000001.tar'" in out
    assert "train-000099.tar: in " in out and "but not in _info.json" in out


def test_plain_verify_flags_bad_sizes_in_shards(prepared, tmp_path):
    from shards.tarread import members
    from shards.verify import verify_shards

    data, _ = prepared()
    out = tmp_path / "s"
    shard_dataset(data, out, ShardSettings(num_shards=2), progress=False)
    tar = out / "train-000000.tar"
    buf = bytearray(tar.read_bytes())
    name, start, _ = next(m for m in members(bytes(buf), str(tar)) if m[0].endswith(".jpg"))
    set_jpeg_size(buf, 0, 0, start)
    tar.write_bytes(bytes(buf))
    r = verify_shards(out, deep=False, progress=False)
    assert any(f"member {name}: image is 0x0 pixels" in p for p in r.problems), r.problems


def _plant(prepared_data, data: bytes):
    """Overwrite the first train image of a prepared view's source with `data`."""
    first = (prepared_data / "meta/train.txt").read_text().split()[0]
    target = prepared_data / "train" / first
    target.write_bytes(data)
    return first


def test_truncated_jpeg_with_eoi_in_check_full_shard_and_verify(prepared, tmp_path):
    from prep import jpeg
    from shards.build import ShardSettings, shard_dataset
    from shards.verify import verify_shards

    if not jpeg.available():
        pytest.skip("the strict JPEG check (prep/jpegcheck.c) was not built")
    data, plan = prepared("ilsvrc2017")
    name = _plant(data, truncated_with_eoi())
    report = prepare_imagenet(tmp_path / "src-ilsvrc2017", tmp_path / "data", check="full",
                              progress=False, workers=1)
    assert any(name.split("/")[1] in u and "premature" in u
               for u in report.problems.undecodable)
    with pytest.raises(PrepError, match="premature end of data.*--on-error skip"):
        shard_dataset(data, tmp_path / "s1", ShardSettings(num_shards=2), progress=False)
    r = shard_dataset(data, tmp_path / "s2", ShardSettings(num_shards=2, on_error="skip"),
                      progress=False)
    assert any(name in s for s in r.info["prep"]["skipped"])
    # let it in on purpose (--check header), then the deep verify must find it
    shard_dataset(data, tmp_path / "s3", ShardSettings(num_shards=2, check="header"),
                  progress=False)
    assert verify_shards(tmp_path / "s3", deep=False, progress=False).ok
    deep = verify_shards(tmp_path / "s3", deep=True, progress=False)
    assert not deep.ok and any("premature end of data" in p for p in deep.problems)
