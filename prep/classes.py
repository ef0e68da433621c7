"""The 1000 ILSVRC CLS-LOC classes and their three label spaces.

Sorted-WNID index (0..999, torchvision/Caffe/mmpretrain) is the toolkit's label.
ILSVRC2012_ID (1..1000, devkit `meta.mat` order) is kept in the class table because
the devkit ground truth and official submissions use it. The reference tables
ship as package data (copied from public ILSVRC metadata) so that a copy without
a devkit still gets the ID mapping.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import IO

from prep.errors import PrepError

WNID_RE = re.compile(r"n\d{8}", re.ASCII)  # \d alone matches any Unicode digit
NUM_CLASSES = 1000


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²', which int() rejects."""
    return text.isascii() and text.isdigit()


def is_wnid(name: str) -> bool:
    """True for a WordNet ID such as `n01440764`."""
    return WNID_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class ClassInfo:
    index: int  # sorted-WNID index, the label everywhere in this toolkit
    wnid: str
    words: str  # "tench, Tinca tinca"
    ilsvrc2012_id: int | None  # 1..1000 in devkit order; None when unknown


def _lines(source: str | Path | IO[str]) -> tuple[str, Iterable[str]]:
    if isinstance(source, (str, Path)):
        return str(source), Path(source).read_text(encoding="utf-8").splitlines()
    return getattr(source, "name", "<stream>"), source.read().splitlines()


def read_synset_words(source: str | Path | IO[str]) -> dict[str, str]:
    """Parse `n01440764 tench, Tinca tinca` lines (LOC_synset_mapping.txt, synset_words.txt)."""
    name, lines = _lines(source)
    words: dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        wnid, _, text = line.strip().partition(" ")
        if not is_wnid(wnid):
            raise PrepError(f"{name}:{lineno}: expected 'nXXXXXXXX words', got {line[:80]!r}")
        if wnid in words:
            raise PrepError(f"{name}:{lineno}: WNID {wnid} listed twice")
        words[wnid] = text.strip()
    return words


def read_map_clsloc(source: str | Path | IO[str]) -> dict[str, int]:
    """Parse the devkit's `map_clsloc.txt` (`n02119789 1 kit_fox`) into WNID -> ILSVRC2012_ID."""
    name, lines = _lines(source)
    ids: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not is_wnid(parts[0]) or not _is_number(parts[1]):
            raise PrepError(f"{name}:{lineno}: expected 'nXXXXXXXX ID name', got {line[:80]!r}")
        ids[parts[0]] = int(parts[1])
    _check_ids(name, ids)
    return ids


def read_meta_mat(fileobj: str | Path | IO[bytes], name: str = "meta.mat") -> dict[str, int]:
    """WNID -> ILSVRC2012_ID for the leaf synsets (`num_children == 0`) of a devkit meta.mat."""
    from scipy.io import loadmat  # lazy: scipy is only needed for the 2012 devkit

    try:
        synsets = loadmat(fileobj, squeeze_me=True)["synsets"]
        ids = {
            str(s["WNID"]): int(s["ILSVRC2012_ID"])
            for s in synsets
            if int(s["num_children"]) == 0
        }
    except PrepError:
        raise
    except Exception as exc:  # scipy raises many types for a damaged file
        raise PrepError(
            f"{name}: cannot read the devkit's synsets table ({type(exc).__name__}: {exc}); "
            "expected the meta.mat of ILSVRC2012_devkit_t12"
        ) from exc
    _check_ids(name, ids)
    return ids


def _check_ids(name: str, ids: dict[str, int]) -> None:
    bad = [w for w in ids if not is_wnid(w)]
    if bad:
        raise PrepError(f"{name}: not a WNID: {bad[:3]}")
    if len(set(ids.values())) != len(ids):
        raise PrepError(f"{name}: the same ILSVRC2012_ID is given to two WNIDs")


def package_data(name: str) -> bytes:
    """Bytes of a file shipped in prep/data (the public ILSVRC metadata)."""
    return resources.files("prep").joinpath("data", name).read_bytes()


@cache
def reference_words() -> dict[str, str]:
    """The 1000 CLS-LOC classes in sorted order with their words (shipped LOC_synset_mapping)."""
    return read_synset_words(io.StringIO(package_data("LOC_synset_mapping.txt").decode()))


@cache
def reference_ids() -> dict[str, int]:
    """WNID -> ILSVRC2012_ID from the shipped devkit `map_clsloc.txt`."""
    return read_map_clsloc(io.StringIO(package_data("map_clsloc.txt").decode()))


@cache
def reference_val_labels() -> dict[str, str]:
    """The real ILSVRC2012 val labels: `ILSVRC2012_val_00000001` -> `n01751748` (50,000)."""
    # the shipped file is parsed by one regular expression (36 ms, against 110 ms through
    # read_loc_csv's per-row checks, on every `prep imagenet`); a test holds the two equal
    text = gzip.decompress(package_data("LOC_val_solution.csv.gz")).decode()
    return dict(re.findall(r"^(ILSVRC2012_val_\d{8}),(n\d{8})", text, re.MULTILINE))


def read_loc_csv(source: IO[str], name: str) -> dict[str, str]:
    """Parse Kaggle `LOC_*_solution.csv`: `ImageId,PredictionString` -> first WNID token."""
    reader = csv.reader(source)
    try:
        return _loc_rows(reader, name)
    except csv.Error as exc:  # e.g. a bare carriage return inside a field
        raise PrepError(f"{name}:{reader.line_num}: malformed CSV ({exc})") from exc


def _loc_rows(reader: Iterable[list[str]], name: str) -> dict[str, str]:
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
        raise PrepError(f"{name}:1: expected header 'ImageId,PredictionString', got {header}")
    labels: dict[str, str] = {}
    for lineno, row in enumerate(reader, 2):
        if not row:
            continue
        tokens = row[1].split() if len(row) == 2 else []
        if not tokens or not is_wnid(tokens[0]):
            raise PrepError(f"{name}:{lineno}: expected 'ImageId,nXXXXXXXX ...', got {row}")
        wnids = {t for t in tokens if t.startswith("n")}
        if len(wnids) > 1:
            raise PrepError(f"{name}:{lineno}: one image labelled with several classes {wnids}")
        if row[0] in labels:
            raise PrepError(f"{name}:{lineno}: image {row[0]} listed twice")
        labels[row[0]] = tokens[0]
    return labels


def build_class_table(wnids: Iterable[str], ids: dict[str, int] | None = None) -> list[ClassInfo]:
    """Classes sorted by WNID, labelled 0..N-1 (what ImageFolder does), with words and
    ILSVRC2012_ID from `ids` (a devkit) or the shipped reference."""
    words = reference_words()
    ids = reference_ids() if ids is None else ids
    return [
        ClassInfo(index=i, wnid=w, words=words.get(w, ""), ilsvrc2012_id=ids.get(w))
        for i, w in enumerate(sorted(set(wnids)))
    ]


def classes_csv(classes: list[ClassInfo]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "wnid", "ilsvrc2012_id", "words"])
    for c in classes:
        w.writerow([c.index, c.wnid, c.ilsvrc2012_id or "", c.words])
    return buf.getvalue()
