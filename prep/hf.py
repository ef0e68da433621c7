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
in parallel, one process each (prep.packed); every file is written under a temp name and
renamed, a rerun from the same inputs skips files already whole, and each split folder is
renamed from `.NAME.partial` only when all of its archives are done (records and reuse
rules: prep.extract). A partial download (`-00000-of-00002` without `-00001`, `train_images_1`
without `_0`) is refused before anything is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

from prep.classes import is_wnid, reference_words
from prep.errors import PrepError
from prep.extract import (
    CORRUPT,
    corrupt,
    member_origin,
    open_tar_stream,
    read_member,
)

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
            for split, paths in found.items():
                _check_complete(base, kind, split, paths)
            if found:
                for split in ("train", "val"):
                    if split not in found:
                        raise PrepError(f"{base}: a Hugging Face {kind[3:]} release without "
                                        f"its {split} files")
                return kind, found
    return None


def _check_complete(base: Path, kind: str, split: str, paths: list[Path]) -> None:
    """Every file of a split's numbered series: NNNNN-of-MMMMM (Parquet) or 0..N (tar)."""
    if kind == "hf-parquet":
        series = {}
        for p in paths:
            i, n = (int(x) for x in re.findall(r"\d+", p.name)[-2:])
            series.setdefault(n, set()).add(i)
        if len(series) > 1:
            raise PrepError(f"{base}: {split} files of two downloads (-of-{sorted(series)[0]:05d}"
                            f" and -of-{sorted(series)[1]:05d}); keep one set")
        (n, have), = series.items()
        missing = sorted(set(range(n)) - have)
        name = f"{paths[0].name.split('-')[0]}-{{:05d}}-of-{n:05d}.parquet"
    elif split == "train":  # val and test come in one archive each
        have = {int(re.findall(r"\d+", p.name)[-1]) for p in paths}
        missing = sorted(set(range(max(have) + 1)) - have)
        name = f"{split}_images_{{}}.tar.gz"
    else:
        return
    if missing:
        raise PrepError(f"{base}: {name.format(missing[0])} is missing ({len(missing)} "
                        f"{split} file(s) missing in all): the download is incomplete; "
                        "download the rest and rerun")


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


class Member(NamedTuple):
    """One image of a release file: `name` as the release names it (the member, or the
    row's `path`), `rel` its path once extracted, `wnid` its label from the name (None on
    test), `origin` how errors name it, `data` its bytes, `offset` where they start in the
    inflated tar (-1: a Parquet row)."""

    name: str
    rel: str
    wnid: str | None
    origin: str
    data: bytes
    offset: int = -1


def release_members(kind: str, path: Path, split: str, inflated: IO[bytes] | None = None
                    ) -> Iterator[Member]:
    """The images of one file of a Hugging Face release ("hf-tar" or "hf-parquet"), front to
    back, judged as the extraction judges them: a member that is not a flat regular file, a
    name without its WNID suffix, a label column that disagrees with it, a row without
    bytes: refused, naming the file and member or row. A damaged file is named.
    `inflated`: a tar.gz's tar, inflated already (prep.gzindex)."""
    if kind == "hf-tar":
        return _tar_members(path, split, inflated)
    return _parquet_rows(path, split)


def _tar_members(archive: Path, split: str, inflated: IO[bytes] | None) -> Iterator[Member]:
    n = 0
    try:
        with open(archive, "rb") as raw, open_tar_stream(inflated or raw) as tar:
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
                n += 1
                yield Member(m.name, rel, wnid, member_origin(archive, m.name, n - 1),
                             read_member(tar, m), m.offset_data)
    except (*CORRUPT, OSError) as exc:
        if isinstance(exc, PrepError):
            raise
        raise corrupt(archive, exc) from exc


PARQUET_COLUMNS = {"image", "label"}


def row_origin(path: Path, row: int, name: str) -> str:
    """How errors name a row of a Parquet file."""
    return f"{path} row {row} ({name!r})"


def _parquet_rows(path: Path, split: str) -> Iterator[Member]:
    import pyarrow.parquet as pq

    sorted_wnids = sorted(reference_words())
    index = {w: i for i, w in enumerate(sorted_wnids)}
    n = 0
    try:
        # batch by batch: Arrow's read-ahead (pre_buffer) held the file's whole image column
        f = pq.ParquetFile(path, pre_buffer=False)
        _check_schema(path, f.schema_arrow)
        batches = f.iter_batches(batch_size=256, columns=["image", "label"])
        for batch in batches:
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
                data = blobs[i].as_py()
                if data is None:  # (an empty file is extracted and listed as one)
                    raise PrepError(f"{where}: {name!r} has no image bytes (null); "
                                    "re-download this file")
                n += 1
                yield Member(name, rel, wnid, row_origin(path, n - 1, name), data)
    except PrepError:
        raise
    except (OSError, ValueError) as exc:
        raise PrepError(f"{path}: not a readable Parquet file ({exc}); re-download it, then "
                        "rerun: the files already extracted are kept") from exc


def _check_schema(path: Path, schema: object) -> None:
    """image: struct<bytes: binary, path: string>, label: integer (the release's schema)."""
    import pyarrow as pa

    names = set(schema.names)
    ok = names == PARQUET_COLUMNS
    if ok:
        image, label = schema.field("image").type, schema.field("label").type
        ok = (pa.types.is_struct(image) and {image.field(i).name for i in
              range(image.num_fields)} >= {"bytes", "path"} and pa.types.is_integer(label))
        if ok:
            ok = pa.types.is_binary(image.field("bytes").type) or \
                pa.types.is_large_binary(image.field("bytes").type)
            ok = ok and pa.types.is_string(image.field("path").type)
    if not ok:
        have = ", ".join(f"{f.name}: {f.type}" for f in schema)
        raise PrepError(f"{path}: schema {have}; the Hugging Face release has image: "
                        "struct<bytes: binary, path: string>, label: int64")
