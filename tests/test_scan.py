"""prep/scan.py: names the index files cannot hold, and sources that cannot be read, are one
line naming the file (no traceback)."""

import os
import sys

from click.testing import CliRunner

from prep.cli import main as prep_main
from tests.conftest import as_nobody, tree_hash


def _prep(src, link):
    return CliRunner().invoke(prep_main, ["imagenet", "-q", "--workers", "2", "--src",
                                          str(src), "--link", str(link)])


def test_a_name_that_is_not_utf8_is_refused(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    w = plan.wnids[0]
    folder = os.fsencode(src / "Data/CLS-LOC/train" / w)
    with open(folder + b"/" + w.encode() + b"_caf\xe9.JPEG", "wb") as f:  # Latin-1 é
        f.write(b"\xff\xd8\xff\xd9")
    before = tree_hash(src)
    r = _prep(src, tmp_path / "data")
    assert r.exit_code == 1 and "Traceback" not in r.output and r.exception is not None
    assert "not UTF-8" in r.output and "_caf" in r.output
    assert tree_hash(src) == before


def test_unreadable_class_folder_is_named(make_sample, shared_tmp):
    src, plan = make_sample("ilsvrc2017")
    import shutil

    shutil.copytree(src, shared_tmp / "src", symlinks=True)
    for d, _, _ in os.walk(shared_tmp / "src"):
        os.chmod(d, 0o755)
    locked = shared_tmp / "src/Data/CLS-LOC/train" / plan.wnids[1]
    locked.chmod(0o000)
    r = as_nobody([sys.executable, "-m", "prep.cli", "imagenet", "-q", "--workers", "1",
                   "--src", str(shared_tmp / "src"), "--link", str(shared_tmp / "data")],
                  cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == f"error: {locked}: cannot read it (Permission denied); check " \
        "its permissions (sources are only read, never changed)"
