"""The predictions pickle: mmpretrain 1.x layout (`tools/test.py --out result.pkl`), a list
of per-sample dicts in dataset (manifest) order, whatever the world size.

Each rank saves its {key: (softmax scores, label)}; rank 0 merges them in the order of the
manifest's Parquet index and writes one pickle: `sample_idx`, `img_path` (source path),
`gt_label` (LongTensor (1,), labelled splits only), `pred_score` (FloatTensor (C,)),
`pred_label` (LongTensor (1,)), `num_classes`, plus `key` and `wnid` (the predicted WNID)
so that nothing depends on order alone.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
import torch.distributed as dist

from prep.atomic import write_atomic
from shards.manifest import INFO_SPLIT_NAMES


def manifest_order(data: str, split: str) -> list[tuple[str, str]]:
    """(key, source path) of every sample of a split, in shard and member order."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(data) / "index.parquet", columns=["key", "split", "source"])
    rows = table.to_pylist()
    names = {split} | {k for k, v in INFO_SPLIT_NAMES.items() if v == split}  # validation: val
    return [(r["key"], r["source"]) for r in rows if r["split"] in names]


def write_predictions(kept: dict, data: str, split: str, out: Path, num_classes: int,
                      rank: int, world: int, classes: list[str] | None = None
                      ) -> list[dict] | None:
    """Gather every rank's kept predictions on rank 0 (through files beside `out`: no 200 MB
    object all-gather) and write the pickle there; `wnid` is named from `classes` (the
    checkpoint's class list), else the shards'. Returns the written list on rank 0."""
    part = out.with_name(f".{out.name}.rank{rank}")
    torch.save(kept, part)
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    merged: dict = {}
    for r in range(world):
        p = out.with_name(f".{out.name}.rank{r}")
        merged |= torch.load(p, weights_only=True)
        p.unlink()
    wnids = classes or json.loads((Path(data) / "_info.json").read_text()).get("classes", [])
    results = []
    for idx, (key, source) in enumerate(manifest_order(data, split)):
        score, label = merged.pop(key)
        score = score.float()
        pred = int(score.argmax())
        item = {"sample_idx": idx, "img_path": source, "key": key,
                "pred_score": score, "pred_label": torch.tensor([pred]),
                "num_classes": num_classes, "wnid": wnids[pred] if pred < len(wnids) else ""}
        if label >= 0:
            item["gt_label"] = torch.tensor([label])
        results.append(item)
    if merged:
        raise RuntimeError(f"{len(merged)} predicted samples are not in the manifest")
    write_atomic(out, pickle.dumps(results, protocol=4))
    return results


def per_class_accuracy(results: list[dict], num_classes: int) -> list[float | None]:
    """Top-1 accuracy of each true class (None for classes without labelled samples)."""
    hits, totals = [0] * num_classes, [0] * num_classes
    for r in results:
        if "gt_label" in r:
            y = int(r["gt_label"])
            totals[y] += 1
            hits[y] += int(r["pred_label"]) == y
    return [h / t if t else None for h, t in zip(hits, totals)]
