import io
import os
import tarfile

import pytest

from prep.errors import PrepError
from prep.extract import claim_split
from prep.tar_extract import extract_ilsvrc2012


def extract_flat_archive(archive, target, workers=1):
    """The val tar `archive` into folder `target` (as prep imagenet extracts it)."""
    return extract_ilsvrc2012({target.name: archive}, target.parent, workers)


def extract_train_archive(archive, target, workers=1):
    return extract_ilsvrc2012({"train": archive}, target.parent, workers)


def _tar(path, members):
    """members: list of (TarInfo-like kwargs, data)."""
    where = {"fileobj": path} if isinstance(path, io.BytesIO) else {"name": path}
    with tarfile.open(mode="w", format=tarfile.GNU_FORMAT, **where) as t:
        for kw, data in members:
            info = tarfile.TarInfo(kw.pop("name"))
            for k, v in kw.items():
                setattr(info, k, v)
            info.size = len(data) if info.isfile() else 0
            t.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


HOSTILE = {
    "dotdot": {"name": "../escape.JPEG"},
    "absolute": {"name": "/tmp/escape.JPEG"},
    "nested": {"name": "sub/dir.JPEG"},
    "symlink": {"name": "link.JPEG", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"},
    "hardlink": {"name": "hard.JPEG", "type": tarfile.LNKTYPE, "linkname": "../../x"},
    "device": {"name": "dev.JPEG", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3},
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_members_are_refused_and_nothing_escapes(tmp_path, kind):
    target = tmp_path / "out" / "val"
    archive = _tar(tmp_path / "val.tar", [({"name": "ok.JPEG"}, b"ok"),
                                          (dict(HOSTILE[kind]), b"evil")])
    with pytest.raises(PrepError, match=r"val.tar: member"):
        extract_flat_archive(archive, target)
    assert not target.exists()  # never renamed to its final name
    assert not (tmp_path / "escape.JPEG").exists() and not (tmp_path / "out/escape.JPEG").exists()
    written = [p.name for p in tmp_path.rglob("*") if p.is_file()
               and not p.name.endswith(".extracted.json")]  # the extraction's record
    assert "evil" not in [p.read_text() for p in tmp_path.rglob("*.JPEG") if p.is_file()]
    assert sorted(written) == ["ok.JPEG", "val.tar"]


def test_hostile_member_inside_a_class_tar(tmp_path):
    inner = io.BytesIO()
    _tar(inner, [({"name": "../../../pwn.JPEG"}, b"evil")])
    archive = _tar(tmp_path / "train.tar", [({"name": "n01440764.tar"}, inner.getvalue())])
    with pytest.raises(PrepError, match=r"n01440764.tar: member name '../../../pwn.JPEG'"):
        extract_train_archive(archive, tmp_path / "out" / "train")
    assert not list(tmp_path.rglob("pwn.JPEG"))


def test_train_member_that_is_not_a_class_tar(tmp_path):
    archive = _tar(tmp_path / "train.tar", [({"name": "readme.txt"}, b"x")])
    with pytest.raises(PrepError, match="not a class tar"):
        extract_train_archive(archive, tmp_path / "train")


def test_truncated_archive_is_a_clear_error_and_resume_completes(tmp_path):
    members = [({"name": f"ILSVRC2012_val_{i:08d}.JPEG"}, os.urandom(3000)) for i in range(1, 6)]
    good = _tar(tmp_path / "good.tar", [(dict(kw), d) for kw, d in members])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:8192])  # members take 3,584 B: stops inside the 3rd
    target = tmp_path / "val"
    with pytest.raises(PrepError, match="cut.tar: truncated or corrupt"):
        extract_flat_archive(cut, target)
    partial = tmp_path / ".val.partial"
    done = sorted(p.name for p in partial.iterdir() if not p.name.startswith("."))
    assert done == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]
    assert not target.exists()
    extract_flat_archive(good, target)  # the rerun, with a good download
    assert sorted(p.name for p in target.iterdir()) == [kw["name"] for kw, _ in members]
    for kw, data in members:
        assert (target / kw["name"]).read_bytes() == data


