import io
import subprocess
import tarfile

import pytest

from shards.tario import MTIME, RECORD, TarStream, member_header


class Buf(io.BytesIO):
    def writev(self, buffers):
        for b in buffers:
            self.write(b)


def _archive(members):
    buf = Buf()
    t = TarStream(buf)
    offsets = []
    for name, data in members:
        offsets.append(t.offset)
        t.add(name, data)
    t.close()
    return buf.getvalue(), offsets


def test_tarfile_reads_members_metadata_and_offsets():
    members = [("a.cls", b"7"), ("a.jpg", bytes(range(256)) * 5), ("b.json", b"{}")]
    raw, offsets = _archive(members)
    assert len(raw) % RECORD == 0
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        infos = t.getmembers()
        assert [(m.name, t.extractfile(m).read()) for m in infos] == members
        assert [m.offset for m in infos] == offsets
        assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname, m.type) for m in infos} == {
            (MTIME, 0o444, 0, 0, "", "", tarfile.REGTYPE)}


def test_header_equals_pythons_ustar_header():
    ti = tarfile.TarInfo("n01440764_10026.jpg")
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = 123456, MTIME, 0o444, "", ""
    assert member_header("n01440764_10026.jpg", 123456) == ti.tobuf(tarfile.USTAR_FORMAT)


def test_gnu_tar_lists_it(tmp_path):
    raw, _ = _archive([("x.jpg", b"abc"), ("x.cls", b"1")])
    (tmp_path / "s.tar").write_bytes(raw)
    out = subprocess.run(["tar", "-tvf", str(tmp_path / "s.tar")], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert [line.split()[-1] for line in out] == ["x.jpg", "x.cls"]


def test_long_names_refused():
    with pytest.raises(ValueError, match="longer than 100"):
        member_header("x" * 101, 1)
