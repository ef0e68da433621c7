"""Progress where people read it: a bar on a terminal, plain lines in a log file."""

import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from prep.progress import PlainProgress, progress_bar

ROOT = Path(__file__).resolve().parents[1]


def test_plain_lines_every_interval_and_at_the_end():
    out = io.StringIO()
    bar = PlainProgress(total=10, desc="epoch 2", unit="step", stream=out, every=0)
    for i in range(10):
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}", lr="0.1000")
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("epoch 2: 1/10 step (10%), ") and "eta" in lines[0]
    assert lines[-1].startswith("epoch 2: 10/10 step (100%), ") and "took" in lines[-1]
    assert lines[-1].endswith("; loss 0.100, lr 0.1000")


def test_quiet_interval_prints_only_the_end():
    out = io.StringIO()
    bar = PlainProgress(range(5), desc="eval", unit="batch", stream=out, every=3600)
    assert list(bar) == list(range(5))
    assert out.getvalue().count("\n") == 1 and "eval: 5/5 batch (100%)" in out.getvalue()


def test_bar_on_a_terminal_plain_in_a_file(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert isinstance(progress_bar(total=3, desc="x"), tqdm)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress_bar(total=3, desc="x"), PlainProgress)


def test_prep_shard_logs_plain_lines_to_a_file(prepared, tmp_path):
    data, _ = prepared()
    log = tmp_path / "shard.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "prep.cli", "shard", "--data", str(data),
                            "--out", str(tmp_path / "s"), "--workers", "1"], stdout=f,
                           stderr=subprocess.STDOUT, cwd=ROOT, timeout=120)
    text = log.read_text()
    assert r.returncode == 0, text
    assert "\r" not in text and "shard: " in text and "img (100%)" in text


def _advance(path: str, slot: int, value: int) -> int:
    from prep.progress import WorkerProgress

    w = WorkerProgress(path, slot)
    w.set(value // 2)
    w.set(value, force=True)  # within 0.1 s of the first write: lands only when forced
    w.close()
    return slot


def test_shared_progress_sums_what_worker_processes_set():
    from prep.progress import SharedProgress, WorkerProgress
    from prep.workers import process_pool

    shared = SharedProgress(3)
    assert shared.total() == 0
    with process_pool(2) as pool:
        assert sorted(pool.map(_advance, [shared.path] * 3, [0, 1, 2], [10, 200, 3000])) == \
            [0, 1, 2]
    assert shared.total() == 3210
    quiet = WorkerProgress("", 0)  # no file: writes nothing, fails nothing
    quiet.set(5, force=True)
    quiet.close()
    path = shared.path
    shared.close()
    assert not os.path.exists(path)
    # the file of a process killed before its close (kill -9) is removed by the next one
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    fd, orphan = tempfile.mkstemp(prefix=f"prep-progress-{dead}-")
    os.close(fd)
    SharedProgress(1).close()
    assert not os.path.exists(orphan)
