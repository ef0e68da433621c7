"""`prep export-preds`: a predictions pickle -> the text formats people hand in.

- ilsvrc: the official classification submission: line n holds image n's top-5
  ILSVRC2012_IDs (1..1000, devkit order), best first. Positional: the images must be
  numbered 1..N without a gap (`positional_order`), else it is refused.
- kaggle: `ImageId,PredictionString` with the top-k WNIDs, space separated.
- mmcls: `path label score` per line (sorted-WNID labels, top-1), dataset order.
- txt: tab-separated `path` then, for each of the top-k, `label score wnid words`.
- csv / parquet: one row per sample: index, path, key, gt label, top-k labels/WNIDs/scores.
The class table comes from `--classes DIR/imagenet/meta/classes.csv` (written by
`prep imagenet`), or, for 1000 classes, from the shipped ILSVRC metadata.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from pathlib import Path

import numpy as np

from prep.atomic import write_atomic
from prep.classes import ClassInfo, build_class_table, reference_words
from prep.errors import PrepError
from prep.predictions import Predictions

FORMATS = ("ilsvrc", "kaggle", "mmcls", "txt", "csv", "parquet")


def load_classes(classes_csv: Path | None, num_classes: int) -> list[ClassInfo] | None:
    """The class table, in label order: row order does not count, the `index` column does
    (a table sorted by another column is still right); indexes 0..C-1 and WNIDs each once."""
    if classes_csv is None:
        return build_class_table(reference_words()) if num_classes == 1000 else None
    try:
        with open(classes_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        table = [ClassInfo(int(r["index"]), r["wnid"], r["words"],
                           int(r["ilsvrc2012_id"]) if r["ilsvrc2012_id"] else None)
                 for r in rows]
    except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise PrepError(f"{classes_csv}: not a prep class table "
                        f"(index,wnid,ilsvrc2012_id,words): {exc}") from exc
    if len(table) != num_classes:
        raise PrepError(f"{classes_csv}: {len(table)} classes, the predictions have "
                        f"{num_classes}: they do not belong together")
    for column, values in (("index", [c.index for c in table]),
                           ("wnid", [c.wnid for c in table])):
        twice = sorted(v for v, n in Counter(values).items() if n > 1)
        if twice:
            raise PrepError(f"{classes_csv}: {column} {twice[0]!r} appears more than once; "
                            "each class has one row")
    if sorted(c.index for c in table) != list(range(num_classes)):
        bad = next(c.index for c in table if not 0 <= c.index < num_classes)
        raise PrepError(f"{classes_csv}: index {bad} is outside 0..{num_classes - 1}")
    return sorted(table, key=lambda c: c.index)


def topk(p: Predictions, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, p.scores.shape[1])
    idx = np.argsort(-p.scores, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(p.scores, idx, axis=1)


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs as numbers: `2.JPEG` before `10.JPEG`; the zero-padded
    ILSVRC names come out as in a plain sort."""
    return tuple((0, int(t), t) if t.isdigit() else (1, 0, t)
                 for t in re.split(r"(\d+)", name) if t)


def _file_order(p: Predictions) -> list[int]:
    """File-name order from real names; dataset order when the pickle has none (mmcls 0.x,
    lists without img_path): a text sort of `str(i)` would give 0, 1, 10, 11, 2, ..."""
    if not p.named:
        return list(range(len(p.paths)))
    return sorted(range(len(p.paths)), key=lambda i: natural_key(Path(p.paths[i]).name))


_OFFICIAL = re.compile(r"ILSVRC2012_(val|test)_(\d{8})\.[A-Za-z]+")
OFFICIAL_COUNT = {"val": 50_000, "test": 100_000}


