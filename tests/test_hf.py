"""prep/hf.py: the Hugging Face tar and Parquet releases. What a release must hold before
anything is extracted, and when an earlier extraction may be reused."""

import io
import os
import tarfile

import pytest
from click.testing import CliRunner

from prep.cli import main as prep_main
from prep.errors import PrepError
from prep.imagenet import prepare_imagenet
from prep.sample import SampleSpec, write_sample
from tests.conftest import tree_hash

SPEC = SampleSpec(classes=4, train_per_class=5, val_per_class=3, size=32)


def _release(tmp_path, layout):
    src = tmp_path / "src"
    plan = write_sample(src, layout, SPEC, progress=False)
    return src, plan


def _prep(src, tmp_path):
    return prepare_imagenet(src, tmp_path / "data", extract_to=tmp_path / "x",
                            progress=False, workers=2)


def _cli(src, tmp_path):
    r = CliRunner().invoke(prep_main, ["imagenet", "-q", "--workers", "1", "--src", str(src),
                                       "--link", str(tmp_path / "data"), "--extract-to",
                                       str(tmp_path / "x")])
    assert "Traceback" not in r.output
    return r


def _rewrite(path, change):
    import pyarrow.parquet as pq

    pq.write_table(change(pq.read_table(path)), path)


def _parquet(src, pattern):
    return sorted((src / "data").glob(pattern))


def test_partial_parquet_download_is_refused(tmp_path):
    src, _ = _release(tmp_path, "hf-parquet")
    _parquet(src, "train-00001-of-00002.parquet")[0].unlink()
    r = _cli(src, tmp_path)
    assert r.exit_code == 1
    assert "train-00001-of-00002.parquet is missing" in r.output
    assert not (tmp_path / "x").exists()


def test_partial_tar_download_is_refused(tmp_path):
    src, _ = _release(tmp_path, "hf-tar")
    (src / "train_images_0.tar.gz").unlink()
    r = _cli(src, tmp_path)
    assert r.exit_code == 1 and "train_images_0.tar.gz is missing" in r.output


def _tar_gz(path, members):
    with tarfile.open(path, "w:gz") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _members(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t]


def test_empty_val_archive_is_refused(tmp_path):
    src, _ = _release(tmp_path, "hf-tar")
    _tar_gz(src / "val_images.tar.gz", [])
    r = _cli(src, tmp_path)
    assert r.exit_code == 1 and "val_images.tar.gz: no images in it" in r.output
    assert not (tmp_path / "x/val").exists()


def test_two_val_members_with_one_stem_are_refused_naming_both(tmp_path):
    """Different WNID suffixes, one original name: the first picture would be kept under
    the second label."""
    src, plan = _release(tmp_path, "hf-tar")
    members = _members(src / "val_images.tar.gz")
    stem, wnid = sorted(plan.val.items())[0]
    other = next(w for w in plan.wnids if w != wnid)
    members.append((f"{stem}_{other}.JPEG", members[1][1]))
    _tar_gz(src / "val_images.tar.gz", members)
    r = _cli(src, tmp_path)
    assert r.exit_code == 1
    assert f"{stem}_{wnid}.JPEG' (#" in r.output and f"{stem}_{other}.JPEG' (#" in r.output
    assert f"would both be extracted as {stem}.JPEG" in r.output


def test_jpg_beside_JPEG_in_two_train_archives_is_refused(tmp_path):  # noqa: N802
    src, plan = _release(tmp_path, "hf-tar")
    first = _members(src / "train_images_0.tar.gz")
    name, data = first[0]
    second = _members(src / "train_images_1.tar.gz")
    second.append((name.replace(".JPEG", ".jpg"), data + b"other"))
    _tar_gz(src / "train_images_1.tar.gz", second)
    r = _cli(src, tmp_path)
    assert r.exit_code == 1
    assert "train_images_0.tar.gz" in r.output and "train_images_1.tar.gz" in r.output
    assert "would both be extracted as" in r.output


def test_two_parquet_rows_with_one_name_are_refused(tmp_path):
    import pyarrow as pa

    src, _ = _release(tmp_path, "hf-parquet")
    a, b = _parquet(src, "train-*.parquet")
    import pyarrow.parquet as pq

    row = pq.read_table(a).slice(0, 1)
    _rewrite(b, lambda t: pa.concat_tables([t, row]))
    r = _cli(src, tmp_path)
    assert r.exit_code == 1 and "would both be extracted as" in r.output
    assert "train-00000-of-00002.parquet row 0" in r.output
    assert "train-00001-of-00002.parquet row" in r.output


