"""prep/fastdir.c: the C listing and the C links give what the Python paths give, entry for
entry, on folders holding anything a copy can hold; a view made without the library is the
same view."""

import errno
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from prep import fastdir, scan
from prep.errors import PrepError
from prep.imagenet import prepare_imagenet

pytestmark = pytest.mark.skipif(not fastdir.available(),
                                reason="prep/_fastdir.so not built (no C compiler)")

_STEMS = st.sampled_from(["n1_5", "n1_6", "._n1_5", "Thumbs", "a b", "caf\u00e9", "x.y",
                          "tab\there", "-", "Z", "a"])
_EXTS = st.sampled_from([".JPEG", ".JPEG", ".jpg", ".png", ".txt", "", ".db"])
_KINDS = st.sampled_from(["file", "file", "file", "dir", "link", "broken", "empty"])
_ENTRIES = st.dictionaries(st.tuples(_STEMS, _EXTS).map("".join) | st.sampled_from(
    sorted(scan.LITTER_NAMES)), _KINDS, max_size=6)


def _fill(folder, entries: dict[str, str]) -> None:
    folder.mkdir()
    for name, kind in entries.items():
        path = folder / name
        if kind == "dir":
            path.mkdir()
        elif kind == "link":
            (folder.parent / "target.JPEG").write_bytes(b"x")
            path.symlink_to(folder.parent / "target.JPEG")
        elif kind == "broken":
            path.symlink_to(folder.parent / "gone.JPEG")
        else:
            path.write_bytes(b"" if kind == "empty" else b"\xff\xd8\xff\xd9")


def _python_path(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        m.setattr(fastdir, "_lib", None)
        return fn(*args)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=_ENTRIES, sizes=st.booleans())
@example(entries={"n1_5.JPEG": "file", "n1_6.JPEG": "file"}, sizes=False)  # the plain case
@example(entries={"n1_5.JPEG": "file", "._n1_5.JPEG": "file"}, sizes=False)  # AppleDouble
@example(entries={"n1_5.JPEG": "file", "n1_6.jpg": "file"}, sizes=False)  # two extensions
@example(entries={"n1_5.JPEG": "file", "n1_6.JPEG": "link"}, sizes=False)  # a symlink
@example(entries={"n1_5.JPEG": "empty", "Z.JPEG": "file"}, sizes=True)  # sizes; byte order
@example(entries={}, sizes=True)
def test_the_c_listing_gives_what_the_python_listing_gives(tmp_path_factory, monkeypatch,
                                                           entries, sizes):
    root = tmp_path_factory.mktemp("listing")
    folder = root / "class"
    _fill(folder, entries)
    fast = scan.list_images_joined(str(folder), "train/c", sizes)
    slow = _python_path(monkeypatch, scan.list_images_joined, str(folder), "train/c", sizes)
    assert fast[0] == slow[0]
    assert vars(fast[1]) == vars(slow[1])


def test_a_plain_folder_is_listed_by_the_c_call(tmp_path, monkeypatch):
    """The fast path is taken where it should be: the per-entry path is not called."""
    folder = tmp_path / "n01440764"
    _fill(folder, {f"n01440764_{i}.JPEG": "file" for i in (10, 9, 100, 1)})
    monkeypatch.setattr(scan, "_list_entries", lambda *a: pytest.fail("per-entry path taken"))
    joined, probs = scan.list_images_joined(str(folder), "train/n01440764", sizes=False)
    assert joined.split("\n") == sorted(os.listdir(folder)) and not probs.extra


def test_a_folder_that_cannot_be_listed_is_named_on_the_python_path(tmp_path):
    assert fastdir.plain_listing(tmp_path / "missing") is None
    with pytest.raises(PrepError, match="missing"):
        scan.list_images_joined(str(tmp_path / "missing"), "train/missing")


@pytest.mark.parametrize("library", [True, False])
def test_make_symlinks_stops_at_the_first_failure_and_names_it(tmp_path, monkeypatch, library):
    if not library:
        monkeypatch.setattr(fastdir, "_lib", None)
    (tmp_path / "b").symlink_to("elsewhere")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        done, err = fastdir.make_symlinks(fd, ["a", "b", "c"], ["ta", "tb", "tc"])
        assert (done, err) == (1, errno.EEXIST)
        assert fastdir.make_symlinks(fd, ["c"], ["tc"]) == (1, 0)
    finally:
        os.close(fd)
    assert {p.name: os.readlink(p) for p in tmp_path.iterdir()} == \
        {"a": "ta", "b": "elsewhere", "c": "tc"}


def _view(root) -> dict[str, str | bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            out[rel] = os.readlink(path) if os.path.islink(path) else open(path, "rb").read()
    return out


def test_the_view_is_the_same_without_the_library(make_sample, tmp_path, monkeypatch):
    """prep imagenet, --force over a view with changed links included: the same links and
    meta files with the C calls and without them."""
    src, _ = make_sample("ilsvrc2017")
    views = {}
    for library in (True, False):
        with monkeypatch.context() as m:
            if not library:
                m.setattr(fastdir, "_lib", None)
            link = tmp_path / f"view-{library}"
            prepare_imagenet(src, link, workers=1, progress=False)
            first = sorted((link / "imagenet/val").iterdir())[0]
            victim = sorted(first.iterdir())[0]
            victim.unlink()
            victim.symlink_to("/elsewhere")
            prepare_imagenet(src, link, workers=1, progress=False, force=True)
            views[library] = _view(link / "imagenet")
    assert views[True] == views[False]
    assert any(k.startswith("val/") for k in views[True])
