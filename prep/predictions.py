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

A pickle can also ask for memory: a 60-byte file can name a 12 GB array or a 2**40-byte
bytes object. Nothing it asks for may exceed the file's own size: the file is read whole
(its size is known) and its opcodes scanned first (pickletools checks every counted length
against the bytes that remain), and every callable it may reach refuses sizes larger than
the file (`_bounded`).

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
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # proto 5
} | {("numpy.dtypes", n) for n in ("Float32DType", "Float64DType", "Float16DType",
                                   "Int64DType", "Int32DType", "BoolDType")}


def _requested(value: Any) -> int:
    """How many elements an argument asks for: an int is a size, a tuple/list of ints a
    shape (their product); anything else asks for nothing by itself."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        n = 1
        for v in value:
            n *= max(v, 0)
        return n
    return 0


class _Bounded:
    """An allowed callable that refuses any call whose size or shape arguments ask for more
    than `limit`; passed as an argument (`_reconstruct(ndarray, ...)`), it is the callable
    itself again."""

    def __init__(self, fn: Any, limit: int, name: str) -> None:
        self.fn, self.limit, self.name = fn, limit, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(a.fn if isinstance(a, _Bounded) else a for a in args)
        for value in (*args, *kwargs.values()):
            if _requested(value) > self.limit:
                raise pickle.UnpicklingError(
                    f"refused {self.name}({str(value)[:40]}): asks for "
                    f"{_requested(value):,} elements, more than the file's {self.limit:,} "
                    "bytes could hold")
        return self.fn(*args, **kwargs)


class SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, limit: int) -> None:
        super().__init__(file)
        self.limit = limit

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage  # its own loader would be torch.load(weights_only=False)
        if (module, name) in ALLOWED:
            return _Bounded(super().find_class(module, name), self.limit, f"{module}.{name}")
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not a type that "
                                     "prediction pickles contain (a pickle can run code)")


def safe_load(path: Path) -> Any:
    import pickletools

    try:
        data = path.read_bytes()
        for _ in pickletools.genops(io.BytesIO(data)):  # every counted length checked
            pass
        return SafeUnpickler(io.BytesIO(data), max(len(data), 1 << 16)).load()
    except FileNotFoundError as exc:
        raise PrepError(f"{path}: does not exist") from exc
    except IsADirectoryError as exc:
        raise PrepError(f"{path}: is a directory, not a predictions pickle") from exc
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refused"):
            raise PrepError(f"{path}: {exc}") from exc
        raise PrepError(f"{path}: truncated or not a predictions pickle ({exc})") from exc
    except (EOFError, ValueError, IndexError, TypeError, AttributeError, KeyError,
            RuntimeError, MemoryError, OverflowError) as exc:
        raise PrepError(f"{path}: truncated or not a predictions pickle "
                        f"({type(exc).__name__}: {str(exc)[:200]})") from exc


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
    if widths == {0}:
        raise PrepError(f"{path}: pred_score holds no class scores (0 classes)")
    named = all(d.get("img_path", d.get("key")) is not None for d in items)
    if named:
        _check_unique(paths, path)
    order = _dataset_order(items, path)
    scores = np.stack(rows).astype(np.float32)[order]
    return Predictions(scores, np.asarray(labels)[order], [paths[i] for i in order],
                       [keys[i] for i in order], named,
                       [wnids[i] for i in order] if all(wnids) else None)


def _check_unique(paths: list[str], path: Path) -> None:
    """One prediction per image: a repeated img_path would put two lines for one image."""
    seen: dict[str, int] = {}
    for i, name in enumerate(paths):
        if name in seen:
            raise PrepError(f"{path}: samples {seen[name]} and {i} are both {name!r}; a "
                            "predictions file holds each image once")
        seen[name] = i


def _dataset_order(items: list[dict], path: Path) -> list[int]:
    """List positions in dataset order: by `sample_idx` when every sample has one (a
    permutation of 0..N-1), else list order. Never a text sort of numbers."""
    idx = [d.get("sample_idx") for d in items]
    if all(i is None for i in idx):
        return list(range(len(items)))
    try:
        vals = [_array(i, "sample_idx", str(path)).reshape(-1) for i in idx]
        if any(v.size != 1 or v[0] != int(v[0]) for v in vals):
            raise TypeError("not one whole number")
        ints = [int(v[0]) for v in vals]
    except (TypeError, IndexError, ValueError, OverflowError, PrepError) as exc:
        first = next((i for i, v in enumerate(idx) if v is None or not isinstance(v, int)
                      or isinstance(v, bool)), 0)
        raise PrepError(f"{path}: sample_idx must be a whole number in every sample "
                        f"(sample {first} has {str(idx[first])[:40]})") from exc
    if sorted(ints) != list(range(len(items))):
        raise PrepError(f"{path}: sample_idx is not a permutation of 0..{len(items) - 1} "
                        "(repeated or missing samples)")
    order = [0] * len(items)
    for pos, i in enumerate(ints):
        order[i] = pos
    return order


def write_predictions(kept: dict, out: Path, num_classes: int,
                      classes: list[str] | None = None) -> list[dict]:
    """Write the predictions pickle at `out` from every rank's kept predictions ({key:
    (scores, label, (source, shard number, member number))}, gathered by the trainer), in
    manifest order (shard, then member); `img_path` is the sample's own `source`, `wnid`
    named from `classes` (the checkpoint's class list). Nothing comes from index.parquet.
    Returns the written list."""
    import torch

    wnids = classes or []
    results = []
    ordered = sorted(kept.items(), key=lambda kv: (kv[1][2][1], kv[1][2][2], kv[0]))
    for idx, (key, (score, label, (source, _, _))) in enumerate(ordered):
        score = score.float()
        pred = int(score.argmax())
        item = {"sample_idx": idx, "img_path": source, "key": key,
                "pred_score": score, "pred_label": torch.tensor([pred]),
                "num_classes": num_classes, "wnid": wnids[pred] if pred < len(wnids) else ""}
        if label >= 0:
            item["gt_label"] = torch.tensor([label])
        results.append(item)
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
