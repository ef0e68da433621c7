"""The Hugging Face Hub's ImageNet (`ILSVRC/imagenet-1k`), tar and Parquet releases, brought
back to the original ILSVRC file names.

- Tar: `train_images_0.tar.gz` .. `train_images_4.tar.gz`, `val_images.tar.gz`,
  `test_images.tar.gz` (possibly under `data/`); flat members named
  `n01440764_10026_n01440764.JPEG` (train) and `ILSVRC2012_val_00000001_n01751748.JPEG`
  (val): the label is the WNID suffix. Test names have none.
- Parquet: `data/{train,validation,test}-NNNNN-of-NNNNN.parquet`, columns `image` (struct
  of `bytes`, `path`) and `label` (sorted-WNID index, -1 on test); `path` keeps the suffix.
  The label column is cross-checked against the suffix. (The release's class *names* are
  made unique by renaming, `crane` / `crane2`: classes are mapped by WNID, never by name.)

Both are extracted into `--extract-to` as `train/<wnid>/<stem>.JPEG`, flat `val/` and
`test/`, with the suffix stripped; val's suffix labels become a label source cross-checked
against the real val labels the package ships. Archives (and Parquet files) are extracted
in parallel, one process each; every file is written under a temp name and renamed, a
rerun skips files already whole, and each split folder is renamed from `.NAME.partial`
only when all of its archives are done.
"""

from __future__ import annotations

import os
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prep.classes import is_wnid, reference_words
from prep.errors import PrepError
from prep.extract import corrupt, write_member
from prep.progress import progress_bar
from prep.workers import pool_worker_init

_SUFFIXED = re.compile(r"(?P<stem>[A-Za-z0-9_.\-]+)_(?P<wnid>n\d{8})\.(?P<ext>JPEG|jpeg|jpg)")
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\.(JPEG|jpeg|jpg)")
TAR_NAMES = {"train": re.compile(r"train_images_\d+\.tar\.gz"),
             "val": re.compile(r"val_images\.tar\.gz"), "test": re.compile(r"test_images\.tar\.gz")}
PARQUET_NAMES = {"train": re.compile(r"train-\d+-of-\d+\.parquet"),
                 "val": re.compile(r"validation-\d+-of-\d+\.parquet"),
                 "test": re.compile(r"test-\d+-of-\d+\.parquet")}


def find_release(src: Path) -> tuple[str, dict[str, list[Path]]] | None:
    """("hf-tar" | "hf-parquet", {split: files}) when `src` (or `src/data`) holds a release."""
    for base in (src, src / "data"):
        if not base.is_dir():
            continue
        names = sorted(os.listdir(base))
        for kind, patterns in (("hf-tar", TAR_NAMES), ("hf-parquet", PARQUET_NAMES)):
            found = {split: [base / n for n in names if p.fullmatch(n)]
                     for split, p in patterns.items()}
            found = {k: v for k, v in found.items() if v}
            if found:
                for split in ("train", "val"):
                    if split not in found:
                        raise PrepError(f"{base}: a Hugging Face {kind[3:]} release without "
                                        f"its {split} files")
                return kind, found
    return None


def original_name(split: str, name: str, where: str) -> tuple[str, str | None]:
    """(path under the split folder, WNID) of a release file name: the suffix stripped,
    train images placed in their class folder; test names have no suffix."""
    name = name.rsplit("/", 1)[-1]
    if split == "test":
        if not _PLAIN.fullmatch(name):
            raise PrepError(f"{where}: test file name {name!r} is not a plain image name")
        return name, None
    m = _SUFFIXED.fullmatch(name)
    if not m or not is_wnid(m["wnid"]):
        raise PrepError(f"{where}: {name!r} does not end in _<wnid>.JPEG (the Hugging Face "
                        "release's naming); refusing to guess its label")
    stem, wnid = m["stem"], m["wnid"]
    if wnid not in reference_words():
        raise PrepError(f"{where}: {name!r}: {wnid} is not one of the 1000 ImageNet classes")
    if split == "train":
        if not stem.startswith(f"{wnid}_"):
            raise PrepError(f"{where}: {name!r}: the suffix says {wnid}, the name says "
                            f"{stem.split('_', 1)[0]}; refusing to guess its label")
        return f"{wnid}/{stem}.JPEG", wnid
    return f"{stem}.JPEG", wnid


@dataclass
class Extracted:
    files: int
    labels: dict[str, str]  # val stem -> wnid from the suffixes (val only)


