"""prep.errors through real processes: one `error: ...` line and exit 1 for a PrepError,
one `interrupted` line and exit 130 for Ctrl-C at any moment, from both entry points."""

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prep.errors import EXIT_GRACE_S
from prep.imagenet import prepare_imagenet
from tests.conftest import as_foreground, tree_hash

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ctrl_c_during_prep_shard_prints_one_line(make_sample, tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does), at several moments
    (also the first ms, as the workers start): one `interrupted` line, exit status 130, no
    traceback from any process, no partial shard, in well under EXIT_GRACE_S (CI once saw
    no exit within 60 s: a Ctrl-C inside a thread pool's own locks)."""
    src, _ = make_sample("ilsvrc2017", classes=8, train_per_class=100, size=128)
    prepare_imagenet(src, tmp_path / "data", progress=False, workers=1)
    before = tree_hash(src)
    checked = 0
    for attempt, delay in enumerate((0.0, 0.1, 0.25, 0.5, 0.05, 0.15, 0.0, 0.02, 0.001, 0.005)):
        if checked >= 6:
            break
        out = tmp_path / f"s{attempt}"
        proc = subprocess.Popen(
            as_foreground([sys.executable, "-m", "prep.cli", "shard", "-q", "--data",
                           str(tmp_path / "data/imagenet"), "--out", str(out),
                           "--num-shards", "16", "--max-size", "32", "--workers", "2"]),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        deadline = time.time() + 60  # wait until it is writing (workers started)
        while not (out / ".prep-shard/plan.json").exists() and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue  # finished before the signal
        checked += 1
        # unwound in order (workers stopped, partials removed), not ended by the exit
        # deadline of a stuck unwinding (prep.errors.EXIT_GRACE_S)
        assert time.monotonic() - t0 < EXIT_GRACE_S, (attempt, delay)
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        assert stderr.strip().splitlines() == [
            "interrupted: rerun the same command to continue where it stopped"], stderr
        assert not list(out.glob("*.partial"))
    assert tree_hash(src) == before
    if checked == 0:  # a machine so loaded that every run ended before its signal
        pytest.skip("every run finished before the signal reached it")


def test_ctrl_c_after_the_work_ends_still_gives_one_line():
    """A SIGINT that lands once the entry point is done, outside exit_on_error (the window
    where CI once saw a process die with -SIGINT and a traceback), still gives one
    `interrupted` line and exit status 130."""
    code = ("import os, signal; from prep.errors import run_program; "
            "run_program(lambda: os.kill(os.getpid(), signal.SIGINT))")
    proc = subprocess.run(as_foreground([sys.executable, "-c", code]), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "interrupted: rerun the same command to continue where it stopped"], proc.stderr


LINE = "interrupted: rerun the same command to continue where it stopped"
# a program whose unwinding after Ctrl-C never ends (a lock an interrupt left held)
STUCK = ("import os, signal, sys, threading, time; import prep.errors as e; "
         "e.EXIT_GRACE_S = {grace}\n"
         "def main():\n"
         "    try:\n"
         "        print('go', flush=True); time.sleep(60)\n"
         "    except KeyboardInterrupt:\n"
         "        while True:\n"
         "            try:\n"
         "                threading.Event().wait()\n"
         "            except KeyboardInterrupt:\n"
         "                pass\n"
         "e.run_program(main)")


def test_a_background_job_keeps_ignoring_ctrl_c():
    """Started with SIGINT ignored (`cmd &` in a shell), a program stays deaf to the
    terminal's Ctrl-C, also while it waits at the deferred points (interrupt_at_checks)."""
    code = ("import signal, sys, time, prep.errors as e, prep.workers as w\n"
            "def main():\n"
            "    print('go', flush=True)\n"
            "    with w.interrupt_at_checks() as check:\n"
            "        time.sleep(1.0); check()\n"
            "    time.sleep(0.5); print('done', flush=True)\n"
            "e.run_program(e.exit_on_error(main))")
    ignoring = [sys.executable, "-c", "import os, signal, sys; "
                "signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "os.execv(sys.argv[1], sys.argv[1:])"]
    proc = subprocess.Popen([*ignoring, sys.executable, "-c", code], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    for delay in (0.2, 0.9):  # inside the deferred region, then after it
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert (proc.returncode, stdout.strip(), stderr) == (0, "done", "")


@pytest.mark.parametrize("grace, presses, within", [(1.0, 1, 8.0), (60.0, 2, 8.0)])
def test_a_program_stuck_after_ctrl_c_still_ends(grace, presses, within):
    """Whatever the program's unwinding waits on, it ends EXIT_GRACE_S after a Ctrl-C, or at
    once on a second one: the one `interrupted` line, exit status 130."""
    proc = subprocess.Popen(as_foreground([sys.executable, "-c", STUCK.format(grace=grace)]),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "go"
    t0 = time.monotonic()
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert time.monotonic() - t0 < within
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == [LINE], stderr


@pytest.mark.slow  # many process starts; test-fast stays under 2 minutes
def test_ctrl_c_in_thread_pools_ends_every_run_with_one_line():
    """Ctrl-C at random moments of plain ThreadPoolExecutor.map calls (library code the
    toolkit does not write, where an interrupt can leave a lock held and the pool's exit
    wait forever): every run ends with the one line and 130, within the exit deadline."""
    code = ("import os, sys, prep.errors as e\n"
            "from concurrent.futures import ThreadPoolExecutor\n"
            "e.EXIT_GRACE_S = 2.0\n"
            "def main():\n"
            "    print('go', flush=True)\n"
            "    while True:\n"
            "        with ThreadPoolExecutor(8) as t:\n"
            "            list(t.map(os.stat, ['/'] * 2000))\n"
            "e.run_program(e.exit_on_error(main))")
    rng = __import__("random").Random(11)
    for trial in range(20):
        proc = subprocess.Popen(as_foreground([sys.executable, "-c", code]), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "go"
        time.sleep(rng.random() * 0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert time.monotonic() - t0 < 10, trial
        assert proc.returncode == 130, (trial, stderr)
        assert stderr.strip().splitlines() == [LINE], (trial, stderr)


@pytest.mark.slow
def test_one_error_path_for_both_entry_points():
    """Both `prep` and train/main.py turn PrepError into one `error: ...` line on stderr and
    exit status 1, as real processes (prep.errors.exit_on_error)."""
    for cmd in ([sys.executable, "-m", "prep.cli", "verify", "/nonexistent/s"],
                [sys.executable, "train/main.py", "--data", "/nonexistent/s", "--device",
                 "cpu"]):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stdout == "", (cmd, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: /nonexistent/s/_info.json: "
                                                       "missing"), r.stderr


def _raises(exc):
    from prep.errors import exit_on_error

    @exit_on_error
    def main():
        raise exc

    return main


def _chained():
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:  # as torch.save does: its own error raised while handling the OSError
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None


def test_a_full_disk_that_reaches_the_entry_point_unnamed_is_one_line():
    with pytest.raises(SystemExit) as got:
        _raises(OSError(errno.ENOSPC, "No space left on device", "/out/x.json"))()
    assert str(got.value.code).startswith("error: /out/x.json: cannot write it (No space left "
                                          "on device); the disk is full")
    try:
        _chained()
    except RuntimeError as exc:
        wrapped = exc
    assert wrapped.__cause__ is None and wrapped.__context__ is not None
    with pytest.raises(SystemExit, match="cannot write it .No space left on device.; the disk "
                                         "is full"):
        _raises(wrapped)()
    with pytest.raises(SystemExit, match="read-only"):
        _raises(OSError(errno.EROFS, "Read-only file system", "/ro/x"))()
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        _raises(RuntimeError("a bug"))()
    with pytest.raises(FileNotFoundError):  # not the disk's state: left as it is
        _raises(FileNotFoundError(errno.ENOENT, "No such file", "/x"))()


def _torchrun_summary(files: dict[int, Path]) -> str:
    """torchrun's closing summary (its agent's own classes) of ranks that failed with these
    error files."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=1,
                                     error_file=str(path)) for rank, path in files.items()}
    return ChildFailedError("train/main.py", failures).format_msg()


def test_under_torchrun_the_error_line_is_what_its_summary_names(tmp_path, monkeypatch,
                                                                  capsys):
    """torchrun's summary shows each failed rank's error file; without one it says only 'To
    enable traceback see ...'. A rank that lost contact with the failing one fails in the
    same second: the summary must still name the cause, also when that rank is higher."""
    from prep.errors import PrepError, exit_lost_peer

    peer, cause = tmp_path / "rank0.json", tmp_path / "rank1.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(cause))
    with pytest.raises(SystemExit):
        _raises(PrepError("checkpoint /o/c.pt: could not be written"))()
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(peer))
    with pytest.raises(SystemExit) as stop:  # printed at once: torchrun may end it soon
        exit_lost_peer("rank 0: lost contact with another rank")
    assert stop.value.code == 1
    assert capsys.readouterr().err == "error: rank 0: lost contact with another rank\n"
    summary = _torchrun_summary({0: peer, 1: cause})
    root = summary.split("Root Cause")[1]
    assert "error: checkpoint /o/c.pt: could not be written" in root, summary
    assert "error: rank 0: lost contact" in summary.split("Root Cause")[0], summary
    disk = tmp_path / "disk.json"  # the full-disk line too
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(disk))
    with pytest.raises(SystemExit):
        _raises(OSError(errno.ENOSPC, "No space left on device", "/out/x.json"))()
    assert "error: /out/x.json: cannot write it" in _torchrun_summary({0: disk})
    with pytest.raises(RuntimeError):  # a bug keeps its traceback, in the summary too
        _raises(RuntimeError("a bug"))()
    assert re.search(r"Traceback .*\n(.*\n)*\s*RuntimeError: a bug", _torchrun_summary({0: disk}))
    disk.unlink()
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")  # not under torchrun: no file anywhere
    with pytest.raises(SystemExit):
        _raises(PrepError("x"))()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank1.json"]


WHOLE_LINES = """
from prep.errors import PrepError, exit_on_error

@exit_on_error
def main():
    raise {!r}

main()
"""


@pytest.mark.parametrize("raised", [
    'PrepError("checkpoint /o/c.pt: could not be written (No space left on device)")',
    'RuntimeError("a bug in " + "x" * 300)'])
def test_each_line_of_the_way_out_is_one_write(raised):
    """Ranks that fail at the same moment share one log: a line whose newline is written
    apart runs into the next rank's line (seen: `error: rank 1: ...error: rank 2: ...`).
    stderr here is a SOCK_SEQPACKET socket, which keeps every write() a packet of its own:
    each packet must be whole lines, the error line one packet."""
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    code = WHOLE_LINES.replace("{!r}", raised)
    with ours, theirs:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=theirs.fileno())
        theirs.close()
        packets = []
        while packet := ours.recv(1 << 20):
            packets.append(packet.decode())
        assert proc.wait(timeout=60) == 1
    text = "".join(packets)
    assert packets and all(p.endswith("\n") for p in packets), packets
    if raised.startswith("PrepError"):
        assert packets == ["error: checkpoint /o/c.pt: could not be written (No space left on "
                           "device)\n"], packets
    else:
        assert text.startswith("Traceback") and "RuntimeError: a bug in xxx" in text, text
