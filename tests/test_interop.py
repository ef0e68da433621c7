"""Other people's readers must read the prepared view as is."""

import pytest

from prep.imagenet import prepare_imagenet


@pytest.fixture
def prepared(make_sample, tmp_path):
    src, plan = make_sample("ilsvrc2017")
    prepare_imagenet(src, tmp_path / "data", progress=False, workers=1)
    return tmp_path / "data/imagenet", plan


def test_torchvision_imagefolder_reads_train_and_val(prepared):
    from torchvision.datasets import ImageFolder

    root, plan = prepared
    for split in ("train", "val"):
        ds = ImageFolder(str(root / split))
        assert ds.classes == plan.wnids
        img, label = ds[0]
        assert img.size[0] > 0 and label == 0
    val = ImageFolder(str(root / "val"))
    index = {w: i for i, w in enumerate(plan.wnids)}
    got = sorted((p.rsplit("/", 1)[1][:-5], y) for p, y in val.samples)
    assert got == sorted((s, index[w]) for s, w in plan.val.items())


def test_meta_txt_matches_imagefolder_labels(prepared):
    from torchvision.datasets import ImageFolder

    root, _ = prepared
    for split in ("train", "val"):
        ds = ImageFolder(str(root / split))
        folder = sorted((str(p).split(f"/{split}/", 1)[1], y) for p, y in ds.samples)
        lines = (root / "meta" / f"{split}.txt").read_text().splitlines()
        assert sorted((p, int(y)) for p, y in (ln.rsplit(" ", 1) for ln in lines)) == folder


def test_mmpretrain_annotation_rule(prepared):
    # mmpretrain CustomDataset: `line.strip().rsplit(' ', 1)`, paths relative to data_prefix
    # (mmpretrain itself needs mmcv; this is its documented parsing rule).
    root, _ = prepared
    for split in ("train", "val"):
        for line in (root / "meta" / f"{split}.txt").read_text().splitlines():
            path, label = line.strip().rsplit(" ", 1)
            assert (root / split / path).is_file() and 0 <= int(label) < 5
    for line in (root / "meta/test.txt").read_text().splitlines():
        assert (root / "test" / line.strip()).is_file()
