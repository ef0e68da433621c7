"""A real full disk (a small tmpfs): clear error, previous outputs intact, rerun completes.
Needs permission to mount (root in the CI container); skipped otherwise."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prep.cli import main as prep_main
from prep.errors import PrepError
from shards.build import ShardSettings, shard_dataset
from tests.conftest import tmpfs
from train import checkpoint as ckpt


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "mnt", "size=3m") as mnt:
        yield mnt


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(small_disk):
    path = small_disk / "checkpoint.pt"
    ckpt.save({"w": torch.ones(1000), "epoch": 1}, path)
    with pytest.raises(PrepError, match=r"checkpoint\.pt: could not be written \(No space left "
                       r"on device\); the previous one is intact; free space .*--resume auto"):
        ckpt.save({"w": torch.ones(2_000_000), "epoch": 2}, path)  # 8 MB on a 3 MB disk
    assert ckpt.load(path)["epoch"] == 1  # still loadable, unchanged
    assert sorted(os.listdir(small_disk)) == ["checkpoint.pt"]  # no temp file left behind
    ckpt.save({"w": torch.ones(100_000), "epoch": 2}, path)  # fits: the rerun completes
    assert ckpt.load(path)["epoch"] == 2


@pytest.mark.slow
def test_training_on_a_full_disk_is_one_line_naming_the_checkpoint(small_disk, tmp_path):
    """torch.save reports the full disk as `RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos`; the trainer says what happened, in one line."""
    from tests.conftest import sharded_sample

    data = sharded_sample(tmp_path / "d", "ilsvrc2017", 2, classes=3, train_per_class=8,
                          val_per_class=2, size=40)
    sets = ["arch=resnet18", "num_classes=3", "image_size=32", "val_resize=36",
            "val_crop=32", "batch_size=8", "epochs=1", "workers=0"]
    r = subprocess.run([sys.executable, "train/main.py", "--data", str(data), "--output-dir",
                        str(small_disk / "run"), "--device", "cpu",
                        *[a for s in sets for a in ("--set", s)]],
                       capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: checkpoint \S+/run/\S+\.pt: could not be written \(No space "
                        r"left on device\); none was written before; free space .*", last), last
    assert not [p for p in (small_disk / "run").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_under_torchrun_one_line_per_rank_and_the_summary_names_the_cause(small_disk, tmp_path):
    """3 ranks, rank 0's checkpoint on a full disk: rank 0 says why in one line, the ranks
    that lose it say so in one line each (no gloo traceback), and torchrun's closing
    summary, the end of the log, names rank 0's line as the root cause."""
    from tests.conftest import sharded_sample

    data = sharded_sample(tmp_path / "d", "ilsvrc2017", 3, classes=3, train_per_class=8,
                          val_per_class=2, size=40)
    sets = ["arch=resnet18", "num_classes=3", "image_size=32", "val_resize=36",
            "val_crop=32", "batch_size=4", "epochs=1", "workers=0"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=3", "train/main.py", "--data", str(data),
                        "--output-dir", str(small_disk / "run"), "--device", "cpu",
                        *[a for s in sets for a in ("--set", s)]],
                       capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    log = r.stdout + r.stderr
    assert r.returncode == 1, log[-3000:]
    cause = re.search(r"^error: checkpoint \S+\.pt: could not be written \(No space left on "
                      r"device\).*$", log, re.M)
    assert cause, log[-3000:]
    for rank in (1, 2):
        assert f"[rank{rank}]: Traceback" not in log, log[-5000:]
        assert re.search(rf"^error: rank {rank}: lost contact with another rank \(.*by peer",
                         log, re.M), log[-3000:]
    root = log.split("Root Cause (first observed failure):")[1]
    assert re.search(r"rank\s*: 0 .*\n(.*\n)*?\s*traceback : " + re.escape(cause[0]), root), root


def test_prep_shard_on_a_full_disk_then_rerun(small_disk, tmp_path):
    from prep.imagenet import prepare_imagenet
    from prep.sample import SampleSpec, write_sample
    from shards.tarread import samples
    from shards.verify import verify_shards

    write_sample(tmp_path / "src", "ilsvrc2017", SampleSpec(classes=4, train_per_class=10,
                 val_per_class=3, size=96), progress=False)
    prepare_imagenet(tmp_path / "src", tmp_path / "data", progress=False, workers=1)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (3 * 2**20 - 160 * 1024))  # leave ~160 KB
    out = small_disk / "shards"
    settings = ShardSettings(num_shards=4)
    with pytest.raises((PrepError, OSError), match="No space left on device"):
        shard_dataset(tmp_path / "data/imagenet", out, settings, workers=1, progress=False)
    assert not list(out.rglob("*.partial"))  # no half shard left behind
    for tar in out.glob("*.tar"):  # a shard that exists is complete (10 train, 3 val each)
        assert len(list(samples(str(tar)))) == (10 if tar.name.startswith("train") else 3)
    filler.unlink()  # free the space; the rerun finishes the job
    shard_dataset(tmp_path / "data/imagenet", out, settings, workers=1, progress=False)
    report = verify_shards(out, deep=True, progress=False)
    assert report.ok and report.samples == 4 * 10 + 4 * 3


