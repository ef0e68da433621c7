"""Read the dataset `prep imagenet` prepared (DIR/imagenet with meta/*.txt) as sample lists."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from prep.errors import PrepError
from prep.evalset import evalset_key
from prep.formats import VIEW, refuse_newer
from prep.scan import sample_key


class Sample(NamedTuple):  # a tuple: cheap to make 1.28 M of and to send to the workers
    key: str  # file stem: unique within its split, no dots (webdataset splits at the first)
    path: str  # relative to DATA/<split>, as in meta/<split>.txt
    label: int  # sorted-WNID index; -1 for unlabelled test
    wnid: str  # "" for test
    line: int  # line in meta/<split>.txt, for error messages


def read_classes(data: Path) -> list[str]:
    """WNIDs in label order from meta/classes.csv (or meta/synsets.txt), from a view this
    prep can read (meta/prep.json's format)."""
    meta = data / "meta"
    try:
        made = json.loads((meta / "prep.json").read_text())
    except (OSError, ValueError):
        made = None
    refuse_newer(made, VIEW, str(meta / "prep.json"), "rerun `prep imagenet` with this one")
    table = meta / "classes.csv"
    if table.is_file():
        with open(table, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or any(int(r["index"]) != i for i, r in enumerate(rows)):
            raise PrepError(f"{table}: expected rows index,wnid,... numbered 0..N-1")
        return [r["wnid"] for r in rows]
    synsets = meta / "synsets.txt"
    if synsets.is_file():
        return synsets.read_text().split()
    raise PrepError(f"{meta}: no classes.csv or synsets.txt; run `prep imagenet` first "
                    "(--data is the imagenet/ dir it made, e.g. data/imagenet)")


def read_samples(data: Path, split: str, wnids: list[str], class_keys: bool = False
               ) -> list[Sample]:
    """Samples of meta/<split>.txt; labels checked against the class table and folders.
    `class_keys`: keys carry the class (`<wnid>_<stem>`: evaluation sets, whose file names
    repeat across classes)."""
    ann = data / "meta" / f"{split}.txt"
    if not ann.is_file():
        raise PrepError(f"{ann}: missing; `prep imagenet` writes it (or drop {split} "
                        "from --splits)")
    with open(ann, encoding="utf-8") as f:
        return parse_samples(f, str(ann), split, wnids, class_keys)


def parse_samples(lines: Iterable[str], where: str, split: str, wnids: list[str],
                  class_keys: bool = False) -> list[Sample]:
    """Samples of the lines of a meta/<split>.txt (`where` names it in errors). Built column
    by column: a line in the folder, with the label, of the line before it needs no second
    check of them (1.28 M train lines: 4.0-4.3 s instead of 6.2-8.5 s line by line, and
    2.1-2.3 s with the collector paused, as shards.build plans: prep.gcpause)."""
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[str] = []
    labels: list[int] = []
    folders: list[str] = []
    numbers: list[int] = []
    prefix, last_lab, label, wnid = "\0", "", -1, ""  # the folder and label just checked
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        if split == "test":
            path = text
        else:
            path, _, lab = text.rpartition(" ")
            if lab != last_lab or not path.startswith(prefix):
                label, wnid = _checked_label(path, lab, text, index, f"{where}:{n}")
                prefix, last_lab = wnid + "/", lab
        paths.append(path)
        labels.append(label)
        folders.append(wnid)
        numbers.append(n)
    if not paths:
        raise PrepError(f"{where}: no samples")
    if class_keys:
        keys = [evalset_key(w, p.rsplit("/", 1)[-1]) for w, p in zip(folders, paths)]
    else:
        keys = list(map(sample_key, paths))
    if len(set(keys)) != len(keys):
        first: dict[str, int] = {}
        for key, n in zip(keys, numbers):
            if key in first:
                raise PrepError(f"{where}:{n}: sample key {key!r} repeats line {first[key]}")
            first[key] = n
    return list(map(Sample._make, zip(keys, paths, labels, folders, numbers)))


def _checked_label(path: str, lab: str, text: str, index: dict[str, int], where: str
                   ) -> tuple[int, str]:
    """(label, folder) of a `path label` line, both checked against the class table."""
    digits = lab.lstrip("-")
    if not path or not (digits.isascii() and digits.isdigit()):
        raise PrepError(f"{where}: expected 'path label', got {text[:80]!r}")
    label, wnid = int(lab), path.split("/", 1)[0]
    if not 0 <= label < len(index):
        raise PrepError(f"{where}: label {label} out of range 0..{len(index) - 1}")
    if index.get(wnid) != label:
        raise PrepError(f"{where}: label {label} but folder {wnid} is class "
                        f"{index.get(wnid, 'unknown')} in meta/classes.csv")
    return label, wnid


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
