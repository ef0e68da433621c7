"""Issue: names that break the index files, hostile images in pass-through sharding, and
tracebacks instead of one-line errors. Each failed on the code
before its fix (the round of 2026-11-30: docs/reliability.md, "Misuse, races and hostile
files")."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from prep.cli import _slurm_part
from prep.cli import main as prep_main
from prep.errors import PrepError
from prep.imagenet import prepare_imagenet
from shards.build import ShardSettings, shard_dataset
from tests.conftest import assert_refused, set_jpeg_size, tree_hash

ROOT = Path(__file__).resolve().parents[1]


def _train_dir(src: Path) -> Path:
    return src / "Data/CLS-LOC/train"


@pytest.mark.parametrize("bad", ["a\nb.JPEG", "tab\there.JPEG", "cr\r.JPEG"])
def test_control_characters_in_train_names_are_refused(make_sample, tmp_path, bad):
    src, plan = make_sample("ilsvrc2017")
    wnid = plan.wnids[0]
    first = sorted((_train_dir(src) / wnid).iterdir())[0]
    (_train_dir(src) / wnid / f"{wnid}_{bad}").write_bytes(first.read_bytes())
    assert_refused(src, tmp_path / "data", "control character", repr(f"{wnid}_{bad}")[1:-1])
    assert not (tmp_path / "data/imagenet/meta/train.txt").exists()


def test_os_litter_is_ignored_and_listed(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    wnid = plan.wnids[0]
    cls = _train_dir(src) / wnid
    first = sorted(cls.iterdir())[0]
    litter = [cls / f"._{first.name}", cls / ".DS_Store", cls / "Thumbs.db",
              _train_dir(src) / ".DS_Store", src / "Data/CLS-LOC/val/._x.JPEG"]
    for p in litter:
        p.write_bytes(b"\0\x05\x16\x07 AppleDouble")
    (_train_dir(src) / "__MACOSX").mkdir()
    r = CliRunner().invoke(prep_main, ["imagenet", "-q", "--workers", "1", "--src", str(src),
                                       "--link", str(tmp_path / "data")])
    assert r.exit_code == 0, r.output
    assert "ignored (macOS / Windows metadata" in r.output
    train = (tmp_path / "data/imagenet/meta/train.txt").read_text()
    assert "._" not in train and "DS_Store" not in train and "Thumbs" not in train
    problems = (tmp_path / "data/imagenet/meta/problems.txt").read_text()
    assert f"ignored\tData/CLS-LOC/train/{wnid}/._{first.name}" in problems
    assert "__MACOSX" in problems
    r = shard_dataset(tmp_path / "data/imagenet", tmp_path / "s", ShardSettings(num_shards=2),
                      workers=1, progress=False)
    assert r.info["splits"]["train"]["num_samples"] == len(plan.train) * 4


@pytest.mark.parametrize("second", ["{stem_}.JPEG", "{stem}.png", "{other}/{stem}.JPEG"])
def test_sample_key_collisions_are_found_by_prep_imagenet(make_sample, tmp_path, second):
    src, plan = make_sample("ilsvrc2017")
    w0, w1 = plan.wnids[:2]
    data = sorted((_train_dir(src) / w0).iterdir())[0].read_bytes()
    stem = f"{w0}_dup.x"
    (_train_dir(src) / w0 / f"{stem}.JPEG").write_bytes(data)
    name = second.format(stem_=stem.replace(".", "_"), stem=stem, other=w1)
    where = _train_dir(src) / (name if "/" in name else f"{w0}/{name}")
    where.write_bytes(data)
    assert_refused(src, tmp_path / "data", "would both be sample", f"{w0}/{stem}.JPEG")


def test_source_folder_named_imagenet(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017", name="imagenet")
    r = CliRunner().invoke(prep_main, ["imagenet", "-q", "--workers", "1", "--src", str(src),
                                       "--link", str(tmp_path / "data")])
    assert r.exit_code == 0, r.output
    assert os.readlink(tmp_path / "data/imagenet-source") == str(src)
    assert (tmp_path / "data/imagenet/meta/train.txt").is_file()
    assert not list((tmp_path / "data").glob(".*.tmp"))
    again = CliRunner().invoke(prep_main, ["imagenet", "-q", "--workers", "1", "--src",
                                           str(src), "--link", str(tmp_path / "data")])
    assert again.exit_code == 0 and "up to date" in again.output


@pytest.mark.parametrize("where", ["class", "split", "val"])
def test_symlink_loop_in_src_is_a_clear_error(make_sample, tmp_path, where):
    src, plan = make_sample("ilsvrc2017")
    parent = {"class": _train_dir(src) / plan.wnids[0], "split": _train_dir(src),
              "val": src / "Data/CLS-LOC/val"}[where]
    (parent / "loop.JPEG").symlink_to(parent / "loop.JPEG")
    out = assert_refused(src, tmp_path / "data", "loop.JPEG")
    assert "loop" in out


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_STEP": "4"}, "1/2"),  # --array=0-7:4
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_STEP": "4"}, "0/2"),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "4"},
     "3/4"),  # --array=4-7
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3",
      "SLURM_ARRAY_TASK_STEP": "2"}, "3/4"),  # --array=3-9:2
    ({}, None),
])
def test_slurm_array_parts(env, expected):
    assert _slurm_part(env) == expected


@pytest.mark.parametrize("env, message", [
    ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_COUNT is not"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, "not a whole number"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4.0"}, "not a whole number"),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_STEP": "4"}, "not one of evenly spaced tasks"),
])
def test_bad_slurm_environment_is_a_clear_error(prepared, tmp_path, monkeypatch, env, message):
    data, _ = prepared()
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(prep_main, ["shard", "-q", "--data", str(data), "--out",
                                       str(tmp_path / "s"), "--workers", "1"])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("items, message", [
    ([{"pred_score": torch.rand(4), "gt_label": torch.tensor([], dtype=torch.long)}],
     "gt_label must hold one whole number"),
    ([{"pred_score": "0.1 0.9"}], "pred_score is not numeric"),
    ([{"pred_score": {"a": 1}}], "pred_score is not numeric"),
    ([{"pred_score": [0.1, "x"]}], "pred_score is not numeric"),
    ([{"pred_score": torch.rand(4), "gt_label": "cat"}], "gt_label is not numeric"),
    ([{"pred_score": torch.rand(4), "img_path": 5}], "img_path/key must be a string"),
    ({"class_scores": "abc"}, "class_scores is not numeric"),
    ([{"pred_score": [[0.1, 0.9], [0.3]]}], "pred_score is not numeric"),
])
def test_malformed_pickles_are_one_line_errors(tmp_path, items, message):
    path = tmp_path / "r.pkl"
    path.write_bytes(pickle.dumps(items))
    r = CliRunner().invoke(prep_main, ["export-preds", str(path), "--summary"])
    assert r.exit_code == 1 and message in r.output, r.output
    assert "Traceback" not in r.output and r.output.startswith("error: ")


def _patch_first_sof(path: Path, width: int, height: int) -> None:
    data = bytearray(path.read_bytes())
    set_jpeg_size(data, width, height)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("size", [(0, 40), (40, 0), (20000, 20000)])
def test_pass_through_applies_on_error_to_bad_sizes(prepared, tmp_path, size):
    data, _ = prepared()
    first = (data / "meta/train.txt").read_text().split()[0]
    _patch_first_sof(data / "train" / first, *size)
    with pytest.raises(PrepError, match=rf"{first}: image is {size[0]}x{size[1]}.*--on-error"):
        shard_dataset(data, tmp_path / "fail", ShardSettings(num_shards=2), progress=False)
    r = shard_dataset(data, tmp_path / "skip", ShardSettings(num_shards=2, on_error="skip"),
                      progress=False)
    assert any(first in s for s in r.info["prep"]["skipped"])


def test_plain_verify_flags_bad_sizes_in_shards(prepared, tmp_path):
    from shards.tarread import members
    from shards.verify import verify_shards

    data, _ = prepared()
    out = tmp_path / "s"
    shard_dataset(data, out, ShardSettings(num_shards=2), progress=False)
    tar = out / "train-000000.tar"
    buf = bytearray(tar.read_bytes())
    name, start, _ = next(m for m in members(bytes(buf), str(tar)) if m[0].endswith(".jpg"))
    set_jpeg_size(buf, 0, 0, start)
    tar.write_bytes(bytes(buf))
    r = verify_shards(out, deep=False, progress=False)
    assert any(f"member {name}: image is 0x0 pixels" in p for p in r.problems), r.problems


@pytest.mark.slow
def test_ctrl_c_during_prep_shard_prints_one_line(make_sample, tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does), at several moments:
    one `interrupted` line, exit status 130, no traceback from any process."""
    src, _ = make_sample("ilsvrc2017", classes=8, train_per_class=100, size=128)
    prepare_imagenet(src, tmp_path / "data", progress=False, workers=1)
    before = tree_hash(src)
    checked = 0
    for attempt, delay in enumerate((0.0, 0.1, 0.25, 0.5, 0.05, 0.15, 0.0, 0.02)):
        if checked >= 4:
            break
        out = tmp_path / f"s{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "prep.cli", "shard", "-q", "--data",
             str(tmp_path / "data/imagenet"), "--out", str(out), "--num-shards", "16",
             "--max-size", "32", "--workers", "2"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        deadline = time.time() + 60  # wait until it is writing (workers started)
        while not (out / ".prep-shard/plan.json").exists() and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue  # finished before the signal
        checked += 1
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        assert stderr.strip().splitlines() == [
            "interrupted: rerun the same command to continue where it stopped"], stderr
        assert not list(out.glob("*.partial"))
    assert tree_hash(src) == before
    if checked == 0:  # a machine so loaded that every run ended before its signal
        pytest.skip("every run finished before the signal reached it")


