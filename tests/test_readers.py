"""The real readers users have, with their defaults and no toolkit code: Hugging Face
`datasets` (three splits in one call; shards holding repaired images), timm's `wds/` reader
(`split="validation"`, its train.py default), NVIDIA DALI's webdataset reader (CPU-only
pipeline) with the index files `prep shard` writes."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from shards.build import ShardSettings, shard_dataset


@pytest.fixture
def shards(prepared, tmp_path):
    """A sample with test images and the four planted bad files (CMYK, PNG, grayscale: all
    repaired; truncated: skipped), sharded with the defaults."""
    data, plan = prepared("ilsvrc2012", bad_files=True, test_images=5)
    out = tmp_path / "shards"
    shard_dataset(data, out, ShardSettings(num_shards=2, on_error="skip"), workers=1,
                  progress=False)
    info = json.loads((out / "_info.json").read_text())
    assert info["prep"]["repairs"] == {"cmyk": 1, "grayscale": 1, "png": 1}
    return out, data, plan, info


def _labels(plan) -> dict[str, int]:
    index = {w: i for i, w in enumerate(plan.wnids)}
    got = {s: index[w] for w, ss in plan.train.items() for s in ss}
    got |= {s: index[w] for s, w in plan.val.items()}
    return got | {s: -1 for s in plan.test}


def _files(out, info, split):
    return [str(out / f) for f in info["splits"][split]["filenames"]]


def test_huggingface_loads_all_splits_in_one_call_with_labels(shards, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from datasets import load_dataset

    out, data, plan, info = shards
    files = {s: _files(out, info, s) for s in ("train", "validation", "test")}
    ds = load_dataset("webdataset", data_files=files, cache_dir=str(tmp_path / "hf-cache"))
    labels = _labels(plan)
    skipped = {s.split("/")[-1].rsplit(".", 1)[0] for s in info["prep"]["skipped"]}
    for split in ("train", "validation", "test"):
        assert "cls" in ds[split].features, (split, ds[split].features)
        rows = ds[split]
        assert len(rows) == info["splits"][split]["num_samples"]
        for row in rows:
            assert int(row["cls"]) == labels[row["__key__"]]
            assert row["json"]["repaired"] in ("", "cmyk", "png", "grayscale")
    repaired = [r for r in ds["train"] if r["json"]["repaired"]]
    assert len(repaired) == 3 and all(r["jpg"].mode == "RGB" for r in repaired)
    assert not skipped & set(ds["train"]["__key__"])
    assert set(ds["test"]["cls"]) == {-1}


def test_timm_reads_the_validation_split_by_default_name(shards):
    from timm.data import create_dataset

    out, data, plan, info = shards
    labels = _labels(plan)
    for split in ("validation", "train"):
        ds = create_dataset("wds/imagenet", root=str(out), split=split, is_training=False)
        got = [(img, int(target)) for img, target in ds]
        assert len(got) == info["splits"][split]["num_samples"]
        assert all(isinstance(img, Image.Image) for img, _ in got)
        if split == "validation":
            expected = sorted(labels[s] for s in plan.val)
            assert sorted(t for _, t in got) == expected


def test_dali_index_files_equal_wds2idx(shards, tmp_path):
    from wds2idx import IndexCreator  # DALI's own tool, shipped in its wheel

    out, _, _, info = shards
    names = [f for s in info["splits"].values() for f in s["filenames"]]
    assert names
    for name in names:
        ours = out / (name.split(".", 1)[0] + ".idx")
        theirs = tmp_path / f"{name}.wds2idx"
        with IndexCreator(str(out / name), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert ours.read_bytes() == theirs.read_bytes(), name


def test_dali_cpu_pipeline_reads_every_sample_with_its_label(shards):
    from nvidia.dali import fn, pipeline_def

    out, data, plan, info = shards
    labels = _labels(plan)
    for split in ("train", "validation", "test"):
        tars = _files(out, info, split)
        idxs = [t[: -len(".tar")] + ".idx" for t in tars]
        n = info["splits"][split]["num_samples"]

        @pipeline_def(batch_size=4, num_threads=1, device_id=None)
        def pipe(tars=tars, idxs=idxs):
            jpg, cls, meta = fn.readers.webdataset(
                paths=tars, index_paths=idxs, ext=["jpg", "cls", "json"],
                missing_component_behavior="error", name="Reader")
            return fn.decoders.image(jpg, device="cpu"), cls, meta

        p = pipe()
        p.build()
        assert p.reader_meta("Reader")["epoch_size"] == n
        seen = {}
        while len(seen) < n:
            images, classes, metas = p.run()
            for i in range(len(classes)):
                key = json.loads(bytes(np.asarray(metas[i])).decode())["key"]
                seen[key] = int(bytes(np.asarray(classes[i])).decode())
                assert np.asarray(images[i]).ndim == 3
        assert seen == {k: labels[k] for k in seen} and len(seen) == n


def test_json_fields_have_one_type_in_every_sample(shards):
    from shards.tarread import samples

    out, _, _, info = shards
    types: dict[str, set] = {}
    for split in info["splits"].values():
        for name in split["filenames"]:
            for s in samples(str(out / name), ("json",)):
                for k, v in json.loads(bytes(s["json"])).items():
                    types.setdefault(k, set()).add(type(v).__name__)
    assert all(len(t) == 1 for t in types.values()), types
    assert os.path.exists(out / "train-000000.idx")


def test_wids_reads_the_shard_index_with_its_defaults(shards):
    import wids

    out, data, plan, info = shards
    labels = _labels(plan)
    ds = wids.ShardListDataset(str(out / "val.shardindex.json"))
    assert len(ds) == info["splits"]["validation"]["num_samples"]
    got = {ds[i]["__key__"]: int(ds[i][".cls"]) for i in range(len(ds))}
    assert got == {k: labels[k] for k in got} and len(got) == len(plan.val)
