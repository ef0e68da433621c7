#!/usr/bin/env python
"""Run a command and print its wall time and the machine's busy CPU over it (user, nice,
system, irq and softirq jiffies of /proc/stat, Linux). Unlike the command's own rusage,
this counts every process it starts, also those of a forkserver it does not wait for
(prep shard's workers); so run it on an otherwise idle machine.

    .venv/bin/python scripts/cpu_busy.py -- COMMAND [ARGS...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

TICK = os.sysconf("SC_CLK_TCK")


def busy_and_system() -> tuple[float, float]:
    """Seconds of busy CPU and of system CPU since boot, all cores together."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / TICK, system / TICK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command given (after --)")
    cores = os.cpu_count() or 1
    busy0, sys0 = busy_and_system()
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    busy1, sys1 = busy_and_system()
    busy = busy1 - busy0
    print(f"wall {wall:.2f} s  busy {busy:.2f} CPU-s (system {sys1 - sys0:.2f})  "
          f"{busy / wall / cores:.0%} of {cores} cores")


if __name__ == "__main__":
    main()
