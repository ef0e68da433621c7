"""The copies people have besides the ILSVRC downloads: the face-blurred release (folders or
.tar.gz), Kaggle's imagenet-mini (class folders for train and val), timm's WebDataset
shards."""

import gzip
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from prep.cli import main as prep_main
from prep.errors import PrepError
from prep.imagenet import prepare_imagenet
from prep.sample import SampleSpec, write_sample
from tests.conftest import tree_hash

SPEC = SampleSpec(classes=4, train_per_class=5, val_per_class=3, size=32)


def _expected_val(plan, ext):
    index = {w: i for i, w in enumerate(plan.wnids)}
    return [f"{w}/{s}{ext} {index[w]}" for s, w in sorted(plan.val.items())]


@pytest.mark.parametrize("layout", ["blurred", "blurred-tar"])
def test_face_blurred_release(tmp_path, layout):
    src = tmp_path / "src"
    plan = write_sample(src, layout, SPEC, progress=False)
    before = tree_hash(src)
    r = prepare_imagenet(src, tmp_path / "data", extract_to=tmp_path / "x", progress=False,
                         workers=1)
    assert r.layout.startswith("blurred")
    assert r.label_sources == ["val class folders", "real ILSVRC2012 val labels (shipped)"]
    val = (tmp_path / "data/imagenet/meta/val.txt").read_text().splitlines()
    assert val == _expected_val(plan, ".jpg")  # the published .jpg names are kept
    train = (tmp_path / "data/imagenet/meta/train.txt").read_text().splitlines()
    assert len(train) == 20 and all(line.split()[0].endswith(".jpg") for line in train)
    assert tree_hash(src) == before


def test_face_blurred_val_folder_that_disagrees_with_the_real_labels(tmp_path):
    src = tmp_path / "src"
    plan = write_sample(src, "blurred", SPEC, progress=False)
    stem, wnid = sorted(plan.val.items())[0]
    other = next(w for w in plan.wnids if w != wnid)
    shutil.move(src / "val_blurred" / wnid / f"{stem}.jpg",
                src / "val_blurred" / other / f"{stem}.jpg")
    with pytest.raises(PrepError, match=rf"{stem}: {other} in .*val_blurred but {wnid}"):
        prepare_imagenet(src, tmp_path / "data", progress=False, workers=1)
    assert not (tmp_path / "data/imagenet/meta/val.txt").exists()


def test_face_blurred_truncated_tar_gz_names_the_file(tmp_path):
    src = tmp_path / "src"
    write_sample(src, "blurred-tar", SPEC, progress=False)
    archive = src / "train_blurred.tar.gz"
    raw = gzip.decompress(archive.read_bytes())
    archive.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # cut inside a member
    r = CliRunner().invoke(prep_main, ["imagenet", "-q", "--workers", "1", "--src", str(src),
                                       "--link", str(tmp_path / "data"), "--extract-to",
                                       str(tmp_path / "x")])
    assert r.exit_code == 1 and "train_blurred.tar.gz: truncated or corrupt" in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "x/train").exists()  # only the .partial folder: never trusted


def test_face_blurred_archive_with_a_hostile_member(tmp_path):
    src = tmp_path / "src"
    write_sample(src, "blurred-tar", SPEC, progress=False)
    with tarfile.open(src / "val_blurred.tar.gz", "w:gz") as t:
        info = tarfile.TarInfo("val_blurred/../../evil.jpg")
        info.size = 3
        import io

        t.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(PrepError, match="refusing to extract"):
        prepare_imagenet(src, tmp_path / "data", extract_to=tmp_path / "x", progress=False,
                         workers=1)
    assert not (tmp_path / "evil.jpg").exists()


def test_kaggle_imagenet_mini_is_a_class_folder_subset(tmp_path):
    """Kaggle's imagenet-mini: train/ and val/ both in WNID folders."""
    src = tmp_path / "imagenet-mini"
    plan = write_sample(src, "imagefolder", SPEC, progress=False)
    r = prepare_imagenet(src, tmp_path / "data", progress=False, workers=1)
    assert r.layout == "imagefolder (val in class folders)"
    assert "subset: 4 of 1000 classes" in r.notes
    val = (tmp_path / "data/imagenet/meta/val.txt").read_text().splitlines()
    assert val == _expected_val(plan, ".JPEG")


@pytest.fixture
def timm_shards(tmp_path):
    """Shards as timm/imagenet-1k-wds publishes them (`prep sample --layout timm-wds`):
    `imagenet1k-{train,validation}-*.tar`, samples `jpg` + `cls` (global sorted-WNID index),
    `_info.json` in timm's format (no class count, no checksums)."""
    out = tmp_path / "timm"
    plan = write_sample(out, "timm-wds", SampleSpec(classes=4, train_per_class=12,
                                                    val_per_class=4, size=40), progress=False)
    info = json.loads((out / "_info.json").read_text())
    assert "num_classes" not in info and set(info["splits"]) == {"train", "validation"}
    assert info["splits"]["validation"]["num_samples"] == len(plan.val) == 16
    return out, info


