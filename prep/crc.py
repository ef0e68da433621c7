"""CRC-32 of image bytes, as zlib defines it (the index's `jpg_crc32`): ISA-L's where `isal`
is installed (a dependency; 51 KB in ~1 us against zlib's ~12 us here), else zlib's (the GPU
machine has no package index). Both give the same values (tests/test_crc.py)."""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32

__all__ = ["crc32"]
