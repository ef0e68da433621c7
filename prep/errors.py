"""The toolkit's error types, and the one place that turns them into `error: ...` lines.

Both entry points (`prep` and `train/main.py`) run through `exit_on_error`: a PrepError
prints one line naming the file and what to do, and exits 1; Ctrl-C prints `interrupted`
and exits 130, from whichever process it reaches (pool workers ignore SIGINT, see
`ignore_sigint`). A full or read-only disk that reaches it unnamed (torch's checkpoint
writer reports ENOSPC as a RuntimeError, for one) is one line too. Anything else is a bug
in the toolkit and keeps its traceback. Under torchrun the line also goes to the rank's
error file, so that torchrun's closing summary names it (`tell_torchrun`).

A program run by `run_program` ends within `EXIT_GRACE_S` of a Ctrl-C whatever it was doing,
and at once on a second Ctrl-C: KeyboardInterrupt can land inside the standard library's
own locks (a ThreadPoolExecutor's `with` block, seen hanging 1 Ctrl-C in 3 here), and the
unwinding then waits for that lock forever. A watchdog thread then prints the same one
line and ends the process with status 130 (pool workers die with it, see
prep.workers.die_with_parent; what a rerun must redo, such as a half-written shard, is
redone by the rerun).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")


class PrepError(Exception):
    """Bad input or a refused operation. The message names the file, what was
    expected and what to do; the CLI prints it without a traceback and exits 1."""


class WriteError(PrepError):
    """An output that cannot be written (prep.errors.write_error): the output's fault, not
    the input's, so no other reader of the input changes it."""


class SettingError(PrepError, ValueError):
    """A wrong setting, flag or recipe (also a ValueError, as the settings code raised)."""


class SampleError(PrepError, ValueError):
    """One sample that cannot be used (undecodable, 0x0, too many pixels); the message names
    shard, member and reason. Training skips it (up to max_skip_rate); evaluation stops."""


INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
INTERRUPTED_LINE = "interrupted: rerun the same command to continue where it stopped"
EXIT_GRACE_S = 10.0  # a program ends at most this long after a Ctrl-C (run_program)


def exit_on_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point: PrepError -> `error: ...` on stderr and exit 1; Ctrl-C ->
    `interrupted` and exit 130 (no traceback from any process), also when what reaches
    here after a Ctrl-C is another error the interrupt caused."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            _interrupted()
        except Exception as exc:
            if _ctrl_c_seen:  # raised by the unwinding: a lock a KeyboardInterrupt cut
                _interrupted()  # short ('release unlocked lock'), a stopped pool, ...
            if isinstance(exc, PrepError):  # SystemExit with a text: to stderr, status 1
                line = f"error: {worker_message(exc)}"
            else:
                disk = os_error_in(exc)
                if disk is None or disk.errno not in DISK_ERRNOS:
                    tell_torchrun(traceback.format_exc())  # a bug: its traceback, as @record
                    whole_lines_on_stderr()
                    raise
                line = f"error: {write_error(disk.filename or 'an output', disk)}"
            tell_torchrun(line)
            whole_lines_on_stderr()
            raise SystemExit(line) from None

    return run


