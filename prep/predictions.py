"""The predictions pickle, both directions: the evaluator writes it, `prep export-preds`
reads it (this toolkit's, mmpretrain 1.x's and mmcls 0.x's) safely into one table.

Written: mmpretrain 1.x's layout (`tools/test.py --out result.pkl`), a list of per-sample
dicts in dataset (manifest) order, whatever the world size: `sample_idx`, `img_path` (source
path), `gt_label` (LongTensor (1,), labelled samples only), `pred_score` (FloatTensor (C,)),
`pred_label` (LongTensor (1,)), `num_classes`, plus `key` and `wnid` (the predicted WNID)
so that nothing depends on order alone.

Read:

A pickle can run code when loaded, so loading goes through an unpickler that allows only
the types these formats need: builtin containers and scalars, OrderedDict, torch tensors
(their storages are loaded with torch.load(weights_only=True)) and numpy arrays. A pickle
that reaches for anything else (os.system, eval, ...) is refused before it runs.

Shapes: this toolkit's and mmpretrain 1.x's list of per-sample dicts (`pred_score`,
`gt_label`, `img_path`, ...) and mmcls 0.x's single dict (`class_scores` N x C, ...).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prep.atomic import write_atomic
from prep.errors import PrepError


def _load_storage(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


ALLOWED = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes",
                              "int", "float", "bool", "complex", "slice", "bytearray")
} | {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
    ("torch", "Size"), ("torch", "device"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
} | {("numpy.dtypes", n) for n in ("Float32DType", "Float64DType", "Float16DType",
                                   "Int64DType", "Int32DType", "BoolDType")}


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage  # its own loader would be torch.load(weights_only=False)
        if module == "torch" and name.endswith("Storage"):
            import torch

            return getattr(torch, name)
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not a type that "
                                     "prediction pickles contain (a pickle can run code)")


def safe_load(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f).load()
    except FileNotFoundError as exc:
        raise PrepError(f"{path}: does not exist") from exc
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refused"):
            raise PrepError(f"{path}: {exc}") from exc
        raise PrepError(f"{path}: truncated or not a predictions pickle ({exc})") from exc
    except (EOFError, ValueError, IndexError, TypeError, AttributeError, KeyError) as exc:
        raise PrepError(f"{path}: truncated or not a predictions pickle "
                        f"({type(exc).__name__}: {exc})") from exc


@dataclass
class Predictions:
    scores: np.ndarray  # N x C softmax scores, dataset order
    labels: np.ndarray  # N ground-truth labels, -1 where unknown
    paths: list[str]  # image path (or key) per sample; the sample index when `named` is False
    keys: list[str]
    named: bool = True  # paths are real file names (file-name order exists)
    wnids: list[str] | None = None  # predicted WNID per sample, when the pickle has them


def _array(x: Any, what: str, where: str) -> np.ndarray:
    """A numeric array from a tensor, array, list or number; PrepError for anything else
    (strings, dicts, ragged lists)."""
    try:
        arr = x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise PrepError(f"{where}: {what} is not numeric ({type(x).__name__})") from exc
    if arr.dtype.kind not in "biuf":
        raise PrepError(f"{where}: {what} is not numeric (got {type(x).__name__} "
                        f"{str(x)[:40]!r})")
    return arr


def read_predictions(path: Path) -> Predictions:
    """The predictions of a pickle in dataset order, checked: finite scores, labels in
    range, a `sample_idx` that is a permutation. Raises PrepError naming the sample."""
    obj = safe_load(path)
    if isinstance(obj, list) and obj and all(isinstance(d, dict) for d in obj):
        preds = _from_list(obj, path)
    elif isinstance(obj, dict) and "class_scores" in obj:  # mmcls 0.x: no file names at all
        scores = _array(obj["class_scores"], "class_scores", str(path)).astype(np.float32)
        if scores.ndim != 2:
            raise PrepError(f"{path}: class_scores must be N x C, got shape {scores.shape}")
        n = len(scores)
        names = [str(i) for i in range(n)]
        preds = Predictions(scores, np.full(n, -1), names, names, named=False)
    else:
        raise PrepError(f"{path}: expected a list of per-sample dicts (mmpretrain 1.x / this "
                        "toolkit) or a dict with class_scores (mmcls 0.x), got "
                        f"{type(obj).__name__}")
    _check_values(preds, path)
    return preds


def _check_values(p: Predictions, path: Path) -> None:
    """Never export silently wrong numbers: NaN/inf scores (an all-NaN row would become
    class 0) and labels outside 0..C-1 are refused, naming the first sample and the count."""
    bad = ~np.isfinite(p.scores).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise PrepError(f"{path}: {int(bad.sum())} sample(s) have NaN or infinite scores, "
                        f"the first is sample {i} ({p.paths[i]}); the model or the evaluation "
                        "diverged: nothing exported")
    c = p.scores.shape[1]
    out = (p.labels < -1) | (p.labels >= c)
    if out.any():
        i = int(np.argmax(out))
        raise PrepError(f"{path}: {int(out.sum())} sample(s) have a gt_label outside "
                        f"0..{c - 1}, the first is sample {i} ({p.paths[i]}) with label "
                        f"{int(p.labels[i])}: the labels and scores do not belong together")


def _label(gt: Any, where: str) -> int:
    if gt is None:
        return -1
    arr = _array(gt, "gt_label", where).reshape(-1)
    if arr.size != 1 or arr.dtype.kind == "f" and arr[0] != int(arr[0]):
        raise PrepError(f"{where}: gt_label must hold one whole number, got {arr.tolist()[:5]}")
    return int(arr[0])


def _from_list(items: list[dict], path: Path) -> Predictions:
    rows, labels, paths, keys, wnids = [], [], [], [], []
    for i, d in enumerate(items):
        where = f"{path}: sample {i}"
        if "pred_score" not in d:
            raise PrepError(f"{where} has no pred_score")
        rows.append(_array(d["pred_score"], "pred_score", where).reshape(-1))
        labels.append(_label(d.get("gt_label"), where))
        name = d.get("img_path", d.get("key"))
        if name is not None and not isinstance(name, str):
            raise PrepError(f"{where}: img_path/key must be a string, got {type(name).__name__}")
        paths.append(name if name is not None else str(i))
        keys.append(str(d.get("key", Path(name).stem if name else i)))
        wnids.append(d.get("wnid") if isinstance(d.get("wnid"), str) else None)
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise PrepError(f"{path}: samples have different class counts {sorted(widths)}")
    named = all(d.get("img_path", d.get("key")) is not None for d in items)
    order = _dataset_order(items, path)
    scores = np.stack(rows).astype(np.float32)[order]
    return Predictions(scores, np.asarray(labels)[order], [paths[i] for i in order],
                       [keys[i] for i in order], named,
                       [wnids[i] for i in order] if all(wnids) else None)


def _dataset_order(items: list[dict], path: Path) -> list[int]:
    """List positions in dataset order: by `sample_idx` when every sample has one (a
    permutation of 0..N-1), else list order. Never a text sort of numbers."""
    idx = [d.get("sample_idx") for d in items]
    if all(i is None for i in idx):
        return list(range(len(items)))
    try:
        ints = [int(_array(i, "sample_idx", str(path)).reshape(-1)[0]) for i in idx]
    except (TypeError, IndexError, PrepError) as exc:
        raise PrepError(f"{path}: sample_idx must be a whole number in every sample") from exc
    if sorted(ints) != list(range(len(items))):
        raise PrepError(f"{path}: sample_idx is not a permutation of 0..{len(items) - 1} "
                        "(repeated or missing samples)")
    order = [0] * len(items)
    for pos, i in enumerate(ints):
        order[i] = pos
    return order


def write_predictions(kept: dict, order: list[tuple[str, str]], out: Path, num_classes: int,
                      rank: int, world: int, classes: list[str] | None = None
                      ) -> list[dict] | None:
    """Gather every rank's kept predictions ({key: (scores, label)}) on rank 0 (through files
    beside `out`: no 200 MB object all-gather) and write the pickle there, in `order`
    ((key, source path) of every sample, the manifest's order); `wnid` is named from
    `classes` (the checkpoint's class list). Returns the written list on rank 0."""
    import torch
    import torch.distributed as dist

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
    wnids = classes or []
    results = []
    for idx, (key, source) in enumerate(order):
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
