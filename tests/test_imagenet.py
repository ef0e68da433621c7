import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from prep.cli import main as prep_main
from prep.errors import PrepError
from prep.imagenet import prepare_imagenet
from shards.build import ShardSettings, shard_dataset
from tests.conftest import assert_refused, expected_val_lines, tree_hash

LAYOUT_LABELS = {
    "ilsvrc2017": ["val XML annotations"],
    "kaggle": ["val XML annotations", "LOC_val_solution.csv"],
    "ilsvrc2012": ["devkit ground truth (meta.mat IDs)"],
    "imagefolder": ["val class folders"],
}


def _prep(src, link, **kw):
    return prepare_imagenet(src, link, progress=False, workers=kw.pop("workers", 1), **kw)


@pytest.mark.parametrize("layout", sorted(LAYOUT_LABELS))
def test_every_layout_gives_the_same_correct_view(make_sample, tmp_path, layout):
    src, plan = make_sample(layout)
    before = tree_hash(src)
    r = _prep(src, tmp_path / "data")
    assert r.label_sources == LAYOUT_LABELS[layout]
    meta = tmp_path / "data/imagenet/meta"
    assert (meta / "val.txt").read_text().splitlines() == expected_val_lines(plan)
    index = {w: i for i, w in enumerate(plan.wnids)}
    train = [f"{w}/{s}.JPEG {index[w]}" for w in plan.wnids for s in sorted(
        plan.train[w], key=lambda s: f"{s}.JPEG")]
    assert (meta / "train.txt").read_text().splitlines() == train
    assert (meta / "synsets.txt").read_text().split() == plan.wnids
    assert r.counts == {"train": 20, "val": 15, "test": 0 if layout == "imagefolder" else 2}
    assert tree_hash(src) == before  # the source is never touched


