"""train/resumable.py: a loader whose position is (epoch, consumed); exactly once, exact
resume, elastic, with a receipt anyone can recompute from the index."""

import pickle
from collections import Counter

import pytest
import torch

from prep.errors import SampleError
from tests.conftest import sharded_sample
from train.data import collate
from train.decode import TrainDecoder
from train.resumable import (
    ResumableLoader,
    SplitRows,
    coverage_hex,
    epoch_order,
    key_hash,
    key_hashes,
    planned_coverage,
    read_rows,
)

B = 3


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resumable")
    shards = sharded_sample(tmp, "ilsvrc2017", 3, classes=4, train_per_class=6,
                            val_per_class=1, size=48)
    return read_rows(shards, "train")  # 24 samples in 3 shards


def _loader(rows, rank=0, world=1, workers=0, batch=B, seed=5):
    return ResumableLoader(rows, TrainDecoder(32, 0.3, True, seed=seed), batch_size=batch,
                           rank=rank, world=world, seed=seed, workers=workers,
                           collate=collate)


def _keys(batches):
    return [k for b in batches for k in b[-1]]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_sample_once_per_epoch_on_any_world_size(rows, world):
    seen = Counter()
    steps = set()
    for rank in range(world):
        batches = list(_loader(rows, rank, world))
        steps.add(len(batches))
        seen.update(_keys(batches))
    n, per_step = len(rows.keys), world * B
    assert len(steps) == 1 and steps.pop() == n // per_step  # equal steps: no DDP hang
    assert max(seen.values()) == 1 and sum(seen.values()) == n // per_step * per_step
    if n % per_step == 0:
        assert set(seen) == set(rows.keys)


@pytest.mark.parametrize("cut,workers_after", [(1, 0), (5, 0), (3, 2)])
@pytest.mark.slow
def test_resume_gives_the_same_batches_as_an_uninterrupted_epoch(rows, cut, workers_after):
    whole = list(_loader(rows))
    first = _loader(rows)
    it = iter(first)
    for _ in range(cut):
        next(it)
    state = first.state_dict()
    assert state["consumed"] == cut * B and state["epoch"] == 0  # a few integers
    again = _loader(rows, workers=workers_after)  # another worker count: same batches
    again.load_state_dict(state)
    rest = list(again)
    assert _keys(rest) == _keys(whole[cut:])
    for a, b in zip(rest, whole[cut:]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # pixels and labels
    assert again.state_dict()["epoch"] == 1  # and on to the next epoch


@pytest.mark.parametrize("before,after", [(4, 2), (4, 3), (1, 4)])
def test_elastic_resume_takes_exactly_the_rest_of_the_epoch(rows, before, after):
    n = len(rows.keys)
    first = [_loader(rows, r, before, batch=2) for r in range(before)]
    taken = []
    for loader in first:  # one global step on every rank
        taken += next(iter(loader))[-1]
    state = first[0].state_dict()
    assert all(x.state_dict() == state for x in first) and state["consumed"] == before * 2
    rest, steps = [], set()
    for r in range(after):
        loader = _loader(rows, r, after, batch=2)
        loader.load_state_dict(state)
        batches = list(loader)
        steps.add(len(batches))
        rest += _keys(batches)
    order = epoch_order(n, 5, 0)
    left = n - state["consumed"]
    full = left // (after * 2) * after * 2  # the rule: whole global batches only
    assert len(steps) == 1
    assert sorted(rest) == sorted(rows.keys[i] for i in order[state["consumed"]:][:full])
    assert not set(rest) & set(taken)


def test_receipt_equals_the_index_value(rows):
    """24 samples, 2 ranks x 3 per step: the epoch covers the whole split, so the ranks'
    receipts combined (XOR) equal the value of the whole split from the index alone."""
    value = 0
    for r in range(2):
        loader = _loader(rows, r, 2)
        list(loader)
        assert loader.finished[:2] == (0, 24) and loader.coverage == 0  # the next epoch's
        value ^= loader.finished[2]
    assert coverage_hex(value) == planned_coverage(key_hashes(rows.keys), epoch_order(24, 5, 0))
    everything = 0
    for k in rows.keys:
        everything ^= key_hash(k)
    assert coverage_hex(value) == coverage_hex(everything)
    assert len(coverage_hex(value)) == 16


def test_a_state_from_another_run_is_refused(rows):
    state = _loader(rows).state_dict()
    with pytest.raises(ValueError, match="seed 5, this loader has 6"):
        _loader(rows, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples 99"):
        _loader(rows).load_state_dict({**state, "num_samples": 99})


def test_bytes_that_are_not_the_indexed_ones_stop_the_read(rows, tmp_path):
    from dataclasses import replace

    bad = replace(rows, crcs=[c ^ 1 for c in rows.crcs])
    with pytest.raises(SampleError, match="not the bytes index.parquet recorded"):
        next(iter(_loader(bad)))


@pytest.mark.slow
def test_an_abandoned_loader_lets_its_workers_go_at_once(rows):
    """A loader dropped mid-epoch (a seek, a stopped loop) stops its workers at once: its
    sampler holds no reference back to the loader, so the DataLoader iterator is freed by
    reference counting, not by a cycle collection that first closes its queues (each worker
    then hung for torch's 5 s timeout: 10 s with 2 workers)."""
    import gc
    import time

    loader = _loader(rows, workers=2)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    del it, loader
    gc.collect()
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("keys", [["a", "b", "c"], ["one"], [""], [], ["x\ny", "z"], ["", ""]])
def test_rows_pickle_packed_and_come_back_equal(rows, keys):
    """SplitRows travel to every loader worker packed (keys joined, shard numbers, arrays);
    they must come back equal, whatever the keys hold."""
    n = len(keys)
    mine = SplitRows(keys, [rows.shards[i % len(rows.shards)] for i in range(n)],
                     [512 * i for i in range(n)], [2**32 - 1 - i for i in range(n)])
    back = pickle.loads(pickle.dumps(mine))
    assert back == mine
    assert pickle.loads(pickle.dumps(rows)) == rows


@pytest.mark.parametrize("keys", [[], ["n01440764_10026"], ["ä", "x" * 300, "", "a/b"]])
def test_key_hashes_are_each_keys_key_hash(keys):
    assert key_hashes(keys).dtype == "uint64"
    assert key_hashes(keys).tolist() == [key_hash(k) for k in keys]