def test_interrupted_class_is_redone_finished_classes_kept(tmp_path):
    def class_tar(n):
        b = io.BytesIO()
        _tar(b, [({"name": f"n0144076{n}_{i}.JPEG"}, b"img%d" % i) for i in range(3)])
        return b.getvalue()

    archive = _tar(tmp_path / "train.tar",
                   [({"name": f"n0144076{n}.tar"}, class_tar(n)) for n in (4, 5)])
    dest = tmp_path / "train"
    partial = claim_split(dest, [archive])  # what an interrupted run of this archive left
    (partial / "n01440764").mkdir()  # finished earlier: must be kept as is
    (partial / "n01440764" / "marker").write_text("kept")
    (partial / ".n01440765.partial").mkdir()  # interrupted earlier
    (partial / ".n01440765.partial" / "n01440765_0.JPEG").write_bytes(b"im")  # half written
    extract_train_archive(archive, dest)
    assert (dest / "n01440764" / "marker").read_text() == "kept"
    assert sorted(p.name for p in (dest / "n01440765").iterdir()) == [
        f"n01440765_{i}.JPEG" for i in range(3)]
    assert (dest / "n01440765" / "n01440765_0.JPEG").read_bytes() == b"img0"


def _val_tar(path, members):
    return _tar(path, [({"name": n}, d) for n, d in members])


def test_two_members_with_one_name_are_refused_naming_both(tmp_path):
    """A tar can hold one name twice; extraction kept the first bytes under the second."""
    archive = _val_tar(tmp_path / "val.tar", [("ILSVRC2012_val_00000001.JPEG", b"first"),
                                              ("ILSVRC2012_val_00000002.JPEG", b"other"),
                                              ("ILSVRC2012_val_00000001.JPEG", b"later")])
    with pytest.raises(PrepError, match=r"val.tar: member 'ILSVRC2012_val_00000001.JPEG' "
                       r"\(#1\) and .*val.tar: member 'ILSVRC2012_val_00000001.JPEG' \(#3\)"):
        extract_flat_archive(archive, tmp_path / "val")
    assert not (tmp_path / "val").exists()


def test_a_class_tar_twice_is_refused(tmp_path):
    inner = io.BytesIO()
    _tar(inner, [({"name": "n01440764_1.JPEG"}, b"x")])
    archive = _tar(tmp_path / "train.tar", [({"name": "n01440764.tar"}, inner.getvalue()),
                                            ({"name": "n01440764.tar"}, inner.getvalue())])
    with pytest.raises(PrepError, match=r"member 'n01440764.tar' \(#1\) and .* \(#2\)"):
        extract_train_archive(archive, tmp_path / "train")


def test_extraction_is_reused_only_while_its_source_is_unchanged(tmp_path):
    archive = _val_tar(tmp_path / "val.tar", [("a.JPEG", b"one"), ("b.JPEG", b"two")])
    dest = tmp_path / "val"
    extract_flat_archive(archive, dest)
    extract_flat_archive(archive, dest)  # unchanged: reused, no error
    _val_tar(archive, [("a.JPEG", b"two"), ("b.JPEG", b"one")])  # same sizes, swapped
    os.utime(archive, ns=(1, 10**18))
    with pytest.raises(PrepError, match=r"val: extracted from .*val.tar as it was before .* "
                       r"Remove .*val and rerun"):
        extract_flat_archive(archive, dest)
    assert (dest / "a.JPEG").read_bytes() == b"one"  # untouched until the user removes it


