"""Progress of long work: a tqdm bar on a terminal, plain lines in a log file.

Under SLURM, `nohup` or any redirect, stderr is a file, and a bar's carriage-return updates
pile up into one giant line per epoch. There, `progress_bar` prints a plain line instead, at
most every `PREP_PROGRESS_SECONDS` seconds (default 30) and once at the end:

    epoch 3: 1,200/5,004 step (24%), 6.1 step/s, eta 10m23s; loss 2.345, lr 0.1000, img_s 781

Both kinds take the same calls (update, set_postfix, set_postfix_str, close, iteration).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm


def interval() -> float:
    try:
        return max(0.0, float(os.environ.get("PREP_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class PlainProgress:
    """tqdm's small API, writing one plain line per interval to `stream`."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None,
                 desc: str = "", unit: str = "it", stream: TextIO | None = None,
                 every: float | None = None) -> None:
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (
            len(iterable) if hasattr(iterable, "__len__") else None)
        self.stream = stream or sys.stderr
        self.every = interval() if every is None else every
        self.n, self.postfix, self.closed = 0, "", False
        self.start = self.last = time.monotonic()
        self.printed_at = -1

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._print(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.n / elapsed
        if self.unit == "B":  # bytes: in MB
            n, total, unit, rate_shown = self.n / 1e6, (self.total or 0) / 1e6, "MB", rate / 1e6
        else:
            n, total, unit, rate_shown = self.n, self.total or 0, self.unit, rate
        if self.total:
            done = f"{n:,.0f}/{total:,.0f} {unit} ({100 * self.n / self.total:.0f}%)"
            left = (self.total - self.n) / rate if rate > 0 else 0.0
            eta = f", eta {_duration(left)}" if self.n < self.total else \
                f", took {_duration(elapsed)}"
        else:
            done, eta = f"{n:,.0f} {unit}", f", {_duration(elapsed)}"
        tail = f"; {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done}, {rate_shown:,.1f} {unit}/s{eta}{tail}"

    def _print(self, now: float | None = None) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self.printed_at = self.n

    def close(self) -> None:
        if not self.closed and self.n and self.printed_at != self.n:
            self._print()
        self.closed = True


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it", disable: bool = False,
                 **tqdm_options: object) -> tqdm | PlainProgress:
    """A tqdm bar when stderr is a terminal, plain lines when it is a file (see above)."""
    from tqdm import tqdm

    if disable or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable,
                    **tqdm_options)
    return PlainProgress(iterable, total, desc, unit)


class SharedProgress:
    """Counters that worker processes advance and this process reads: one 8-byte slot per
    task in a small temporary file named with this process's pid (no message per item, no
    shared-memory tracker; the file of a process killed before `close` is removed by the
    next one). The workers write with WorkerProgress; `total()` sums the slots."""

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        _remove_orphans()
        self.fd, self.path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-")
        os.ftruncate(self.fd, 8 * self.slots)

    def total(self) -> int:
        return sum(self.values())

    def values(self) -> tuple[int, ...]:
        return struct.unpack(f"{self.slots}q", os.pread(self.fd, 8 * self.slots, 0))

    def close(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


PREFIX = "prep-progress-"  # then the owner's pid


def _remove_orphans() -> None:
    """The counter files of processes that are gone (killed before their `close`)."""
    folder = tempfile.gettempdir()
    for name in os.listdir(folder):
        pid = name[len(PREFIX):].split("-", 1)[0] if name.startswith(PREFIX) else ""
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


class WorkerProgress:
    """A worker's slot of a SharedProgress (`path` "" writes nothing): `set(value)`, at most
    10 times a second."""

    def __init__(self, path: str, slot: int) -> None:
        self.slot, self.next = slot, 0.0
        try:
            self.fd = os.open(path, os.O_WRONLY) if path else -1
        except OSError:  # the main process is gone or cleaned up: no progress to show
            self.fd = -1

    def set(self, value: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.fd >= 0 and (force or now >= self.next):
            self.next = now + 0.1
            os.pwrite(self.fd, struct.pack("q", value), 8 * self.slot)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileProgress:
    """An archive's progress (or a part's of `size` bytes), for a worker's slot of a
    SharedProgress: the bytes of its members read (and a header each), at most its size (a
    gzip archive of JPEGs is about as large as its contents)."""

    def __init__(self, size: int, progress: str, slot: int) -> None:
        self.size, self.n = size, 0
        self.shared = WorkerProgress(progress, slot)

    def add(self, nbytes: int) -> None:
        self.n += nbytes + 512
        self.shared.set(min(self.n, self.size))

    def close(self) -> None:
        self.shared.set(self.size, force=True)
        self.shared.close()
