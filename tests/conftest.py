"""Shared fixtures: synthetic ILSVRC trees and a hash of a whole tree (to prove SRC untouched)."""

from __future__ import annotations

import atexit
import hashlib
import io
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from prep.sample import SamplePlan, SampleSpec, write_sample
from prep.synth import render_class_image

SHARED_META = Path(__file__).resolve().parents[1] / ".." / "shared" / "imagenet-meta"
SMALL = SampleSpec(classes=5, train_per_class=4, val_per_class=3, test_images=2, size=32)


MEMORY_TMP = Path("/dev/shm")  # a tmpfs on Linux
MEMORY_TMP_ROOM = 6 << 30  # free bytes it must have (twice as many free in memory): 3.4 GB peak


@pytest.hookimpl(tryfirst=True)  # before pytest's own tmp_path set-up reads --basetemp
def pytest_configure(config: pytest.Config) -> None:
    """The tests' temporary folders in memory (a tmpfs) where it has room, as a
    `--basetemp` of this run's own: on the project's VMs ext4 creates files at 20-150 us of
    kernel time each (the full-scale trees' files cost minutes of it), a tmpfs at ~7 us.
    PREP_TESTS_ON_DISK=1, or a --basetemp of your own, keeps them on disk. The folder goes
    when the run ends (and one a killed run left, at the next run's start)."""
    if config.option.basetemp or os.environ.get("PREP_TESTS_ON_DISK") or \
            not _has_room(MEMORY_TMP, MEMORY_TMP_ROOM):
        return
    for old in MEMORY_TMP.glob("prep-tests-*"):
        if old.name.rpartition("-")[2].isdigit() and \
                not Path(f"/proc/{old.name.rpartition('-')[2]}").exists():
            shutil.rmtree(old, ignore_errors=True)
    config.option.basetemp = str(MEMORY_TMP / f"prep-tests-{os.getpid()}")


def pytest_unconfigure(config: pytest.Config) -> None:
    base = config.option.basetemp
    if base and Path(base).parent == MEMORY_TMP and Path(base).name.startswith("prep-tests-"):
        shutil.rmtree(base, ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> str:
    return f"temporary folders: {config.option.basetemp or tempfile.gettempdir()}"


def _has_room(folder: Path, nbytes: int) -> bool:
    try:
        st = os.statvfs(folder)
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f
                             if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    return st.f_bavail * st.f_frsize >= nbytes and available >= 2 * nbytes


def tree_hash(root: Path) -> str:
    """Names, types, modes, link targets and contents of everything under root."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(os.fsencode(os.path.relpath(p, root)))  # names need not be UTF-8
            h.update(f"|{st.st_mode}|{st.st_mtime_ns}".encode())
            if os.path.islink(p):
                h.update(os.fsencode(os.readlink(p)))
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


@pytest.fixture
def make_sample(tmp_path):
    """make_sample(layout, **spec overrides) -> (src path, plan)."""

    def make(layout: str = "ilsvrc2017", name: str | None = None, **overrides):
        spec = SampleSpec(**{**SMALL.__dict__, **overrides})
        src = tmp_path / (name or f"src-{layout}")
        plan: SamplePlan = write_sample(src, layout, spec, progress=False)
        return src, plan

    return make


def expected_val_lines(plan: SamplePlan) -> list[str]:
    """What Caffe's val.txt (with class folders) says for a sample: computed from the plan."""
    index = {w: i for i, w in enumerate(plan.wnids)}
    return [f"{w}/{s}.JPEG {index[w]}" for s, w in sorted(plan.val.items())]


@pytest.fixture
def prepared(make_sample, tmp_path):
    """prepared(layout, **spec) -> (DATA/imagenet, plan): a sample run through prep imagenet."""
    from prep.imagenet import prepare_imagenet

    def make(layout: str = "ilsvrc2017", **overrides):
        src, plan = make_sample(layout, **overrides)
        prepare_imagenet(src, tmp_path / "data", progress=False, workers=1)
        return tmp_path / "data" / "imagenet", plan

    return make


def sha256_files(paths) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)}


def sharded_sample(tmp: Path, layout: str, num_shards: int, **spec) -> Path:
    """A synthetic tree under tmp/src, prepared into tmp/data, sharded into tmp/shards."""
    from prep.imagenet import prepare_imagenet
    from shards.build import ShardSettings, shard_dataset

    write_sample(tmp / "src", layout, SampleSpec(**spec), progress=False)
    prepare_imagenet(tmp / "src", tmp / "data", progress=False, workers=1)
    shard_dataset(tmp / "data/imagenet", tmp / "shards", ShardSettings(num_shards=num_shards),
                  workers=1, progress=False)
    return tmp / "shards"


