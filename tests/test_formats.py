"""prep/formats.py: every output names its format; an output of a newer format is refused in
one line naming the file, before anything is written."""

import json

import pytest
from click.testing import CliRunner

from prep import formats
from prep.cli import main as prep_main
from prep.errors import PrepError
from tests.conftest import sharded_sample


@pytest.fixture
def sharded(tmp_path):
    return sharded_sample(tmp_path, "ilsvrc2017", 2, classes=3, train_per_class=4,
                          val_per_class=1)


def _bump(path, key=None):
    doc = json.loads(path.read_text())
    (doc[key] if key else doc)["format"] += 1
    path.write_text(json.dumps(doc))


def test_outputs_name_their_format(sharded):
    view = sharded.parent / "data/imagenet"
    assert json.loads((view / "meta/prep.json").read_text())["format"] == formats.VIEW
    assert json.loads((sharded / "_info.json").read_text())["prep"]["format"] == formats.SHARDS


def test_a_view_of_a_newer_format_is_refused_by_prep_shard(sharded, tmp_path):
    view = sharded.parent / "data/imagenet"
    _bump(view / "meta/prep.json")
    r = CliRunner().invoke(prep_main, ["shard", "-q", "--data", str(view), "--out",
                                       str(tmp_path / "s2")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "prep.json: written by a newer prep" in r.output and "format 2" in r.output
    assert not (tmp_path / "s2").exists() or not any((tmp_path / "s2").iterdir())


def test_shards_of_a_newer_format_are_refused_by_verify_and_the_trainer(sharded):
    from train.data import read_split

    _bump(sharded / "_info.json", "prep")
    r = CliRunner().invoke(prep_main, ["verify", str(sharded)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "_info.json: written by a newer prep" in r.output
    with pytest.raises(PrepError, match="_info.json: written by a newer prep"):
        read_split(str(sharded), "train")
