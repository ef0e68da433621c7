from collections import Counter

import pytest

from prep.errors import PrepError
from shards.plan import assign, default_num_shards
from shards.source import Sample, read_classes, read_samples


def _samples(n):
    return [Sample(f"k{i}", f"w/k{i}.JPEG", i % 3, "w", i + 1) for i in range(n)]


@pytest.mark.parametrize("n,expected", [(1_281_167, 1024), (50_000, 64), (100_000, 64),
                                        (600, 8), (5, 5), (20_000, 64)])
def test_default_shard_counts(n, expected):
    assert default_num_shards(n) == expected


def test_train_is_a_seeded_permutation_dealt_round_robin():
    s = _samples(103)
    plans = assign("train", s, 7, seed=1)
    sizes = [len(p.samples) for p in plans]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103
    keys = [x.key for p in plans for x in p.samples]
    assert Counter(keys) == Counter(x.key for x in s)  # each exactly once
    assert keys != [x.key for x in s]  # shuffled
    assert [x.key for p in assign("train", s, 7, seed=1) for x in p.samples] == keys
    assert [x.key for p in assign("train", s, 7, seed=2) for x in p.samples] != keys
    assert plans[0].name == "train-000000.tar"


def test_val_keeps_file_order():
    s = _samples(50)
    plans = assign("val", s, 4, seed=1)
    assert [x.key for p in plans for x in p.samples] == [x.key for x in s]
    assert [len(p.samples) for p in plans] == [13, 13, 12, 12]


def test_read_split_matches_meta(prepared):
    data, plan = prepared()
    wnids = read_classes(data)
    assert wnids == plan.wnids
    val = read_samples(data, "val", wnids)
    assert [s.key for s in val] == sorted(plan.val)
    assert all(s.label == wnids.index(plan.val[s.key]) for s in val)
    test = read_samples(data, "test", wnids)
    assert [s.label for s in test] == [-1, -1]


@pytest.mark.parametrize("line,message", [
    ("n0000/x.JPEG", "expected 'path label'"),
    ("{w}/x.JPEG 99", "out of range"),
    ("{w}/x.JPEG {other}", "but folder"),
])
def test_bad_meta_lines(prepared, line, message):
    data, plan = prepared()
    w, other = plan.wnids[0], 1
    ann = data / "meta/train.txt"
    ann.write_text(ann.read_text() + line.format(w=w, other=other) + "\n")
    with pytest.raises(PrepError, match=rf"train.txt:21: .*{message}"):
        read_samples(data, "train", read_classes(data))


def test_missing_meta_files(prepared):
    data, _ = prepared()
    (data / "meta/val.txt").unlink()
    with pytest.raises(PrepError, match=r"meta/val.txt: missing"):
        read_samples(data, "val", read_classes(data))
    (data / "meta/classes.csv").unlink()
    (data / "meta/synsets.txt").unlink()
    with pytest.raises(PrepError, match="no classes.csv"):
        read_classes(data)
