"""`--set tensorboard=true`: per-step and per-epoch scalars, each step once after a resume."""

import json
import shutil

import pytest

from tests.conftest import sharded_sample
from train.main import main

pytest.importorskip("tensorboard")  # in the test extra; optional for users

SETTINGS = ["arch=resnet18", "num_classes=4", "image_size=32", "val_resize=36", "val_crop=32",
            "batch_size=8", "workers=1", "shuffle_buffer=20", "lr=0.1", "log_every=1",
            "tensorboard=true"]


def _scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_scalars_match_the_metrics_and_survive_a_resume(tmp_path):
    shards = sharded_sample(tmp_path, "ilsvrc2017", 2, classes=4, train_per_class=8,
                            val_per_class=3, size=40)
    run = tmp_path / "run"
    args = ["--data", str(shards), "--output-dir", str(run), "--device", "cpu",
            *[a for s in SETTINGS for a in ("--set", s)]]
    main([*args, "--set", "epochs=1"])
    shutil.copy(run / "checkpoint.pt", tmp_path / "epoch0.pt")
    main([*args, "--set", "epochs=2", "--resume", "auto"])
    # as if that run had died after logging epoch 1 but before its checkpoint: resume again
    # from epoch 0; epoch 1's steps and metrics must then appear once, not twice
    shutil.copy(tmp_path / "epoch0.pt", run / "checkpoint.pt")
    main([*args, "--set", "epochs=2", "--resume", "auto"])
    s = _scalars(run)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert s["epoch/epoch"] == [(4, 0), (8, 1)]  # at the step where each epoch ended
    assert [v for _, v in s["epoch/top1"]] == pytest.approx([m["top1"] for m in metrics])
    steps = [step for step, _ in s["step/loss"]]
    assert steps == list(range(1, 9))  # 2 epochs x 32 samples / 8 per step, once each
    assert {"step/lr", "step/img_s", "epoch/train_loss", "epoch/val_loss"} <= set(s)
