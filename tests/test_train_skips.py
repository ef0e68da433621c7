"""Corrupt samples in the shards: training skips a few with a warning, aborts above the rate."""

import json

import numpy as np
import pytest

from prep.synth import encode_jpeg, render_class_image
from shards.tario import TarStream
from train.config import TrainConfig
from train.data import SkipCounter, make_train_loader, read_split


class _File:
    def __init__(self, f):
        self.f = f

    def writev(self, buffers):
        for b in buffers:
            self.f.write(b)


def _shards(tmp_path, bad: int, n: int = 60, num_shards: int = 2):
    rng = np.random.default_rng(0)
    good = encode_jpeg(render_class_image(1, 4, rng, 48))
    names, lengths = [], []
    for s in range(num_shards):
        name = f"train-{s:06d}.tar"
        with open(tmp_path / name, "wb") as f:
            tar = TarStream(_File(f))
            count = 0
            for i in range(s, n, num_shards):
                jpg = b"\xff\xd8 not a jpeg" if i < bad else good
                tar.add_many([(f"k{i}.cls", b"1"), (f"k{i}.jpg", jpg)])
                count += 1
            tar.close()
        names.append(name)
        lengths.append(count)
    info = {"name": "t", "num_classes": 4, "classes": ["a", "b", "c", "d"],
            "splits": {"train": {"name": "train", "num_samples": n, "filenames": names,
                                 "shard_lengths": lengths}}}
    (tmp_path / "_info.json").write_text(json.dumps(info))
    return read_split(str(tmp_path), "train")


CFG = TrainConfig(batch_size=6, workers=0, image_size=32, shuffle_buffer=10,
                  max_skip_rate=0.05)


def test_a_few_corrupt_samples_are_skipped(tmp_path, capsys):
    split = _shards(tmp_path, bad=3)
    batches = list(make_train_loader(split, CFG, 0, 1, 0, SkipCounter(CFG.max_skip_rate)))
    assert len(batches) == 60 // 6 and all(b[0].shape == (6, 3, 32, 32) for b in batches)
    out = capsys.readouterr().out
    # k0..k2 are bad; the stream repeats to fill the last steps, so one may come round again
    assert 3 <= out.count("warning: skipping a sample") <= 6
    assert "train-000000.tar: member k0.jpg: UnidentifiedImageError" in out


def test_too_many_corrupt_samples_abort(tmp_path):
    split = _shards(tmp_path, bad=30)
    with pytest.raises(RuntimeError, match="unreadable samples out of .* max_skip_rate"):
        list(make_train_loader(split, CFG, 0, 1, 0, SkipCounter(CFG.max_skip_rate)))


def _garble_middle_of_a_jpg(shards_dir):
    """1 KB of garbage in the middle of the first train sample's JPEG, tar intact."""
    import pyarrow.parquet as pq

    rows = pq.read_table(shards_dir / "index.parquet").to_pylist()
    row = next(r for r in rows if r["split"] == "train" and r["jpg_bytes"] > 2500)
    cls_member = 512 + 512  # the sample's cls header + data block, then the jpg header
    start = row["offset"] + cls_member + 512 + row["jpg_bytes"] // 2 - 512
    with open(shards_dir / row["shard"], "r+b") as f:
        f.seek(start)
        f.write(np.random.default_rng(1).bytes(1024))
    return row


def test_a_jpg_with_garbage_inside_is_never_trained_on(tmp_path, capsys):
    """The region decoder decodes such a JPEG without a word: the index's CRC-32 catches it,
    in training (skipped, named) and in evaluation (stops, named)."""
    from prep.errors import SampleError
    from tests.conftest import sharded_sample
    from train.data import make_eval_loader

    shards = sharded_sample(tmp_path, "ilsvrc2017", 2, classes=3, train_per_class=6,
                            val_per_class=2, size=160)
    row = _garble_middle_of_a_jpg(shards)
    split = read_split(str(shards), "train")
    cfg = TrainConfig(batch_size=2, workers=0, image_size=32, shuffle_buffer=4,
                      max_skip_rate=0.5)
    list(make_train_loader(split, cfg, 0, 1, 0, SkipCounter(cfg.max_skip_rate)))
    out = capsys.readouterr().out
    assert f"{row['shard']}: member {row['key']}.jpg: its CRC-32 differs from index.parquet" \
        in out
    train_only = read_split(str(shards), "train")  # evaluated as if it were val: stops
    with pytest.raises(SampleError, match=f"member {row['key']}.jpg: its CRC-32 differs"):
        list(make_eval_loader(train_only, cfg, 0, 1, 2))
