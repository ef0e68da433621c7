"""`init_process_group` that survives torchrun restarts (`--max-restarts N`).

torchrun's agent hosts the TCPStore the workers rendezvous through, and keeps the same
store, with the keys of the failed attempt still in it, when it restarts the workers
(torch 2.14; pytorch/pytorch#135712, #167288). A restarted rank can then read a dead
peer's address and fail with "Gloo connectFullMesh failed ... Connection refused" (or, with
NCCL, a stale unique id). Measured here: after a rank was SIGKILLed under
`--max-restarts=1`, the restarted job failed to connect in 3 of 5 trials without this, 0 of 5
with it (docs/reliability.md).

On one node the restart count is the same for every worker, so each attempt gets its own
key namespace. Across nodes each agent counts its own restarts (pytorch/pytorch#108158),
so there the fix is torchrun's own switch, `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` (a new
store per attempt), which scripts/slurm_train.sh sets; without it a warning says so.
"""

from __future__ import annotations

import os
import warnings

import torch.distributed as dist


def init_process_group(backend: str) -> None:
    env = os.environ
    shared_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if not (shared_store and restarts > 0):
        dist.init_process_group(backend)
        return
    if int(env.get("GROUP_WORLD_SIZE", "1")) > 1:
        warnings.warn("torchrun --max-restarts with several nodes: export "
                      "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun, or a restarted "
                      "job can fail to connect (pytorch/pytorch#135712)", stacklevel=2)
        dist.init_process_group(backend)
        return
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"prep/attempt-{attempt}", store),
                            rank=rank, world_size=world)