def whole_lines_on_stderr() -> None:
    """From here on, each line on stderr goes out in one write. The interpreter prints
    SystemExit's text and its newline in two writes (a traceback, piece by piece), so the
    lines of ranks that fail at the same moment ran together in the shared log (`error: rank
    1: ...error: rank 2: ...`). Buffered up to each newline, they cannot. Called only on
    the way out: a progress bar's `\r` updates have no newline."""
    if sys.stderr is not sys.__stderr__:  # replaced (pytest's capture): not ours to change
        return
    reconfigure = getattr(sys.stderr, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(line_buffering=True, write_through=False)
        except (ValueError, OSError):  # closed, or a broken pipe on the flush
            pass


def exit_lost_peer(message: str) -> NoReturn:
    """`error: message` printed at once, then exit 1, for a rank that lost contact with
    another whose own error is the cause. Printed at once, not at the exit as
    exit_on_error's line is: torchrun sends SIGTERM to the other ranks as soon as the
    failing one has exited, and this one's exit comes after the process group's teardown.
    torchrun's summary must name the other's error, not this one (`follows`)."""
    line = f"error: {message}"
    tell_torchrun(line, follows=True)
    # one write: print() writes the newline apart, and the other ranks print theirs now too
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    raise SystemExit(1)


def tell_torchrun(line: str, follows: bool = False) -> None:
    """Under torchrun (TORCHELASTIC_ERROR_FILE set): the error line (a bug's traceback) into
    this rank's error file, where torchrun's closing summary reads it; without it the
    summary says only 'To enable traceback see: ...'. The summary's root cause is the
    failure with the earliest time, in whole seconds, the lowest rank on a tie: an error
    that another rank's caused (`follows`) is dated a second later, so a tie names the
    cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = str(int(time.time()) + int(follows))  # the format torch's own @record writes
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": stamp}}}, f)
    except OSError:
        pass  # the line is on stderr all the same (the disk may be the one that is full)


_ctrl_c_seen = False  # a Ctrl-C reached run_program's handler or interrupt_at_checks
_reported = False  # the interrupted line is printed (the watchdog must not print it again)
_watchdog_fd = -1  # write end of the watchdog's pipe: one byte per Ctrl-C


def _interrupted() -> None:
    global _reported
    print(INTERRUPTED_LINE, file=sys.stderr, flush=True)
    _reported = True
    raise SystemExit(INTERRUPTED) from None


def run_program(main: Callable[[], object]) -> None:
    """Run an entry point (wrapped in exit_on_error) as a program. A Ctrl-C raises
    KeyboardInterrupt and starts the exit deadline (see the module's docstring). Once
    `main` returns or raises, Ctrl-C is ignored (interpreter shutdown joins pool threads; a
    SIGINT there has nothing left to interrupt and would end the process silently with
    -SIGINT). A SIGINT that lands between the end of `main` and that switch, where
    exit_on_error no longer catches it, still gives the one `interrupted` line and exit
    status 130."""
    _start_watchdog()
    try:
        try:
            # a program started with Ctrl-C ignored (a shell's background job) keeps it so
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, _on_sigint)
            main()
        finally:
            ignore_sigint()
    except Exception:
        if not _ctrl_c_seen:
            raise
        ignore_sigint()
        _interrupted()
    except KeyboardInterrupt:
        ignore_sigint()
        _interrupted()


def note_interrupt() -> None:
    """Tell the exit watchdog (if this is a program run by run_program) that a Ctrl-C came:
    the first starts the deadline, the second ends the program now. For SIGINT handlers
    that defer the KeyboardInterrupt (prep.workers.interrupt_at_checks). Safe in a signal
    handler: one write(2), no lock."""
    global _ctrl_c_seen
    _ctrl_c_seen = True
    if _watchdog_fd >= 0:
        try:
            os.write(_watchdog_fd, b"!")
        except OSError:  # full (thousands of Ctrl-C) or closed: the deadline is running
            pass


def _on_sigint(signum: int, frame: object) -> None:
    note_interrupt()
    raise KeyboardInterrupt


def _start_watchdog() -> None:
    global _watchdog_fd
    if _watchdog_fd >= 0:
        return
    read_fd, _watchdog_fd = os.pipe()
    os.set_blocking(_watchdog_fd, False)
    threading.Thread(target=_watch, args=(read_fd,), daemon=True,
                     name="interrupt-deadline").start()


def _watch(read_fd: int) -> None:
    """Wait for a first Ctrl-C, then for a second one or the deadline; then end the process
    with the one line (unless the program printed it already) and status 130. os.write and
    os._exit: no lock the stuck main thread could hold (not sys.stderr's)."""
    os.read(read_fd, 1)
    select.select([read_fd], [], [], EXIT_GRACE_S)  # a second Ctrl-C, or the deadline
    if not _reported:
        os.write(2, f"{INTERRUPTED_LINE}\n".encode())
    os._exit(INTERRUPTED)


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


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the disk's state, never a bug


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError that is `exc` or that it was raised from or while handling (torch.save
    wraps a full disk's OSError in a RuntimeError); None without one."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [e.__context__, e.__cause__]
    return None


def write_error(path: str | os.PathLike, exc: OSError) -> WriteError:
    """An output that cannot be written: the disk or the folder's permissions, not the
    source."""
    what = ("the disk is full: free space (or choose another output) and rerun; what was "
            "written whole is kept" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "the file system is read-only: choose another output" if exc.errno == errno.EROFS
            else "check the folder's permissions")
    return WriteError(f"{path}: cannot write it ({exc.strerror or exc}); {what}")


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# a storage or web scheme with one slash or none (`s3:/bucket/x`, `gs:bucket`): a URL typed
# short, which a path would turn into a folder `s3:` here
_SHORT_URL = re.compile(r"(s3|s3a|s3n|gs|gcs|az|abfs|abfss|wasb|wasbs|adl|hdfs|http|https|ftp|"
                        r"sftp|file|hf|r2|oss|cos|swift|webdav):(?!//)", re.IGNORECASE)


def refuse_url(value: str | os.PathLike, flag: str) -> None:
    """A URL given where a local path is expected is refused, never taken for a path
    (`s3://bucket/x` would become the folder `s3:/bucket/x` here); so is a URL typed with
    one slash or none (`s3:/bucket/x`)."""
    text = os.fspath(value)
    if _URL.match(text):
        raise PrepError(f"{flag} {value}: a URL; this option takes a local path (object "
                        "storage and other URLs are not supported here)")
    short = _SHORT_URL.match(text)
    if short:
        raise PrepError(f"{flag} {value}: a URL without its '//' (did you mean "
                        f"{short[1]}://{text[short.end():].lstrip('/')}?); a local path here "
                        f"may not begin with '{short[0]}'")
