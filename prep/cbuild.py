"""Build the small C libraries loaded with ctypes (shards/tarpack.c, train/jpeg_region.c),
each next to its source; scripts/setup.sh runs `python -m <module>` for each."""

from __future__ import annotations

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
