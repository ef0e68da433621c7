"""What `prep shard` is asked to do: the one declaration of each setting and its default.
`prep shard`'s options take their defaults from here; shards/build.py plans with it and
shards/write.py writes each shard by it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ShardSettings:
    splits: tuple[str, ...] = ("train", "val", "test")  # test only where meta/test.txt is
    num_shards: int | None = None  # per split; None: from samples_per_shard, else default
    samples_per_shard: int | None = None  # None: ~1250, the count rounded to a power of 2
    seed: int = 0  # of the train split's global permutation
    max_size: int | None = None  # px, longer side; None keeps sizes (pass-through)
    quality: int = 90  # JPEG quality of resized images
    on_error: str = "fail"  # undecodable image: "fail" stops, "skip" leaves it out, listed
    check: str = "full"  # full: entropy-decode every JPEG; header: trust complete headers

    @property
    def strict(self) -> bool:
        """Entropy-decode every JPEG (prep.jpeg.strict_problem)."""
        return self.check == "full"
