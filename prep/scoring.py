"""How the evaluation sets papers report beside ImageNet val are scored, and their classes.

- ImageNet-ReaL (Beyer et al. 2020, `real.json`, Apache-2.0, shipped): for val image i
  (`ILSVRC2012_val_{i+1:08d}`) a list of sorted-WNID indices, every one a right answer; an
  empty list leaves the image out of numerator and denominator.
- ImageNet-A and ImageNet-R: 200 classes each (shipped lists); a 1000-class model is scored
  with its logits restricted to those 200 classes (as the papers and timm's
  `--valid-labels` do); labels stay in the 1000-class space.
- ImageNetV2 (three variants) and ImageNet-Sketch: all 1000 classes, scored as val.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from prep.classes import package_data, reference_words

RESTRICTED = {"imagenet-a": "imagenet_a_wnids.txt", "imagenet-r": "imagenet_r_wnids.txt"}


@cache
def subset_wnids(kind: str) -> tuple[str, ...] | None:
    """The 200 WNIDs of ImageNet-A / -R (sorted); None for the 1000-class sets."""
    if kind not in RESTRICTED:
        return None
    return tuple(package_data(RESTRICTED[kind]).decode().split())


@cache
def global_index() -> dict[str, int]:
    """WNID -> index in the 1000-class sorted-WNID space."""
    return {w: i for i, w in enumerate(sorted(reference_words()))}


@cache
def real_labels() -> tuple[tuple[int, ...], ...]:
    """ReaL's 50,000 label lists (sorted-WNID indices), list i for val image i + 1."""
    lists = json.loads(gzip.decompress(package_data("real.json.gz")))
    return tuple(tuple(x) for x in lists)


_VAL = re.compile(r"ILSVRC2012_val_(\d{8})")


@cache
def _official() -> dict[str, int]:
    from prep.classes import reference_val_labels

    gi = global_index()
    return {stem: gi[w] for stem, w in reference_val_labels().items()}


def official_label(key_or_path: str) -> int | None:
    """The official ILSVRC2012 val label (global sorted-WNID index) of a val image, or None.
    ReaL is reported only when a copy's val labels are these: a synthetic or relabelled
    set reusing the file names would get meaningless ReaL numbers."""
    m = _VAL.search(key_or_path.rsplit("/", 1)[-1])
    return _official().get(f"ILSVRC2012_val_{m.group(1)}") if m else None


def real_for(key_or_path: str) -> tuple[int, ...] | None:
    """ReaL's answers for a val image named by its key or path (`.JPEG` or `.jpg`, any
    folder); None when it is not an ILSVRC2012 val image or ReaL leaves it out."""
    m = _VAL.search(key_or_path.rsplit("/", 1)[-1])
    if not m:
        return None
    i = int(m.group(1)) - 1
    labels = real_labels()
    return labels[i] if 0 <= i < len(labels) and labels[i] else None


@dataclass
class RealTally:
    """ReaL top-1/top-5, the one scorer (the trainer's evaluation, `prep export-preds`).
    `to_global`: the model's class index -> sorted-WNID index. One labelled sample whose
    label is not the official one for its name (a synthetic or relabelled set reusing the
    names) and there is no result: ReaL describes ImageNet's val photos, not those."""

    to_global: Sequence[int]
    top1: int = 0
    top5: int = 0
    n: int = 0
    unlike: int = 0  # labelled samples whose label is not the official one

    def add(self, name: str, label: int, top5: Sequence[int]) -> None:
        """One sample: its key or path, its label (-1: unlabelled), the model's top-5 class
        indices, best first."""
        if label >= 0 and official_label(name) not in (None, self.to_global[label]):
            self.unlike += 1
        answers = real_for(name)
        if answers:
            row = [int(self.to_global[i]) for i in top5]
            self.top1 += row[0] in answers
            self.top5 += any(x in answers for x in row)
            self.n += 1

    def counts(self) -> list[int]:
        """(top1, top5, n, unlike): what ranks sum before `result`."""
        return [self.top1, self.top5, self.n, self.unlike]

    def result(self) -> dict | None:
        """{"real_top1", "real_top5" (fractions), "real_samples"}, or None (none counted, or
        labels unlike the official ones)."""
        if self.unlike or not self.n:
            return None
        return {"real_top1": self.top1 / self.n, "real_top5": self.top5 / self.n,
                "real_samples": self.n}