def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.save({"w": torch.zeros(10), "epoch": 1}, path)
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch; sys.path.insert(0, '.'); from pathlib import Path; "
        "from train import checkpoint as c; "
        f"c.save({{'w': torch.ones(150_000_000), 'epoch': 2}}, Path({str(path)!r}))")])
    tmp = tmp_path / ".checkpoint.pt.tmp"
    deadline = time.time() + 60
    while not (tmp.exists() and tmp.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.01)
    child.kill()  # SIGKILL while the 600 MB temp file is being written
    child.wait()
    assert tmp.exists(), "the kill came too late to test anything"
    assert ckpt.load(path)["epoch"] == 1


@pytest.mark.parametrize("layout", ["hf-parquet", "blurred-tar"])
def test_extraction_on_a_full_disk_blames_the_disk_and_leaves_no_temp_file(
        small_disk, tmp_path, layout):
    from click.testing import CliRunner

    from prep.cli import main as prep_main
    from prep.sample import SampleSpec, write_sample

    write_sample(tmp_path / "src", layout, SampleSpec(classes=4, train_per_class=40,
                 val_per_class=3, size=160), progress=False)
    (small_disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 200 * 1024))  # ~200 KB left
    args = ["imagenet", "-q", "--workers", "1", "--src", str(tmp_path / "src"), "--link",
            str(tmp_path / "data"), "--extract-to", str(small_disk / "x")]
    r = CliRunner().invoke(prep_main, args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "No space left on device" in r.output and "the disk is full" in r.output
    assert "re-download" not in r.output  # the archive is fine
    assert not [p for p in (small_disk / "x").rglob("*.tmp")]
    (small_disk / "filler").unlink()  # space freed: the rerun completes
    r = CliRunner().invoke(prep_main, args)
    assert r.exit_code == 0, r.output


@pytest.fixture
def inode_starved_disk(tmp_path):
    with tmpfs(tmp_path / "mnt", "size=8m,nr_inodes=40") as mnt:
        yield mnt


def test_full_disk_while_making_links(make_sample, inode_starved_disk):
    from prep.imagenet import prepare_imagenet

    src, _ = make_sample("ilsvrc2017", classes=5, val_per_class=10)
    link = inode_starved_disk / "data"
    r = CliRunner().invoke(prep_main, ["imagenet", "-q", "--workers", "1", "--src", str(src),
                                       "--link", str(link)])
    assert r.exit_code == 1 and "could not write the dataset view" in r.output, r.output
    assert "No space left" in r.output and "Traceback" not in r.output
    leftovers = [p for p in link.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert not (link / "imagenet/meta/val.txt").exists()  # no index of links not made
    subprocess.run(["mount", "-o", "remount,nr_inodes=400", str(inode_starved_disk)],
                   check=True)
    report = prepare_imagenet(src, link, progress=False, workers=1)
    assert report.counts["val"] == 50
    assert len(list((link / "imagenet/val").rglob("*.JPEG"))) == 50


def test_src_of_a_compressed_release_refuses_a_disk_without_room_then_rerun(small_disk,
                                                                           tmp_path,
                                                                           monkeypatch):
    """The two-pass path creates its shards at their final size (sparse): a file system
    without room for them is refused before the second pass, in one line; once there is
    room the rerun writes them (the first pass kept)."""
    from prep.sample import SampleSpec, write_sample
    from shards.build import shard_release
    from shards.verify import verify_shards

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_sample(tmp_path / "src", "hf-tar", SampleSpec(classes=4, train_per_class=10,
                 val_per_class=3, size=96), progress=False)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (3 * 2**20 - 160 * 1024))  # leave ~160 KB
    out = small_disk / "shards"
    r = CliRunner().invoke(prep_main, ["shard", "--src", str(tmp_path / "src"), "--out",
                                       str(out), "-q", "--num-shards", "2"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert re.search(r"shards: the shards need 0\.\d+ GB and its file system has 0\.0\d GB "
                     r"free", r.output), r.output
    assert not list(out.glob("*.partial")) and not list(out.glob("*.tar"))
    filler.unlink()
    shard_release(tmp_path / "src", out, ShardSettings(num_shards=2), workers=2,
                  progress=False)
    report = verify_shards(out, deep=True, progress=False)
    assert report.ok and report.samples == 4 * 10 + 4 * 3
