"""The toolkit's error types, and the one place that turns them into `error: ...` lines.

Both entry points (`prep` and `train/main.py`) run through `exit_on_error`: a PrepError
prints one line naming the file and what to do, and exits 1; Ctrl-C prints `interrupted`
and exits 130, from whichever process it reaches (pool workers ignore SIGINT, see
`ignore_sigint`). Anything else is a bug in the toolkit and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class PrepError(Exception):
    """Bad input or a refused operation. The message names the file, what was
    expected and what to do; the CLI prints it without a traceback and exits 1."""


class SettingError(PrepError, ValueError):
    """A wrong setting, flag or recipe (also a ValueError, as the settings code raised)."""


class SampleError(PrepError, ValueError):
    """One sample that cannot be used (undecodable, 0x0, too many pixels); the message names
    shard, member and reason. Training skips it (up to max_skip_rate); evaluation stops."""


INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def exit_on_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point: PrepError -> `error: ...` on stderr and exit 1; Ctrl-C ->
    `interrupted` and exit 130 (no traceback from any process)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PrepError as exc:  # SystemExit with a text: printed to stderr, exit status 1
            raise SystemExit(f"error: {worker_message(exc)}") from None
        except KeyboardInterrupt:
            _interrupted()

    return run


def _interrupted() -> None:
    print("interrupted: rerun the same command to continue where it stopped",
          file=sys.stderr, flush=True)
    raise SystemExit(INTERRUPTED) from None


def run_program(main: Callable[[], object]) -> None:
    """Run an entry point (wrapped in exit_on_error) as a program. Once it returns or
    raises, Ctrl-C is ignored (interpreter shutdown joins pool threads; a SIGINT there
    has nothing left to interrupt and would end the process silently with -SIGINT). A
    SIGINT that lands between the end of `main` and that switch, where exit_on_error no
    longer catches it, still gives the one `interrupted` line and exit status 130."""
    try:
        try:
            main()
        finally:
            ignore_sigint()
    except KeyboardInterrupt:
        ignore_sigint()
        _interrupted()


def worker_message(exc: BaseException) -> str:
    """The message of an error raised in a DataLoader worker, without the worker traceback
    that torch puts into the re-raised error's text."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last


def ignore_sigint() -> None:
    """Ignore Ctrl-C. Pool workers (initializer): the main process stops the pool and
    prints one line (a worker would otherwise print its own KeyboardInterrupt traceback).
    A program whose work is done and reported: see run_program."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both paths name one existing file (also through links and hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwrite(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None],
                     flag: str) -> None:
    """Refuse an output path that resolves to one of the inputs (same file, also through
    links): `--out best.pt` with `--checkpoint best.pt` would replace the weights."""
    for what, path in inputs.items():
        if path is not None and (same_file(out, path) or
                                 os.path.realpath(out) == os.path.realpath(path)):
            raise PrepError(f"{flag} {out}: is the {what} ({path}); writing there would "
                            "destroy it. Choose another output path")


def refuse_inside(out: str | os.PathLike, sources: dict[str, str | os.PathLike | None],
                  flag: str) -> None:
    """Refuse an output that resolves inside a source tree (following links): nothing is
    ever written into a source."""
    real = os.path.realpath(out)
    for what, src in sources.items():
        if src is None or not os.path.exists(src):
            continue
        root = os.path.realpath(src)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            raise PrepError(f"{flag} {out}: resolves to {real}, inside the {what} "
                            f"({src} -> {root}); nothing is written into a source. "
                            "Choose a directory outside it, e.g. ./out/shards")


def read_error(path: str | os.PathLike, exc: OSError) -> PrepError:
    """A source file or folder that cannot be read: named, with the cause (nothing was
    written, so never the disk's space)."""
    return PrepError(f"{path}: cannot read it ({exc.strerror or exc}); check its permissions "
                     "(sources are only read, never changed)")


def write_error(path: str | os.PathLike, exc: OSError) -> PrepError:
    """An output that cannot be written: the disk or the folder's permissions, not the
    source."""
    what = ("the disk is full: free space (or choose another output) and rerun; what was "
            "written whole is kept" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "the file system is read-only: choose another output" if exc.errno == errno.EROFS
            else "check the folder's permissions")
    return PrepError(f"{path}: cannot write it ({exc.strerror or exc}); {what}")


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def refuse_url(value: str | os.PathLike, flag: str) -> None:
    """A URL given where a local path is expected is refused, never taken for a path
    (`s3://bucket/x` would become the folder `s3:/bucket/x` here)."""
    if _URL.match(os.fspath(value)):
        raise PrepError(f"{flag} {value}: a URL; this option takes a local path (object "
                        "storage and other URLs are not supported here)")