def test_partial_extraction_of_other_inputs_is_not_resumed(tmp_path):
    """Same sizes, other bytes: a size check would have kept the old files."""
    first = _val_tar(tmp_path / "val.tar", [("a.JPEG", b"AAA"), ("b.JPEG", b"BBB")])
    dest = tmp_path / "val"
    partial = claim_split(dest, [first])
    (partial / "a.JPEG").write_bytes(b"BBB")  # left by a run on another download
    _val_tar(first, [("a.JPEG", b"AAA"), ("b.JPEG", b"BBB")])
    os.utime(first, ns=(1, 10**18))
    extract_flat_archive(first, dest)
    assert (dest / "a.JPEG").read_bytes() == b"AAA"


def test_a_folder_without_a_record_or_a_file_in_its_place_is_refused(tmp_path):
    archive = _val_tar(tmp_path / "val.tar", [("a.JPEG", b"one")])
    (tmp_path / "x").mkdir()
    (tmp_path / "x/val").write_text("my notes")
    with pytest.raises(PrepError, match=r"x/val: exists and is not a folder"):
        extract_flat_archive(archive, tmp_path / "x/val")
    assert (tmp_path / "x/val").read_text() == "my notes"
    (tmp_path / "y/val").mkdir(parents=True)
    with pytest.raises(PrepError, match=r"y/val: exists but .* does not say what"):
        extract_flat_archive(archive, tmp_path / "y/val")


def test_an_empty_archive_is_refused(tmp_path):
    archive = _val_tar(tmp_path / "val.tar", [])
    with pytest.raises(PrepError, match=r"val.tar: no images in it"):
        extract_flat_archive(archive, tmp_path / "val")
    assert not (tmp_path / "val").exists()


def _contents(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".extracted.json")}


def test_the_tars_on_several_workers_extract_what_one_extracts(make_sample, tmp_path):
    """The ILSVRC2012 tars: the class tars and the val tar as tasks of a pool, each class
    tar read where it lies in the train tar: the same files with 1 and with 3 workers, the
    source untouched."""
    from tests.conftest import tree_hash

    src, plan = make_sample("ilsvrc2012-tar", classes=6, train_per_class=5)
    before = tree_hash(src)
    archives = {"train": src / "ILSVRC2012_img_train.tar", "val": src / "ILSVRC2012_img_val.tar"}
    got = []
    for workers in (1, 3):
        dirs = extract_ilsvrc2012(archives, tmp_path / f"x{workers}", workers, progress=False)
        assert dirs == {s: tmp_path / f"x{workers}" / s for s in archives}
        got.append(_contents(tmp_path / f"x{workers}"))
    assert got[0] == got[1] and len(got[0]) == 6 * 5 + 6 * 3  # SMALL: 3 val a class
    assert tree_hash(src) == before


@pytest.mark.parametrize("cut", ["inside a class tar", "inside a header"])
def test_a_cut_train_tar_is_named_with_any_workers_and_the_rerun_completes(make_sample,
                                                                           tmp_path, cut):
    """The train tar cut short: the same error with 1 and 2 workers, the split never
    renamed into place; the rerun with the whole tar extracts every class."""
    src, _ = make_sample("ilsvrc2012-tar", classes=6, train_per_class=5)
    train = src / "ILSVRC2012_img_train.tar"
    whole = train.read_bytes()
    at = len(whole) * 2 // 3
    if cut == "inside a header":
        at = at // 512 * 512 + 100
    train.write_bytes(whole[:at])
    errors = []
    for workers in (1, 2):
        with pytest.raises(PrepError) as got:
            extract_ilsvrc2012({"train": train}, tmp_path / f"x{workers}", workers,
                               progress=False)
        errors.append(str(got.value))
        assert not (tmp_path / f"x{workers}" / "train").exists()
    assert errors[0] == errors[1] and f"{train}: truncated or corrupt" in errors[0]
    train.write_bytes(whole)
    extract_ilsvrc2012({"train": train}, tmp_path / "x2", 2, progress=False)
    extract_ilsvrc2012({"train": train}, tmp_path / "ref", 1, progress=False)
    assert _contents(tmp_path / "x2") == _contents(tmp_path / "ref")
