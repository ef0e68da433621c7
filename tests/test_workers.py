"""prep.workers: no worker is forked from a threaded process, workers die with their parent,
a pool stops at once, Ctrl-C never leaves a thread pool waiting on its own locks."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prep.workers import process_pool, thread_map
from tests.conftest import as_foreground, descendants, running

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def test_every_worker_process_is_started_by_prep_workers():
    """The class behind the `prep imagenet` hang: a pool forked from a thread. No module but
    prep/workers.py may start processes; every DataLoader names its context."""
    starters = {"ProcessPoolExecutor", "Pool", "Process", "fork", "get_context"}
    found = []
    for path in sorted([*ROOT.glob("prep/*.py"), *ROOT.glob("shards/*.py"),
                        *ROOT.glob("train/*.py")]):
        for call in _calls(path):
            name = _name(call)
            if name in starters and path.name != "workers.py":
                found.append(f"{path.relative_to(ROOT)}:{call.lineno} {name}")
            if name in ("DataLoader", "WebLoader") and not any(
                    k.arg == "multiprocessing_context" or (
                        k.arg is None and isinstance(k.value, ast.Call)
                        and _name(k.value) == "worker_settings") for k in call.keywords):
                found.append(f"{path.relative_to(ROOT)}:{call.lineno} {name} without a context")
    assert found == []


def _square(x: int) -> int:
    import json  # noqa: F401 - an import in the worker, as the pool initializer does

    return x * x


def test_pool_started_while_another_thread_holds_the_import_lock():
    """Deterministic form of the hang: a thread holds the import lock while the pool starts.
    A forked child inherits the held lock and its first import waits forever; workers from
    the forkserver do not."""
    script = textwrap.dedent(f"""
        import _imp, faulthandler, sys, threading, time
        sys.path.insert(0, {str(ROOT)!r})
        from prep.workers import process_pool, thread_map
        import multiprocessing.forkserver, concurrent.futures.process  # imported before
        from tests.test_workers import _square
        faulthandler.dump_traceback_later(30, exit=True)
        held = threading.Event()
        def hold():
            _imp.acquire_lock(); held.set(); time.sleep(1.5); _imp.release_lock()
        if __name__ == "__main__":
            threading.Thread(target=hold).start()
            held.wait()
            with process_pool(2) as pool:
                print(sorted(pool.map(_square, range(8))))
    """)
    out = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sorted(x * x for x in range(8)))


@pytest.mark.slow
def test_prep_imagenet_200_times_never_hangs(tmp_path):
    """The command of the report, 200 times in a loop (in one process, so the loop costs
    ~35 s, not 200 interpreter starts); each run must end within 20 s (a normal one: 0.2 s)."""
    script = textwrap.dedent(f"""
        import faulthandler, shutil, sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from prep.imagenet import prepare_imagenet
        from prep.sample import SampleSpec, write_sample
        if __name__ == "__main__":
            tmp = Path({str(tmp_path)!r})
            write_sample(tmp / "src", "ilsvrc2012", SampleSpec(classes=3, train_per_class=4,
                         val_per_class=2, size=32), progress=False)
            for i in range(200):
                faulthandler.dump_traceback_later(20, exit=True)
                shutil.rmtree(tmp / "data", ignore_errors=True)
                prepare_imagenet(tmp / "src", tmp / "data", progress=False, workers=2)
                faulthandler.cancel_dump_traceback_later()
            print("done", i + 1)
    """)
    out = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["done", "200"]


def test_pool_workers_die_with_a_killed_parent():
    """kill -9 of the process that owns a pool (the OOM killer): its workers follow."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from prep.workers import process_pool, thread_map
        if __name__ == "__main__":
            pool = process_pool(2)
            fs = [pool.submit(time.sleep, 60) for _ in range(2)]
            print("ready", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 20
    while len(descendants(proc.pid)) < 3 and time.monotonic() < deadline:  # server + 2
        time.sleep(0.05)
    family = descendants(proc.pid)
    assert len(family) >= 3
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(running(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in family if running(p)] == []


def test_process_pool_runs_work():
    with process_pool(2) as pool:
        assert list(pool.map(_square, [1, 2, 3])) == [1, 4, 9]


def _deaf_sleep(flag: str) -> None:
    """Ignore SIGTERM, as a worker forked a moment ago does (from the forkserver) until
    its initializer takes SIGTERM back, then sleep."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(flag).touch()
    time.sleep(60)


def test_pool_stop_ends_a_worker_that_lost_its_sigterm(tmp_path):
    """stop() returns within a few seconds with every worker gone, also one whose SIGTERM
    was lost: the caller then removes what the workers were writing."""
    pool = process_pool(1)
    flag = tmp_path / "started"
    pool.submit(_deaf_sleep, str(flag))
    deadline = time.monotonic() + 30
    while not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    procs = list(pool._processes.values())
    t0 = time.monotonic()
    pool.stop()
    assert time.monotonic() - t0 < 6
    assert procs and not any(p.is_alive() for p in procs)


def test_thread_map_results_in_order_and_first_error_raised():
    assert thread_map(_square, range(50), 4) == [i * i for i in range(50)]
    with pytest.raises(ZeroDivisionError):
        thread_map(lambda i: 1 // (i - 7), range(20), 4)


@pytest.mark.slow  # many process starts; test-fast stays under 2 minutes
def test_thread_map_ctrl_c_at_any_moment_never_hangs():
    """Ctrl-C at random moments of thread pools started one after the other: each run ends
    with KeyboardInterrupt, none waits forever on a lock the interrupt left held (a plain
    ThreadPoolExecutor.map in a `with` block hung 1 run in 3 here)."""
    # `hit`: a KeyboardInterrupt raised in a garbage collector's callback between two calls
    # is swallowed ("Exception ignored"); the loop must still end
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from prep.workers import thread_map
        hit = []
        def on_sigint(signum, frame):
            hit.append(signum)
            raise KeyboardInterrupt
        signal.signal(signal.SIGINT, on_sigint)
        print("go", flush=True)
        try:
            while not hit:
                thread_map(os.stat, ["/"] * 2000, 8)
        except KeyboardInterrupt:
            pass
        sys.exit(130)
    """)
    rng = __import__("random").Random(7)
    for trial in range(30):
        proc = subprocess.Popen(as_foreground([PY, "-X", "faulthandler", "-c", script]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "go"
        time.sleep(rng.random() * 0.2)
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints where it waits
            _, stderr = proc.communicate()
            pytest.fail(f"trial {trial}: hung after Ctrl-C\n{stderr[-3000:]}")
        assert proc.returncode == 130, (trial, stderr)


@pytest.mark.slow
def test_loader_workers_and_their_server_outlive_a_sigterm_from_anyone_else(tmp_path):
    """SLURM's preemption and torchrun's shutdown send SIGTERM to every process of a rank
    (its process group): the trainer's loader workers and the forkserver that started them
    must leave it to the trainer, which finishes its step and checkpoints. Before, a worker
    could die of it (delivered to a thread started before SIGTERM was blocked), or the
    server did, and torch's workers quit once their parent is gone."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from train.data import worker_settings

        class Slow(torch.utils.data.IterableDataset):
            def __iter__(self):
                for i in range(400):
                    time.sleep(0.01)
                    yield i

        if __name__ == "__main__":
            loader = torch.utils.data.DataLoader(Slow(), batch_size=None,
                                                 **worker_settings(2))
            n = 0
            for i, _ in enumerate(loader):
                if i == 5:
                    print("ready", flush=True)
                n += 1
            print("read", n, flush=True)
    """)
    (tmp_path / "loader.py").write_text(script)  # a file: the workers import its classes
    proc = subprocess.Popen([PY, str(tmp_path / "loader.py")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        family = descendants(proc.pid)  # forkserver, 2 workers, resource tracker
        assert len(family) >= 3
        for _ in range(3):
            for pid in family:
                try:
                    os.kill(pid, signal.SIGTERM)  # not from the loader's process
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert out.split() == ["read", "800"]  # both workers read their whole share
