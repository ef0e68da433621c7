"""The memory-mapped shard reader gives exactly what webdataset gives, and clear errors."""

import io
import tarfile

import pytest
import webdataset as wds
from hypothesis import given
from hypothesis import strategies as st

from prep.tarheaders import header_checksum
from shards.tarread import ShardError, samples
from tests.conftest import sharded_sample


def _as_dicts(it):
    return [{k: bytes(v) if isinstance(v, (bytes, memoryview)) else v for k, v in s.items()}
            for s in it]


def test_same_samples_as_webdataset(tmp_path):
    shards = sharded_sample(tmp_path, "ilsvrc2017", 2, classes=3, train_per_class=4,
                            val_per_class=2, test_images=0, size=32)
    for tar in sorted(shards.glob("*.tar")):
        ours = _as_dicts(samples(str(tar)))
        theirs = _as_dicts(wds.tarfile_to_samples()([{"url": str(tar)}]))
        assert ours == theirs and len(ours) > 0
        kept = _as_dicts(samples(str(tar), keep=("jpg", "cls")))
        assert [sorted(s) for s in kept] == [["__key__", "__url__", "cls", "jpg"]] * len(ours)


def _tar(members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        t.addfile(tarfile.TarInfo("somedir"))  # a non-file member is skipped
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_pax_and_gnu_and_meta_members(tmp_path, fmt):
    deep = "d" * 60 + "/" + "e" * 50 + "/" + "k" * 30  # > 100 bytes: prefix, pax or GNU L
    members = [("__index__", b"{}"), (".hidden.jpg", b"?"),
               (f"{deep}.jpg", b"J1"), (f"{deep}.CLS", b"3"),
               ("b.x.jpg", b"J2"), ("b.x.cls", b"4")]
    path = tmp_path / "t.tar"
    path.write_bytes(_tar(members, fmt))
    got = _as_dicts(samples(str(path)))
    assert got == [{"__key__": deep, "__url__": str(path), "jpg": b"J1", "cls": b"3"},
                   {"__key__": "b", "__url__": str(path), "x.jpg": b"J2", "x.cls": b"4"}]
    assert got == _as_dicts(wds.tarfile_to_samples()([{"url": str(path)}]))


def test_truncated_shard_names_file_and_member_and_keeps_earlier_samples(tmp_path):
    data = _tar([("a.jpg", b"x" * 3000), ("a.cls", b"1"), ("b.jpg", b"y" * 3000)])
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:6000])  # ends inside b.jpg (headers: dir, a.jpg, a.cls, b.jpg)
    it = samples(str(path))
    with pytest.raises(ShardError, match=r"cut\.tar: truncated: member b\.jpg"):
        got = [next(it)]
        got.append(next(it))
    assert got[0]["__key__"] == "a"


def test_damaged_header_and_empty_file(tmp_path):
    data = bytearray(_tar([("a.jpg", b"x" * 10)]))
    data[512 + 5] ^= 0xFF  # a byte of the second header (a.jpg) name
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"bad\.tar: damaged tar header at offset \d+"):
        list(samples(str(bad)))
    wiped = bytearray(_tar([("a.jpg", b"x" * 10), ("a.cls", b"1"), ("b.jpg", b"y" * 10)]))
    with tarfile.open(fileobj=io.BytesIO(bytes(wiped))) as t:
        at = t.getmembers()[-2].offset
    wiped[at:at + 512] = bytes(512)  # a header wiped to zeros: members still follow it
    bad.write_bytes(bytes(wiped))
    with pytest.raises(ShardError, match=rf"bad\.tar: damaged tar header at offset {at}"):
        list(samples(str(bad)))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(ShardError, match="empty.tar: empty file"):
        list(samples(str(empty)))


@given(st.binary(min_size=512, max_size=512))
def test_header_checksum_is_the_byte_sum(header):
    assert header_checksum(header) == sum(header) - sum(header[148:156]) + 8 * 32


def test_header_checksum_matches_tarfile():
    for name in ("a.jpg", "n01440764/" + "x" * 90 + ".JPEG"):
        info = tarfile.TarInfo(name)
        info.size, info.mtime = 123456, 1700000000
        header = info.tobuf(tarfile.USTAR_FORMAT)
        assert header_checksum(header[:512]) == int(header[148:154], 8)
    assert header_checksum(b"\xff" * 512) == 512 * 255 - 8 * 255 + 256