def positional_order(p: Predictions) -> list[int]:
    """Sample positions in submission order for a format where line n is image n (the
    ILSVRC devkit reads it so): the official names of one split, numbered 1..N with no gap
    and no repeat, else a PrepError naming the first gap (a missing image would shift every
    later prediction onto the wrong image's line)."""
    if not p.named:  # mmcls 0.x: dataset order, which is file order for a whole split
        if len(p.paths) in OFFICIAL_COUNT.values():
            return list(range(len(p.paths)))
        raise PrepError(f"--format ilsvrc: line n is image n, and these {len(p.paths):,} "
                        "predictions carry no file names to tell which images they are (a "
                        "whole split, 50,000 val or 100,000 test, is taken in dataset "
                        "order); use --format csv")
    numbers: dict[int, int] = {}
    splits = set()
    for i, path in enumerate(p.paths):
        m = _OFFICIAL.fullmatch(Path(path).name)
        if not m:
            raise PrepError(f"--format ilsvrc: line n is image ILSVRC2012_val_n; sample {i} "
                            f"is {path!r}, not an official ILSVRC2012 name; use --format "
                            "kaggle or csv")
        splits.add(m[1])
        numbers[int(m[2])] = i
    if len(splits) > 1:
        raise PrepError("--format ilsvrc: the predictions mix val and test images")
    split = splits.pop()
    gap = next((n for n in range(1, len(numbers) + 1) if n not in numbers), None)
    if gap is not None:
        after = min(n for n in numbers if n > gap)
        raise PrepError(f"--format ilsvrc: ILSVRC2012_{split}_{gap:08d} has no prediction, so "
                        f"line {gap} would hold ILSVRC2012_{split}_{after:08d}'s; the format "
                        f"is positional and needs images 1..N of the {split} set without a "
                        f"gap (here {len(numbers):,} of {OFFICIAL_COUNT[split]:,}). Evaluate "
                        "the whole split, or use --format kaggle (lines named by ImageId)")
    return [numbers[n] for n in range(1, len(numbers) + 1)]


def check_class_table(p: Predictions, classes: list[ClassInfo]) -> None:
    """The pickle's predicted WNIDs (written by the evaluator from the checkpoint's classes)
    must be what the class table says for the predicted index."""
    if p.wnids is None:
        return
    top = p.scores.argmax(1)
    for i, (j, wnid) in enumerate(zip(top, p.wnids)):
        if wnid and classes[j].wnid != wnid:
            raise PrepError(f"sample {i} ({p.paths[i]}): the pickle predicts {wnid}, the class "
                            f"table says class {j} is {classes[j].wnid}: the class table does "
                            "not belong to this model; pass the --classes of its shards")


def render(p: Predictions, fmt: str, k: int, classes: list[ClassInfo] | None) -> bytes:
    if fmt not in FORMATS:
        raise PrepError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    needs = {"ilsvrc": "ILSVRC2012_IDs", "kaggle": "WNIDs", "txt": "WNIDs and names"}
    if fmt in needs and classes is None:
        raise PrepError(f"--format {fmt} needs the class table for {needs[fmt]}: pass "
                        "--classes DIR/imagenet/meta/classes.csv (from prep imagenet)")
    if classes is not None and len(classes) != p.scores.shape[1]:
        raise PrepError(f"the class table has {len(classes)} classes, the predictions "
                        f"{p.scores.shape[1]}")
    if classes is not None:
        check_class_table(p, classes)
    idx, sc = topk(p, 5 if fmt == "ilsvrc" else k)
    if fmt == "ilsvrc":
        if any(c.ilsvrc2012_id is None for c in classes):
            raise PrepError("--format ilsvrc: the class table lacks ILSVRC2012_IDs")
        ids = np.array([c.ilsvrc2012_id for c in classes])
        return "".join(" ".join(map(str, ids[idx[i]])) + "\n"
                       for i in positional_order(p)).encode()
    if fmt == "kaggle":
        rows = [f"{p.keys[i]},{' '.join(classes[j].wnid for j in idx[i])}\n"
                for i in _file_order(p)]
        return ("ImageId,PredictionString\n" + "".join(rows)).encode()
    if fmt == "mmcls":
        return "".join(f"{p.paths[i]} {idx[i, 0]} {sc[i, 0]:.6f}\n"
                       for i in range(len(p.paths))).encode()
    if fmt == "txt":
        return "".join("\t".join([p.paths[i]] + [f"{j}\t{s:.6f}\t{classes[j].wnid}\t"
                                                  f"{classes[j].words}"
                                                  for j, s in zip(idx[i], sc[i])]) + "\n"
                       for i in range(len(p.paths))).encode()
    return _table(p, idx, sc, classes, fmt)


