#!/usr/bin/env python
"""Fault injection: SIGKILL `prep` commands at random moments, rerun, compare with a clean run.

For each command: one uninterrupted reference run, then N trials of (start, SIGKILL the
whole process group after a random delay within the reference duration, check that every
finished-looking output file equals the reference's, rerun to completion, compare the whole
output tree with the reference: names, types, link targets, contents; mtimes excluded).

    .venv/bin/python scripts/fault_kill.py [--trials 20] [--root /tmp/fault-kill]
        [--only TEXT]   (the commands whose name holds TEXT, e.g. "extract-to")
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PARTIAL = (".partial", ".tmp")


def tree(root: Path) -> dict[str, str]:
    """{relative path: digest of content or link target} for everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir() and not os.listdir(p):
                out[rel] = "empty-dir"
    return out


def finished_looking(files: dict[str, str]) -> dict[str, str]:
    """Outputs a reader would take as complete: no temporary names anywhere in the path."""
    return {k: v for k, v in files.items()
            if not any(part.startswith(".") or part.endswith(PARTIAL)
                       for part in Path(k).parts)}


def run_killed(cmd: list[str], delay: float) -> bool:
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return False  # finished before the kill
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def trials(name: str, cmd: list[str], outs: list[Path], n: int, rng: random.Random) -> dict:
    for o in outs:
        shutil.rmtree(o, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    duration = time.perf_counter() - t
    ref = {str(o): tree(o) for o in outs}
    result = {"name": name, "duration": duration, "killed": 0, "ok": 0, "bad_partial": 0,
              "bad_final": 0, "done_fraction": []}
    for _ in range(n):
        for o in outs:
            shutil.rmtree(o, ignore_errors=True)
        delay = rng.uniform(0.05, duration)
        killed = run_killed(cmd, delay)
        result["killed"] += killed
        partial_ok, done = True, 0
        for o in outs:
            now = finished_looking(tree(o)) if o.exists() else {}
            done += sum(1 for k in now if ref[str(o)].get(k) == now[k])
            partial_ok &= all(ref[str(o)].get(k) == v for k, v in now.items())
        result["done_fraction"].append(done / max(1, sum(len(r) for r in ref.values())))
        result["bad_partial"] += not partial_ok
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        final_ok = all(tree(o) == ref[str(o)] for o in outs)
        result["bad_final"] += not final_ok
        result["ok"] += partial_ok and final_ok
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--root", type=Path, default=Path("/tmp/fault-kill"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="only the commands whose name holds this")
    a = ap.parse_args()
    prep = str(Path(sys.executable).with_name("prep"))
    root, rng = a.root, random.Random(a.seed)
    shutil.rmtree(root, ignore_errors=True)
    sample = [prep, "sample", "--classes", "20", "--train-per-class", "60", "--val-per-class",
              "10", "--size", "160", "--seed", "1"]
    subprocess.run([*sample, str(root / "src"), "--layout", "ilsvrc2017"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([*sample, str(root / "tars"), "--layout", "ilsvrc2012-tar"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([prep, "sample", str(root / "big"), "--layout", "ilsvrc2017", "--classes",
                    "1000", "--train-per-class", "2", "--val-per-class", "50",
                    "--empty-files"], check=True, stdout=subprocess.DEVNULL)
    data = root / "data"
    subprocess.run([prep, "imagenet", "-q", "--src", str(root / "src"), "--link", str(data)],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*sample, str(root / "blurred"), "--layout", "blurred-tar"], check=True,
                   stdout=subprocess.DEVNULL)
    commands = [
        ("prep shard (2 workers, 32 shards)",
         [prep, "shard", "-q", "--data", str(data / "imagenet"), "--out",
          str(root / "shards"), "--workers", "2", "--num-shards", "16"], [root / "shards"]),
        ("prep imagenet (1000 classes, 50,000 val links)",
         [prep, "imagenet", "-q", "--src", str(root / "big"), "--link", str(root / "view")],
         [root / "view"]),
        ("prep imagenet --extract-to (ILSVRC2012 archives)",
         [prep, "imagenet", "-q", "--src", str(root / "tars"), "--link", str(root / "tview"),
          "--extract-to", str(root / "x")], [root / "tview", root / "x"]),
        ("prep imagenet --extract-to (face-blurred tar.gz)",
         [prep, "imagenet", "-q", "--src", str(root / "blurred"), "--link",
          str(root / "bview"), "--extract-to", str(root / "bx")],
         [root / "bview", root / "bx"]),
    ]
    results = [trials(name, cmd, outs, a.trials, rng) for name, cmd, outs in commands
               if a.only in name]
    print(f"\n{a.trials} trials each, seed {a.seed}, {time.strftime('%Y-%m-%d')}\n")
    print("| command | clean run s | killed mid-run | finished-looking files wrong | "
          "rerun differs | trials OK | work done at kill (min..max) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        f = r["done_fraction"]
        print(f"| {r['name']} | {r['duration']:.1f} | {r['killed']} | {r['bad_partial']} | "
              f"{r['bad_final']} | {r['ok']}/{a.trials} | {min(f):.0%}..{max(f):.0%} |")
    if any(r["ok"] != a.trials for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