def test_timm_wds_shards_verify_and_evaluate(timm_shards, tmp_path):
    from shards.verify import verify_shards

    out, info = timm_shards
    r = verify_shards(out, progress=False)
    assert r.ok, r.problems
    assert r.samples == info["splits"]["train"]["num_samples"] + \
        info["splits"]["validation"]["num_samples"]
    bad = out / "imagenet1k-validation-00.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    r = verify_shards(out, progress=False)
    assert not r.ok and any("imagenet1k-validation-00.tar" in p for p in r.problems)


@pytest.mark.slow
def test_train_and_evaluate_on_timm_wds_shards(timm_shards, tmp_path):
    from train.main import main as train_main

    out, info = timm_shards
    sets = [a for kv in ("arch=resnet18", "num_classes=1000", "image_size=32", "val_resize=36",
                         "val_crop=32", "batch_size=8", "workers=1", "epochs=1")
            for a in ("--set", kv)]
    metrics = train_main(["--data", str(out), "--output-dir", str(tmp_path / "run"),
                          "--device", "cpu", *sets])
    assert metrics["val_samples"] == info["splits"]["validation"]["num_samples"]
    ev = train_main(["--data", str(out), "--evaluate", "--checkpoint",
                     str(tmp_path / "run/checkpoint.pt"), "--device", "cpu"])
    assert ev["val_samples"] == 16


def test_timm_shards_need_no_toolkit_files(timm_shards):
    out, _ = timm_shards
    assert sorted(p.name for p in Path(out).iterdir() if not p.name.endswith(".tar")) == \
        ["SAMPLE.json", "_info.json"]


@pytest.mark.parametrize("layout", ["hf-tar", "hf-parquet"])
def test_hugging_face_release_gets_the_original_names(tmp_path, layout):
    src = tmp_path / "src"
    spec = SampleSpec(classes=4, train_per_class=5, val_per_class=3, test_images=3, size=32)
    plan = write_sample(src, layout, spec, progress=False)
    before = tree_hash(src)
    r = prepare_imagenet(src, tmp_path / "data", extract_to=tmp_path / "x", progress=False,
                         workers=2)
    assert r.layout == f"{layout} (flat val)"
    assert r.label_sources == ["file-name suffixes (Hugging Face)",
                               "real ILSVRC2012 val labels (shipped)"]
    val = (tmp_path / "data/imagenet/meta/val.txt").read_text().splitlines()
    assert val == _expected_val(plan, ".JPEG")
    index = {w: i for i, w in enumerate(plan.wnids)}
    train = (tmp_path / "data/imagenet/meta/train.txt").read_text().splitlines()
    assert sorted(train) == sorted(f"{w}/{s}.JPEG {index[w]}" for w, ss in plan.train.items()
                                   for s in ss)
    assert (tmp_path / "data/imagenet/meta/test.txt").read_text().split() == \
        [f"ILSVRC2012_test_{i:08d}.JPEG" for i in (1, 2, 3)]
    assert tree_hash(src) == before
    again = prepare_imagenet(src, tmp_path / "data", extract_to=tmp_path / "x",
                             progress=False, workers=2)
    assert again.changes.nothing_to_do


def test_hf_tar_and_parquet_give_byte_identical_shards(tmp_path):
    from shards.build import ShardSettings, shard_dataset
    from tests.conftest import sha256_files

    spec = SampleSpec(classes=3, train_per_class=6, val_per_class=2, test_images=2, size=32)
    for layout in ("hf-tar", "hf-parquet"):
        write_sample(tmp_path / layout, layout, spec, progress=False)
        prepare_imagenet(tmp_path / layout, tmp_path / f"data-{layout}",
                         extract_to=tmp_path / f"x-{layout}", progress=False, workers=1)
        shard_dataset(tmp_path / f"data-{layout}/imagenet", tmp_path / f"s-{layout}",
                      ShardSettings(num_shards=2), workers=1, progress=False)
    a = sha256_files((tmp_path / "s-hf-tar").glob("*.tar"))
    assert a and a == sha256_files((tmp_path / "s-hf-parquet").glob("*.tar"))


def _rewrite_parquet(path, change):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(change(table), path)


def test_hf_parquet_label_that_disagrees_with_the_suffix(tmp_path):
    import pyarrow as pa
    import pyarrow.compute as pc

    src = tmp_path / "src"
    write_sample(src, "hf-parquet", SPEC, progress=False)
    path = next((src / "data").glob("train-00000-*.parquet"))
    _rewrite_parquet(path, lambda t: t.set_column(1, "label", pc.add(t["label"],
                                                                     pa.scalar(1, pa.int64()))))
    with pytest.raises(PrepError, match=r"train-00000-of-00002.parquet row 0: .* the label "
                       r"column says"):
        prepare_imagenet(src, tmp_path / "data", extract_to=tmp_path / "x", progress=False,
                         workers=1)
    assert not (tmp_path / "x/train").exists()


