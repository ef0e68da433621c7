import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from prep.cli import LocalPath, _slurm_part, main
from prep.cli import main as prep_main


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output.splitlines()) > 5


def test_sample_then_imagenet_prints_summary_and_is_idempotent(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["sample", str(tmp_path / "src"), "--layout", "kaggle",
                             "--classes", "3", "--train-per-class", "2", "--val-per-class", "2",
                             "--bad-files"])
    assert r.exit_code == 0, r.output
    assert "3 classes, 6 train, 6 val" in r.output and "planted cmyk" in r.output
    args = ["imagenet", "-q", "--src", str(tmp_path / "src"), "--link", str(tmp_path / "data")]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "kaggle (flat val)" in r.output
    assert "val XML annotations + LOC_val_solution.csv (all agree)" in r.output
    r = runner.invoke(main, args)
    assert r.exit_code == 0 and "up to date, nothing changed" in r.output


def test_sample_rejects_bad_class_count(tmp_path):
    r = CliRunner().invoke(main, ["sample", str(tmp_path / "x"), "--classes", "1001"])
    assert r.exit_code != 0 and "--classes must be 1..1000" in r.output


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "prep.cli", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("prep, version")


@pytest.mark.slow
def test_every_option_is_in_the_reference():
    """docs/cli.md holds every command's --help; an option missing there fails here (to
    regenerate: each `prep COMMAND --help` and `python train/main.py --help`, in fences)."""

    from train.main import parse_args  # noqa: F401 - its parser is built in parse_args

    reference = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    missing = []
    for name, command in sorted(main.commands.items()):
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-") and opt not in reference:
                    missing.append(f"prep {name} {opt}")
    trainer = subprocess.run([sys.executable, "train/main.py", "--help"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    import re

    for opt in sorted(set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", trainer))):
        if opt not in reference:
            missing.append(f"train/main.py {opt}")
    assert missing == []


def test_a_url_is_never_taken_for_a_local_path(tmp_path, monkeypatch):
    """`prep shard --out s3://bucket/ds` wrote a folder `s3:/bucket/ds` and exited 0."""
    monkeypatch.chdir(tmp_path)
    checked = 0
    for name, command in sorted(main.commands.items()):
        for param in command.params:
            if type(param.type).__name__ != "LocalPath":
                continue
            flag = param.opts[0]
            args = [name, "s3://bucket/ds"] if not flag.startswith("-") else \
                [name, flag, "s3://bucket/ds"]
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 2 and "a URL; this option takes a local path" in r.output, \
                (name, flag, r.output)
            checked += 1
    assert checked >= 10 and list(tmp_path.iterdir()) == []  # nothing written, no `s3:`
    from train.main import main as train_main

    for flag in ("--output-dir", "--checkpoint", "--out", "--recipe", "--resume",
                 "--cache-dir"):
        with pytest.raises(SystemExit, match=f"{flag} gs://b/x: a URL"):
            train_main(["--data", str(tmp_path), flag, "gs://b/x"])
        with pytest.raises(SystemExit, match=f"{flag} s3:/b/x: a URL without its '//'"):
            train_main(["--data", str(tmp_path), flag, "s3:/b/x"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("typed, meant", [("s3:/bucket/ds", "s3://bucket/ds"),
                                          ("s3:bucket/ds", "s3://bucket/ds"),
                                          ("GS:/bucket/ds", "GS://bucket/ds"),
                                          ("https:/host/ds", "https://host/ds")])
def test_a_url_typed_without_its_slashes_is_never_taken_for_a_local_path(tmp_path, monkeypatch,
                                                                         typed, meant):
    """`s3:/bucket/ds` is a valid relative path: taken as one, it became a folder `s3:`."""
    monkeypatch.chdir(tmp_path)
    checked = 0
    for name, command in sorted(main.commands.items()):
        for param in command.params:
            if not isinstance(param.type, LocalPath):
                continue
            flag = param.opts[0]
            args = [name, typed] if not flag.startswith("-") else [name, flag, typed]
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 2 and f"did you mean {meant}?" in r.output, \
                (name, flag, r.output)
            checked += 1
    assert checked >= 10 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url, why", [("s3://Bucket/ds", "not an s3://BUCKET/PREFIX URL"),
                                      ("s3://ab/ds", "not an s3://BUCKET/PREFIX URL"),
                                      ("s3://bucket//ds", "empty path segment"),
                                      ("s3://bucket/a/../ds", "'.' or '..' segment"),
                                      ("s3://bucket/./ds", "'.' or '..' segment")])
def test_a_store_url_the_toolkit_cannot_use_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                       url, why):
    monkeypatch.chdir(tmp_path)
    for args in (["shard", "--data", str(tmp_path), "--out", url], ["verify", url]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and url in r.output and why in r.output, (args, r.output)
    assert list(tmp_path.iterdir()) == []


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
