"""Real torchrun, 2 processes, gloo on CPU: exact eval count, checkpoints, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import kill_job, rank_pids, sharded_sample
from train import checkpoint as ckpt

pytestmark = pytest.mark.slow  # `make test-fast` skips these

ROOT = Path(__file__).resolve().parents[1]
TINY = ["arch=resnet18", "num_classes=6", "image_size=32", "val_resize=36", "val_crop=32",
        "batch_size=8", "workers=1", "shuffle_buffer=50", "lr=0.4", "lr_schedule=cosine",
        "log_every=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return sharded_sample(tmp_path_factory.mktemp("torchrun"), "ilsvrc2017", 4, classes=6,
                          train_per_class=16, val_per_class=4, size=40)


def command(shards, out, epochs, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train/main.py"), "--data", str(shards), "--output-dir", str(out),
           "--device", "cpu", "--set", f"epochs={epochs}", *[a for s in TINY for a in
                                                             ("--set", s)], *extra]


def torchrun(shards, out, epochs, *extra):
    r = subprocess.run(command(shards, out, epochs, *extra), capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted 2-epoch run: what every interrupted run must end up matching."""
    full = tmp_path_factory.mktemp("reference") / "full"
    torchrun(shards, full, 2)
    return full


def same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [x["epoch"] for x in got] == [x["epoch"] for x in want]
    for a, b in zip(got, want):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["top1"] == pytest.approx(b["top1"], abs=1 / 24 + 1e-9)


def test_two_processes_train_evaluate_and_resume(shards, reference, tmp_path):
    full = reference
    m = metrics(full)
    assert [x["epoch"] for x in m] == [0, 1]
    assert all(x["val_samples"] == 24 for x in m)  # every val sample once over 2 ranks
    config = json.loads((full / "config.json").read_text())
    assert config["world_size"] == 2 and config["steps_per_epoch"] == 96 // 16
    state = ckpt.load(full / "checkpoint.pt")  # weights_only=True
    assert state["epoch"] == 1 and state["step"] == 12 and state["position"]["epoch"] == 2
    assert (full / "best.pt").is_file() and (full / "curves.png").stat().st_size > 1000

    part = tmp_path / "part"  # preempted (SIGKILL) once epoch 0 is saved, then resumed
    proc = subprocess.Popen(command(shards, part, 2), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (part / "metrics.jsonl").is_file():
        time.sleep(0.05)
    kill_job(proc, part)  # every process of the run, as a scheduler's preemption does
    assert len(metrics(part)) == 1
    log = torchrun(shards, part, 2, "--resume", "auto")
    assert "resumed from" in log and "epoch 1, step 6" in log
    same_metrics(metrics(part), m)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_one_rank_killed_then_torchrun_restarts_the_job(shards, reference, tmp_path):
    """SIGKILL of rank 1 mid-epoch under `torchrun --max-restarts=1`: the agent restarts both
    workers, which resume from the last checkpoint and end with the uninterrupted metrics."""
    out = tmp_path / "run"
    cmd = command(shards, out, 2, "--resume", "auto")
    cmd.insert(cmd.index("--nproc_per_node=2"), "--max-restarts=1")
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "metrics.jsonl").is_file():
            time.sleep(0.02)  # epoch 0 checkpointed: rank 1 is in epoch 1 now
        victims = rank_pids(out, 1)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log[-3000:]
    assert "resumed from" in log and "epoch 1, step 6" in log, log[-3000:]
    assert "exitcode: -9" in log  # the agent saw rank 1 die, and restarted the workers:
    same_metrics(metrics(out), metrics(reference))
    assert ckpt.load(out / "checkpoint.pt")["epoch"] == 1


def test_evaluate_only_from_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    torchrun(shards, out, 1)
    log = torchrun(shards, out, 1, "--evaluate", "--checkpoint", str(out / "checkpoint.pt"))
    result = json.loads([line for line in log.splitlines() if line.startswith('{"top1"')][-1])
    assert result["val_samples"] == 24
