"""CPU seconds (user + system) of this process and every live process below it, from
/proc (Linux). Loaders spread their work over worker processes and threads, so the CPU
they spend per image is read over the whole tree, not from one process. No dependencies:
the benchmarks' children in other environments (FFCV's venv) import it by path."""

from __future__ import annotations

import os

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of one process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def tree_cpu(root: int | None = None) -> dict[int, float]:
    """{pid: CPU seconds} of `root` (default: this process) and its live descendants."""
    root = os.getpid() if root is None else root
    procs = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(p))}
    family, grew = {root}, True
    while grew:  # parents are listed before or after their children: repeat until stable
        grew = False
        for pid, (ppid, _) in procs.items():
            if ppid in family and pid not in family:
                family.add(pid)
                grew = True
    return {pid: procs[pid][1] for pid in family if pid in procs}


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float | None:
    """CPU seconds the tree spent between two readings; None when a process of either
    reading is missing from the other (one that ended took its CPU time with it)."""
    if before.keys() != after.keys():
        return None
    return sum(after[p] - before[p] for p in after)
