"""Every command line of README.md and docs/*.md runs as written, in the documents' order, on
a tiny synthetic copy, so that no documented command can go stale. What differs from the
page, and why (SWAPS, TRAINING):
- paths outside the working directory (/abs/ILSVRC2017, /datasets/..., /scratch/...,
  /local/nvme/...) are the test's; the bucket is the test server's;
- one CPU process instead of 8 GPUs; training runs one short epoch of a small model on
  small images (the settings appended to every train/main.py line);
- `export-preds --format ilsvrc` needs all 50,000 val images (its positional rule); the
  tiny copy has 1,000, so the test exports the kaggle format there;
- the pages' examples are independent, the test runs them in one folder: the archive copy
  gets its own view (data-archives/), the run from the store its own output dir (resuming
  the local run's checkpoint on other data is refused, as it must be).
Lines for tools the machine has not got (`sbatch`, `make`) are left out; `make demo` and
`make test` are what CI and the demo run anyway."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/prep-imagenet.md", "docs/sharding.md", "docs/training.md",
         "docs/predictions.md", "docs/evalsets.md", "docs/storage.md", "docs/readers.md",
         "docs/cli.md", "docs/benchmarks.md", "docs/reliability.md", "docs/design-notes.md"]
PROGRAMS = ("prep", "torchrun", "python")
TRAINING = ["--device", "cpu", "--set", "epochs=1", "--set", "arch=resnet18", "--set",
            "workers=1", "--set", "image_size=32", "--set", "val_resize=36", "--set",
            "val_crop=32", "--set", "batch_size=64", "--set", "amp=none", "--set",
            "num_classes=1000"]


def doc_commands(page: Path) -> list[str]:
    """The command lines of a page's fenced code blocks: continuation lines joined, comments
    dropped, only lines that start with one of PROGRAMS."""
    out = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", page.read_text(), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.split(" ", 1)[0] in PROGRAMS:
                out.append(line)
    return out


def test_the_pages_hold_the_commands_this_test_runs():
    """The extraction finds the pipeline's commands (so the test below cannot pass empty)."""
    found = [c for p in PAGES for c in doc_commands(ROOT / p)]
    assert len(found) >= 20
    for head in ("prep imagenet", "prep shard", "prep verify", "prep evalset",
                 "prep export-preds", "torchrun", "python train/main.py"):
        assert any(c.startswith(head) for c in found), head


def _swap(cmd: str, src: Path, work: Path, bucket: str) -> list[str]:
    swaps = {"/abs/ILSVRC2017": src / "ILSVRC2017",
             "/datasets/ilsvrc2012-archives": src / "ilsvrc2012-archives",
             "/datasets/imagenet-1k-hf": src / "imagenet-1k-hf",
             "/datasets/imagenetv2-matched-frequency-format-val":
                 src / "imagenetv2-matched-frequency-format-val",
             "/scratch/ilsvrc2012": work / "scratch/ilsvrc2012",
             "/local/nvme/prep-shards": work / "cache",
             "s3://datasets/": f"s3://{bucket}/",
             "--nproc_per_node=8": "--nproc_per_node=1"}
    for old, new in swaps.items():
        cmd = cmd.replace(old, str(new))
    if "--extract-to" in cmd:  # another copy: its own view, beside the first one's
        cmd = cmd.replace("--link data/", "--link data-archives/")
    if "s3://" in cmd and "--output-dir runs/rn50" in cmd:  # the pages' runs/rn50 trained on
        cmd = cmd.replace("runs/rn50", "runs/rn50-s3")  # local shards; resuming it is refused
    args = shlex.split(cmd)
    if "export-preds" in args and "ilsvrc" in args:
        args[args.index("ilsvrc")] = "kaggle"
    if args[0] == "python":
        args[0] = sys.executable
    if "train/main.py" in args:
        args += TRAINING
    return args


@pytest.mark.slow
def test_every_documented_command_runs(tmp_path, s3):
    src, work = tmp_path / "src", tmp_path / "work"
    work.mkdir()
    (work / "train").symlink_to(ROOT / "train")  # the pages run train/main.py from the repo
    prep = [str(Path(sys.executable).with_name("prep")), "sample", "--classes", "1000",
            "--train-per-class", "1", "--val-per-class", "1", "--size", "32"]
    for name, layout in (("ILSVRC2017", "ilsvrc2017"), ("ilsvrc2012-archives", "ilsvrc2012-tar"),
                         ("imagenet-1k-hf", "hf-parquet"),
                         ("imagenetv2-matched-frequency-format-val", "imagenet-v2")):
        subprocess.run([*prep, "--layout", layout, str(src / name)], check=True,
                       capture_output=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    ran = []
    for page in PAGES:
        for cmd in doc_commands(ROOT / page):
            args = _swap(cmd, src, work, s3.bucket)
            done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, (f"{page}: {cmd}\nran: {shlex.join(args)}\n"
                                          f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            ran.append(cmd)
    assert len(ran) >= 20
