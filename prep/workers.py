"""The one way the toolkit starts worker processes, and their set-up.

Workers are never forked from the process that asks for them: that process may run threads
(a thread pool listing files, the digest thread of `prep shard`, TensorBoard's writer,
torch's process-group threads), and a child forked while another thread holds a lock (the
import lock, a logging or malloc lock) waits on it forever. Measured: `prep imagenet` hung
in 2 of 9 runs when its pool was forked from a thread. So every pool (`process_pool`) and
every DataLoader (`worker_context`) uses a `forkserver`: one clean, single-threaded process
started by exec, from which the workers are forked. It costs one server start per command
(+14 ms for a tiny `prep imagenet`; ~3 s once per trainer run, where the server imports
torch): modules named in `preload` are imported there once, not per worker.

Workers die with the main process (`die_with_parent`), also after `kill -9` (the OOM
killer). Forked from a process started by exec, they inherit none of the main process's
file descriptors (the `prep shard` lock included).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from contextlib import contextmanager
from multiprocessing import forkserver
from multiprocessing.context import BaseContext
from typing import TypeVar

from prep.errors import ignore_sigint, note_interrupt
from prep.progress import SharedProgress, progress_bar

T = TypeVar("T")
R = TypeVar("R")


def worker_context(preload: Iterable[str] = ()) -> BaseContext:
    """The multiprocessing context of every worker process (see the module's docstring).
    `preload`: modules the forkserver imports once (honoured when it is first started)."""
    ctx = multiprocessing.get_context("forkserver")
    # __main__ first: the server imports the entry script once, so the children it forks
    # find it imported and skip re-running it (spawn's rule); a script without a
    # `__name__ == "__main__"` guard would otherwise run again in every worker
    ctx.set_forkserver_preload(["__main__", "prep.workers", *preload])
    # Started now, with SIGINT ignored for the few ms of the spawn call: an ignored signal
    # stays ignored across exec, and Python then installs no KeyboardInterrupt handler, so
    # a Ctrl-C sent to the process group cannot kill the server, or a worker it forks,
    # half-started with a traceback (the signal mask would not do: the server's start
    # clears it). A Ctrl-C inside those few ms is lost; the next one works.
    # SIGUSR1 likewise: SLURM's preemption warning (`--signal=USR1@...`) reaches every
    # process of the job, and its default action would end the server and the workers.
    # SIGTERM too: SLURM's preemption, and torchrun's shutdown (it signals each rank's
    # process group), would end the server, and torch's DataLoader workers quit as soon as
    # their parent (the server) is gone, failing the step the trainer is finishing. The
    # server still ends with its last client (it watches a pipe); the workers take SIGTERM
    # back (pool_worker_init, terminate_only_from).
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, signal.SIG_IGN)
                    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)}
        try:
            forkserver.ensure_running()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return ctx


STOP_S = 2.0  # WorkerPool.stop: a worker not gone this long after SIGTERM is killed


class WorkerPool(ProcessPoolExecutor):
    """A ProcessPoolExecutor that an error or Ctrl-C stops at once (`stop`), also when it
    lands while the pool is still starting (a plain shutdown then raises 'cannot join
    thread before it is started')."""

    def stop(self) -> None:
        """End the workers (gone before the caller cleans up what they were writing) and
        drop pending work, within STOP_S. SIGTERM first; SIGKILL for a worker still there
        after STOP_S: one forked a moment ago has SIGTERM ignored (from the forkserver)
        until pool_worker_init takes it back, and loses the SIGTERM."""
        procs = list((getattr(self, "_processes", None) or {}).values())
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + STOP_S
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=STOP_S)
        manager = getattr(self, "_executor_manager_thread", None)
        self.shutdown(wait=False, cancel_futures=True)
        # its workers gone, the manager thread ends at once; joined here, not at the
        # interpreter's exit, which then races it for the pool's wake-up pipe (Python
        # 3.11: 'Exception ignored ... Bad file descriptor', 1 Ctrl-C in ~150)
        if manager is not None and manager.is_alive():
            manager.join(timeout=STOP_S)

    def __exit__(self, exc_type: type | None, *rest: object) -> bool:
        if exc_type is None:
            return super().__exit__(exc_type, *rest)
        self.stop()
        return False


def process_pool(workers: int, preload: Iterable[str] = ()) -> WorkerPool:
    """A pool of `workers` image-handling processes: forkserver-started, SIGINT ignored,
    image buffers kept in the heap, killed with the main process."""
    return WorkerPool(max(1, workers), mp_context=worker_context(preload),
                      initializer=pool_worker_init, initargs=(os.getpid(),))


@contextmanager
def interrupt_at_checks() -> Iterator[Callable[[], None]]:
    """Within it Ctrl-C is recorded, and raised as KeyboardInterrupt by the `check` it
    yields, at a point the caller chose. Raised anywhere else, it can land inside
    concurrent.futures.wait() while that takes each future's lock in turn: a lock stays held
    and the pool's manager thread, and the exit that joins it, wait forever (seen: 1 in ~20
    Ctrl-C of `prep shard`). Signal handlers live in the main thread: elsewhere `check`
    does nothing (the main thread takes the Ctrl-C), as where Ctrl-C is ignored (a
    background job). A Ctrl-C still starts the program's exit deadline
    (prep.errors.note_interrupt)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # or a background job's
        yield lambda: None
        return
    hit: list[int] = []

    def record(signum: int, frame: object) -> None:
        hit.append(signum)
        note_interrupt()

    previous = signal.signal(signal.SIGINT, record)

    def check() -> None:
        if hit:
            raise KeyboardInterrupt

    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
    check()


def in_workers(job: Callable[..., T], tasks: list[tuple[int, tuple]], workers: int,
               desc: str, progress: bool, done: Callable[[int, T], None]) -> None:
    """job(*args, progress_path, slot) for each (bytes, args) of `tasks` in a process pool
    of at most `workers`; done(task number, result) here as each ends (the first error
    raises). A bar of bytes: a task that has ended counts its bytes, one still running what
    it wrote to its slot of the SharedProgress at progress_path (prep.progress.FileProgress;
    nothing where it writes none)."""
    total = sum(size for size, _ in tasks)
    bar = progress_bar(total=total, unit="B", unit_scale=True, desc=desc,
                       disable=not progress or not tasks)
    shared = SharedProgress(len(tasks))
    try:
        if tasks:
            with process_pool(min(workers, len(tasks))) as pool, \
                    interrupt_at_checks() as check:
                futures = {pool.submit(job, *args, shared.path, slot): slot
                           for slot, (_, args) in enumerate(tasks)}
                pending, ended = set(futures), 0
                while pending:
                    finished, pending = wait(pending, timeout=0.2,
                                             return_when=FIRST_COMPLETED)
                    check()
                    for f in finished:
                        done(futures[f], f.result())
                        ended += tasks[futures[f]][0]
                    running = shared.values()
                    bar.update(min(ended + sum(running[futures[f]] for f in pending), total)
                               - bar.n)
    finally:
        bar.close()
        shared.close()


def thread_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> list[R]:
    """[fn(item) for item in items] on `threads` threads, in order; the first error is
    raised. A Ctrl-C stops it between results, dropping what has not started, never inside
    the pool's own locks: a KeyboardInterrupt in ThreadPoolExecutor.map or its `with` exit
    can leave one of them held, and the exit then waits forever (seen: 1 Ctrl-C in 3)."""
    with interrupt_at_checks() as check:
        pool = ThreadPoolExecutor(threads)
        try:
            futures = [pool.submit(fn, item) for item in items]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                check()
                for f in done:
                    if f.exception():
                        raise f.exception()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return [f.result() for f in futures]


def die_with_parent(main_pid: int) -> None:
    """End this worker the moment process `main_pid` exits, however it ends (kill -9): it
    SIGKILLs itself (`when_exits`). Not prctl(PR_SET_PDEATHSIG): a worker's parent is the
    forkserver, which outlives the main process as long as workers hold the pipe it
    watches. Threads are safe here: workers never fork."""
    when_exits(main_pid, lambda: os.kill(os.getpid(), signal.SIGKILL))


def when_exits(pid: int, action: Callable[[], None]) -> None:
    """Call `action` the moment process `pid` exits, however it ends (kill -9), from a
    thread that waits on a pidfd of it (Linux 5.3+; elsewhere it checks every 0.5 s); at
    once, in this thread, when it is gone already."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        action()
        return
    except (AttributeError, OSError):
        fd = None
    threading.Thread(target=_wait_then, args=(pid, fd, action), daemon=True,
                     name=f"when-{pid}-exits").start()


def terminate_only_from(main_pid: int) -> None:
    """SIGTERM ends this worker only when process `main_pid` sends it (its loader's
    shutdown). A SIGTERM from anyone else, such as SLURM's preemption, which signals every
    process of the job, is left to the main process: it finishes its step and checkpoints,
    and a worker ended by it would fail that step. A thread takes the signal with its
    sender (sigwaitinfo); the signal is blocked in every other thread, so this must run
    before the worker starts any thread (a thread started earlier keeps SIGTERM unblocked,
    the kernel may deliver it there, and its default action ends the whole worker)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ignored by the forkserver it came from
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_take_sigterm, args=(main_pid,), daemon=True,
                     name="sigterm-from-main").start()


def _take_sigterm(main_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == main_pid:
            os._exit(0)


def _wait_then(pid: int, fd: int | None, action: Callable[[], None]) -> None:
    if fd is not None:
        select.select([fd], [], [])  # readable when the process has exited
        os.close(fd)
    else:
        while _alive(pid):
            time.sleep(0.5)
    action()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def keep_image_buffers_in_heap() -> bool:
    """Stop glibc from returning Pillow's freed image buffers to the OS after every image.

    Pillow mallocs and frees a ~0.75 MB buffer per 500x375 image; with other allocations in
    between (the file's bytes), glibc mmaps and unmaps it each time and every image pays
    fresh page faults: measured 222-306 img/s for decode+resize+encode here, 382-473 img/s
    with this (mmap threshold 16 MB, trim threshold 64 MB). Call once per worker process;
    returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 16 << 20)
                    and libc.mallopt(m_trim_threshold, 64 << 20))
    except (OSError, AttributeError):
        return False


def pool_worker_init(main_pid: int) -> None:
    """Initializer of the process pools that handle images: die with the main process,
    Ctrl-C is the main process's to report (prep.errors.ignore_sigint), and image buffers
    stay in the heap."""
    die_with_parent(main_pid)
    ignore_sigint()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool's stop() terminates it
    keep_image_buffers_in_heap()