def _tar_job(archive: Path, split: str, partial: Path) -> Extracted:
    labels: dict[str, str] = {}
    made: set[str] = set()
    n = 0
    try:
        with tarfile.open(archive, "r|gz") as tar:
            for m in tar:
                if m.isdir():
                    continue
                if not m.isfile():
                    raise PrepError(f"{archive}: member {m.name!r} is not a plain file; "
                                    "refusing to extract")
                if "/" in m.name.strip("./") or m.name.startswith("/") or ".." in m.name:
                    raise PrepError(f"{archive}: member {m.name!r} is not a flat file name; "
                                    "refusing to extract")
                rel, wnid = original_name(split, m.name, str(archive))
                if split == "train" and wnid not in made:
                    (partial / wnid).mkdir(exist_ok=True)
                    made.add(wnid)
                write_member(partial / rel, tar.extractfile(m), m.size)
                if split == "val":
                    labels[rel.rsplit(".", 1)[0]] = wnid
                n += 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, PrepError):
            raise
        raise corrupt(archive, exc) from exc
    return Extracted(n, labels)


PARQUET_COLUMNS = {"image", "label"}


def _parquet_job(path: Path, split: str, partial: Path) -> Extracted:
    import pyarrow.parquet as pq

    sorted_wnids = sorted(reference_words())
    index = {w: i for i, w in enumerate(sorted_wnids)}
    labels: dict[str, str] = {}
    made: set[str] = set()
    n = 0
    try:
        f = pq.ParquetFile(path)
        names = set(f.schema_arrow.names)
        if names != PARQUET_COLUMNS:
            raise PrepError(f"{path}: columns {sorted(names)}; the Hugging Face release has "
                            f"{sorted(PARQUET_COLUMNS)} (image: bytes + path, label)")
        for batch in f.iter_batches(batch_size=256, columns=["image", "label"]):
            images = batch.column("image")
            paths = images.field("path").to_pylist()
            blobs = images.field("bytes")
            for i, (name, label) in enumerate(zip(paths, batch.column("label").to_pylist())):
                where = f"{path} row {n}"
                if name is None:
                    raise PrepError(f"{where}: no image path")
                rel, wnid = original_name(split, name, where)
                if split != "test" and label != index[wnid]:
                    have = sorted_wnids[label] if isinstance(label, int) and \
                        0 <= label < len(sorted_wnids) else "no class"
                    raise PrepError(f"{where}: {name!r} says {wnid} (label "
                                    f"{index[wnid]}), the label column says "
                                    f"{label} ({have}); refusing to guess")
                if split == "test" and label not in (-1, None):
                    raise PrepError(f"{where}: a test image with label {label} (expected -1)")
                if split == "train" and wnid not in made:
                    (partial / wnid).mkdir(exist_ok=True)
                    made.add(wnid)
                data = blobs[i].as_py()
                write_member(partial / rel, data, len(data))
                if split == "val":
                    labels[rel.rsplit(".", 1)[0]] = wnid
                n += 1
    except PrepError:
        raise
    except (OSError, ValueError) as exc:
        raise PrepError(f"{path}: not a readable Parquet file ({exc}); re-download it, then "
                        "rerun: the files already extracted are kept") from exc
    return Extracted(n, labels)


def extract_release(kind: str, files: dict[str, list[Path]], dest: Path, workers: int,
                    progress: bool = True) -> tuple[dict[str, Path], dict[str, str]]:
    """Extract every split into `dest/<split>` in parallel; ({split: dir}, val labels)."""
    job = _tar_job if kind == "hf-tar" else _parquet_job
    dirs, labels, todo = {}, {}, []
    for split, paths in files.items():
        final = dest / split
        dirs[split] = final
        if final.is_dir():
            if split == "val":
                labels |= _read_labels(dest / ".val.labels.tsv")
            continue  # finished by an earlier run
        partial = dest / f".{split}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        todo += [(p, split, partial) for p in paths]
    total = sum(p.stat().st_size for p, _, _ in todo)
    bar = progress_bar(total=total, unit="B", desc=f"extract {kind}", disable=not progress)
    done: dict[str, list[Extracted]] = {}
    with ProcessPoolExecutor(max(1, min(workers, len(todo) or 1)),
                             initializer=pool_worker_init) as pool:
        futures = {pool.submit(job, p, split, partial): (p, split) for p, split, partial in todo}
        for f, (p, split) in futures.items():
            done.setdefault(split, []).append(f.result())
            bar.update(p.stat().st_size)
    bar.close()
    for split in {s for _, s, _ in todo}:
        partial = dest / f".{split}.partial"
        split_labels = {k: v for e in done[split] for k, v in e.labels.items()}
        if split == "val":  # beside the folder, written before it is renamed final
            (dest / ".val.labels.tsv").write_text(
                "".join(f"{k}\t{v}\n" for k, v in sorted(split_labels.items())))
        os.replace(partial, dest / split)
        labels |= split_labels
    return dirs, labels


def _read_labels(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise PrepError(f"{path}: missing (the val labels of an earlier extraction); remove "
                        f"{path.parent / 'val'} and rerun to extract val again")
    return dict(line.split("\t") for line in path.read_text().splitlines() if line)
