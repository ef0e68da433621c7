"""Which sample goes into which shard: decided once, before any writing, so the result does
not depend on worker count or completion order."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from prep.scan import Problems
from shards.source import Sample

if TYPE_CHECKING:
    from shards.packed_scan import PackedRelease

TARGET_SAMPLES = 1250  # ~140 MB of ImageNet JPEGs (avg ~110 KB): within 100 MB .. 1 GB


@dataclass
class ShardPlan:
    split: str
    index: int
    samples: list[Sample]
    # `prep shard --src`: the samples are read in place from this archive; per sample
    # (offset of its bytes, size, source name `ARCHIVE:MEMBER`)
    archive: str = ""
    members: list[tuple[int, int, str]] | None = None
    # a compressed release (shards/packed_scan.py): the split's files; a member's offset is
    # then its sample_id (file number, member number), not a place in `archive`
    files: list[str] | None = None

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"

    def __reduce__(self):
        # sent to a worker as plain lists (pickled in C): ~5x cheaper than per-sample objects
        return _plan_from_columns, (self.split, self.index, self.archive, self.members,
                                    self.files, *map(list, zip(*self.samples)))


@dataclass
class ShardInput:
    """What one `prep shard` reads, planned: a view `prep imagenet` made (--data), or a
    release read in place (--src, shards/release.py)."""

    root: Path  # the view, or the release's folder
    wnids: list[str]  # classes in label order
    plans: list[ShardPlan]
    extra: dict  # the manifest's blocks about the input (evalset, release)
    record: Path | None  # the folder of the record of checked sources (None: none kept)
    problems: Problems | None = None  # --src: what the listing of the release found
    notes: list[str] = field(default_factory=list)
    # --src of a compressed release: its first pass (shards/packed_scan.PackedRelease)
    packed: PackedRelease | None = None


def _plan_from_columns(split: str, index: int, archive: str,
                       members: list[tuple[int, int, str]] | None, files: list[str] | None,
                       *columns: list) -> ShardPlan:
    return ShardPlan(split, index, list(map(Sample._make, zip(*columns))), archive, members,
                     files)


def default_num_shards(n: int) -> int:
    """n / 1250 rounded to the nearest power of two, at least 8 (so shards divide evenly
    among any power-of-two world_size x workers up to that count; ImageNet: 1024 train,
    64 val, like timm's published shards), at least 64 once that leaves >= 256 samples per
    shard, never more shards than samples."""
    raw = max(n / TARGET_SAMPLES, 1)
    shards = 2 ** round(math.log2(raw))
    shards = max(shards, 8, 64 if n >= 64 * 256 else 0)
    return max(1, min(shards, n))


def shard_count(num_samples: int, num_shards: int | None, samples_per_shard: int | None
                ) -> int:
    """A split's shard count from the options (--num-shards, else --samples-per-shard, else
    default_num_shards); never more than the samples (no empty shards)."""
    if num_shards:
        n = num_shards
    elif samples_per_shard:
        n = -(-num_samples // samples_per_shard)
    else:
        n = default_num_shards(num_samples)
    return min(n, num_samples)


def assign(split: str, samples: list[Sample], num_shards: int, seed: int,
           archive: str = "", members: list[tuple[int, int, str]] | None = None
           ) -> list[ShardPlan]:
    """Train: a seeded global permutation dealt round-robin (shard sizes differ by at most
    one). Other splits keep file order in contiguous, equally sized shards. `archive`,
    `members`: where each sample lies in an archive (ShardPlan), dealt with it."""
    n = len(samples)
    if split == "train":
        order = np.random.default_rng(seed).permutation(n)
        groups = [order[i::num_shards] for i in range(num_shards)]
    else:
        groups = np.array_split(np.arange(n), num_shards)
    return [ShardPlan(split, i, [samples[j] for j in g], archive,
                      [members[j] for j in g] if members is not None else None)
            for i, g in enumerate(groups)]
