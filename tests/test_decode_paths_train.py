"""Training with the fast decode path reaches the accuracy of the plain Pillow path."""

import pytest

from tests.conftest import sharded_sample
from train.main import main

SETTINGS = ["arch=resnet18", "num_classes=8", "image_size=32", "val_resize=36", "val_crop=32",
            "min_scale=0.35", "batch_size=16", "workers=1", "shuffle_buffer=100", "lr=0.2",
            "lr_schedule=cosine", "warmup_epochs=0.5", "epochs=4", "log_every=50"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return sharded_sample(tmp_path_factory.mktemp("paths"), "ilsvrc2017", 2, classes=8,
                          train_per_class=40, val_per_class=10, size=64)


def _train(shards, out, decode):
    return main(["--data", str(shards), "--output-dir", str(out), "--device", "cpu",
                 "--decode", decode, *[a for s in SETTINGS for a in ("--set", s)]])


@pytest.mark.slow
def test_region_decoder_and_plain_pillow_train_alike(shards, tmp_path, capsys):
    fast = _train(shards, tmp_path / "cpu", "cpu")
    from train import jpeg_region

    expected = "decode: cpu (region decoder)" if jpeg_region.available() else "decode: cpu"
    assert expected in capsys.readouterr().out
    plain = _train(shards, tmp_path / "pil", "pil")
    assert fast["top1"] > 0.6 and plain["top1"] > 0.6  # chance is 0.125
    assert abs(fast["top1"] - plain["top1"]) <= 0.15


def test_gpu_decode_without_cuda_is_a_clear_error(shards, tmp_path):
    with pytest.raises(SystemExit, match="--decode gpu: no nvJPEG decode on cpu"):
        _train(shards, tmp_path / "gpu", "gpu")
