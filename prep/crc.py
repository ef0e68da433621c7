"""CRC-32 of image bytes, as zlib defines it (the index's `jpg_crc32`): ISA-L's where `isal`
is installed (a dependency; 51 KB in ~1 us against zlib's ~12 us here), else zlib's (the GPU
machine has no package index). Both give the same values (tests/test_crc.py)."""

from __future__ import annotations

import ctypes
import functools

try:
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32

__all__ = ["crc32", "crc_function_address"]


@functools.cache
def crc_function_address() -> int | None:
    """The address of ISA-L's C function `crc32_gzip_refl(init, buf, len)`, which the
    `isal_zlib` extension exports (zlib's values, ~10x faster), for C code that computes
    CRC-32s (shards/tarpack.c); None without isal (the C code then uses zlib's)."""
    try:
        from isal import isal_zlib

        return ctypes.cast(ctypes.CDLL(isal_zlib.__file__).crc32_gzip_refl,
                           ctypes.c_void_p).value
    except (ImportError, OSError, AttributeError):
        return None
