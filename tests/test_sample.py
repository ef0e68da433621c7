import io
import tarfile

import pytest
from PIL import Image

from prep.classes import reference_val_labels
from prep.errors import PrepError
from prep.sample import LAYOUTS, SampleSpec, plan_sample
from tests.conftest import tree_hash


def test_plan_is_deterministic_and_uses_real_wnids():
    a, b = plan_sample(SampleSpec(seed=3)), plan_sample(SampleSpec(seed=3))
    assert a.wnids == b.wnids and a.val == b.val and a.train == b.train
    assert plan_sample(SampleSpec(seed=4)).wnids != a.wnids
    assert all(len(s) == 20 for s in a.train.values())
    assert sorted(set(a.val.values())) == a.wnids  # every class has val images
    real = reference_val_labels()
    assert all(real[s] == w for s, w in a.val.items())  # official names, real labels


def test_full_size_plan_uses_real_val_labels():
    plan = plan_sample(SampleSpec(classes=1000, train_per_class=1, val_per_class=50,
                                  empty_files=True))
    assert len(plan.val) == 50_000
    assert plan.val["ILSVRC2012_val_00000001"] == "n01751748"


@pytest.mark.parametrize("layout,files", [
    ("ilsvrc2017", ["Data/CLS-LOC/val/{val}.JPEG",
                    "Annotations/CLS-LOC/val/{val}.xml",
                    "ImageSets/CLS-LOC/train_cls.txt", "ImageSets/CLS-LOC/val.txt",
                    "ImageSets/CLS-LOC/test.txt", "devkit/data/map_clsloc.txt",
                    "Data/CLS-LOC/test/ILSVRC2012_test_00000001.JPEG"]),
    ("kaggle", ["ILSVRC/Data/CLS-LOC/val/{val}.JPEG",
                "LOC_val_solution.csv", "LOC_train_solution.csv", "LOC_synset_mapping.txt"]),
    ("ilsvrc2012", ["val/{val}.JPEG",
                    "ILSVRC2012_devkit_t12/data/meta.mat",
                    "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"]),
    ("ilsvrc2012-tar", ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                        "ILSVRC2012_devkit_t12.tar.gz"]),
])
def test_layout_files(make_sample, layout, files):
    src, plan = make_sample(layout)
    first = sorted(plan.val)[0]  # real val names (and labels): sparse numbers
    for f in files:
        assert (src / f.format(val=first)).is_file(), f
    assert layout in LAYOUTS


def test_imagefolder_val_is_in_class_folders(make_sample):
    src, plan = make_sample("imagefolder")
    for stem, wnid in plan.val.items():
        assert (src / "val" / wnid / f"{stem}.JPEG").is_file()


def test_train_tar_is_a_tar_of_class_tars(make_sample):
    src, plan = make_sample("ilsvrc2012-tar")
    with tarfile.open(src / "ILSVRC2012_img_train.tar") as outer:
        names = outer.getnames()
        assert names == [f"{w}.tar" for w in plan.wnids]
        inner = tarfile.open(fileobj=outer.extractfile(names[0]))
        assert sorted(inner.getnames()) == sorted(f"{s}.JPEG" for s in plan.train[plan.wnids[0]])


def test_ground_truth_is_in_id_order_not_sorted_order(make_sample):
    from prep.classes import reference_ids

    src, plan = make_sample("ilsvrc2012")
    gt = (src / "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
    ids = [int(x) for x in gt.read_text().split()]
    assert len(ids) == 50_000  # the real devkit's file: line n is ILSVRC2012_val_{n:08d}
    for stem, w in plan.val.items():
        assert ids[int(stem.rsplit("_", 1)[1]) - 1] == reference_ids()[w]


def test_same_spec_gives_identical_tree(tmp_path):
    from prep.sample import write_sample

    spec = SampleSpec(classes=3, train_per_class=2, val_per_class=2)
    write_sample(tmp_path / "a", "kaggle", spec, progress=False)
    write_sample(tmp_path / "b", "kaggle", spec, progress=False)
    # mtimes differ between the two writes; compare names and contents
    for p in sorted((tmp_path / "a").rglob("*")):
        q = tmp_path / "b" / p.relative_to(tmp_path / "a")
        assert q.exists() and (p.is_dir() or p.read_bytes() == q.read_bytes())


def test_planted_bad_files_are_what_they_claim(make_sample):
    src, plan = make_sample("ilsvrc2012", bad_files=True)
    kinds = {k: s for s, k in plan.bad.items()}
    assert set(kinds) == {"cmyk", "png", "gray", "truncated"}

    def path(kind):
        stem = kinds[kind]
        return src / "train" / stem.split("_")[0] / f"{stem}.JPEG"

    assert Image.open(path("cmyk")).mode == "CMYK"
    assert Image.open(path("png")).format == "PNG"
    assert Image.open(path("gray")).mode == "L"
    with pytest.raises(OSError):
        Image.open(path("truncated")).load()


def test_empty_files_are_zero_bytes(make_sample):
    src, plan = make_sample("ilsvrc2017", empty_files=True)
    files = list((src / "Data/CLS-LOC/train").rglob("*.JPEG"))
    assert files and all(f.stat().st_size == 0 for f in files)


def test_images_are_real_jpegs_of_requested_size(make_sample):
    src, plan = make_sample("ilsvrc2017", size=48)
    f = next((src / "Data/CLS-LOC/train").rglob("*.JPEG"))
    im = Image.open(io.BytesIO(f.read_bytes()))
    assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) == 48


def test_refuses_non_empty_output(make_sample, tmp_path):
    src, _ = make_sample("ilsvrc2017")
    before = tree_hash(src)
    from prep.sample import write_sample

    with pytest.raises(PrepError, match="not an empty directory"):
        write_sample(src, "ilsvrc2017", SampleSpec(), progress=False)
    assert tree_hash(src) == before