def test_hf_parquet_with_other_columns(tmp_path):
    import pyarrow as pa

    src = tmp_path / "src"
    write_sample(src, "hf-parquet", SPEC, progress=False)
    path = next((src / "data").glob("validation-*.parquet"))
    _rewrite_parquet(path, lambda t: t.append_column("extra", pa.array([1] * len(t))))
    with pytest.raises(PrepError,
                       match=r"validation-00000-of-00001.parquet: schema .*extra: int64"):
        prepare_imagenet(src, tmp_path / "data", extract_to=tmp_path / "x", progress=False,
                         workers=1)


def test_hf_tar_val_suffix_that_disagrees_with_the_real_labels(tmp_path):
    import io

    src = tmp_path / "src"
    plan = write_sample(src, "hf-tar", SPEC, progress=False)
    stem, wnid = sorted(plan.val.items())[0]
    other = next(w for w in plan.wnids if w != wnid)
    members = []
    with tarfile.open(src / "val_images.tar.gz") as t:
        for m in t:
            data = t.extractfile(m).read()
            name = m.name.replace(f"{stem}_{wnid}", f"{stem}_{other}")
            members.append((name, data))
    with tarfile.open(src / "val_images.tar.gz", "w:gz") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(PrepError, match=rf"{stem}: {other} in .* but {wnid}"):
        prepare_imagenet(src, tmp_path / "data", extract_to=tmp_path / "x", progress=False,
                         workers=1)


def test_hf_tar_truncated_archive(tmp_path):
    src = tmp_path / "src"
    write_sample(src, "hf-tar", SPEC, progress=False)
    archive = src / "train_images_1.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-200])
    r = CliRunner().invoke(prep_main, ["imagenet", "-q", "--workers", "1", "--src", str(src),
                                       "--link", str(tmp_path / "data"), "--extract-to",
                                       str(tmp_path / "x")])
    assert r.exit_code == 1 and "train_images_1.tar.gz: truncated or corrupt" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "x/train").exists()


def _retar(path, change):
    """Rewrite a shard, each sample's members through change(key, members) -> members."""
    import io

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as t:
        for m in t:
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = t.extractfile(m).read()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for key, members in samples.items():
            for ext, data in change(key, members).items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("damage,message", [
    ("cls 1000", "cls 1000 is outside 0..999"),
    ("no cls", "no cls member (this split is labelled)"),
])
@pytest.mark.slow
def test_evaluating_foreign_shards_checks_every_label(timm_shards, tmp_path, damage, message):
    """An IndexError traceback, or a sample counted as unlabelled, before."""
    import torch
    import torchvision

    from train.main import main as train_main

    out, _ = timm_shards
    first = [True]

    def change(key, members):
        if first[0]:
            first[0] = False
            if damage == "cls 1000":
                members["cls"] = b"1000"
            else:
                del members["cls"]
        return members

    _retar(out / "imagenet1k-validation-00.tar", change)
    model = torchvision.models.get_model("resnet18", num_classes=1000)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    sets = [a for kv in ("arch=resnet18", "num_classes=1000", "val_resize=36", "val_crop=32",
                         "batch_size=8", "workers=1") for a in ("--set", kv)]
    with pytest.raises(SystemExit) as info:
        train_main(["--data", str(out), "--evaluate", "--checkpoint",
                    str(tmp_path / "w.pth"), "--device", "cpu", *sets])
    text = str(info.value)
    assert text.startswith("error: ") and "imagenet1k-validation-00.tar: member" in text
    assert message in text and "Traceback" not in text


@pytest.mark.parametrize("form", ["json with num_classes", "yaml"])
@pytest.mark.slow
def test_timm_manifests_are_not_taken_for_prep_outputs(timm_shards, form):
    """timm's _info.json may carry num_classes, or come as _info.yaml: still timm's shards
    (no SHA256SUMS to ask for), read by verify and the trainer alike."""
    import yaml

    from shards.verify import verify_shards
    from train.data import read_split

    out, info = timm_shards
    if form == "yaml":
        (out / "_info.json").unlink()
        (out / "_info.yaml").write_text(yaml.safe_dump(info))
    else:
        (out / "_info.json").write_text(json.dumps({**info, "num_classes": 1000}))
    r = verify_shards(out, progress=False)
    assert r.ok, r.problems
    split = read_split(str(out), "validation")
    assert split.num_samples == 16 and split.num_classes == 1000 and split.checksums is None
