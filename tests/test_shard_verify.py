import io
import tarfile

import pytest
from click.testing import CliRunner

from prep.cli import main
from shards.build import ShardSettings, shard_dataset


@pytest.fixture
def shards(prepared, tmp_path):
    data, _ = prepared()
    out = tmp_path / "shards"
    shard_dataset(data, out, ShardSettings(num_shards=2), workers=1, progress=False)
    return out


def verify(out, *extra):
    r = CliRunner().invoke(main, ["verify", "-q", "--workers", "1", str(out), *extra])
    return r.exit_code, r.output


def test_clean_shards_verify(shards):
    code, out = verify(shards, "--deep")
    assert code == 0 and "9 shards... " not in out and ": OK" in out and "37 samples" in out


def test_flipped_byte_is_found(shards):
    p = shards / "train-000001.tar"
    data = bytearray(p.read_bytes())
    data[5000] ^= 0xFF
    p.write_bytes(bytes(data))
    code, out = verify(shards)
    assert code == 1 and "train-000001.tar: sha256 differs" in out


def _rewrite(path, drop_ext=None, jpg=None):
    """Rewrite a shard without one member type, or with broken jpg bytes."""
    src = tarfile.open(fileobj=io.BytesIO(path.read_bytes()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if drop_ext and m.name.endswith(drop_ext):
                continue
            if jpg is not None and m.name.endswith(".jpg"):
                data = jpg
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return src.getmembers()[0].name.split(".")[0]


def test_missing_cls_is_pinpointed(shards):
    key = _rewrite(shards / "val-000000.tar", drop_ext=".cls")
    code, out = verify(shards)
    assert code == 1 and f"val-000000.tar: sample {key}: no cls member" in out


def test_undecodable_jpg_found_by_deep(shards):
    key = _rewrite(shards / "train-000000.tar", jpg=b"\xff\xd8\xff garbage")
    code, out = verify(shards)
    assert code == 1 and "sha256 differs" in out
    code, out = verify(shards, "--deep")
    assert f"train-000000.tar: member {key}.jpg: cannot decode" in out


def test_truncated_tar(shards):
    p = shards / "train-000000.tar"
    p.write_bytes(p.read_bytes()[:3000])
    code, out = verify(shards)
    assert code == 1 and "train-000000.tar" in out and "samples, manifest says" in out


def test_missing_manifest(tmp_path):
    code, out = verify(tmp_path)
    assert code != 0 and "_info.json: missing" in out
