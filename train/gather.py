"""Every rank's kept predictions, collected on rank 0 for the predictions pickle (whose
format is prep/predictions.py's)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def gather_on_rank0(kept: dict, out: Path, rank: int, world: int) -> dict | None:
    """The union of every rank's `kept` ({sample key: ...}) on rank 0, through files beside
    `out` (`.NAME.rankR`, removed once read): no 200 MB object all-gather. None on the other
    ranks."""
    part = out.with_name(f".{out.name}.rank{rank}")
    torch.save(kept, part)
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    merged: dict = {}
    for r in range(world):
        p = out.with_name(f".{out.name}.rank{r}")
        merged |= torch.load(p, weights_only=True)
        p.unlink()
    return merged