def test_rerun_after_the_source_changed_is_not_up_to_date(tmp_path):
    """A row moved to another class (same sizes): the rerun must not say 'up to date'."""
    import pyarrow.compute as pc

    src, _ = _release(tmp_path, "hf-parquet")
    _prep(src, tmp_path)
    path = _parquet(src, "train-00000-*.parquet")[0]
    _rewrite(path, lambda t: t.set_column(1, "label", pc.multiply(t["label"], 1)))
    os.utime(path, ns=(1, 10**18))
    with pytest.raises(PrepError, match=r"x/train: extracted from .*train-00000-of-00002"
                       r".parquet as it was before"):
        _prep(src, tmp_path)


def test_a_parquet_file_added_since_is_seen(tmp_path):
    import pyarrow.parquet as pq

    src, _ = _release(tmp_path, "hf-parquet")
    _prep(src, tmp_path)
    (val,) = _parquet(src, "validation-*.parquet")  # the split now comes in two files
    table = pq.read_table(val)
    val.unlink()
    pq.write_table(table.slice(0, 6), src / "data/validation-00000-of-00002.parquet")
    pq.write_table(table.slice(6), src / "data/validation-00001-of-00002.parquet")
    with pytest.raises(PrepError, match=r"x/val: extracted from .*; the source has changed "
                       r"since. Remove .*x/val and rerun"):
        _prep(src, tmp_path)


@pytest.mark.parametrize("damage", ["null bytes", "plain binary", "no path"])
def test_odd_image_columns_are_one_line_errors(tmp_path, damage):
    import pyarrow as pa

    src, _ = _release(tmp_path, "hf-parquet")
    path = _parquet(src, "validation-*.parquet")[0]

    def change(t):
        image = t["image"].combine_chunks()
        if damage == "null bytes":
            blobs = image.field("bytes").to_pylist()
            blobs[1] = None
            new = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()),
                                              image.field("path")], ["bytes", "path"])
        elif damage == "plain binary":
            new = image.field("bytes")
        else:
            new = pa.StructArray.from_arrays([image.field("bytes")], ["bytes"])
        return t.set_column(0, "image", new)

    _rewrite(path, change)
    r = _cli(src, tmp_path)
    assert r.exit_code == 1, r.output
    expected = {"null bytes": "row 1: 'ILSVRC2012_val_", "plain binary": ": schema",
                "no path": ": schema"}[damage]
    assert expected in r.output and "validation-00000-of-00001.parquet" in r.output
    if damage == "null bytes":
        assert "has no image bytes" in r.output


def test_damaged_val_record_is_a_clear_error(tmp_path):
    src, _ = _release(tmp_path, "hf-tar")
    _prep(src, tmp_path)
    (tmp_path / "x/.val.extracted.json").write_text("{not json")
    r = _cli(src, tmp_path)
    assert r.exit_code == 1 and ".val.extracted.json: damaged" in r.output


def test_a_user_file_named_val_in_extract_to_is_kept(tmp_path):
    src, _ = _release(tmp_path, "hf-tar")
    (tmp_path / "x").mkdir()
    (tmp_path / "x/val").write_text("mine")
    before = tree_hash(src)
    r = _cli(src, tmp_path)
    assert r.exit_code == 1 and "x/val: exists and is not a folder" in r.output
    assert (tmp_path / "x/val").read_text() == "mine" and tree_hash(src) == before


def test_a_parquet_file_is_read_a_batch_at_a_time_not_whole(tmp_path):
    """Arrow's default read-ahead (pre_buffer) held a whole file's image column in memory
    per reader (269 MB of Arrow memory for a 227 MB file); ImageNet's Parquet files are
    read by several workers at once."""
    import subprocess
    import sys

    src = tmp_path / "src"
    write_sample(src, "hf-parquet", SampleSpec(classes=4, train_per_class=1500,
                                                val_per_class=1, size=32), progress=False)
    path = _parquet(src, "train-*.parquet")[0]
    code = ("import sys, pyarrow as pa; from pathlib import Path; "
            "from prep.hf import release_members; "
            "n = sum(len(m.data) for m in release_members('hf-parquet', Path(sys.argv[1]), "
            "'train')); print(n, pa.default_memory_pool().max_memory())")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, check=True).stdout.split()
    image_bytes, peak = int(out[0]), int(out[1])
    assert image_bytes > 3_000_000  # rows for many batches (256 rows each)
    assert peak < image_bytes / 3, (peak, image_bytes)
