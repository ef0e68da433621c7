"""`prep sample`: synthetic ILSVRC trees in each real layout, for demos, tests and scale runs.

The plan (which classes, which file names, which val label) is a pure function of
`SampleSpec`, so tests recompute the ground truth instead of trusting the tree.
With all 1000 classes and 50 val images per class, val uses the real ILSVRC2012
labels, so a prepared full-scale sample must match Caffe's `val.txt` line for line.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prep import __version__
from prep.classes import (
    NUM_CLASSES,
    package_data,
    reference_ids,
    reference_val_labels,
    reference_words,
)
from prep.errors import PrepError
from prep.progress import progress_bar
from prep.synth import BAD_KINDS, bad_file_bytes, encode_jpeg, render_class_image

LAYOUTS = ("ilsvrc2017", "kaggle", "ilsvrc2012", "ilsvrc2012-tar", "imagefolder", "blurred",
           "blurred-tar", "hf-tar", "hf-parquet", "timm-wds")
# evaluation sets (`prep evalset`): class folders with each set's own names; the classes
# come from the set's pool (ImageNet-A/-R: their 200), `--val-per-class` images each
EVALSET_LAYOUTS = ("imagenet-v2", "imagenet-a", "imagenet-r", "imagenet-sketch")
DEVKIT = "ILSVRC2012_devkit_t12"
TRAIN_TAR, VAL_TAR, TEST_TAR = (
    "ILSVRC2012_img_train.tar",
    "ILSVRC2012_img_val.tar",
    "ILSVRC2012_img_test_v10102019.tar",
)


@dataclass(frozen=True)
class SampleSpec:
    classes: int = 10  # how many of the 1000 CLS-LOC classes
    train_per_class: int = 20
    val_per_class: int = 5
    test_images: int = 0
    size: int = 64  # longer image side, px
    seed: int = 0
    empty_files: bool = False  # zero-byte images, for scale tests
    bad_files: bool = False  # plant CMYK, PNG-named-JPEG, grayscale and truncated files


@dataclass
class SamplePlan:
    spec: SampleSpec
    wnids: list[str]  # sorted: position in this list is the sample's class label
    train: dict[str, list[str]]  # wnid -> file stems
    val: dict[str, str]  # val stem -> wnid, in file-name order
    test: list[str]
    bad: dict[str, str] = field(default_factory=dict)  # train stem -> kind


def plan_sample(spec: SampleSpec, pool: list[str] | None = None,
                real_val: bool = True) -> SamplePlan:
    """The sample's plan; classes are drawn from `pool` (default: the 1000). `real_val`:
    val is the first `val_per_class` real ILSVRC2012 val images of each class, with their
    real labels (a release of the real images is cross-checked against them)."""
    all_wnids = sorted(pool or reference_words())
    if not 1 <= spec.classes <= len(all_wnids):
        raise PrepError(f"--classes must be 1..{len(all_wnids)}, got {spec.classes}")
    if real_val and not 0 <= spec.val_per_class <= 50:
        raise PrepError(f"--val-per-class must be 0..50 (the real val set has 50 images per "
                        f"class), got {spec.val_per_class}")
    rng = np.random.default_rng(spec.seed)
    picked = rng.choice(len(all_wnids), spec.classes, replace=False)
    wnids = sorted(all_wnids[i] for i in picked)
    train = {}
    for w in wnids:  # real train names are sparse numbers: n01440764_10026
        nums = rng.choice(np.arange(1, 20000), spec.train_per_class, replace=False)
        train[w] = [f"{w}_{n}" for n in sorted(nums.tolist())]
    if spec.classes == NUM_CLASSES and spec.val_per_class == 50:
        val = dict(sorted(reference_val_labels().items()))
    elif real_val:
        per: dict[str, list[str]] = {w: [] for w in wnids}
        for stem, w in sorted(reference_val_labels().items()):
            if w in per and len(per[w]) < spec.val_per_class:
                per[w].append(stem)
        val = dict(sorted((s, w) for w, stems in per.items() for s in stems))
    else:
        labels = np.repeat(np.arange(spec.classes), spec.val_per_class)
        rng.shuffle(labels)
        val = {f"ILSVRC2012_val_{i + 1:08d}": wnids[c] for i, c in enumerate(labels)}
    test = [f"ILSVRC2012_test_{i + 1:08d}" for i in range(spec.test_images)]
    bad = {}
    if spec.bad_files and not spec.empty_files:
        stems = [s for w in wnids for s in train[w]]
        bad = dict(zip(stems[: len(BAD_KINDS)], BAD_KINDS))
    return SamplePlan(spec, wnids, train, val, test, bad)


def _image(plan: SamplePlan, stem: str, wnid: str | None) -> bytes:
    if plan.spec.empty_files:
        return b""
    # Seeded per file so content does not depend on generation order.
    rng = np.random.default_rng([plan.spec.seed, zlib.crc32(stem.encode())])
    pos = plan.wnids.index(wnid) if wnid else int(rng.integers(len(plan.wnids)))
    img = render_class_image(pos, len(plan.wnids), rng, plan.spec.size)
    kind = plan.bad.get(stem)
    return bad_file_bytes(kind, img) if kind else encode_jpeg(img)


def _files(plan: SamplePlan, val_folders: bool) -> Iterator[tuple[str, str, bytes]]:
    """(split, path relative to the split dir, bytes) for every image."""
    for w, stems in plan.train.items():
        for s in stems:
            yield "train", f"{w}/{s}.JPEG", _image(plan, s, w)
    for s, w in plan.val.items():
        yield "val", (f"{w}/{s}.JPEG" if val_folders else f"{s}.JPEG"), _image(plan, s, w)
    for s in plan.test:
        yield "test", f"{s}.JPEG", _image(plan, s, None)


def _box(stem: str, size: int) -> tuple[int, int, int, int]:
    r = np.random.default_rng(zlib.crc32(stem.encode()))
    x0, y0 = (int(v) for v in r.integers(0, size // 2, 2))
    return x0, y0, x0 + size // 3, y0 + size // 3


def voc_xml(stem: str, wnid: str, folder: str, size: int, objects: int = 1) -> str:
    """A PASCAL-VOC annotation as the ILSVRC bbox files have them."""
    boxes = []
    for k in range(objects):
        x0, y0, x1, y1 = _box(f"{stem}/{k}", size)
        boxes.append(
            f"\t<object>\n\t\t<name>{wnid}</name>\n\t\t<pose>Unspecified</pose>\n"
            f"\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
            f"\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
            f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        )
    return (
        f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{stem}</filename>\n"
        f"\t<source>\n\t\t<database>ILSVRC_2012</database>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{size}</width>\n\t\t<height>{size}</height>\n"
        f"\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n"
        + "".join(boxes)
        + "</annotation>\n"
    )


def _loc_csv(labels: dict[str, str], size: int, rng: np.random.Generator) -> str:
    rows = []
    for stem, w in labels.items():
        x0, y0, x1, y1 = _box(f"{stem}/0", size)
        rows.append(f"{stem},{w} {x0} {y0} {x1} {y1} ")
    rng.shuffle(rows)  # the Kaggle files are not in file-name order
    return "ImageId,PredictionString\n" + "\n".join(rows) + "\n"


def _boxed_train(plan: SamplePlan) -> dict[str, str]:
    """The boxed train subset: the first two images of each class, as in the real data."""
    return {s: w for w, stems in plan.train.items() for s in stems[:2]}


def write_meta_mat(path: Path | io.BytesIO) -> None:
    """A devkit-style meta.mat: the 1000 leaves (real IDs) plus non-leaf synsets after them."""
    from scipy.io import savemat

    words, ids = reference_words(), reference_ids()
    names = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
             "wordnet_height", "num_train_images"]
    rows = [(ids[w], w, words[w], "", 0, np.zeros((1, 0)), 0, 1300) for w in sorted(ids)]
    rows.sort(key=lambda r: r[0])
    rows += [(1001, "n00001740", "entity", "", 2, np.array([[1002, 1003]]), 18, 0),
             (1002, "n00001930", "physical entity", "", 1, np.array([[1]]), 17, 0),
             (1003, "n00002137", "abstraction", "", 1, np.array([[2]]), 17, 0)]
    arr = np.zeros((len(rows), 1), dtype=[(n, "O") for n in names])
    for i, r in enumerate(rows):
        arr[i, 0] = r
    savemat(path, {"synsets": arr})


def _devkit_files(plan: SamplePlan) -> dict[str, bytes]:
    ids = reference_ids()
    real = reference_val_labels()  # the real devkit's 50,000 lines: line i is image i
    gt = "".join(f"{ids[real[f'ILSVRC2012_val_{i:08d}']]}\n" for i in range(1, 50_001))
    buf = io.BytesIO()
    write_meta_mat(buf)
    return {
        f"{DEVKIT}/data/meta.mat": buf.getvalue(),
        f"{DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt": gt.encode(),
    }


def _imagesets(plan: SamplePlan) -> dict[str, bytes]:
    train = [f"{w}/{s} {i}" for i, (w, s) in
             enumerate(((w, s) for w, ss in plan.train.items() for s in ss), 1)]
    val = [f"{s} {i}" for i, s in enumerate(plan.val, 1)]
    test = [f"{s} {i}" for i, s in enumerate(plan.test, 1)]
    out = {"train_cls.txt": train, "val.txt": val}
    if test:
        out["test.txt"] = test
    return {f"ImageSets/CLS-LOC/{k}": ("\n".join(v) + "\n").encode() for k, v in out.items()}


def _clsloc_tree(plan: SamplePlan, val_xml: bool = True) -> Iterator[tuple[str, bytes]]:
    """Files of the image-net.org ILSVRC2017 CLS-LOC tree, relative to its root."""
    for split, rel, data in _files(plan, val_folders=False):
        yield f"Data/CLS-LOC/{split}/{rel}", data
    size = plan.spec.size
    if val_xml:
        for i, (s, w) in enumerate(plan.val.items()):
            xml = voc_xml(s, w, "val", size, objects=1 + (i % 7 == 0))
            yield f"Annotations/CLS-LOC/val/{s}.xml", xml.encode()
    for s, w in _boxed_train(plan).items():
        yield f"Annotations/CLS-LOC/train/{w}/{s}.xml", voc_xml(s, w, w, size).encode()
    yield from _imagesets(plan).items()


def _layout_files(plan: SamplePlan, layout: str) -> Iterator[tuple[str, bytes]]:
    rng = np.random.default_rng(plan.spec.seed + 1)
    if layout == "ilsvrc2017":
        yield from _clsloc_tree(plan)
        yield "devkit/data/map_clsloc.txt", package_data("map_clsloc.txt")
        yield "Data/DET/README.txt", b"other ILSVRC tasks live beside CLS-LOC; prep ignores them\n"
    elif layout == "kaggle":
        for rel, data in _clsloc_tree(plan):
            yield f"ILSVRC/{rel}", data
        yield "LOC_synset_mapping.txt", package_data("LOC_synset_mapping.txt")
        yield "LOC_val_solution.csv", _loc_csv(plan.val, plan.spec.size, rng).encode()
        yield "LOC_train_solution.csv", _loc_csv(_boxed_train(plan), plan.spec.size, rng).encode()
    elif layout == "ilsvrc2012":
        for split, rel, data in _files(plan, val_folders=False):
            yield f"{split}/{rel}", data
        yield from _devkit_files(plan).items()
    elif layout == "imagefolder":
        for split, rel, data in _files(plan, val_folders=True):
            if split != "test":
                yield f"{split}/{rel}", data
    elif layout == "blurred":  # train_blurred/<wnid>/<stem>.jpg, val in class folders too
        for split, rel, data in _files(plan, val_folders=True):
            if split != "test":
                yield f"{split}_blurred/{rel.rsplit('.', 1)[0]}.jpg", data
    else:
        raise PrepError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def _evalset_files(plan: SamplePlan, layout: str) -> Iterator[tuple[str, bytes]]:
    """Class folders named as each evaluation set names them (see prep/evalset.py)."""
    import hashlib

    gindex = {w: i for i, w in enumerate(sorted(reference_words()))}
    words = reference_words()
    styles = ("art", "cartoon", "painting", "sketch", "toy")
    for w in plan.wnids:
        word = words[w].split(",")[0]
        for i in range(plan.spec.val_per_class):
            stem = f"{layout}-{w}-{i}"
            rng = np.random.default_rng([plan.spec.seed, zlib.crc32(stem.encode())])
            data = encode_jpeg(render_class_image(plan.wnids.index(w), len(plan.wnids), rng,
                                                  plan.spec.size))
            if layout == "imagenet-v2":  # folder = sorted-WNID index, file = a sha1
                name = f"{gindex[w]}/{hashlib.sha1(stem.encode()).hexdigest()}.jpeg"
            elif layout == "imagenet-a":  # scores, words, spaces and dots in the name
                a, b = rng.integers(0, 10**6, 2)
                name = f"{w}/0.{a:06d}_{word} _ {word}_0.{b:06d}.jpg"
            elif layout == "imagenet-r":  # the same names in every class
                name = f"{w}/{styles[i % len(styles)]}_{i // len(styles)}.jpg"
            else:  # imagenet-sketch
                name = f"{w}/{i + 1}.JPEG"
            yield name, data


def _total(plan: SamplePlan, layout: str = "") -> int:
    if layout in EVALSET_LAYOUTS:
        return len(plan.wnids) * plan.spec.val_per_class
    return sum(map(len, plan.train.values())) + len(plan.val) + len(plan.test)


def write_sample(out: Path, layout: str, spec: SampleSpec, progress: bool = True) -> SamplePlan:
    """Write a synthetic tree of `layout` under `out` (which must not exist or be empty)."""
    if layout not in LAYOUTS + EVALSET_LAYOUTS:
        raise PrepError(f"unknown layout {layout!r}; choose one of "
                        f"{', '.join(LAYOUTS + EVALSET_LAYOUTS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrepError(f"{out}: exists and is not an empty directory; choose a new path")
    pool = None
    if layout in ("imagenet-a", "imagenet-r"):
        from prep.scoring import subset_wnids

        pool = list(subset_wnids(layout))
    # every ILSVRC layout names val images as the real ones, with their real labels: prep
    # imagenet checks every official val name against them (prep.labels.check_official)
    plan = plan_sample(spec, pool, real_val=layout not in EVALSET_LAYOUTS)
    bar = progress_bar(total=_total(plan, layout), unit="img", desc=f"sample {layout}",
                       disable=not progress)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "ilsvrc2012-tar":
        _write_archives(out, plan, bar)
    elif layout in ("hf-tar", "hf-parquet"):
        _write_hf(out, plan, layout, bar)
    elif layout == "timm-wds":
        _write_timm_wds(out, plan, bar)
    elif layout == "blurred-tar":  # the release's train_blurred.tar.gz / val_blurred.tar.gz
        for split in ("train", "val"):
            members = [(rel, data) for rel, data in _layout_files(plan, "blurred")
                       if rel.startswith(f"{split}_blurred/")]
            with tarfile.open(out / f"{split}_blurred.tar.gz", "w:gz",
                              format=tarfile.GNU_FORMAT) as t:
                for rel, data in members:
                    _tar_add(t, rel, data)
                    bar.update()
    else:
        made: set[Path] = set()
        files = _evalset_files(plan, layout) if layout in EVALSET_LAYOUTS else \
            _layout_files(plan, layout)
        for rel, data in files:
            path = out / rel
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            if data:
                path.write_bytes(data)
            else:  # os-level create: 1.3 M zero-byte files in ~10 s instead of ~30 s
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            if rel.lower().endswith((".jpeg", ".jpg")):
                bar.update()
    bar.close()
    info = {"tool": f"prep {__version__}", "layout": layout, "spec": asdict(spec),
            "planted_bad_files": {f"{s}.JPEG": k for s, k in plan.bad.items()}}
    (out / "SAMPLE.json").write_text(json.dumps(info, indent=2) + "\n")
    return plan


def _write_hf(out: Path, plan: SamplePlan, layout: str, bar: Any) -> None:
    """Hugging Face `ILSVRC/imagenet-1k`: files renamed `<stem>_<wnid>.JPEG` (test: no
    suffix), in tar.gz archives (train over two) or Parquet files under data/."""
    rows: dict[str, list[tuple[str, bytes, int]]] = {"train": [], "val": [], "test": []}
    index = {w: i for i, w in enumerate(sorted(reference_words()))}
    for split, rel, data in _files(plan, val_folders=False):
        stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        wnid = rel.split("/")[0] if split == "train" else plan.val.get(stem)
        name = f"{stem}_{wnid}.JPEG" if wnid else f"{stem}.JPEG"
        rows[split].append((name, data, index[wnid] if wnid else -1))
    if layout == "hf-tar":
        groups = {"train_images_0.tar.gz": rows["train"][::2],
                  "train_images_1.tar.gz": rows["train"][1::2],
                  "val_images.tar.gz": rows["val"], "test_images.tar.gz": rows["test"]}
        for archive, members in groups.items():
            if members:
                with tarfile.open(out / archive, "w:gz", format=tarfile.GNU_FORMAT) as t:
                    for name, data, _ in members:
                        _tar_add(t, name, data)
                        bar.update()
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "data").mkdir()
    for split, prefix in (("train", "train"), ("val", "validation"), ("test", "test")):
        parts = [rows[split][::2], rows[split][1::2]] if split == "train" else [rows[split]]
        parts = [p for p in parts if p]
        for i, part in enumerate(parts):
            image = pa.array([{"bytes": d, "path": n} for n, d, _ in part],
                             pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
            table = pa.table({"image": image,
                              "label": pa.array([lab for _, _, lab in part], pa.int64())})
            pq.write_table(table, out / "data" / f"{prefix}-{i:05d}-of-{len(parts):05d}.parquet",
                           row_group_size=8)
            bar.update(len(part))


def _write_timm_wds(out: Path, plan: SamplePlan, bar: Any) -> None:
    """timm's `timm/imagenet-1k-wds` shards: `imagenet1k-train-NNNN.tar` and
    `imagenet1k-validation-NN.tar` with `jpg` + `cls` (global sorted-WNID index) samples,
    and its `_info.json` (splits, filenames, shard lengths; no class count)."""
    index = {w: i for i, w in enumerate(sorted(reference_words()))}
    samples: dict[str, list[tuple[str, bytes, int]]] = {"train": [], "validation": []}
    for split, rel, data in _files(plan, val_folders=False):
        stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        wnid = rel.split("/")[0] if split == "train" else plan.val.get(stem)
        if split in ("train", "val"):
            samples["train" if split == "train" else "validation"].append(
                (stem, data, index[wnid]))
    splits = {}
    for split, items in samples.items():
        n = 4 if split == "train" else 2
        digits = 4 if split == "train" else 2
        names, lengths = [], []
        for i in range(n):
            part = items[i::n]
            name = f"imagenet1k-{split}-{i:0{digits}d}.tar"
            with tarfile.open(out / name, "w", format=tarfile.GNU_FORMAT) as t:
                for stem, data, label in part:
                    _tar_add(t, f"{stem}.cls", str(label).encode())
                    _tar_add(t, f"{stem}.jpg", data)
                    bar.update()
            names.append(name)
            lengths.append(len(part))
        splits[split] = {"name": split, "num_samples": sum(lengths), "filenames": names,
                         "shard_lengths": lengths}
    (out / "_info.json").write_text(json.dumps({"name": "imagenet-1k", "splits": splits},
                                               indent=1) + "\n")


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1335830400, 0o644  # fixed: reproducible
    tar.addfile(info, io.BytesIO(data))


def _write_archives(out: Path, plan: SamplePlan, bar: Any) -> None:
    """The three original ILSVRC2012 downloads: a tar of per-class tars, a flat val tar
    and the devkit tar.gz (plus a flat test tar when test images are asked for)."""
    files = list(_files(plan, val_folders=False))
    with tarfile.open(out / TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
        for w in plan.wnids:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as t:
                for split, rel, data in files:
                    if split == "train" and rel.startswith(w + "/"):
                        _tar_add(t, rel.split("/", 1)[1], data)
                        bar.update()
            _tar_add(outer, f"{w}.tar", inner.getvalue())
    for split, name in (("val", VAL_TAR), ("test", TEST_TAR)):
        members = [(rel, data) for s, rel, data in files if s == split]
        if members:
            with tarfile.open(out / name, "w", format=tarfile.GNU_FORMAT) as t:
                for rel, data in members:
                    _tar_add(t, rel, data)
                    bar.update()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        for rel, data in _devkit_files(plan).items():
            _tar_add(t, rel, data)
    (out / f"{DEVKIT}.tar.gz").write_bytes(gzip.compress(raw.getvalue(), mtime=0))