def _table(p: Predictions, idx: np.ndarray, sc: np.ndarray, classes: list[ClassInfo] | None,
           fmt: str) -> bytes:
    cols: dict[str, list] = {"sample_idx": list(range(len(p.paths))), "path": p.paths,
                             "key": p.keys, "gt_label": p.labels.tolist()}
    for r in range(idx.shape[1]):
        cols[f"top{r + 1}_label"] = idx[:, r].tolist()
        if classes is not None:
            cols[f"top{r + 1}_wnid"] = [classes[j].wnid for j in idx[:, r]]
        cols[f"top{r + 1}_score"] = sc[:, r].tolist()
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.table(cols), buf)
        return buf.getvalue()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerows(zip(*cols.values()))
    return buf.getvalue().encode()


def write_export(data: bytes, out: Path) -> None:
    if not out.parent.is_dir():
        raise PrepError(f"{out}: directory {out.parent} does not exist; create it first")
    write_atomic(out, data)


def real_scores(p: Predictions, classes: list[ClassInfo] | None,
                idx: np.ndarray | None = None) -> dict | None:
    """ReaL top-1/top-5 (fractions) over the ILSVRC2012 val images ReaL keeps; None when
    the predictions hold none or their classes are not known WNIDs (prep.scoring.RealTally)."""
    from prep.scoring import RealTally, global_index

    gi = global_index()
    if classes is None or not all(c.wnid in gi for c in classes):
        return None
    tally = RealTally([gi[c.wnid] for c in classes])
    idx = topk(p, 5)[0] if idx is None else idx
    for i, name in enumerate(p.paths if p.named else []):
        tally.add(name, int(p.labels[i]), idx[i])
    return tally.result()


def summary(p: Predictions, classes: list[ClassInfo] | None, worst: int = 10) -> str:
    labelled = p.labels >= 0
    n = int(labelled.sum())
    lines = [f"{len(p.paths):,} samples, {p.scores.shape[1]} classes"]
    if not n:
        return "\n".join(lines + ["no ground-truth labels: accuracy not computed"])
    idx, _ = topk(p, 5)
    y = p.labels[labelled]
    top1 = float((idx[labelled, 0] == y).mean())
    top5 = float((idx[labelled] == y[:, None]).any(1).mean())
    lines.append(f"top-1 {100 * top1:.2f}%   top-5 {100 * top5:.2f}%   "
                 f"(top-5 error {100 * (1 - top5):.2f}%) on {n:,} labelled samples")
    real = real_scores(p, classes, idx)
    if real:
        lines.append(f"ReaL top-1 {100 * real['real_top1']:.2f}%   ReaL top-5 "
                     f"{100 * real['real_top5']:.2f}%   on {real['real_samples']:,} val images "
                     "ReaL keeps")
    pairs = Counter((int(t), int(q)) for t, q in zip(y, idx[labelled, 0]) if t != q)

    def name(c: int) -> str:
        return f"{c} {classes[c].wnid} {classes[c].words.split(',')[0]}" if classes else str(c)

    for (t, q), count in pairs.most_common(worst):
        lines.append(f"  {count:>5}x  true {name(t)}  ->  predicted {name(q)}")
    return "\n".join(lines)


def plot(p: Predictions, classes: list[ClassInfo] | None, out: Path, worst: int = 15) -> Path:
    """PNG: per-class top-1 accuracy (sorted) and the most confused (true -> predicted) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labelled = p.labels >= 0
    if not labelled.any():
        raise PrepError("--plot needs ground-truth labels; these predictions have none")
    y, pred = p.labels[labelled], p.scores[labelled].argmax(1)
    acc = [(float((pred[y == c] == c).mean()), c) for c in np.unique(y)]
    acc.sort()
    pairs = Counter((int(t), int(q)) for t, q in zip(y, pred) if t != q).most_common(worst)
    name = (lambda c: classes[c].words.split(",")[0]) if classes else str
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5))
    a.plot(range(len(acc)), [100 * v for v, _ in acc])
    a.set(title=f"per-class top-1 ({len(acc)} classes, sorted)", xlabel="class rank",
          ylabel="top-1 (%)", ylim=(0, 100))
    b.barh([f"{name(t)} -> {name(q)}" for (t, q), _ in pairs][::-1],
           [n for _, n in pairs][::-1])
    b.set(title="most confused pairs (true -> predicted)", xlabel="images")
    b.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    if not out.parent.is_dir():
        raise PrepError(f"{out}: directory {out.parent} does not exist; create it first")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
