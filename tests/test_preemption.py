"""Preemption-proof training under real torchrun (gloo, CPU): SIGKILL at random steps and
resume, on the same and on other world sizes and worker counts; SIGUSR1 to one rank and
SIGTERM to the whole job; every epoch's receipt against the index; the same-size runs
match the uninterrupted run's every step."""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import kill_job, rank_pids, sharded_sample
from train import checkpoint as ckpt
from train.preempt import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = ["arch=resnet18", "num_classes=6", "image_size=32", "val_resize=36", "val_crop=32",
        "batch_size=8", "lr=0.4", "lr_schedule=cosine", "log_every=1", "epochs=2"]
STEPS = 6  # 96 train samples, 2 ranks x 8 per step


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return sharded_sample(tmp_path_factory.mktemp("preempt"), "ilsvrc2017", 4, classes=6,
                          train_per_class=16, val_per_class=4, size=40)


def command(shards, out, nproc=2, workers=1, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(ROOT / "train/main.py"), "--data", str(shards),
            "--output-dir", str(out), "--device", "cpu",
            *[a for s in [*TINY, f"workers={workers}"] for a in ("--set", s)], *extra]


def run(shards, out, nproc=2, workers=1, *extra, status=0):
    r = subprocess.run(command(shards, out, nproc, workers, *extra), capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == status, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def start(shards, out, nproc=2, workers=1, *extra):
    return subprocess.Popen(command(shards, out, nproc, workers, *extra), cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def wait_for_step(out, step, proc):
    deadline = time.time() + 240
    while len(lines(out / "steps.jsonl")) < step:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)


def running(pid):
    """Whether process `pid` still runs (an exited one whose parent is gone stays a zombie
    where PID 1 does not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def index_receipt(shards):
    """The receipt of a whole epoch, from index.parquet alone (no code of the toolkit)."""
    table = pq.read_table(shards / "index.parquet", columns=["key", "split"]).to_pydict()
    value = 0
    for key, split in zip(table["key"], table["split"]):
        if split == "train":
            value ^= int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return f"{value:016x}"


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    run(shards, out)
    return out


def same_steps(got, want):
    assert [s["step"] for s in got] == [s["step"] for s in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]


def receipts_exact(out, shards, samples=96):
    for m in lines(out / "metrics.jsonl"):
        assert m["coverage_check"] == "exact" and m["samples"] == samples
        assert m["coverage"] == index_receipt(shards)


def test_uninterrupted_run_carries_the_receipt(shards, reference):
    m = lines(reference / "metrics.jsonl")
    assert [x["epoch"] for x in m] == [0, 1]
    receipts_exact(reference, shards)
    assert len(lines(reference / "steps.jsonl")) == 2 * STEPS


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_random_steps_then_resume_matches_every_step(shards, reference, tmp_path,
                                                                seed):
    """Killed at two random steps (one per epoch or both in one), step checkpoints every 2
    steps: each resume continues at the next step after its checkpoint."""
    out = tmp_path / "run"
    cuts = sorted(random.Random(seed).sample(range(2, 2 * STEPS), 2))
    for cut in cuts:
        proc = start(shards, out, 2, 1, "--save-every", "2", "--resume", "auto")
        wait_for_step(out, cut, proc)
        kill_job(proc, out)
    log = run(shards, out, 2, 1, "--save-every", "2", "--resume", "auto")
    assert "resumed from" in log
    same_steps(lines(out / "steps.jsonl"), lines(reference / "steps.jsonl"))
    got, want = lines(out / "metrics.jsonl"), lines(reference / "metrics.jsonl")
    for a, b in zip(got, want):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert (a["top1"], a["val_loss"]) == pytest.approx((b["top1"], b["val_loss"]), rel=1e-6)
    receipts_exact(out, shards)


@pytest.mark.parametrize("before,after,workers_after", [(2, 1, 2), (2, 3, 0), (1, 4, 1)])
def test_resume_on_another_world_size_takes_exactly_the_rest(shards, tmp_path, before, after,
                                                             workers_after):
    out = tmp_path / "run"
    proc = start(shards, out, before, 1, "--save-every", "1")
    wait_for_step(out, 3, proc)
    kill_job(proc, out)
    state = ckpt.load(out / "checkpoint.pt")
    consumed = state["position"]["consumed"]
    assert state["position"]["epoch"] == 0 and 0 < consumed < 96
    log = run(shards, out, after, workers_after, "--resume", "auto")
    assert f"saved on {before} rank(s), now {after}" in log
    m = lines(out / "metrics.jsonl")
    per_step = after * 8
    first = consumed + (96 - consumed) // per_step * per_step  # the rest, whole steps only
    assert [x["samples"] for x in m] == [first, 96 // per_step * per_step]
    assert all(x["coverage_check"] == "exact" for x in m)
    if first == 96:
        assert m[0]["coverage"] == index_receipt(shards)
    steps = [s["step"] for s in lines(out / "steps.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # each step once, in order


def test_sigusr1_to_one_rank_stops_every_rank_at_one_step(shards, reference, tmp_path):
    """SLURM's warning may reach the ranks apart: here only rank 1 gets it. Every rank
    stops after the same step, one checkpoint is written, the status is documented."""
    out = tmp_path / "run"
    proc = start(shards, out)
    wait_for_step(out, 4, proc)
    victims = rank_pids(out, 1)
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGUSR1)
    log, _ = proc.communicate(timeout=120)
    assert f"exit status {EXIT_PREEMPTED}" in log and "SIGUSR1" in log, log[-3000:]
    assert re.search(rf"exitcode\s*:\s*{EXIT_PREEMPTED}", log), log[-3000:]  # torchrun's report
    stopped = json.loads((out / "preempted.json").read_text())
    assert stopped["signal"] == "SIGUSR1" and stopped["exit_status"] == EXIT_PREEMPTED
    state = ckpt.load(out / "checkpoint.pt")
    assert state["step"] == stopped["step"] and state["position"]["consumed"] > 0
    run(shards, out, 2, 1, "--resume", "auto")
    assert not (out / "preempted.json").exists()
    same_steps(lines(out / "steps.jsonl"), lines(reference / "steps.jsonl"))
    receipts_exact(out, shards)


def test_sigterm_to_the_whole_job_checkpoints_within_the_grace_time(shards, reference,
                                                                    tmp_path):
    """SLURM's preemption sends SIGTERM to every process of the job (torchrun, ranks, data
    workers): the workers leave it to their rank, torchrun forwards it, and the ranks stop
    together after a checkpoint well inside torchrun's 30 s grace."""
    out = tmp_path / "run"
    proc = start(shards, out, 2, 2)
    wait_for_step(out, 3, proc)
    t = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    for pid in rank_pids(out, 0) + rank_pids(out, 1):
        os.kill(pid, signal.SIGTERM)  # the ranks run in their own sessions under torchrun
    log, _ = proc.communicate(timeout=120)
    assert time.time() - t < 30
    assert "SIGTERM" in log and "step checkpoint written" in log, log[-3000:]
    run(shards, out, 2, 2, "--resume", "auto")
    same_steps(lines(out / "steps.jsonl"), lines(reference / "steps.jsonl"))
    receipts_exact(out, shards)


