"""Load a predictions pickle safely and bring its three shapes to one table.

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

import numpy as np

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
    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage  # its own loader would be torch.load(weights_only=False)
        if module == "torch" and name.endswith("Storage"):
            import torch

            return getattr(torch, name)
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not a type that "
                                     "prediction pickles contain (a pickle can run code)")


def safe_load(path: Path):
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
    paths: list[str]  # image path (or key) per sample
    keys: list[str]


def _array(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x)


def read_predictions(path: Path) -> Predictions:
    obj = safe_load(path)
    if isinstance(obj, list) and obj and all(isinstance(d, dict) for d in obj):
        return _from_list(obj, path)
    if isinstance(obj, dict) and "class_scores" in obj:  # mmcls 0.x
        scores = np.asarray(_array(obj["class_scores"]), dtype=np.float32)
        if scores.ndim != 2:
            raise PrepError(f"{path}: class_scores must be N x C, got shape {scores.shape}")
        n = len(scores)
        names = [str(i) for i in range(n)]
        return Predictions(scores, np.full(n, -1), names, names)
    raise PrepError(f"{path}: expected a list of per-sample dicts (mmpretrain 1.x / this "
                    f"toolkit) or a dict with class_scores (mmcls 0.x), got {type(obj).__name__}")


def _from_list(items: list[dict], path: Path) -> Predictions:
    rows, labels, paths, keys = [], [], [], []
    for i, d in enumerate(items):
        if "pred_score" not in d:
            raise PrepError(f"{path}: sample {i} has no pred_score")
        rows.append(_array(d["pred_score"]).reshape(-1))
        gt = d.get("gt_label")
        labels.append(int(_array(gt).reshape(-1)[0]) if gt is not None else -1)
        paths.append(str(d.get("img_path", d.get("key", i))))
        keys.append(str(d.get("key", Path(paths[-1]).stem)))
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise PrepError(f"{path}: samples have different class counts {sorted(widths)}")
    return Predictions(np.stack(rows).astype(np.float32), np.asarray(labels), paths, keys)
