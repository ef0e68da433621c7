"""prep/scan.py: names the index files cannot hold, and sources that cannot be read, are one
line naming the file (no traceback)."""

import os
import sys

import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prep import scan
from prep.cli import main as prep_main
from prep.errors import PrepError
from prep.scan import check_unique_keys, sample_key
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


# Folders that are prefixes of one another ("n1" / "n1_a"), names with and without their
# folder's prefix, extra dots, other extensions, names with no dot: every shortcut of
# check_unique_keys is taken and every one of its conditions is needed somewhere.
_FOLDERS = ["n1", "n1_a", "n2", "a.b", "a", ""]
_TAILS = st.sampled_from(["5", "5", "a_5", "a_5", "a.5", "x", ""])
_EXTS = st.sampled_from([".JPEG"] * 6 + [".png", "", ".", ".a.JPEG"])


@st.composite
def _split(draw: st.DrawFn) -> dict[str, list[str]]:
    folders = draw(st.lists(st.sampled_from(_FOLDERS), unique=True, max_size=4))
    out = {}
    for f in folders:
        prefix = draw(st.sampled_from([f"{f}_", f"{f}_", f"{f}_", "n1_", ""]))
        names = draw(st.sets(st.tuples(_TAILS, _EXTS).map(lambda t, p=prefix: p + t[0] + t[1]),
                             max_size=5))
        out[f] = sorted(names)
    return out


@settings(max_examples=300, deadline=None)
@given(_split())
@example({"n1": ["n1_a_5.JPEG"], "n1_a": ["n1_a_5.JPEG"]})  # one folder's prefix in another's
@example({"n1": ["n1_5"], "n2": ["n1_5"]})  # no extension
@example({"n1": ["n1_5.JPEG", "n1_5.png"]})  # one stem, two extensions
@example({"n1": ["n1_5.a.JPEG", "n1_5_a.JPEG"]})  # a dot inside the stem
@example({"n1": ["n1_5.JPEG"], "": ["n1_5.JPEG"]})  # the top folder beside a class folder
@example({"n1": ["x_y", "x.y.y"]})  # the first name has no dot; the dots add up anyway
def test_unique_key_check_agrees_with_the_key_definition(folders):
    """check_unique_keys refuses exactly the splits where two files share sample_key."""
    keys = [sample_key(n) for names in folders.values() for n in names]
    clash = len(set(keys)) != len(keys)
    try:
        check_unique_keys(folders, "split")
    except PrepError as e:
        assert clash, e
        assert "would both be sample" in str(e)
    else:
        assert not clash, folders


def test_ilsvrc_train_names_pass_without_computing_keys(monkeypatch):
    """The common case (1.28 M ILSVRC names) is shown unique without a key per file; one
    clash hidden in it is still found."""
    folders = {f"n{c:08d}": [f"n{c:08d}_{i}.JPEG" for i in range(50)] for c in range(20)}
    calls = []
    monkeypatch.setattr(scan, "sample_key", lambda n: calls.append(n) or n.split(".")[0])
    check_unique_keys(folders, "train")
    assert calls == []
    folders["n00000003"].append("n00000003_7.jpg")  # key of n00000003_7.JPEG
    with pytest.raises(PrepError, match="n00000003_7"):
        check_unique_keys(folders, "train")


_NAME_PARTS = st.sampled_from(["n1_5", "._n1_5", "Thumbs", "a\tb", "caf\u00e9", "x.y", ""])
_NAME_EXTS = st.sampled_from([".JPEG", ".jpg", ".png", ".txt", "", ".db"])


@settings(max_examples=500, deadline=None)
@given(st.sets(st.tuples(_NAME_PARTS, _NAME_EXTS).map("".join) | st.sampled_from(
    sorted(scan.LITTER_NAMES)), max_size=5))
@example({"n1_5.JPEG", "._n1_5.JPEG"})  # AppleDouble litter named like an image
@example({"n1_5.JPEG", "a\x01.JPEG"})  # a control character
@example({"n1_5.JPEG", "caf\udce9.JPEG"})  # a byte that is not UTF-8 (a surrogate escape)
@example({"n1_5.JPEG", "n1_6.jpg"})  # two image extensions: the slow path sorts them out
def test_the_listing_shortcut_takes_only_what_the_per_name_tests_take(names):
    names = sorted(names)
    per_name = all(n.endswith(scan.IMAGE_EXTS) and not scan.is_litter(n)
                   and not scan.bad_name(n) for n in names)
    if scan.all_plain_images(names):
        assert per_name, names
