"""The C pass-through writer (shards/tarpack.c) writes exactly what the Python writer does,
and hands every sample it cannot pass through (repairs, resizes, broken files) to Python."""

import pytest

from shards import tarpack
from shards.build import ShardSettings, shard_dataset
from tests.conftest import sha256_files

pytestmark = pytest.mark.skipif(not tarpack.available(),
                                reason="shards/_tarpack.so not built (scripts/setup.sh)")


@pytest.mark.parametrize("max_size", [None, 48])
def test_c_writer_is_byte_identical_to_the_python_writer(prepared, tmp_path, monkeypatch,
                                                          max_size):
    data, plan = prepared("ilsvrc2012", bad_files=True)  # CMYK, PNG, grayscale, truncated
    settings = ShardSettings(num_shards=2, on_error="skip", max_size=max_size)
    real, log = tarpack.write_samples, tmp_path / "c-samples"

    def counting(*args):  # runs in the shard worker process: count through a file
        done, end, rows = real(*args)
        with open(log, "a") as f:
            f.write(f"{done}\n")
        return done, end, rows

    monkeypatch.setattr(tarpack, "write_samples", counting)
    fast = shard_dataset(data, tmp_path / "c", settings, workers=1, progress=False)
    monkeypatch.setattr(tarpack, "_lib", None)
    slow = shard_dataset(data, tmp_path / "py", settings, workers=1, progress=False)
    assert fast.info["prep"]["repairs"] == {"cmyk": 1, "grayscale": 1, "png": 1}
    c, py = ([f for f in (tmp_path / d).iterdir() if f.is_file() and f.name[0] != "."]
             for d in ("c", "py"))  # not the lock file
    assert len(c) == 3 * 2 * 2 + 3 + 3  # 2 shards + DALI indexes, wids index per split; 3 more
    assert sha256_files(c) == sha256_files(py)
    total = sum(r.num_samples for r in slow.written)
    via_c = sum(map(int, log.read_text().split())) if log.exists() else 0
    # pass-through: every sample but the 3 repairs goes through C; resizing: none does
    assert via_c == (total - 3 if max_size is None else 0)
