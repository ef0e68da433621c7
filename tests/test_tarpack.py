"""The C pass-through writer (shards/tarpack.c) writes exactly what the Python writer does,
and hands every sample it cannot pass through (repairs, resizes, broken files) to Python."""

import zlib

import pytest

from shards import tarpack
from shards.build import ShardSettings, make_plans
from shards.dali_index import dali_index, index_path
from shards.write import write_shard
from tests.conftest import sha256_files

pytestmark = pytest.mark.skipif(not tarpack.available(),
                                reason="shards/_tarpack.so not built (scripts/setup.sh)")


@pytest.mark.parametrize("max_size", [None, 48])
def test_c_writer_is_byte_identical_to_the_python_writer(prepared, tmp_path, monkeypatch,
                                                          max_size):
    """Each shard written in this process (pool workers start from a forkserver and would
    not see the monkeypatches) by the C writer, then by the Python one."""
    data, plan = prepared("ilsvrc2012", bad_files=True)  # CMYK, PNG, grayscale, truncated
    _, plans, _ = make_plans(data, ShardSettings(num_shards=2))
    opts = ShardSettings(max_size=max_size, on_error="skip")
    real, via_c = tarpack.write_samples, []

    def counting(*args):
        done, end, rows = real(*args)
        via_c.append(done)
        return done, end, rows

    monkeypatch.setattr(tarpack, "write_samples", counting)
    (tmp_path / "c").mkdir()
    fast = [write_shard(p, data, tmp_path / "c", opts) for p in plans]
    monkeypatch.setattr(tarpack, "_lib", None)
    (tmp_path / "py").mkdir()
    slow = [write_shard(p, data, tmp_path / "py", opts) for p in plans]
    repairs = sorted(x for r in fast for x in r.rows["repaired"] if x)
    assert repairs == ["cmyk", "grayscale", "png"]
    c, py = (sorted((tmp_path / d).iterdir()) for d in ("c", "py"))
    assert len(c) == 2 * 2 * 3  # 2 shards + their DALI indexes, for each of 3 splits
    assert sha256_files(c) == sha256_files(py)
    # DALI's index comes from each writer's account of what it wrote (C runs and the
    # samples Python wrote between them); it must be what the tar's headers say
    for tar in (f for f in c if f.suffix == ".tar"):
        assert index_path(tar).read_bytes() == dali_index(tar), tar.name
    assert [r.rows for r in fast] == [r.rows for r in slow]
    total = sum(r.num_samples for r in slow)
    # pass-through: every sample but the 3 repairs goes through C; resizing: none does
    assert sum(via_c) == (total - 3 if max_size is None else 0)


@pytest.mark.parametrize("crc", ["isal", "zlib"])
def test_c_writer_crcs_are_zlibs_through_isal_or_zlib(prepared, tmp_path, monkeypatch, crc):
    """tarpack.c takes ISA-L's CRC-32 function when isal is installed, zlib's otherwise:
    either way the index gets zlib.crc32 of the stored bytes."""
    from prep.crc import crc_function_address

    if crc == "isal":
        if crc_function_address() is None:
            pytest.skip("isal is not installed")
    else:
        monkeypatch.setattr(tarpack, "crc_function_address", lambda: None)
    data, _ = prepared("ilsvrc2012")
    _, plans, _ = make_plans(data, ShardSettings(num_shards=1))
    plan = next(p for p in plans if p.split == "train")
    paths = [str(data / "train" / s.path) for s in plan.samples]
    with open(tmp_path / "x.tar", "wb") as f:
        done, _, rows = tarpack.write_samples(f.fileno(), 0, paths, plan.samples,
                                              [s.path for s in plan.samples])
    assert done == len(paths) > 10
    assert [r[6] for r in rows] == [zlib.crc32(open(p, "rb").read()) for p in paths]
