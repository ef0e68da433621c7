"""Reused shared-memory batch buffers: the same batches as fresh tensors, no deadlock when
the consumer holds on to slots."""

import pytest
import torch

from tests.conftest import sharded_sample
from train import batch_ring
from train.config import TrainConfig
from train.data import SkipCounter, make_eval_loader, make_train_loader, read_split

CFG = TrainConfig(num_classes=4, image_size=32, val_resize=36, val_crop=32, batch_size=4,
                  workers=1, shuffle_buffer=10)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return sharded_sample(tmp_path_factory.mktemp("ring"), "ilsvrc2017", 2, classes=4,
                          train_per_class=6, val_per_class=3, size=40)


def _batches(loader):
    # a ring batch is valid until the next one is requested: copy it before that
    return [(images.clone(), labels.clone()) for images, labels, *_ in loader]


@pytest.mark.slow
def test_ring_batches_equal_fresh_tensor_batches(shards):
    from dataclasses import replace

    split = read_split(str(shards), "train")
    ring = make_train_loader(split, CFG, 0, 1, 0, SkipCounter(0.01))
    assert isinstance(ring, batch_ring.RingLoader)
    plain = make_train_loader(split, replace(CFG, workers=0), 0, 1, 0, SkipCounter(0.01))
    a, b = _batches(ring), _batches(plain)
    assert len(a) == len(b) == 24 // 4 and ring.from_ring == len(a)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
        assert xa.shape == (4, 3, 32, 32) and xa.dtype == torch.uint8
    # the labels come through the ring's shared buffer too, as a copy: kept uncopied, they
    # stay right after their slot is reused
    kept = [labels for _, labels, *_ in make_train_loader(split, CFG, 0, 1, 0, SkipCounter(0.01))]
    assert [y.tolist() for y in kept] == [y.tolist() for _, y in b]
    val = read_split(str(shards), "val")  # 12 samples: the short last batch too
    ev = _batches(make_eval_loader(val, replace(CFG, batch_size=5), 0, 1, 5))
    ev0 = _batches(make_eval_loader(val, replace(CFG, batch_size=5, workers=0), 0, 1, 5))
    assert [len(y) for _, y in ev] == [5, 5, 2]
    assert all(torch.equal(x, x0) for (x, _), (x0, _) in zip(ev, ev0))


@pytest.mark.slow
def test_worker_falls_back_when_every_slot_is_held(shards, monkeypatch):
    monkeypatch.setattr(batch_ring, "WAIT_S", 0.05)
    split = read_split(str(shards), "train")
    loader = make_train_loader(split, CFG, 0, 1, 0, SkipCounter(0.01))
    loader.ring.free.zero_()  # as if the consumer held every slot
    batches = _batches(loader)  # fresh shared tensors instead: no hang, same content
    plain = _batches(make_train_loader(split, CFG, 0, 1, 0, SkipCounter(0.01)))
    assert len(batches) == 6 and loader.from_ring == 0
    assert all(torch.equal(x, p) for (x, _), (p, _) in zip(batches, plain))
