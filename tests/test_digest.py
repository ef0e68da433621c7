"""The shard checksum is computed on a helper thread from the file as written."""

import hashlib
import os
import threading

import pytest

from shards import digest as dg
from shards.tario import FdSink, TarStream


@pytest.mark.parametrize("chunk", [4096, 1 << 16, dg.CHUNK])
def test_digest_matches_the_file(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(dg, "CHUNK", chunk)  # chunk boundaries inside and across members
    path = tmp_path / "x.tar"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    d = dg.BackgroundDigest(path, fd)
    tar = TarStream(FdSink(fd, d))
    for i in range(200):
        tar.add(f"k{i}.jpg", os.urandom(i * 523 % 70_000))
    tar.close()
    got = d.hexdigest()
    os.close(fd)
    assert got == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not any(t.name == "shard-digest" and t.is_alive() for t in threading.enumerate())


def test_digest_reports_a_file_cut_behind_its_back(tmp_path, monkeypatch):
    monkeypatch.setattr(dg, "CHUNK", 4096)
    path = tmp_path / "x.tar"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    d = dg.BackgroundDigest(path, fd)
    os.write(fd, b"x" * 10_000)
    os.ftruncate(fd, 100)  # e.g. another process truncated it
    d.advance(10_000)
    with pytest.raises(OSError, match="shorter than written"):
        d.hexdigest()
    d.close()  # idempotent after an error
    os.close(fd)


def test_close_without_hexdigest_stops_the_thread(tmp_path):
    path = tmp_path / "x.tar"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    d = dg.BackgroundDigest(path, fd)
    d.close()
    d.close()
    os.close(fd)
    assert not d._thread.is_alive()
