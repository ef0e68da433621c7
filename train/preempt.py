"""When a run writes a step checkpoint and when it stops: `--save-every` (steps, or time),
and the preemption signals, SIGTERM and SIGUSR1 (SLURM's `--signal=USR1@120`, the
Kubernetes / spot-VM SIGTERM that torchrun forwards to every rank).

Every rank must write the step checkpoint at the same step (it gathers from all of them),
but a signal reaches the ranks at different moments, and rank 0's clock decides a timed
save. So after each step every rank posts a wish (0 go on, 1 save, 2 save and stop) with
a non-blocking all-reduce (MAX) on a CPU (gloo) group, and all ranks act on the result one
step later: the same step everywhere, without a host sync in the training step. A run
stopped this way exits with EXIT_PREEMPTED after its step checkpoint is whole; the next
start resumes it with `--resume auto`.

A rank whose torchrun agent has ended without stopping it (kill -9, the OOM killer) sends
itself the same SIGTERM (`stop_with_torchrun`), so it stops the same way.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from prep.errors import SettingError
from prep.workers import when_exits
from train.collectives import all_reduce, refs, released

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL, "try again later": checkpointed, resumable
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
GO_ON, SAVE, STOP = 0, 1, 2  # posted as STOP + the signal's number: every rank learns it
UNITS = {"s": 1, "m": 60, "h": 3600}


def stop_with_torchrun(rank: int) -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set), from the start of the rank: when the agent
    that started it (its parent) ends without ending it first (kill -9, the OOM killer),
    the rank SIGTERMs itself and stops as if preempted: a step checkpoint at the next step,
    the same step on every rank (they all lose the agent), exit EXIT_PREEMPTED. Without
    this the ranks trained on with no agent, holding the machine and writing checkpoints
    that nobody would resume. A normal end of torchrun never triggers it: the agent ends
    its ranks before it exits."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    agent = torchrun_agent()

    def agent_gone() -> None:
        sys.stderr.write(f"rank {rank}: torchrun (pid {agent}) has ended and left this rank "
                         "running: stopping it as if preempted (SIGTERM)\n")  # one write
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)

    when_exits(agent, agent_gone)


AGENT_ARGS = (b"torch.distributed.run", b"torch.distributed.launch")


def torchrun_agent() -> int:
    """The pid of the torchrun agent that started this rank: the nearest ancestor that runs
    torchrun (`torchrun ...`, `python -m torch.distributed.run ...`); a shell script or
    other wrapper may stand between them (`torchrun --no-python ./run.sh`), and it lives on
    when the agent is killed. The parent where no ancestor runs torchrun (another launcher
    that sets TORCHELASTIC_RUN_ID)."""
    pid = os.getppid()
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if any(a in AGENT_ARGS or a.rsplit(b"/", 1)[-1] == b"torchrun" for a in argv[:4]):
            return pid
        pid = ppid
    return os.getppid()


class Preempted(Exception):
    """Raised once the step checkpoint of a preemption is written: exit EXIT_PREEMPTED."""


def parse_every(text: str | None) -> tuple[int | None, float | None]:
    """--save-every: (steps, None) for `500`, (None, seconds) for `90s`, `30m`, `1.5h`."""
    if text is None:
        return None, None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m or float(m[1]) <= 0 or (not m[2] and "." in m[1]):
        raise SettingError(f"--save-every {text!r}: expected a number of steps (500) or a "
                           "time (90s, 30m, 1.5h)")
    if not m[2]:
        return int(m[1]), None
    return None, float(m[1]) * UNITS[m[2]]


class StepControl:
    """Decides, after each step, GO_ON / SAVE / STOP, the same on every rank (see the
    module's docstring). `install()` catches SIGTERM and SIGUSR1 (main thread only)."""

    def __init__(self, save_every: str | None, rank: int, world: int):
        self.every_steps, self.every_s = parse_every(save_every)
        self.rank = rank
        self.signal: int | None = None  # the first preemption signal received
        self.signal_at = 0.0
        self.last_save = time.monotonic()
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self._posted = torch.zeros(1, dtype=torch.int64)
        self._before = 0  # refs(self._posted) before it was posted (train/collectives.py)
        self._work = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signal is None:
            self.signal, self.signal_at = signum, time.monotonic()

    def _wish(self) -> int:
        if self.signal is not None:
            return STOP + self.signal
        timed = self.every_s is not None and self.rank == 0 and \
            time.monotonic() - self.last_save >= self.every_s
        return SAVE if timed else GO_ON

    def after_step(self, global_step: int) -> int:
        """What every rank does after this step (called once per step on every rank)."""
        agreed = self._collect()
        if self.group is None:
            agreed = self._wish()
        else:
            self._posted = torch.tensor([self._wish()], dtype=torch.int64)
            self._before = refs(self._posted)
            self._work = dist.all_reduce(self._posted, op=dist.ReduceOp.MAX,
                                         group=self.group, async_op=True)
        if self.every_steps and global_step % self.every_steps == 0:
            agreed = max(agreed, SAVE)
        return self._learn(agreed)

    def _learn(self, agreed: int) -> int:
        """GO_ON / SAVE / STOP; a stop also tells this rank which signal asked for it."""
        if agreed < STOP:
            return agreed
        if self.signal is None:  # another rank's signal
            self.signal, self.signal_at = agreed - STOP, time.monotonic()
        return STOP

    def stop_now(self) -> bool:
        """Blocking agreement (between epochs): whether any rank was asked to stop."""
        agreed = self._collect()
        wish = STOP + self.signal if self.signal is not None else GO_ON
        if self.group is not None:
            t = all_reduce(torch.tensor([wish], dtype=torch.int64), dist.ReduceOp.MAX,
                           self.group)
            wish = int(t.item())
        return self._learn(max(agreed, wish)) == STOP

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def _collect(self) -> int:
        """The agreed wish posted one step before (GO_ON when none is pending)."""
        if self._work is None:
            return GO_ON
        self._work.wait()
        self._work = None  # then gloo's thread lets go of the tensor (train/collectives.py)
        released(self._posted, self._before)
        return int(self._posted.item())

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def close(self, keep_handlers: bool = False) -> None:
        """Let a pending all-reduce finish (every rank has posted as many). After a stop the
        handlers stay (`keep_handlers`): a second SIGTERM, torchrun's to the ranks still
        shutting down, is then recorded, not fatal."""
        self._collect()
        if not keep_handlers:
            self.uninstall()

    def signal_name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a stop request"

    def since_signal(self) -> float:
        return time.monotonic() - self.signal_at if self.signal else 0.0
