"""Each bad input: non-zero exit, a message naming the file, and SRC unchanged."""

import os
import shutil

import pytest
from click.testing import CliRunner

from prep.cli import main
from tests.conftest import assert_refused


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
    CliRunner().invoke(main, ["imagenet", "-q", "--src", str(src), "--link", str(data)])
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