@pytest.mark.parametrize("wrapped", [False, True], ids=["direct", "shell-wrapper"])
def test_kill_9_of_torchrun_stops_its_ranks_with_a_step_checkpoint(shards, reference,
                                                                   tmp_path, wrapped):
    """torchrun's agent killed alone (kill -9, the OOM killer): its ranks used to train on
    to the end with no agent. Each rank now notices, and they stop together as if
    preempted: one step checkpoint, then exit; the resumed run matches the reference. Also
    where a shell script stands between torchrun and the rank (`torchrun --no-python
    run.sh`): the script outlives the agent, so the rank watches the agent, not its
    parent."""
    out = tmp_path / "run"
    if wrapped:
        script = tmp_path / "run.sh"  # no exec: the shell stays the rank's parent
        script.write_text(f'#!/bin/sh\n"{sys.executable}" "{ROOT / "train/main.py"}" "$@"\n'
                          'status=$?\nexit $status\n')
        script.chmod(0o755)
        args = command(shards, out, 2, 2)
        at = args.index(str(ROOT / "train/main.py"))
        proc = subprocess.Popen([*args[:at], "--no-python", str(script), *args[at + 1:]],
                                cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    else:
        proc = start(shards, out, 2, 2)
    wait_for_step(out, 3, proc)
    ranks = rank_pids(out, 0) + rank_pids(out, 1)
    assert len(ranks) == 2
    t = time.time()
    os.kill(proc.pid, signal.SIGKILL)  # the agent only: its ranks run in their own sessions
    log, _ = proc.communicate(timeout=120)  # the ranks hold its output pipe until they end
    assert time.time() - t < 60
    assert not any(running(pid) for pid in ranks), log[-3000:]
    assert log.count("has ended and left this rank running") == 2, log[-3000:]
    assert "SIGTERM: stopped; step checkpoint written" in log, log[-3000:]
    stopped = json.loads((out / "preempted.json").read_text())
    assert stopped["signal"] == "SIGTERM" and stopped["exit_status"] == EXIT_PREEMPTED
    assert stopped["step"] < 2 * STEPS  # before the end: stopped, not finished
    assert ckpt.load(out / "checkpoint.pt")["step"] == stopped["step"]
    run(shards, out, 2, 2, "--resume", "auto")
    same_steps(lines(out / "steps.jsonl"), lines(reference / "steps.jsonl"))
    receipts_exact(out, shards)