def test_ctrl_c_after_the_work_ends_still_gives_one_line():
    """A SIGINT that lands once the entry point is done, outside exit_on_error (the window
    where CI once saw a process die with -SIGINT and a traceback), still gives one
    `interrupted` line and exit status 130."""
    code = ("import os, signal; from prep.errors import run_program; "
            "run_program(lambda: os.kill(os.getpid(), signal.SIGINT))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "interrupted: rerun the same command to continue where it stopped"], proc.stderr


@pytest.mark.slow
def test_one_error_path_for_both_entry_points():
    """Both `prep` and train/main.py turn PrepError into one `error: ...` line on stderr and
    exit status 1, as real processes (prep.errors.exit_on_error)."""
    for cmd in ([sys.executable, "-m", "prep.cli", "verify", "/nonexistent/s"],
                [sys.executable, "train/main.py", "--data", "/nonexistent/s", "--device",
                 "cpu"]):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stdout == "", (cmd, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: /nonexistent/s/_info.json: "
                                                       "missing"), r.stderr


def test_region_and_strict_check_agree_on_np_data():
    """Sanity: a normal image passes every check (the checks are not just refusing)."""
    from prep import jpeg
    from prep.synth import encode_jpeg, render_class_image

    data = encode_jpeg(render_class_image(0, 3, np.random.default_rng(3), 80))
    assert jpeg.size_problem(*jpeg.jpeg_sof(data)[:2]) is None
    assert jpeg.strict_problem(data) is None
