"""Full-scale labels: 1000 classes and the 50,000 real val labels, every layout.

meta/val.txt must equal what Caffe's val.txt + valprep.sh give, built here independently
(plain csv/text parsing, none of prep's readers) from the real metadata the package ships
in prep/data (LOC_val_solution.csv.gz + LOC_synset_mapping.txt), so the test needs no file
outside the repository.
"""

import gzip
import re
from pathlib import Path

import pytest

from prep.imagenet import prepare_imagenet
from prep.sample import SampleSpec, write_sample

DATA = Path(__file__).resolve().parents[1] / "prep" / "data"

pytestmark = pytest.mark.slow  # `make test-fast` skips these

FULL = SampleSpec(classes=1000, train_per_class=1, val_per_class=50, empty_files=True)


@pytest.fixture(scope="module")
def caffe_val_txt():
    sorted_wnids = [ln.split()[0] for ln in
                    (DATA / "LOC_synset_mapping.txt").read_text().splitlines()]
    index = {w: i for i, w in enumerate(sorted_wnids)}
    rows = gzip.decompress((DATA / "LOC_val_solution.csv.gz").read_bytes()).decode()
    rows = rows.splitlines()[1:]
    labels = {img: pred.split()[0] for img, pred in (r.split(",", 1) for r in rows)}
    return [f"{labels[s]}/{s}.JPEG {index[labels[s]]}" for s in sorted(labels)]


@pytest.mark.parametrize("layout", ["ilsvrc2017", "kaggle", "ilsvrc2012", "imagefolder",
                                    "ilsvrc2012-tar", "blurred", "blurred-tar", "hf-tar",
                                    "hf-parquet"])
def test_full_scale_val_txt_equals_caffe(tmp_path, caffe_val_txt, layout):
    src = tmp_path / "src"
    write_sample(src, layout, FULL, progress=False)
    prepare_imagenet(src, tmp_path / "data", extract_to=tmp_path / "x", progress=False,
                     workers=2)
    lines = (tmp_path / "data/imagenet/meta/val.txt").read_text().splitlines()
    if layout.startswith("blurred"):  # the face-blurred release keeps its published .jpg
        lines = [line.replace(".jpg ", ".JPEG ") for line in lines]
    assert lines[0] == "n01751748/ILSVRC2012_val_00000001.JPEG 65"
    assert lines == caffe_val_txt
    table = (tmp_path / "data/imagenet/meta/classes.csv").read_text().splitlines()
    assert len(table) == 1001 and table[66].startswith("65,n01751748,490,")


@pytest.mark.parametrize("layout", ["ilsvrc2012-tar", "blurred-tar", "hf-tar", "hf-parquet"])
def test_full_scale_direct_plans_equal_the_two_step_plans(tmp_path, caffe_val_txt, layout,
                                                          monkeypatch):
    """`prep shard --src` on each release in archives plans the very samples, labels,
    shards and order that `prep imagenet --extract-to` then `prep shard --data` plan (1000
    classes, the 50,000 real val labels), each sample read from the member of its own name."""
    from shards.build import ShardSettings, make_plans
    from shards.release import release_input

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "src"
    write_sample(src, layout, FULL, progress=False)
    prepare_imagenet(src, tmp_path / "data", extract_to=tmp_path / "x", progress=False,
                     workers=2)
    settings = ShardSettings()
    wnids, two_step, _ = make_plans(tmp_path / "data/imagenet", settings)
    direct = release_input(src, settings, progress=False)
    assert direct.wnids == wnids and len(wnids) == 1000
    assert [(p.name, [s[:4] for s in p.samples]) for p in direct.plans] == \
        [(p.name, [s[:4] for s in p.samples]) for p in two_step]
    val = [p for p in direct.plans if p.split == "val"]
    assert sum(len(p.samples) for p in val) == 50_000 and len(val) == 64
    lines = [f"{s.path} {s.label}" for p in val for s in p.samples]
    if layout.startswith("blurred"):  # the face-blurred release keeps its published .jpg
        lines = [line.replace(".jpg ", ".JPEG ") for line in lines]
    assert lines == caffe_val_txt  # val shards keep file order
    for p in direct.plans[:: len(direct.plans) // 7]:
        for s, (_offset, size, source) in zip(p.samples, p.members):
            stem = s.path.rsplit("/", 1)[1].rsplit(".", 1)[0]  # HF: suffixed with the WNID
            assert size == 0 and re.search(rf"[:/]{stem}(_n\d{{8}})?\.(JPEG|jpg)$", source)
