"""`prep imagenet --extract-to` of the compressed releases (prep/packed.py): one worker per
file, and a tar.gz with more than one worker's share of the bytes (the face-blurred train
archive) inflated on that share of the cores through rapidgzip, which only speeds up: the
files and every verdict are those of ISA-L's one reader."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prep import gzindex, packed
from prep.errors import PrepError, WriteError
from prep.imagenet import prepare_imagenet
from tests.conftest import tmpfs, tree_hash

BIG = dict(classes=4, train_per_class=40, val_per_class=3, size=256)  # 3.4 MB of train
needs_rapidgzip = pytest.mark.skipif(not gzindex.available(),
                                     reason="rapidgzip is not installed")


def contents(root: Path) -> dict[str, str]:
    """Each file under `root` (by its path) -> the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout, many", [("blurred-tar", 2), ("hf-tar", 4)])
def test_extraction_on_several_cores_writes_what_one_reader_writes(make_sample, tmp_path,
                                                                    layout, many):
    """The same extracted files and the same view with 1 worker (ISA-L) and with more
    (the train archive on 2 threads, rapidgzip where installed); the source untouched."""
    src, _ = make_sample(layout, **BIG)
    before = tree_hash(src)
    got = []
    for workers in (1, many):
        prepare_imagenet(src, tmp_path / f"v{workers}", extract_to=tmp_path / f"x{workers}",
                         progress=False, workers=workers)
        meta = tmp_path / f"v{workers}" / "imagenet" / "meta"
        got.append((contents(tmp_path / f"x{workers}"), (meta / "train.txt").read_text(),
                    (meta / "val.txt").read_text()))
    assert got[0] == got[1] and len(got[0][0]) > 160
    assert tree_hash(src) == before


@pytest.mark.parametrize("how", ["half", "block", "trailer", "junk", "crc"])
def test_a_damaged_archive_gets_the_verdict_of_one_reader(make_sample, tmp_path, how):
    """rapidgzip reads some damage without an error (a file cut at the end of a deflate
    block, bytes after the gzip data): the extraction on 2 workers gives the error that
    ISA-L's one reader gives."""
    src, _ = make_sample("blurred-tar", **BIG)
    archive = src / "train_blurred.tar.gz"
    raw = archive.read_bytes()
    archive.write_bytes({"half": raw[: len(raw) // 2], "block": raw[:5000],
                         "trailer": raw[:-4], "junk": raw + b"junkjunk",
                         "crc": raw[:-8] + bytes([raw[-8] ^ 1]) + raw[-7:]}[how])
    errors = []
    for workers in (1, 2):
        with pytest.raises(PrepError) as got:
            prepare_imagenet(src, tmp_path / f"v{workers}",
                             extract_to=tmp_path / f"x{workers}", progress=False,
                             workers=workers)
        errors.append(str(got.value))
    assert errors[0] == errors[1] and f"{archive}: truncated or corrupt" in errors[0]


def test_a_cut_archive_is_one_line_from_the_cli(make_sample, tmp_path):
    """rapidgzip prints a line of its own when the gzip trailer is cut off; the user sees
    only prep's one line, exit 1."""
    src, _ = make_sample("blurred-tar", **BIG)
    archive = src / "train_blurred.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-4])
    r = subprocess.run([sys.executable, "-m", "prep.cli", "imagenet", "-q", "--src", str(src),
                        "--link", str(tmp_path / "data"), "--extract-to", str(tmp_path / "x"),
                        "--workers", "2"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {archive}: truncated or corrupt"), r.stderr


def _doubt(*_args):
    raise gzindex.Unsure("as a cut trailer would")


@needs_rapidgzip
def test_a_read_that_cannot_be_trusted_writes_every_file_again(make_sample, tmp_path,
                                                              monkeypatch):
    """rapidgzip's read of the train archive ends in doubt: the archive is read again
    through ISA-L and every file written again, also one that a resumed run would keep
    (here: one of the right size with other bytes, as a misread would leave it)."""
    src, _ = make_sample("blurred-tar", **BIG)
    archive = src / "train_blurred.tar.gz"
    ref, part = tmp_path / "ref", tmp_path / "part"
    ref.mkdir()
    packed._extract_file("blurred", archive, "train", ref, 1)
    victim = sorted(p for p in ref.rglob("*") if p.is_file())[7].relative_to(ref)
    for p in ref.rglob("*"):
        if p.is_file():
            (part / p.relative_to(ref)).parent.mkdir(parents=True, exist_ok=True)
            (part / p.relative_to(ref)).write_bytes(p.read_bytes())
    (part / victim).write_bytes(b"\0" * (ref / victim).stat().st_size)
    reads = []
    write = packed._write
    monkeypatch.setattr(packed, "_write", lambda *a: reads.append(a[-1]) or write(*a))
    monkeypatch.setattr(gzindex, "_check_end", _doubt)
    out = packed._extract_file("blurred", archive, "train", part, 2)
    assert reads == [False, True] and out.files == 160
    assert contents(part) == contents(ref)


@needs_rapidgzip
def test_a_full_disk_is_named_without_a_second_read(make_sample, tmp_path, monkeypatch):
    """A full disk under --extract-to is the output's fault: rapidgzip's read stops with the
    disk's error, and the archive is not read again through ISA-L to find the same."""
    src, _ = make_sample("blurred-tar", **BIG)
    reads = []
    write = packed._write
    monkeypatch.setattr(packed, "_write", lambda *a: reads.append(a[-1]) or write(*a))
    with tmpfs(tmp_path / "mnt", "size=1m") as small:
        with pytest.raises(WriteError, match="the disk is full"):
            packed._extract_file("blurred", src / "train_blurred.tar.gz", "train", small, 2)
        assert reads == [False] and not list(small.rglob("*.tmp"))
    assert not os.path.ismount(tmp_path / "mnt")