def descendants(pid: int) -> set[int]:
    """Every descendant of pid (from /proc)."""
    kids: dict[int, list[int]] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(p))
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def sigkill_with_workers(proc) -> set[int]:
    """kill -9 a `prep` process (started with start_new_session=True), as the OOM killer or
    a lost node does, and wait up to 10 s for its workers to follow it
    (prep.workers.die_with_parent); the ones still running (none, when they do)."""
    family = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(running(p) for p in family):
        time.sleep(0.02)
    return {p for p in family if running(p)}


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# Python ignores Ctrl-C for good when it starts with SIGINT ignored, and the test runner may
# have started that way (a background job of a non-interactive shell, `nohup`): a Ctrl-C
# test runs its program through this, which sets SIGINT to its default and execs the
# program, as a terminal's foreground job starts.
FOREGROUND = [sys.executable, "-c",
              "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
              "os.execv(sys.argv[1], sys.argv[1:])"]


def as_foreground(args: list[str]) -> list[str]:
    """`args` (a command line) started with Ctrl-C at its default, whatever this process has."""
    return [*FOREGROUND, *args]


def as_nobody(args: list[str], **kwargs):
    """Run `args` as user nobody (setpriv), where root's reads would ignore permissions; skips
    the test where that cannot be done (not root, no setpriv, the venv out of reach)."""
    import subprocess

    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run a command as another user")
    probe = subprocess.run([*drop, args[0], "-c", "import prep"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("the venv cannot be run as user nobody here")
    return subprocess.run([*drop, *args], capture_output=True, text=True, **kwargs)


@pytest.fixture
def shared_tmp():
    """A temporary directory every user can enter (for as_nobody)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="prep-nobody-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def tmpfs(path: Path, options: str):
    """A real tmpfs mounted at `path` (`options`: size=3m, ro, nr_inodes=...): a full or
    read-only disk for real; skips the test where mounting is not allowed (not root)."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def kill_job(proc, out: Path) -> None:
    """SIGKILL every process of a torchrun job started with start_new_session=True and
    writing to `out` (torchrun starts its workers in their own sessions), as a lost node or
    a scheduler's preemption does, and wait until none is left."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while subprocess.run(["pkill", "-KILL", "-f", str(out)]).returncode == 0:
        time.sleep(0.1)


def rank_pids(out: Path, rank: int) -> list[int]:
    """The process of the torchrun job writing to `out` whose RANK is `rank` (not its data
    workers, which share its command line and environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if str(out).encode() in cmd and f"RANK={rank}".encode() in env and \
                b"TORCHELASTIC_RUN_ID=" in b"\0".join(env):
            found.append((int(proc.name), ppid))
    return [pid for pid, ppid in found if ppid not in {p for p, _ in found}]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) for the session; scripts/s3_server.py starts it."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from s3_server import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """The session's S3 server with a fresh bucket for this test; the AWS_* variables are
    set (for this process and the programs it starts). s3.url(prefix) -> s3://bucket/prefix."""
    import re

    if s3_server.proc is None:  # a test stopped it and did not restart it
        s3_server.start()
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + \
        f"-{os.getpid() % 10000}-{int(time.time() * 1000) % 100000}"
    s3_server.make_bucket(bucket)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PREP_S3_RETRY_SECONDS", "20")
    s3_server.bucket = bucket
    s3_server.url = lambda prefix="": f"s3://{bucket}/{prefix}".rstrip("/")
    yield s3_server
    s3_server.drop_bucket(bucket)  # SeaweedFS gives each bucket volumes of its own


def set_jpeg_size(buf: bytearray | mmap.mmap, width: int, height: int, start: int = 0) -> None:
    """Rewrite, in place, the size in the SOF header of the JPEG that begins at `start` of
    `buf` (a JPEG's bytes, or a whole shard held in memory): a file that claims another size
    than its pixels, for the size checks."""
    i = start + 2
    while buf[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(buf[i + 2 : i + 4], "big")
    buf[i + 5 : i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")


def run_prep_imagenet(*args) -> tuple[int, str]:
    """`prep imagenet -q --workers 1 ARGS` in this process: (exit code, output)."""

    from prep.cli import main

    result = CliRunner().invoke(main, ["imagenet", "-q", "--workers", "1", *map(str, args)])
    return result.exit_code, result.output


def assert_refused(src, link, *needles, extra=()) -> str:
    """`prep imagenet --src SRC --link LINK` fails, with every needle in its output, no
    traceback, and SRC untouched; returns the output."""
    before = tree_hash(src) if src.exists() else None
    code, out = run_prep_imagenet("--src", src, "--link", link, *extra)
    assert code != 0, out
    assert "Traceback" not in out
    for n in needles:
        assert str(n) in out, (n, out)
    if before:
        assert tree_hash(src) == before
    return out


def png16(path_or_buf):
    """A 16-bit grayscale PNG: a left-to-right ramp over the full 16-bit range."""
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (48, 1))
    img = Image.fromarray(ramp)  # uint16: mode I;16
    img.save(path_or_buf, format="PNG")
    return ramp


def truncated_with_eoi(progressive=False):
    img = render_class_image(0, 3, np.random.default_rng(0), 160)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, progressive=progressive)
    data = buf.getvalue()
    return data[: len(data) // 3] + b"\xff\xd9"


# prep shard --src keeps its record of checked members under $XDG_CACHE_HOME: the tests'
# own, never the user's ~/.cache (set before any test, inherited by the programs they run)
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="prep-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)
