"""prep/crc.py: ISA-L's CRC-32, where isal is installed, gives zlib's values (the index's
`jpg_crc32` written before it, and by readers that use zlib, must still match)."""

import mmap
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from prep import crc


def test_isal_is_used_where_it_is_installed():
    from isal import isal_zlib  # a dependency of the toolkit

    assert crc.crc32 is isal_zlib.crc32


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=70_000), st.integers(0, 2**32 - 1))
def test_the_same_values_as_zlib(data, start):
    assert crc.crc32(data) == zlib.crc32(data)
    assert crc.crc32(data, start) == zlib.crc32(data, start)


def test_buffers_the_readers_hand_it(tmp_path):
    """The loader checks memory-mapped shard bytes (memoryview slices), not only bytes."""
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 1000)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)[1000:90_000]
        assert crc.crc32(view) == zlib.crc32(bytes(view))
        view.release()


def test_zlib_where_isal_is_missing():
    """The GPU machine has no package index: without isal, zlib's CRC-32 is used."""
    import subprocess
    import sys

    code = ("import sys, zlib; sys.modules['isal'] = None; sys.modules['isal.isal_zlib'] = None;"
            "from prep import crc; assert crc.crc32 is zlib.crc32")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
