"""Other people's readers, no toolkit code: webdataset and Hugging Face datasets."""

import json
import os

import pytest

from shards.build import ShardSettings, shard_dataset
from shards.manifest import find_split


@pytest.fixture
def shards(prepared, tmp_path):
    data, plan = prepared()
    out = tmp_path / "shards"
    shard_dataset(data, out, ShardSettings(num_shards=2), workers=1, progress=False)
    info = json.loads((out / "_info.json").read_text())
    return out, data, plan, info


def _expected(data, plan, split):
    index = {w: i for i, w in enumerate(plan.wnids)}
    items = plan.val.items() if split == "val" else \
        [(s, w) for w, ss in plan.train.items() for s in ss]
    return {s: (index[w], (data / split / w / f"{s}.JPEG").read_bytes()) for s, w in items}


@pytest.mark.parametrize("split", ["train", "val"])
def test_webdataset_reads_same_keys_labels_bytes(shards, split):
    import webdataset as wds

    out, data, plan, info = shards
    urls = [str(out / f) for f in info["splits"][find_split(info, split)]["filenames"]]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    got = {s["__key__"]: (int(s["cls"]), s["jpg"]) for s in ds}
    assert got == _expected(data, plan, split)


def test_huggingface_datasets_reads_same(shards, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from datasets import load_dataset

    out, data, plan, info = shards
    files = [str(out / f) for f in info["splits"]["validation"]["filenames"]]
    ds = load_dataset("webdataset", data_files={"validation": files}, split="validation",
                      cache_dir=str(tmp_path / "hf-cache"))
    exp = _expected(data, plan, "val")
    assert len(ds) == len(exp)
    import io

    from PIL import Image

    for row in ds:
        label, raw = exp[row["__key__"]]
        assert int(row["cls"]) == label
        assert row["json"]["wnid"] == plan.val[row["__key__"]]
        img = row["jpg"]  # datasets decodes jpg into a PIL image
        assert img.size == Image.open(io.BytesIO(raw)).size
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
