"""shards/write.py's check ahead: a helper thread strict-checks a shard's sources from the
last backwards while the writer goes forwards. What it passes is trusted only while the
file is the one it read; what it fails (or never reached) the writer checks as before."""

import pytest

from prep import jpeg
from shards import tarpack, write
from shards.build import ShardSettings, make_plans
from tests.conftest import sha256_files, truncated_with_eoi

pytestmark = pytest.mark.skipif(not (tarpack.available() and jpeg.available()),
                                reason="the C writer or the strict check is not built")


def _one_train_shard(prepared):
    data, _ = prepared("ilsvrc2012", classes=4, train_per_class=60, val_per_class=1, size=32)
    _, plans, _ = make_plans(data, ShardSettings(num_shards=1))
    plan, = [p for p in plans if p.split == "train"]
    assert len(plan.samples) > 2 * write.RUN  # the writer and the helper each get runs
    return data, plan


def _write(plan, data, out, **settings):
    out.mkdir()
    return write.write_shard(plan, data, out, ShardSettings(on_error="skip", **settings))


def test_the_check_ahead_writes_the_same_shard_and_leaves_a_broken_file_to_the_writer(
        prepared, tmp_path, monkeypatch):
    data, plan = _one_train_shard(prepared)
    broken = plan.samples[-1]  # the helper's first file
    (data / "train" / broken.path).resolve().write_bytes(truncated_with_eoi())
    helpers = []

    def recording(*args):
        helpers.append(_RealCheckAhead(*args))
        return helpers[-1]

    monkeypatch.setattr(write, "CheckAhead", recording)
    with_helper = _write(plan, data, tmp_path / "a")
    assert helpers and helpers[0].passed  # it ran, and passed files the writer then trusted
    assert f"train/{broken.path}" not in helpers[0].passed
    monkeypatch.setattr(write, "CheckAhead", _IdleCheckAhead)
    without = _write(plan, data, tmp_path / "b")
    assert sha256_files((tmp_path / "a").iterdir()) == sha256_files((tmp_path / "b").iterdir())
    for rec in (with_helper, without):
        assert [s.split(":")[0] for s in rec.skipped] == [f"train/{broken.path}"]
        # every other source checked exactly once by this write, and so recorded
        assert sorted(c[0] for c in rec.checked) == sorted(
            f"train/{s.path}" for s in plan.samples if s is not broken)
        assert rec.trusted == 0


def test_a_file_changed_after_the_helper_passed_it_is_checked_again(prepared, tmp_path,
                                                                    monkeypatch):
    data, plan = _one_train_shard(prepared)
    victim = plan.samples[-3]
    seen = []

    def writer_at(self, n):  # before the first run: let the helper finish, then damage
        if not seen:
            self._thread.join()
            seen.append(dict(self.passed))
            (data / "train" / victim.path).resolve().write_bytes(truncated_with_eoi())
        self._limit = n

    monkeypatch.setattr(write.CheckAhead, "writer_at", writer_at)
    rec = _write(plan, data, tmp_path / "out")
    assert f"train/{victim.path}" in seen[0]  # passed before it changed
    assert [s.split(":")[0] for s in rec.skipped] == [f"train/{victim.path}"]
    assert rec.num_samples == len(plan.samples) - 1


_RealCheckAhead = write.CheckAhead


class _IdleCheckAhead(_RealCheckAhead):
    def _run(self) -> None:  # checks nothing: the writer checks every file itself
        return
