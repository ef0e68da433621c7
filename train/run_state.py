"""What a step checkpoint holds beside the model and optimizer, and the checks on resume:
every rank's RNG streams, the epoch's running sums over all ranks, and the fingerprint of
the data the position refers to (a position in another split, seed or shard set would
silently train on the wrong samples)."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
import torch.distributed as dist

from prep.errors import PrepError


def gather(value: object, group: object | None) -> list:
    """`value` from every rank, in rank order (one element without a process group)."""
    if group is None:
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=group)
    return out


def rng_state() -> dict:
    """This process's random streams: torch (CPU and this GPU), Python's, NumPy's."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       *np_state[2:])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def data_fingerprint(keys: list[str], shards: list[str], seed: int, window: int = 0) -> dict:
    """What a saved position refers to: the split's keys in index order, its shard files
    and the order's seed and shard window (object storage; 0 on local disk)."""
    digest = hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()
    names = sorted({s.rsplit("/", 1)[-1] for s in set(shards)})  # a shard per ~1,250 rows
    return {"num_samples": len(keys), "keys_sha256": digest,
            "shards_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
            "num_shards": len(names), "seed": seed, "window": window}


WHAT = {"num_samples": "train samples", "keys_sha256": "train sample keys (index.parquet)",
        "shards_sha256": "shard files", "num_shards": "shard files", "seed": "seed",
        "window": "shard_window (the order shuffles shards in windows on object storage)"}


def check_fingerprint(saved: dict | None, mine: dict, src: str, data: str) -> None:
    """Refuse a step checkpoint whose position refers to other data, naming the
    difference."""
    if saved is None:
        return
    for name in ("seed", "num_samples", "num_shards", "shards_sha256", "keys_sha256", "window"):
        if saved.get(name, 0 if name == "window" else None) != mine[name]:
            have = (f"{saved.get(name, 0)} vs {mine[name]}" if name in
                    ("seed", "num_samples", "num_shards", "window") else "they differ")
            raise PrepError(f"{src}: its position is in other data than {data}: "
                            f"{WHAT[name]} ({name}: {have}). Resuming would train on the "
                            "wrong samples: resume with the same shards and seed, or start a "
                            "new --output-dir")
