"""Build and load the small C libraries used through ctypes (prep/jpegcheck.c,
shards/tarpack.c, train/jpeg_region.c), each next to its source; scripts/setup.sh runs
`python -m <module>` for each."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path


def build_library(source: Path, library: Path, libs: tuple[str, ...] = ()) -> Path:
    """cc -O2 -shared source -> library, written under a temp name then renamed."""
    tmp = library.with_suffix(".so.partial")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(tmp), str(source), *libs],
                   check=True)
    tmp.replace(library)
    return library


def main(source: Path, library: Path, libs: tuple[str, ...], without: str) -> None:
    """Build, or say what runs instead (`without`) and exit 1."""
    try:
        print(f"built {build_library(source, library, libs)}")
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"{source.name}: not built ({exc}); {without}", file=sys.stderr)
        sys.exit(1)


def load(library: Path, function: str, restype: object, argtypes: list, *,
         abi: tuple[str, int] | None = None, use_errno: bool = False) -> ctypes.CDLL | None:
    """`library` with `function`'s signature declared; None when it is not built, does not
    load here (built on another machine), or was built from an older source: `abi` (name,
    value) names a function returning the version of the call signature, which must match."""
    if not library.exists():
        return None
    try:
        lib = ctypes.CDLL(str(library), use_errno=use_errno)
    except OSError:
        return None
    if abi is not None and (not hasattr(lib, abi[0]) or getattr(lib, abi[0])() != abi[1]):
        return None  # `make setup` rebuilds it
    fn = getattr(lib, function)
    fn.restype, fn.argtypes = restype, argtypes
    return lib
