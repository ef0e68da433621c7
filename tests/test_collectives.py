"""Gloo collectives return only once gloo's worker thread has let go of the tensor: a rank
that exits right after its last collective must not leave that thread needing the GIL
during interpreter shutdown (SIGABRT, "terminate called without an active exception")."""

import os
import re
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from train.collectives import all_reduce
from train.engine import reduce_sum
from train.preempt import StepControl

ROUNDS = 300


@pytest.fixture
def gloo(tmp_path):
    """A one-rank gloo process group in this process, its collectives on gloo's worker
    threads; this thread and those share one core, as ranks on a busy node do (that is where
    the race shows: 208-232 of 500 plain all-reduces returned early, against 0-1 of 500 with
    both cores free)."""
    assert not dist.is_initialized()
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # threads started from here inherit it
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield dist.new_group(backend="gloo")
    finally:
        dist.destroy_process_group()
        os.sched_setaffinity(0, cores)


def held_after(reduce, rounds=ROUNDS):
    """How many of `rounds` calls of reduce(t) return while something else holds t."""
    held = 0
    for _ in range(rounds):
        t = torch.ones(1)
        before = sys.getrefcount(t)
        reduce(t)
        held += sys.getrefcount(t) > before
    return held


def test_a_plain_all_reduce_can_return_while_gloo_still_holds_the_tensor(gloo):
    """The race the helpers close (a precondition: if torch ever stops holding the
    tensor past wait(), this documents that the helpers became unneeded)."""
    assert held_after(lambda t: dist.all_reduce(t, group=gloo), rounds=5 * ROUNDS) > 0


def test_the_helpers_return_with_the_tensor_theirs_alone(gloo):
    assert held_after(lambda t: all_reduce(t, group=gloo)) == 0
    assert held_after(reduce_sum) == 0


def test_the_step_agreement_collects_each_post_once_gloo_let_go(gloo):
    control = StepControl(None, rank=0, world=2)  # world > 1: posts on its gloo group
    assert control.group is not None
    alike = SimpleNamespace(t=torch.zeros(1))  # held as control holds _posted, by no one else
    alone = sys.getrefcount(alike.t)
    held = 0
    for step in range(1, ROUNDS + 1):
        control.after_step(step)
        control.close()  # waits for the pending all-reduce
        held += sys.getrefcount(control._posted) > alone
    assert held == 0
    assert control.stop_now() is False


LOST = """
import sys, torch, torch.distributed as dist
from train.collectives import lost_peer
dist.init_process_group("gloo", init_method=sys.argv[1], rank=int(sys.argv[2]), world_size=2)
if dist.get_rank() == 1:
    try:  # a collective misused: a bug here, not another rank
        dist.broadcast(torch.ones(1), src=5)  # gloo: "invalid root rank"
    except Exception as exc:
        print("MISUSE", lost_peer(exc), flush=True)
dist.all_reduce(torch.ones(1))
if dist.get_rank() == 0:
    sys.exit(0)  # gone: rank 1's next collective fails
try:
    dist.all_reduce(torch.ones(1))
except RuntimeError as exc:
    print("LOST", lost_peer(exc), flush=True)
"""


def test_a_collective_that_lost_its_peer_is_told_from_a_bug(tmp_path):
    """Two real gloo ranks; rank 0 ends, rank 1's next all-reduce fails. That failure is
    gloo's one reason without its source path or advice; a misused collective is not one."""
    import subprocess

    script = tmp_path / "lost.py"
    script.write_text(LOST)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    init = f"file://{tmp_path / 'store'}"
    ranks = [subprocess.Popen([sys.executable, str(script), init, str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    out = [p.communicate(timeout=120) for p in ranks]
    lines = dict(line.split(" ", 1) for line in out[1][0].splitlines())
    assert set(lines) == {"LOST", "MISUSE"}, out
    assert re.fullmatch(r"(Read error \S+: )?Connection (closed|reset) by peer.*",
                        lines["LOST"]), lines
    assert "gloo" not in lines["LOST"] and "typically" not in lines["LOST"]
    assert lines["MISUSE"] == "None"