def test_links_and_files(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    data = tmp_path / "data"
    _prep(src, data)
    assert os.readlink(data / src.name) == str(src)  # named after the source, absolute target
    assert os.readlink(data / "imagenet/train") == str(src / "Data/CLS-LOC/train")
    assert os.readlink(data / "imagenet/test") == str(src / "Data/CLS-LOC/test")
    stem, wnid = next(iter(sorted(plan.val.items())))
    link = data / "imagenet/val" / wnid / f"{stem}.JPEG"
    assert link.is_symlink() and len(os.readlink(link)) < 60  # fits in an ext4 inode
    assert link.resolve() == (src / "Data/CLS-LOC/val" / f"{stem}.JPEG").resolve()
    assert link.read_bytes() == (src / "Data/CLS-LOC/val" / f"{stem}.JPEG").read_bytes()
    meta = data / "imagenet/meta"
    assert (meta / "test.txt").read_text().split() == [f"{s}.JPEG" for s in plan.test]
    words = (meta / "synset_words.txt").read_text().splitlines()
    assert words[0].split(" ", 1)[0] == plan.wnids[0] and len(words) == 5
    rows = (meta / "classes.csv").read_text().splitlines()
    assert rows[0] == "index,wnid,ilsvrc2012_id,words"
    prov = json.loads((meta / "prep.json").read_text())
    assert prov["layout"] == "ilsvrc2017" and prov["counts"]["val"] == 15


def test_relative_src_links_to_absolute_path(make_sample, tmp_path, monkeypatch):
    src, _ = make_sample("ilsvrc2017")
    monkeypatch.chdir(tmp_path)
    _prep(os.path.relpath(src, tmp_path), "data")
    assert os.readlink(tmp_path / "data" / src.name) == str(src)


def test_second_run_changes_nothing(make_sample, tmp_path):
    src, _ = make_sample("kaggle")
    first = _prep(src, tmp_path / "data")
    assert first.changes.created > 0
    out_hash = tree_hash(tmp_path / "data")
    second = _prep(src, tmp_path / "data")
    assert second.changes.nothing_to_do
    assert tree_hash(tmp_path / "data") == out_hash


def test_parallel_equals_serial(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2017", classes=12)
    _prep(src, tmp_path / "a", workers=1)
    _prep(src, tmp_path / "b", workers=2)
    for name in ("train.txt", "val.txt", "classes.csv"):
        assert ((tmp_path / "a/imagenet/meta" / name).read_bytes()
                == (tmp_path / "b/imagenet/meta" / name).read_bytes())


def test_conflict_needs_force_and_force_only_touches_prep_paths(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    data = tmp_path / "data"
    _prep(src, data)
    val_txt = data / "imagenet/meta/val.txt"
    val_txt.write_text("edited by hand\n")
    with pytest.raises(PrepError, match="--force"):
        _prep(src, data)
    assert val_txt.read_text() == "edited by hand\n"  # refused: untouched
    r = _prep(src, data, force=True)
    assert r.changes.replaced == 1
    assert val_txt.read_text().splitlines() == expected_val_lines(plan)


def test_stale_val_link_is_a_conflict(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    data = tmp_path / "data"
    _prep(src, data)
    stray = data / "imagenet/val" / plan.wnids[0] / "ILSVRC2012_val_99999999.JPEG"
    os.symlink("../../.src-val/nothing.JPEG", stray)
    with pytest.raises(PrepError, match="no longer in the source"):
        _prep(src, data)
    assert _prep(src, data, force=True).changes.removed == 1
    assert not os.path.lexists(stray)


def test_rerun_checks_every_existing_val_link(make_sample, tmp_path):
    """A rerun compares each val link with the plan: a missing link or class folder is made
    again, a link pointing elsewhere is a conflict that only --force replaces, and a file
    in a link's place is refused even with --force, and kept."""
    src, plan = make_sample("ilsvrc2017", classes=3)
    data = tmp_path / "data"
    _prep(src, data)
    val = data / "imagenet/val"
    links = sorted(p for p in val.rglob("*") if p.is_symlink())
    missing, moved, kept = links[0], links[1], links[2]
    wanted = {p: os.readlink(p) for p in links}
    os.unlink(missing)
    os.unlink(moved)
    os.symlink("../../.src-val/elsewhere.JPEG", moved)
    with pytest.raises(PrepError, match="prep wants"):
        _prep(src, data)
    assert not os.path.lexists(missing)  # a refused run writes nothing
    r = _prep(src, data, force=True)
    assert (r.changes.created, r.changes.replaced) == (1, 1)
    assert {p: os.readlink(p) for p in links} == wanted

    gone = links[-1].parent
    assert gone != missing.parent
    shutil.rmtree(gone)
    r = _prep(src, data)
    assert r.changes.created == sum(p.parent == gone for p in links)
    assert {p: os.readlink(p) for p in links} == wanted

    os.unlink(kept)
    kept.write_bytes(b"mine")
    with pytest.raises(PrepError, match="not a link made by prep"):
        _prep(src, data, force=True)
    assert kept.read_bytes() == b"mine"


def test_tar_layout_extracts_and_links(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2012-tar")
    before = tree_hash(src)
    r = _prep(src, tmp_path / "data", extract_to=tmp_path / "extracted")
    assert r.layout.startswith("ilsvrc2012-tar")
    assert (tmp_path / "data/imagenet/meta/val.txt").read_text().splitlines() == \
        expected_val_lines(plan)
    assert os.readlink(tmp_path / "data/imagenet/train") == str(tmp_path / "extracted/train")
    assert tree_hash(src) == before
    again = _prep(src, tmp_path / "data", extract_to=tmp_path / "extracted")
    assert again.changes.nothing_to_do


def test_val_already_in_class_folders_inside_clsloc(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    val = src / "Data/CLS-LOC/val"  # what running valprep.sh in place leaves
    for stem, wnid in plan.val.items():
        (val / wnid).mkdir(exist_ok=True)
        os.rename(val / f"{stem}.JPEG", val / wnid / f"{stem}.JPEG")
    r = _prep(src, tmp_path / "data")
    assert r.label_sources == ["val XML annotations", "val class folders"]
    assert "class folders" in r.layout
    assert (tmp_path / "data/imagenet/meta/val.txt").read_text().splitlines() == \
        expected_val_lines(plan)


def test_full_check_reports_bad_files(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2012", bad_files=True)
    r = _prep(src, tmp_path / "data", check="full")
    bad = {k: s for s, k in plan.bad.items()}
    assert len(r.problems.undecodable) == 1 and bad["truncated"] in r.problems.undecodable[0]
    assert [bad["cmyk"] in p for p in r.problems.notes["cmyk"]] == [True]
    assert bad["png"] in r.problems.notes["png named as jpeg"][0]
    assert bad["gray"] in r.problems.notes["grayscale"][0]
    text = (tmp_path / "data/imagenet/meta/problems.txt").read_text()
    assert f"undecodable\ttrain/{bad['truncated'].split('_')[0]}/{bad['truncated']}" in text


def test_empty_files_found_by_sizes_check_not_by_fast(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2017", empty_files=True)
    fast = _prep(src, tmp_path / "a")
    assert len(fast.problems.empty) == 15 + 2  # val and test sizes are always checked
    sizes = _prep(src, tmp_path / "b", check="sizes")
    assert len(sizes.problems.empty) == 20 + 15 + 2


def test_subset_counts_are_noted(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2017")
    r = _prep(src, tmp_path / "data")
    assert any("5 of 1000 classes" in n for n in r.notes)


def test_missing_val_image_is_reported(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    val = sorted(plan.val)  # real val names: sparse numbers
    (src / f"Data/CLS-LOC/val/{val[3]}.JPEG").unlink()
    r = _prep(src, tmp_path / "data")
    assert r.problems.missing == [f"Data/CLS-LOC/val/{val[3]}.JPEG"]
    assert r.counts["val"] == 14
    assert f"missing\tData/CLS-LOC/val/{val[3]}.JPEG" in \
        (tmp_path / "data/imagenet/meta/problems.txt").read_text()


def test_train_compared_with_imagesets_list(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    w = plan.wnids[2]
    gone = src / f"Data/CLS-LOC/train/{w}/{plan.train[w][0]}.JPEG"
    gone.unlink()
    (src / f"Data/CLS-LOC/train/{w}/{w}_99999.JPEG").write_bytes(gone.parent.joinpath(
        f"{plan.train[w][1]}.JPEG").read_bytes())
    assert _prep(src, tmp_path / "a").problems.missing == []  # fast: not compared
    r = _prep(src, tmp_path / "b", check="sizes")
    assert r.problems.missing == [f"Data/CLS-LOC/train/{w}/{plan.train[w][0]}.JPEG"]
    assert r.problems.unlisted == [f"Data/CLS-LOC/train/{w}/{w}_99999.JPEG"]


def test_bbox_val_archive_is_a_cross_checked_label_source(make_sample, tmp_path):
    import tarfile

    from prep.sample import voc_xml

    src, plan = make_sample("ilsvrc2012")
    with tarfile.open(src / "ILSVRC2012_bbox_val_v3.tgz", "w:gz") as t:
        for stem, wnid in plan.val.items():
            path = tmp_path / f"{stem}.xml"
            path.write_text(voc_xml(stem, wnid, "val", 32))
            t.add(path, arcname=f"val/{stem}.xml")
    r = _prep(src, tmp_path / "data")
    assert r.label_sources == ["val XML archive", "devkit ground truth (meta.mat IDs)"]
    assert (tmp_path / "data/imagenet/meta/val.txt").read_text().splitlines() == \
        expected_val_lines(plan)
    stem = sorted(plan.val)[2]  # now make the archive disagree with the devkit
    other = next(w for w in plan.wnids if w != plan.val[stem])
    with tarfile.open(src / "ILSVRC2012_bbox_val_v3.tgz", "w:gz") as t:
        for s, wnid in plan.val.items():
            path = tmp_path / f"{s}.xml"
            path.write_text(voc_xml(s, other if s == stem else wnid, "val", 32))
            t.add(path, arcname=f"val/{s}.xml")
    with pytest.raises(PrepError, match=f"{stem}: {other} in .*bbox_val_v3.tgz"):
        _prep(src, tmp_path / "data2")


@pytest.mark.parametrize("layout", ["imagefolder", "kaggle-mini"])
def test_official_val_image_in_the_wrong_class_folder_is_refused(make_sample, tmp_path,
                                                                   layout):
    """Class-folder copies (plain ImageFolder, Kaggle's imagenet-mini) label val by folder
    alone: an official val image moved to another class must not be trained against."""
    src, plan = make_sample("imagefolder")
    if layout == "kaggle-mini":  # imagenet-mini: train/ and val/ class folders, fewer files
        for w in plan.wnids:
            for f in sorted((src / "train" / w).iterdir())[2:]:
                f.unlink()
    stem, wnid = sorted(plan.val.items())[0]
    other = next(w for w in plan.wnids if w != wnid)
    (src / "val" / wnid / f"{stem}.JPEG").rename(src / "val" / other / f"{stem}.JPEG")
    before = tree_hash(src)
    r = CliRunner().invoke(prep_main, ["imagenet", "-q", "--src", str(src), "--link",
                                       str(tmp_path / "data")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{stem}: {other} in {src / 'val'} but {wnid} in the real ILSVRC2012 val labels" \
        in r.output
    assert tree_hash(src) == before and not (tmp_path / "data/imagenet/meta/val.txt").exists()


# Bad inputs: non-zero exit, a message naming the
# file, and SRC unchanged.


def test_missing_src(tmp_path):
    assert_refused(tmp_path / "nope", tmp_path / "data", tmp_path / "nope", "does not exist")


def test_file_as_src(tmp_path):
    f = tmp_path / "ILSVRC2012_img_val.tar"
    f.write_bytes(b"x")
    assert_refused(f, tmp_path / "data", f, "is a file")


def test_unreadable_src(make_sample, tmp_path, monkeypatch):
    src, _ = make_sample("ilsvrc2017")
    # Tests run as root here, where chmod 000 does not stop reads; simulate the refusal.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p) == str(src)
                        else real(p, m, **k))
    assert_refused(src, tmp_path / "data", src, "permission denied")


def test_no_layout(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("x")
    assert_refused(tmp_path / "stuff", tmp_path / "data", "no ImageNet layout found")


@pytest.mark.parametrize("split", ["train", "val"])
def test_layout_without_a_split(make_sample, tmp_path, split):
    src, _ = make_sample("ilsvrc2017")
    shutil.rmtree(src / "Data/CLS-LOC" / split)
    assert_refused(src, tmp_path / "data", f"without a {split} split")


def test_missing_annotation_for_some_val_images(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    val = sorted(plan.val)  # real val names: sparse numbers
    (src / f"Annotations/CLS-LOC/val/{val[6]}.xml").unlink()
    assert_refused(src, tmp_path / "data", "missing val annotations", val[6],
                   src / "Annotations/CLS-LOC/val")


def test_malformed_xml(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    val = sorted(plan.val)  # real val names: sparse numbers
    bad = src / f"Annotations/CLS-LOC/val/{val[2]}.xml"
    bad.write_text("<annotation><object><name>n01440764</name></object>")  # not closed
    assert_refused(src, tmp_path / "data", bad, "malformed XML")


def test_xml_entity_expansion_is_refused(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2017")
    bad = src / "Annotations/CLS-LOC/val/ILSVRC2012_val_00000002.xml"
    bad.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "n01440764">]>'
                   "<annotation><object><name>&x;</name></object></annotation>")
    assert_refused(src, tmp_path / "data", bad, "refused")


def test_malformed_csv(make_sample, tmp_path):
    src, _ = make_sample("kaggle")
    csv = src / "LOC_val_solution.csv"
    lines = csv.read_text().splitlines()
    lines[3] = "ILSVRC2012_val_00000004"
    csv.write_text("\n".join(lines) + "\n")
    assert_refused(src, tmp_path / "data", f"{csv}:4")


def test_not_a_wnid_in_annotation(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    val = sorted(plan.val)  # real val names: sparse numbers
    bad = src / f"Annotations/CLS-LOC/val/{val[4]}.xml"
    bad.write_text(bad.read_text().replace("<name>n", "<name>dog_n"))
    assert_refused(src, tmp_path / "data", bad, "is not a WNID")


def test_annotation_class_without_train_folder(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    val = sorted(plan.val)  # real val names: sparse numbers
    bad = src / f"Annotations/CLS-LOC/val/{val[4]}.xml"
    wnid = plan.val[val[4]]
    other = next(w for w in ("n01440764", "n01443537") if w not in plan.wnids)
    bad.write_text(bad.read_text().replace(wnid, other))
    assert_refused(src, tmp_path / "data", val[4], other, "no train folder")


def test_sources_disagree(make_sample, tmp_path):
    src, plan = make_sample("kaggle")
    val = sorted(plan.val)  # real val names: sparse numbers
    xml = src / f"ILSVRC/Annotations/CLS-LOC/val/{val[3]}.xml"
    old = plan.val[val[3]]
    new = next(w for w in plan.wnids if w != old)
    xml.write_text(xml.read_text().replace(old, new))
    assert_refused(src, tmp_path / "data", "disagree", val[3], old, new,
                   src / "LOC_val_solution.csv")


def test_devkit_ground_truth_with_bad_id(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2012")
    gt = src / "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
    lines = gt.read_text().splitlines()
    lines[1] = "1001"
    gt.write_text("\n".join(lines) + "\n")
    assert_refused(src, tmp_path / "data", f"{gt}:2", "1001")


def test_damaged_meta_mat(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2012")
    meta = src / "ILSVRC2012_devkit_t12/data/meta.mat"
    meta.write_bytes(b"not a mat file")
    assert_refused(src, tmp_path / "data", meta)


def test_class_folder_not_a_wnid(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2017")
    (src / "Data/CLS-LOC/train/cats").mkdir()
    assert_refused(src, tmp_path / "data", src / "Data/CLS-LOC/train/cats", "not a WNID")


def test_unknown_wnid_class_folder(make_sample, tmp_path):
    src, _ = make_sample("imagefolder")
    (src / "train/n99999999").mkdir()
    assert_refused(src, tmp_path / "data", "n99999999", "not one of the 1000")


def test_broken_symlink_in_src(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    w = plan.wnids[1]
    os.symlink("/nonexistent/x.JPEG", src / f"Data/CLS-LOC/train/{w}/{w}_1.JPEG")
    assert_refused(src, tmp_path / "data", "broken symlink", f"{w}/{w}_1.JPEG")


def test_link_inside_src(make_sample):
    src, _ = make_sample("ilsvrc2017")
    assert_refused(src, src / "data", src / "data", "inside --src")
    assert not (src / "data").exists()


def test_link_dir_holding_unrelated_files(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2017")
    mine = tmp_path / "data/imagenet"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    out = assert_refused(src, tmp_path / "data", mine, "not made by prep", "notes.txt")
    assert (mine / "notes.txt").read_text() == "my notes"
    assert "--force" not in out or "even" in out


def test_force_never_replaces_a_real_file(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2017")
    data = tmp_path / "data"
    CliRunner().invoke(prep_main, ["imagenet", "-q", "--src", str(src), "--link", str(data)])
    os.unlink(data / "imagenet/train")
    (data / "imagenet/train").mkdir()
    (data / "imagenet/train/keep.txt").write_text("mine")
    assert_refused(src, data, data / "imagenet/train", "not a link made by prep",
                   extra=["--force"])
    assert (data / "imagenet/train/keep.txt").read_text() == "mine"


def test_tar_layout_needs_extract_to(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2012-tar")
    assert_refused(src, tmp_path / "data", "--extract-to")


def test_extract_to_inside_src(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2012-tar")
    assert_refused(src, tmp_path / "data", src / "x", "inside --src",
                   extra=["--extract-to", src / "x"])


def _train_dir(src: Path) -> Path:
    return src / "Data/CLS-LOC/train"


@pytest.mark.parametrize("bad", ["a\nb.JPEG", "tab\there.JPEG", "cr\r.JPEG"])
def test_control_characters_in_train_names_are_refused(make_sample, tmp_path, bad):
    src, plan = make_sample("ilsvrc2017")
    wnid = plan.wnids[0]
    first = sorted((_train_dir(src) / wnid).iterdir())[0]
    (_train_dir(src) / wnid / f"{wnid}_{bad}").write_bytes(first.read_bytes())
    assert_refused(src, tmp_path / "data", "control character", repr(f"{wnid}_{bad}")[1:-1])
    assert not (tmp_path / "data/imagenet/meta/train.txt").exists()


def test_os_litter_is_ignored_and_listed(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    wnid = plan.wnids[0]
    cls = _train_dir(src) / wnid
    first = sorted(cls.iterdir())[0]
    litter = [cls / f"._{first.name}", cls / ".DS_Store", cls / "Thumbs.db",
              _train_dir(src) / ".DS_Store", src / "Data/CLS-LOC/val/._x.JPEG"]
    for p in litter:
        p.write_bytes(b"\0\x05\x16\x07 AppleDouble")
    (_train_dir(src) / "__MACOSX").mkdir()
    r = CliRunner().invoke(prep_main, ["imagenet", "-q", "--workers", "1", "--src", str(src),
                                       "--link", str(tmp_path / "data")])
    assert r.exit_code == 0, r.output
    assert "ignored (macOS / Windows metadata" in r.output
    train = (tmp_path / "data/imagenet/meta/train.txt").read_text()
    assert "._" not in train and "DS_Store" not in train and "Thumbs" not in train
    problems = (tmp_path / "data/imagenet/meta/problems.txt").read_text()
    assert f"ignored\tData/CLS-LOC/train/{wnid}/._{first.name}" in problems
    assert "__MACOSX" in problems
    r = shard_dataset(tmp_path / "data/imagenet", tmp_path / "s", ShardSettings(num_shards=2),
                      workers=1, progress=False)
    assert r.info["splits"]["train"]["num_samples"] == len(plan.train) * 4


@pytest.mark.parametrize("second", ["{stem_}.JPEG", "{stem}.png", "{other}/{stem}.JPEG"])
def test_sample_key_collisions_are_found_by_prep_imagenet(make_sample, tmp_path, second):
    src, plan = make_sample("ilsvrc2017")
    w0, w1 = plan.wnids[:2]
    data = sorted((_train_dir(src) / w0).iterdir())[0].read_bytes()
    stem = f"{w0}_dup.x"
    (_train_dir(src) / w0 / f"{stem}.JPEG").write_bytes(data)
    name = second.format(stem_=stem.replace(".", "_"), stem=stem, other=w1)
    where = _train_dir(src) / (name if "/" in name else f"{w0}/{name}")
    where.write_bytes(data)
    assert_refused(src, tmp_path / "data", "would both be sample", f"{w0}/{stem}.JPEG")


def test_source_folder_named_imagenet(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017", name="imagenet")
    r = CliRunner().invoke(prep_main, ["imagenet", "-q", "--workers", "1", "--src", str(src),
                                       "--link", str(tmp_path / "data")])
    assert r.exit_code == 0, r.output
    assert os.readlink(tmp_path / "data/imagenet-source") == str(src)
    assert (tmp_path / "data/imagenet/meta/train.txt").is_file()
    assert not list((tmp_path / "data").glob(".*.tmp"))
    again = CliRunner().invoke(prep_main, ["imagenet", "-q", "--workers", "1", "--src",
                                           str(src), "--link", str(tmp_path / "data")])
    assert again.exit_code == 0 and "up to date" in again.output


@pytest.mark.parametrize("where", ["class", "split", "val"])
def test_symlink_loop_in_src_is_a_clear_error(make_sample, tmp_path, where):
    src, plan = make_sample("ilsvrc2017")
    parent = {"class": _train_dir(src) / plan.wnids[0], "split": _train_dir(src),
              "val": src / "Data/CLS-LOC/val"}[where]
    (parent / "loop.JPEG").symlink_to(parent / "loop.JPEG")
    out = assert_refused(src, tmp_path / "data", "loop.JPEG")
    assert "loop" in out


def test_val_image_in_two_class_folders_is_refused(make_sample, tmp_path):
    from tests.conftest import assert_refused

    src, plan = make_sample("imagefolder")
    stem, wnid = sorted(plan.val.items())[0]
    other = next(w for w in plan.wnids if w != wnid)
    shutil.copy(src / "val" / wnid / f"{stem}.JPEG", tmp_path / "copy.JPEG")
    shutil.move(tmp_path / "copy.JPEG", src / "val" / other / f"{stem}.JPEG")
    out = assert_refused(src, tmp_path / "data", stem, "two class folders")
    assert wnid in out and other in out


def test_same_val_image_with_other_extension_in_two_folders_is_refused(make_sample, tmp_path):
    from tests.conftest import assert_refused

    src, plan = make_sample("imagefolder")
    stem, wnid = sorted(plan.val.items())[1]
    other = next(w for w in plan.wnids if w != wnid)
    shutil.copy(src / "val" / wnid / f"{stem}.JPEG", src / "val" / other / f"{stem}.jpg")
    assert_refused(src, tmp_path / "data", stem, "two class folders")


@pytest.mark.parametrize("layout", ["ilsvrc2012", "ilsvrc2012-tar"])
def test_the_image_tars_without_the_devkit_take_the_real_labels_shipped(make_sample, tmp_path,
                                                                        layout):
    """Many download only the two image tars: a flat val of official names is labelled by
    the real labels the toolkit ships, the same view as with the devkit."""
    src, plan = make_sample(layout)
    extract = {"extract_to": tmp_path / "x-dev"} if layout.endswith("-tar") else {}
    _prep(src, tmp_path / "with", **extract)
    devkit = [p for p in src.iterdir() if p.name.startswith("ILSVRC2012_devkit_t12")]
    assert devkit
    for p in devkit:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    before = tree_hash(src)
    extract = {"extract_to": tmp_path / "x"} if extract else {}
    r = _prep(src, tmp_path / "without", **extract)
    assert r.label_sources == ["real ILSVRC2012 val labels (shipped)"]
    for name in ("val.txt", "train.txt", "classes.csv"):
        assert (tmp_path / "without/imagenet/meta" / name).read_bytes() == \
            (tmp_path / "with/imagenet/meta" / name).read_bytes()
    assert (tmp_path / "without/imagenet/meta/val.txt").read_text().splitlines() == \
        expected_val_lines(plan)
    assert tree_hash(src) == before


def test_a_flat_val_image_without_an_official_name_and_no_devkit_is_named(make_sample,
                                                                          tmp_path):
    src, _ = make_sample("ilsvrc2012")
    shutil.rmtree(src / "ILSVRC2012_devkit_t12")
    odd = src / "val" / "holiday_photo.JPEG"
    shutil.copyfile(next((src / "val").iterdir()), odd)
    assert_refused(src, tmp_path / "data", "holiday_photo")
